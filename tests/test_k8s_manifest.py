"""The Kubernetes path, which cannot run here (no cluster): the PyTorchJob manifest the
Kubernetes backend (`worker.k8s`) would apply, for the same `Launch` the Slurm backend
submits, checked against the Training Operator's published CRD schema (v1.9.0, vendored in
worker/schemas/ with its licence note). The schema check itself is shown to fail on a broken
manifest, so a pass means something.
"""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest

from worker.backends import Launch
from worker.k8s import pytorchjob_manifest, schema


def _launch(nodes: int, gpus: int) -> Launch:
    return Launch(
        job_id="job_01JABCDEF",
        team_id="team_x",
        attempt=2,
        spec={"resources": {"queue": "k8s", "nodes": nodes, "gpus": gpus}},
        logfile=Path("/tmp/x.log"),
        env={},
    )


@pytest.fixture(scope="module")
def validator() -> jsonschema.protocols.Validator:
    s = schema()
    cls = jsonschema.validators.validator_for(s, default=jsonschema.Draft7Validator)
    cls.check_schema(s)
    return cls(s)


def test_multi_node_gpu_manifest_is_a_valid_pytorchjob(validator) -> None:
    m = pytorchjob_manifest(_launch(nodes=4, gpus=8), image="registry/sharp:1")
    validator.validate(m)
    assert m["apiVersion"] == "kubeflow.org/v1" and m["kind"] == "PyTorchJob"
    assert m["metadata"]["name"] == "sharp-job-01jabcdef-a2"
    specs = m["spec"]["pytorchReplicaSpecs"]
    assert specs["Master"]["replicas"] == 1 and specs["Worker"]["replicas"] == 3  # 4 nodes
    assert m["spec"]["nprocPerNode"] == "8"
    (c,) = specs["Worker"]["template"]["spec"]["containers"]
    assert c["name"] == "pytorch"
    assert c["command"][-3:] == ["worker.child", "job_01JABCDEF", "2"]
    assert c["resources"]["limits"] == {"nvidia.com/gpu": 8}
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["PET_NPROC_PER_NODE"] == "8" and env["PET_MAX_RESTARTS"] == "0"
    assert c["envFrom"] == [{"secretRef": {"name": "sharp-worker-settings"}}]  # no credentials


def test_single_node_cpu_manifest_has_no_workers_and_no_gpu_limit(validator) -> None:
    m = pytorchjob_manifest(_launch(nodes=1, gpus=0), image="registry/sharp:1")
    validator.validate(m)
    assert list(m["spec"]["pytorchReplicaSpecs"]) == ["Master"]
    (c,) = m["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"]
    assert c["resources"]["limits"] == {} and m["spec"]["nprocPerNode"] == "1"


@pytest.mark.parametrize(
    "path, value",
    [
        (("spec", "pytorchReplicaSpecs", "Master", "replicas"), "one"),
        (("spec", "nprocPerNode"), 8),
        (("spec", "runPolicy", "backoffLimit"), "none"),
    ],
)
def test_the_schema_check_refuses_a_broken_manifest(validator, path, value) -> None:
    m = copy.deepcopy(pytorchjob_manifest(_launch(nodes=2, gpus=1), image="i"))
    node = m
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError):
        validator.validate(m)


def test_the_schema_requires_the_replica_specs(validator) -> None:
    m = pytorchjob_manifest(_launch(nodes=2, gpus=1), image="i")
    del m["spec"]["pytorchReplicaSpecs"]
    with pytest.raises(jsonschema.ValidationError, match="pytorchReplicaSpecs"):
        validator.validate(m)
