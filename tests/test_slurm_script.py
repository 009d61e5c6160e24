"""The sbatch script the Slurm backend submits, and how Slurm's final states map onto the
lifecycle's errors (pure: no cluster; tests/test_slurm.py runs them on a real one)."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.settings import Settings
from worker.backends import Launch
from worker.slurm import SlurmHandle, _exit, batch_script


def _launch(attempt: int = 1, **resources: object) -> Launch:
    return Launch(
        job_id="job_X",
        team_id="t",
        attempt=attempt,
        spec={"resources": {"queue": "s", **resources}},
        logfile=Path("/a/logs/attempt_1.log"),
        env={},
    )


def _opts(script: str) -> list[str]:
    return [line.split(" ", 1)[1] for line in script.splitlines() if line.startswith("#SBATCH")]


def test_gpu_partition_script_asks_for_nodes_gpus_and_the_warning() -> None:
    s = Settings(
        slurm_partition="h100",
        slurm_account="acct",
        slurm_qos="high",
        slurm_gpus_per_node=8,
        slurm_time_limit="1-00:00:00",
        slurm_signal_grace_s=90,
        slurm_container_image="nvcr.io#sharp:1",
    )
    script = batch_script(s, _launch(nodes=4, gpus=8))
    opts = _opts(script)
    for o in (
        "--job-name=sharp-job_X-a1",
        "--nodes=4",
        "--ntasks-per-node=1",
        "--gpus-per-node=8",
        "--signal=B:USR1@90",
        "--no-requeue",
        "--partition=h100",
        "--account=acct",
        "--qos=high",
        "--time=1-00:00:00",
    ):
        assert o in opts, o
    assert "--container-image=nvcr.io#sharp:1" in script
    assert '--nnodes "$SLURM_NNODES"' in script and '--node-rank "$SLURM_NODEID"' in script
    assert "--nproc-per-node 8" in script and "--rdzv-backend c10d" in script
    assert "-m worker.child job_X 1" in script
    assert "trap '" in script and "USR1" in script


def test_cpu_nodes_get_no_gpu_request_and_a_resumed_attempt_takes_fewer_nodes() -> None:
    s = Settings(slurm_gpus_per_node=0)
    first = _opts(batch_script(s, _launch(nodes=2, gpus=1)))
    assert "--nodes=2" in first and not any(o.startswith("--gpus") for o in first)
    again = _opts(batch_script(s, _launch(attempt=2, nodes=2, gpus=1)))
    assert "--nodes=1-2" in again  # resumes on the nodes Slurm gives next, even fewer


@pytest.mark.parametrize(
    "state, signalled, code, retryable",
    [
        ("TIMEOUT", False, "slurm_timeout", True),
        ("NODE_FAIL", False, "slurm_node_fail", True),
        ("PREEMPTED", False, "preempted", True),
        ("OUT_OF_MEMORY", False, "out_of_memory", False),
        ("CANCELLED", False, "slurm_cancelled", False),
        ("CANCELLED", True, None, True),  # our own scancel: the cancel decides
        ("COMPLETED", False, None, True),
    ],
)
def test_slurm_end_states_name_their_error(
    state: str, signalled: bool, code: str | None, retryable: bool
) -> None:
    h = SlurmHandle(Settings(), "42", signalled=signalled, state=state, exit_code=0)
    end = h.end()
    assert end is not None and end.code == code and end.retryable == retryable
    if code == "slurm_cancelled":
        assert end.external_cancel and "Slurm job 42" in end.message


def test_exit_codes() -> None:
    assert _exit("0:0") == 0 and _exit("1:0") == 1 and _exit("0:9") == -9 and _exit("") is None
