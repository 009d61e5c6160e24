"""Job plans in the service: what a pool declares, which model configs and tokenizers are
readable at submission, the step-cost table, and admission (docs/planning.md).

The arithmetic is `sharp_core.train.plan`'s; this module gathers its inputs from what the
service owns (workers' declared cards, finished jobs' checkpoints, local folders) and keeps
the step-cost table up to date when a job succeeds (a job-ended reaction).
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

from service.errors import InvalidRequestError
from service.models import Job, Team
from service.repositories import (
    CheckpointRepository,
    JobRepository,
    StepCostRepository,
    WorkerRepository,
)
from service.settings import Settings
from service.store import get_store
from sharp_core.spec import JobRef, JobSpec, ModelSpec

if TYPE_CHECKING:
    from sharp_core.train.plan import JobPlan, PoolInfo

log = logging.getLogger(__name__)

#: Prune target field -> the config keys it sets (Llama-style names and GPT-2/OPT ones).
_PRUNE_KEYS = {
    "heads": ("num_attention_heads", "n_head"),
    "kv_heads": ("num_key_value_heads",),
    "ffn": ("intermediate_size", "n_inner", "ffn_dim"),
    "hidden": ("hidden_size", "n_embd"),
}


@dataclass
class Planner:
    """Builds a job's plan from what the service can read without downloading anything."""

    session: Session
    settings: Settings

    # -- inputs ----------------------------------------------------------------------------
    def pool(self, name: str) -> PoolInfo:
        from sharp_core.train.plan import PoolInfo

        card = WorkerRepository(self.session).pool_card(name)
        if card is None:
            return PoolInfo(name)
        return PoolInfo(name, card[0], card[1])

    def _folder(self, team: Team, ms: ModelSpec | None) -> Path | None:
        """A local folder holding the model (a finished job's checkpoint in a local store, or
        a local path); None for a hub id or a remote store."""
        if ms is None or ms.model is None:
            return None
        if isinstance(ms.model, JobRef):
            ckpts = CheckpointRepository(self.session).list(ms.model.job)
            if not ckpts:
                return None
            store = get_store(self.settings)
            if store.remote:
                return None
            key = store.key_of(ckpts[-1].path)
            path = Path(store.location(key) if key is not None else ckpts[-1].path)
            return path if path.is_dir() else None
        if ms.model.startswith(("/", "./", "../", "~")):
            p = Path(ms.model).expanduser()
            return p if p.is_dir() else None
        return None

    def config(self, team: Team, ms: ModelSpec | None) -> dict[str, Any] | None:
        """The model's config dict with its overrides, when readable at submission."""
        if ms is None:
            return None
        config: dict[str, Any] | None = None
        if ms.config is not None and (ms.model is None or ms.init == "config"):
            config = dict(ms.config)
        if config is None:
            folder = self._folder(team, ms)
            if folder is not None:
                try:
                    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    config = None
        if not isinstance(config, dict):
            return None
        return {**config, **ms.config_overrides}

    def pruned_config(self, spec: JobSpec, teacher: dict[str, Any] | None) -> dict[str, Any] | None:
        """A pruned student's config: the teacher's with the prune targets applied."""
        ps = spec.student.prune
        if teacher is None or ps is None or isinstance(ps.layers, list | tuple):
            layers = len(ps.layers) if ps is not None and isinstance(ps.layers, list) else None
        else:
            layers = ps.layers
        if teacher is None or ps is None:
            return None
        out = dict(teacher)
        if layers is not None:
            for k in ("num_hidden_layers", "n_layer"):
                if k in out:
                    out[k] = layers
        for f, keys in _PRUNE_KEYS.items():
            v = getattr(ps, f)
            if v is not None:
                for k in keys:
                    if k in out:
                        out[k] = v
        return {**out, **spec.student.config_overrides}

    def tokenizer(self, team: Team, ms: ModelSpec | None) -> Any | None:
        folder = self._folder(team, ms)
        if folder is None:
            return None
        try:
            return _load_tokenizer(str(folder), folder.stat().st_mtime_ns)
        except Exception:  # noqa: BLE001 - unreadable: the job start checks it again
            return None

    def costs(self, gpu_type: str | None) -> list[Any]:
        from sharp_core.train.plan import StepCost

        if not gpu_type:
            return []
        return [
            StepCost(
                gpu_type=r.gpu_type,
                method=r.method,
                student_params=r.student_params,
                seq_len=r.seq_len,
                world_size=r.world_size,
                tokens_per_s=r.tokens_per_s,
                flops_per_token=r.flops_per_token,
                mfu=r.mfu,
            )
            for r in StepCostRepository(self.session).for_card(gpu_type)
        ]

    # -- the plan --------------------------------------------------------------------------
    def plan(self, team: Team, spec: JobSpec) -> JobPlan:
        """The plan of a validated spec on its pool. Raises SpecError (422) when it cannot fit
        even with the levers; error findings are in the plan (`admit` refuses them)."""
        from sharp_core.models.compat import (
            Finding,
            compare_chat_templates,
            compare_tokenizers,
        )
        from sharp_core.train.plan import make_plan, preflight

        pool = self.pool(spec.resources.queue)
        t_cfg = self.config(team, spec.teacher) if spec.teacher is not None else None
        if spec.student.init == "prune":
            s_cfg = self.pruned_config(spec, t_cfg)
        else:
            s_cfg = self.config(team, spec.student)
        findings = preflight(spec, student_config=s_cfg, teacher_config=t_cfg, pool=pool)
        vocab = None
        t_tok = self.tokenizer(team, spec.teacher) if spec.teacher is not None else None
        named = None
        if spec.tokenizer.train is not None:
            vocab = spec.tokenizer.train.vocab_size
        elif spec.tokenizer.name is not None:
            named = self.tokenizer(team, ModelSpec(model=spec.tokenizer.name))
            vocab = len(named) if named is not None else None
        elif t_tok is not None:
            vocab = len(t_tok)  # the job's tokenizer is the teacher's
        distils = spec.teacher is not None and spec.method.name != "sft"
        own_tokenizers = spec.tokenizer.name is None and spec.tokenizer.train is None
        s_tok = None
        if distils and own_tokenizers and spec.student.init == "pretrained":
            s_tok = self.tokenizer(team, spec.student)
            if t_tok is not None and s_tok is not None:
                findings += compare_tokenizers(
                    t_tok,
                    s_tok,
                    teacher_rows=(t_cfg or {}).get("vocab_size"),
                    student_rows=(s_cfg or {}).get("vocab_size"),
                    cross_tokenizer=spec.method.cross_tokenizer,
                )
                findings += compare_chat_templates(t_tok, s_tok)
            else:
                findings.append(
                    Finding(
                        "tokenizers_unchecked",
                        "info",
                        "tokenizers compared at job start (not readable at submission)",
                    )
                )
        cross = None
        job_tok = named if spec.tokenizer.name is not None else s_tok
        if distils and spec.method.cross_tokenizer and t_tok is not None and job_tok is not None:
            # the teacher's tokens per student token: its logits are (B, T, V_T), whole
            from sharp_core.train.plan import cross_tokens_of

            cross = cross_tokens_of(job_tok, t_tok)
        p = make_plan(
            spec,
            student_config=s_cfg,
            teacher_config=t_cfg,
            pool=pool,
            costs=self.costs(pool.gpu_type),
            findings=findings,
            vocab=vocab,
            cross=cross,
        )
        return p

    def admit(self, team: Team, spec: JobSpec) -> tuple[JobSpec, dict[str, Any]]:
        """Admission of POST /v1/jobs: the plan, refusing a job that cannot fit or has an error
        finding (422 naming the field); returns the spec with the levers the plan pulled and
        the plan to store on the job."""
        p = self.plan(team, spec)
        for f in p.findings:
            if f.severity == "error":
                raise InvalidRequestError(
                    f"{f.param or 'spec'}: {f.message}", param=f.param or "spec", code=f.code
                )
        assert p.spec is not None
        return p.spec, plan_record(p)


@functools.lru_cache(maxsize=32)
def _load_tokenizer(folder: str, mtime_ns: int) -> Any:
    """A folder's tokenizer, cached while the folder is unchanged (submissions reuse them)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)


def plan_record(p: JobPlan) -> dict[str, Any]:
    """The plan as stored on the job and returned by the API."""
    return p.as_dict()


# --------------------------------------------------------------------------- measurements
def record_step_cost(repo: JobRepository, job_id: str) -> None:
    """A succeeded job's median tokens/s goes into the step-cost table of its pool's card
    (only jobs that were planned on a declared card; the job-ended reaction). In a savepoint,
    and never raising: a measurement must not fail the transition that ends the job."""
    try:
        with repo.session.begin_nested():
            _record_step_cost(repo, job_id)
    except Exception:  # noqa: BLE001
        log.exception("could not record the step cost of %s", job_id)


def _record_step_cost(repo: JobRepository, job_id: str) -> None:
    job = repo.session.get(Job, job_id)
    if job is None or not job.plan:
        return
    plan = job.plan
    gpu_type = (plan.get("pool") or {}).get("gpu_type")
    flops = (plan.get("throughput") or {}).get("flops_per_token")
    models = plan.get("models") or {}
    if not gpu_type or not flops or not models.get("student_params"):
        return
    costs = StepCostRepository(repo.session)
    tps = costs.median_metric(job_id, "tokens_per_s")
    if not tps:
        return
    spec = job.spec or {}
    mfu = costs.median_metric(job_id, "mfu")
    costs.add(
        job_id=job_id,
        gpu_type=str(gpu_type).lower(),
        method=str((spec.get("method") or {}).get("name", "sharp")),
        student_params=int(models["student_params"]),
        seq_len=int((spec.get("training") or {}).get("seq_len", 512)),
        world_size=int(job.gpus or 1) or 1,
        tokens_per_s=float(tps),
        flops_per_token=float(flops),
        mfu=mfu,
    )


def usage(job: Job) -> dict[str, Any] | None:
    """Planned against measured peak memory (GB per GPU) and tokens/s, side by side."""
    plan = job.plan
    if not plan and job.peak_mem_mb is None:
        return None
    mem = (plan or {}).get("memory") or {}
    tp = (plan or {}).get("throughput") or {}
    planned_gb = None if mem.get("per_gpu_bytes") is None else mem["per_gpu_bytes"] / 1e9
    return {
        "peak_memory_gb": {
            "planned": planned_gb,
            "measured": None if job.peak_mem_mb is None else job.peak_mem_mb * 2**20 / 1e9,
        },
        "tokens_per_s": {"planned": tp.get("tokens_per_s"), "measured": job.tokens_per_s},
    }


def warm_up() -> None:
    """Import what a plan needs (torch, transformers: seconds) ahead of the first submission,
    which would otherwise pay it inside its request (the API calls this on a thread at start;
    a request that arrives meanwhile waits on the import lock for the rest only)."""
    import sharp_core.models.compat  # noqa: F401
    import sharp_core.train.plan  # noqa: F401
