"""The layers of ../shared/design/layout.md: imports run one way, SQL lives in the repositories,
and job statuses are written only by the lifecycle.

    ops  →  {api, worker}  →  service  →  sharp_core

Every module's imports are read with `ast`, including the lazy ones inside functions, so an
import that hides from the module top is caught too. These tests parse files; they import
nothing from the project.

No circles either, inside a package as between packages (a strongly connected component of
the module import graph with more than one module fails, naming its edges), and inside
`sharp_core/` the sub-packages keep their order (`SHARP_CORE_ORDER`). ``python
tests/test_layout.py`` prints the cycles and sharp_core's sub-package edges.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator, Mapping
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


# -- no circles ----------------------------------------------------------------------------------

#: The packages whose module graph must have no cycle.
GRAPH_PACKAGES = ("service", "api", "worker", "ops", "sharp_core")


def module_of(path: str) -> str:
    """``service/jobs.py`` -> ``service.jobs``; ``api/routes/__init__.py`` -> ``api.routes``."""
    parts = path.removesuffix(".py").split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the nodes under ``if TYPE_CHECKING:`` (never run, so never a circle)."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            t = node.test
            if (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
                isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
            ):
                out |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return out


def import_edges(path: str, source: str, known: set[str]) -> list[tuple[int, str]]:
    """(line, module) for every import of a `known` module anywhere in `source` (lazy ones in
    functions included, ``if TYPE_CHECKING:`` ones excluded). ``from pkg import name`` is an
    edge to ``pkg.name`` where that is a module, else to ``pkg``. The parent packages an import
    also runs are not counted: a package ``__init__`` that re-exports its modules, which
    import each other by full name, is the usual harmless pattern, not a circle to break."""
    tree = ast.parse(source)
    skip = _type_checking_only(tree)
    me = module_of(path)
    package = me.split(".") if path.endswith("__init__.py") else me.split(".")[:-1]
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        for name in names:
            while name not in known and "." in name:
                name = name.rsplit(".", 1)[0]
            if name in known and name != me and (node.lineno, name) not in out:
                out.append((node.lineno, name))
    return out


Graph = dict[str, list[tuple[int, str]]]


def import_graph(files: Mapping[str, str]) -> Graph:
    """module -> [(line, imported module)] over `files` (path -> source)."""
    known = {module_of(p) for p in files}
    return {module_of(p): import_edges(p, src, known) for p, src in files.items()}


def import_cycles(graph: Graph) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for _, w in graph.get(v, []):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def describe_cycle(graph: Graph, comp: list[str]) -> str:
    """The edges inside one component, one ``module:line -> module`` a line."""
    edges = [f"  {v}:{line} -> {w}" for v in comp for line, w in graph[v] if w in comp]
    return f"circle of {len(comp)} modules {comp}:\n" + "\n".join(edges)


def project_files(*packages: str) -> dict[str, str]:
    return {rel(p): p.read_text(encoding="utf-8") for p in modules(*packages)}


def test_no_import_circles() -> None:
    graph = import_graph(project_files(*GRAPH_PACKAGES))
    cycles = import_cycles(graph)
    assert not cycles, "\n".join(describe_cycle(graph, c) for c in cycles)


# -- sharp_core's sub-packages keep their order --------------------------------------------------

#: sharp_core's modules at its top level: the bottom (spec, errors, methods, files, ranks) and
#: the entry points (cli, demo, ``__main__``). Anything new belongs in a sub-package.
SHARP_CORE_FLAT = {
    "__init__",
    "__main__",
    "spec",
    "errors",
    "methods",
    "files",
    "ranks",
    "cli",
    "demo",
}

_BOTTOM = {"spec", "errors", "methods", "files", "ranks"}
#: sharp_core unit (a sub-package or a top-level module) -> the units it may import; every
#: unit may import itself. The design's table (../shared/design/layout.md) as the code needs
#: it: `files` (sha256, fsync, the manifest's name) joins the bottom because checkpoints and
#: the teacher cache both write durable folders; `ranks` (the collectives evaluation, pruning
#: and the cache build split their work with) joins it so they need not import `train`; `cache` reads `models` (the autocast dtype)
#: besides data and objectives; `evaluate` uses `objectives` (the cross-entropy it reports);
#: `train` runs `evaluate` (held-out evaluation during training); `cli` (``python -m
#: sharp_core``) may import everything.
SHARP_CORE_ORDER: dict[str, set[str]] = {
    "errors": set(),
    "files": set(),
    "ranks": set(),
    "methods": {"errors"},
    "spec": {"errors", "methods"},
    "data": _BOTTOM,
    "models": _BOTTOM,
    "objectives": _BOTTOM | {"models"},
    "cache": _BOTTOM | {"data", "models", "objectives"},
    "evaluate": _BOTTOM | {"data", "models", "objectives"},
    "train": _BOTTOM | {"data", "models", "objectives", "cache", "evaluate"},
    "study": _BOTTOM,
    "demo": _BOTTOM,
    "__init__": set(),
    "__main__": {"cli"},
    "cli": {"errors", "files", "ranks", "methods", "spec", "data", "models", "objectives"}
    | {"cache", "evaluate", "train", "study", "demo"},
}


def sharp_core_unit(module: str) -> str:
    """``sharp_core.train.step`` -> ``train``; ``sharp_core.spec`` -> ``spec``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def subpackage_violations(graph: Graph) -> list[str]:
    out = []
    for v, edges in sorted(graph.items()):
        if not v.startswith("sharp_core"):
            continue
        a = sharp_core_unit(v)
        for line, w in edges:
            if not w.startswith("sharp_core"):
                continue
            b = sharp_core_unit(w)
            if b != a and b not in SHARP_CORE_ORDER.get(a, set()):
                out.append(
                    f"{v}:{line} imports {w} ({a} may import {sorted(SHARP_CORE_ORDER.get(a, set()))})"
                )
    return out


def test_sharp_core_subpackages_keep_their_order() -> None:
    """data, models -> the bottom; objectives -> models; cache -> data, models, objectives;
    evaluate -> data, models, objectives; train -> all of those; study -> the bottom (the
    bottom: spec, errors, methods, files). See `SHARP_CORE_ORDER` for why each edge exists."""
    bad = subpackage_violations(import_graph(project_files("sharp_core")))
    assert not bad, "sharp_core imports against its sub-package order:\n" + "\n".join(bad)


def test_sharp_core_has_no_new_flat_modules_or_unplaced_subpackages() -> None:
    top = ROOT / "sharp_core"
    flat = {p.stem for p in top.glob("*.py")}
    assert flat <= SHARP_CORE_FLAT, (
        f"new top-level modules {sorted(flat - SHARP_CORE_FLAT)}: put them in a sub-package"
    )
    subs = {p.parent.name for p in top.glob("*/__init__.py")}
    assert subs <= set(SHARP_CORE_ORDER), (
        f"sub-packages missing from SHARP_CORE_ORDER: {sorted(subs - set(SHARP_CORE_ORDER))}"
    )
    # a folder of modules without __init__ would be a namespace package the order cannot place
    loose = {p.parent.name for p in top.glob("*/*.py")} - subs
    assert not loose, f"folders of modules without __init__.py: {sorted(loose)}"


# -- the circle and order checks catch what they should ------------------------------------------

_CIRCLE = {
    # the service's old circle, in small: the lifecycle imported upward lazily
    "service/lifecycle.py": "def _ended():\n    from service.sweeps import cell_ended\n",
    "service/models.py": "from service.lifecycle import JOB_STATUSES\n",
    "service/sweeps.py": "from service import models\n",
    "service/ids.py": "",
}


def test_cycle_check_sees_a_lazy_circle_and_names_it() -> None:
    graph = import_graph(_CIRCLE)
    assert graph["service.sweeps"] == [(1, "service.models")]  # `from pkg import module`
    cycles = import_cycles(graph)
    assert cycles == [["service.lifecycle", "service.models", "service.sweeps"]]
    text = describe_cycle(graph, cycles[0])
    assert "service.lifecycle:2 -> service.sweeps" in text
    assert "service.models:1 -> service.lifecycle" in text


def test_cycle_check_ignores_type_checking_imports_and_acyclic_graphs() -> None:
    files = {
        **_CIRCLE,
        "service/lifecycle.py": (
            "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n    from service.sweeps import cell_ended\n"
        ),
    }
    assert import_cycles(import_graph(files)) == []
    # a relative import is an edge too
    rel_circle = {**files, "service/lifecycle.py": "def f():\n    from . import sweeps\n"}
    assert import_cycles(import_graph(rel_circle)) == [
        ["service.lifecycle", "service.models", "service.sweeps"]
    ]


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        # the teacher cache reaching up into train (what it did for sha256_file)
        (
            "from sharp_core.train.checkpoint import sha256_file\n",
            ["sharp_core.cache.x:1 imports sharp_core.train.checkpoint"],
        ),
        (
            "def f():\n    from sharp_core.evaluate import perplexity\n",
            ["sharp_core.cache.x:2 imports sharp_core.evaluate.perplexity"],
        ),
        (
            "from sharp_core.files import sha256_file\nfrom sharp_core.objectives import losses\n",
            [],
        ),
        (
            "from sharp_core.models.loading import autocast_dtype\nimport sharp_core.cache.store\n",
            [],
        ),
    ],
)
def test_order_check_sees_upward_subpackage_imports(source: str, expected: list[str]) -> None:
    files = {
        "sharp_core/cache/x.py": source,
        "sharp_core/cache/store.py": "",
        "sharp_core/train/checkpoint.py": "",
        "sharp_core/evaluate/perplexity.py": "",
        "sharp_core/models/loading.py": "",
        "sharp_core/objectives/losses.py": "",
        "sharp_core/files.py": "",
    }
    got = [v.split(" (")[0] for v in subpackage_violations(import_graph(files))]
    assert got == expected


if __name__ == "__main__":  # print the circles and sharp_core's sub-package edges
    g = import_graph(project_files(*GRAPH_PACKAGES))
    for comp in import_cycles(g):
        print(describe_cycle(g, comp))
    units: dict[str, set[str]] = {}
    for v, es in g.items():
        for _, w in es:
            inside = v.startswith("sharp_core") and w.startswith("sharp_core")
            if inside and sharp_core_unit(v) != sharp_core_unit(w):
                units.setdefault(sharp_core_unit(v), set()).add(sharp_core_unit(w))
    for a in sorted(units):
        print(f"sharp_core.{a} -> {sorted(units[a])}")
    sys.exit(1 if import_cycles(g) else 0)
