"""The layers of ../shared/design/layout.md: imports run one way, SQL lives in the repositories,
and job statuses are written only by the lifecycle.

    ops  →  {api, worker}  →  service  →  sharp_core

Every module's imports are read with `ast`, including the lazy ones inside functions, so an
import that hides from the module top is caught too. These tests parse files; they import
nothing from the project.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: package -> the project packages it may import (itself always allowed).
ALLOWED: dict[str, set[str]] = {
    "sharp_core": set(),
    "service": {"sharp_core"},
    "api": {"service", "sharp_core"},
    "worker": {"service", "sharp_core"},
    "ops": {"api", "worker", "service", "sharp_core"},
    "migrations": {"service", "sharp_core"},
}
PROJECT = {"sharp_core", "service", "api", "worker", "ops", "bench", "migrations", "tests"}

#: The only modules allowed to hold SQL.
SQL_HOMES = {"service/repositories.py"}

#: Names whose call builds or runs SQL.
SQL_CALLS = {"select", "insert", "update", "delete", "text", "exec_driver_sql", "execute"}
SQL_CALLS_QUALIFIED = {"query", "scalar", "scalars", "with_for_update"}


def modules(*packages: str) -> Iterator[Path]:
    for pkg in packages:
        yield from sorted((ROOT / pkg).rglob("*.py"))


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def imported_packages(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """(line, top-level package) of every absolute import anywhere in the module."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module.split(".")[0]


def layer_violations(path: Path, source: str) -> list[str]:
    layer = rel(path).split("/")[0]
    allowed = ALLOWED[layer] | {layer}
    out = []
    for line, pkg in imported_packages(ast.parse(source)):
        if pkg in PROJECT and pkg not in allowed:
            out.append(f"{rel(path)}:{line} imports {pkg}")
    return out


def sql_violations(path: Path, source: str) -> list[str]:
    """Calls that build or run SQL: sqlalchemy's select/insert/update/delete/text (imported
    or qualified), ``session.execute``/``scalar``/``scalars``/``query``, raw driver SQL."""
    tree = ast.parse(source)
    sql_imports = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sqlalchemy"):
            sql_imports |= {a.asname or a.name for a in node.names} & SQL_CALLS
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Name) and f.id in sql_imports:
            out.append(f"{rel(path)}:{node.lineno} {f.id}()")
        elif isinstance(f, ast.Attribute) and (
            f.attr in SQL_CALLS - {"text"} or f.attr in SQL_CALLS_QUALIFIED
        ):
            # cursor.execute / session.execute / session.scalar / sa.select …; `str.replace`,
            # `dict.update` and friends are not SQL, so `update`/`delete` count only on sqlalchemy
            if f.attr == "execute" and isinstance(f.value, ast.Name) and f.value.id == "pipe":
                continue  # a Redis pipeline (service.live)
            if f.attr in {"update", "delete"}:
                base = f.value
                if not (isinstance(base, ast.Name) and base.id in {"sa", "sqlalchemy"}):
                    continue
            out.append(f"{rel(path)}:{node.lineno} .{f.attr}()")
    return out


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_run_down_the_layers(package: str) -> None:
    bad = []
    for path in modules(package):
        bad += layer_violations(path, path.read_text(encoding="utf-8"))
    assert not bad, "imports that run up or sideways:\n" + "\n".join(bad)


def test_no_sql_outside_the_repositories() -> None:
    bad = []
    for path in modules("service", "api", "worker", "ops"):
        if rel(path) in SQL_HOMES:
            continue
        bad += sql_violations(path, path.read_text(encoding="utf-8"))
    assert not bad, "SQL outside service/repositories.py:\n" + "\n".join(bad)


def test_only_the_lifecycle_writes_job_statuses() -> None:
    """``JobRepository.transition`` (the status write) is called from service/lifecycle.py
    only, and nothing else assigns a ``status`` on a row."""
    bad = []
    for path in modules("service", "api", "worker", "ops"):
        if rel(path) in {"service/lifecycle.py", "service/repositories.py"}:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "transition"
            ):
                bad.append(f"{rel(path)}:{node.lineno} .transition()")
            if isinstance(node, ast.Assign | ast.AugAssign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    # `self.status`: an object's own field (ops.follow's client-side state)
                    if (
                        isinstance(t, ast.Attribute)
                        and t.attr == "status"
                        and not (isinstance(t.value, ast.Name) and t.value.id == "self")
                    ):
                        bad.append(f"{rel(path)}:{node.lineno} .status = …")
    assert not bad, "status writes outside service/lifecycle.py:\n" + "\n".join(bad)


# -- the checks themselves catch what they should -------------------------------------------


@pytest.mark.parametrize(
    ("path", "source", "expected"),
    [
        (
            "api/x.py",
            "def f():\n    from worker.tasks import dispatch\n",
            ["api/x.py:2 imports worker"],
        ),
        ("worker/x.py", "import api.app\n", ["worker/x.py:1 imports api"]),
        ("service/x.py", "from ops import cli\n", ["service/x.py:1 imports ops"]),
        ("service/x.py", "from api.schemas import JobPublic\n", ["service/x.py:1 imports api"]),
        (
            "sharp_core/x.py",
            "from service.db import Database\n",
            ["sharp_core/x.py:1 imports service"],
        ),
        ("ops/x.py", "from api.app import create_app\nimport worker.tasks\n", []),
        ("api/x.py", "from service.db import Database\nimport sharp_core.spec\n", []),
    ],
)
def test_layer_check_sees_lazy_and_upward_imports(
    path: str, source: str, expected: list[str]
) -> None:
    assert layer_violations(ROOT / path, source) == expected


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from sqlalchemy import select\nq = select(1)\n", ["api/x.py:2 select()"]),
        ("def f(s):\n    s.execute(x)\n", ["api/x.py:2 .execute()"]),
        ("import sqlalchemy as sa\nsa.update(T)\n", ["api/x.py:2 .update()"]),
        ("from sqlalchemy import text as t\n", []),
        ("from sqlalchemy import text\ntext('SELECT 1')\n", ["api/x.py:2 text()"]),
        ("d = {}\nd.update(a=1)\n'x'.replace('a', 'b')\n", []),
        ("def f(s):\n    return s.scalar(q)\n", ["api/x.py:2 .scalar()"]),
    ],
)
def test_sql_check_sees_queries(source: str, expected: list[str]) -> None:
    assert sql_violations(ROOT / "api/x.py", source) == expected
