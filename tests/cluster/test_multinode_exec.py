"""Two nodes through the operator: an Indexed Job whose two pods run on the exec node, rendezvousing
at pod 0's DNS name under the headless Service (``<job>-0.<job>``, which the exec node resolves to
loopback as cluster DNS would), one CPU worker each over gloo.

Deleting pod 1 mid-run (SIGTERM) stops both ranks at the same step; rank 0 checkpoints it and both
exit 143. That is a preemption, not a failed attempt: the Job's podFailurePolicy ignores exit 143,
so the same attempt's replacement pods resume from that checkpoint on both ranks and publish
exactly one Adapter. The loss curve must match one process with the same global batch
(tolerances as in tests/unit/test_trainer_distributed.py).
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest
from temper.api.contract import StageContract, StageProgress, StorageConfig
from temper.storage import S3Uri, Storage
from temper_dev.cluster import Cluster
from temper_dev.s3server import S3Server
from temper_trainer.checkpoint import Checkpointer

from tests.cluster.test_operator_pipeline import Api, pipeline, wait_for
from tests.fixtures.operator import OperatorProcess
from tests.unit.trainer_helpers import run_in_process

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

STEPS = 30
EXEC = {
    "nodeSelector": {"kubernetes.io/hostname": "exec-node"},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
}
INDEX = "batch.kubernetes.io/job-completion-index"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def losses(storage: Storage, prefix: str, step: int) -> list[float]:
    uri = S3Uri.parse(prefix).join("checkpoints", f"step-{step}", "trainer_state.json")
    return [float(e["loss"]) for e in json.loads(storage.get_bytes(str(uri)))["log_history"] if "loss" in e]


def contract_of(pod: Any) -> StageContract:
    env = {e.name: e.value for e in pod.spec.containers[0].env if e.value}
    return StageContract.from_env(env["TEMPER_STAGE_CONTRACT"])


def test_two_node_indexed_job_rendezvous_by_pod_dns_resumes_after_sigterm_and_publishes_once(
    api: Api,
    cluster: Cluster,
    operator_factory: Any,
    s3_server: S3Server,
    s3_bucket: str,
    s3_secret: str,
    tiny_model: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    operator: OperatorProcess = operator_factory(TEMPER_MASTER_PORT=str(free_port()))
    stage = {
        "name": "sft",
        "type": "sft",
        "data": {"train": ["arith"], "eval": ["arith-eval"]},
        "peft": {"method": "lora", "r": 8, "alpha": 16},
        "hyperparameters": {"maxSteps": STEPS, "batchSize": 8, "learningRate": 3e-3, "packing": True},
        "checkpoint": {"everySteps": STEPS - 1, "everySeconds": 3600},
        "retries": {"maxRetries": 2, "backoffSeconds": 0},
        "resources": {"nodes": 2, **EXEC},
    }
    body = pipeline("multi", s3_bucket, stages=[stage])
    body["spec"]["datasets"] = [
        {"name": "arith", "uri": "builtin://arith?n=80", "format": "chat"},
        {"name": "arith-eval", "uri": "builtin://arith?n=20&split=eval", "format": "chat"},
    ]
    body["spec"]["storage"]["endpointUrl"] = s3_server.endpoint_url
    body["spec"]["trainer"] = {"env": [{"name": "TEMPER_MODEL_CACHE", "value": str(tiny_model.parent)}]}
    api.create_run(body)
    storage = Storage(
        StorageConfig.model_validate({"endpointUrl": s3_server.endpoint_url}), s3_server.client()
    )

    pods = wait_for("two pods", lambda: len(p := api.pods("multi")) == 2 and p, 60, operator)
    contract = contract_of(pods[0])
    progress = f"{contract.output.prefix}attempts/1/progress.json"

    def trained() -> int:
        if not storage.exists(progress):
            return 0
        return StageProgress.model_validate_json(storage.get_bytes(progress)).step

    seen = wait_for("5 steps on both nodes", lambda: (s := trained()) >= 5 and s, 300, operator)
    job = pods[0].metadata.labels["batch.kubernetes.io/job-name"]
    second = next(p for p in pods if p.metadata.annotations[INDEX] == "1")
    env = {e.name: e.value for e in second.spec.containers[0].env if e.value}
    assert env["MASTER_ADDR"] == f"{job}-0.{job}"  # pod 0's DNS name under the headless Service
    assert (second.spec.hostname, second.spec.subdomain) == (f"{job}-1", job)
    api.core.delete_namespaced_pod(second.metadata.name, api.ns, grace_period_seconds=120)

    wait_for("run finished", lambda: api.succeeded("multi") or api.failed("multi"), 600, operator)
    status = api.run("multi")["status"]
    logs = {p.metadata.name: cluster.pod_log(api.ns, p.metadata.name)[-3000:] for p in api.pods("multi")}
    assert api.succeeded("multi"), (status, logs)
    sft = status["stages"][0]
    assert sft["attempts"] == 1, sft  # a preemption is never charged as an attempt
    assert sft["topology"] == {
        "worldSize": 2,
        "nodes": 2,
        "procsPerNode": 1,
        "gpusPerNode": 0,
        "strategy": "ddp",
    }
    assert any(
        "(world size 2, rendezvous multi-sft-c1-a1-0.multi-sft-c1-a1:" in log for log in logs.values()
    ), logs
    manifest, _ = storage.read_manifest(sft["manifestUri"])
    checkpoint_steps = Checkpointer(contract, storage, tmp_path / "ck").complete_steps()
    assert manifest.lineage["resumedFromStep"] in checkpoint_steps
    assert seen <= manifest.lineage["resumedFromStep"] < STEPS - 1
    assert manifest.metrics["dist/replicas_identical"] == 1.0
    keys = storage.list_keys(S3Uri.parse(contract.output.prefix))
    assert keys.count("manifest.json") == 1
    assert {k.split("/")[1] for k in keys if k.startswith("attempts/") and "adapter" in k} == {"1"}
    assert [a["metadata"]["name"] for a in api.adapters()] == ["multi-sft-g1"]

    # One process, the same global batch (16), the operator's own contract otherwise.
    single = contract.model_copy(
        update={
            "output": contract.output.model_copy(update={"prefix": f"s3://{s3_bucket}/single/"}),
            "resources": contract.resources.model_copy(update={"nodes": 1}),
            "hyperparameters": contract.hyperparameters.model_copy(update={"batch_size": 16}),
        }
    )
    for key in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "JOB_COMPLETION_INDEX"):
        monkeypatch.delenv(key, raising=False)
    code, reference = run_in_process(single, monkeypatch, s3_server, tmp_path)
    assert code == 0, reference.error
    ours = losses(storage, contract.output.prefix, STEPS - 1)
    theirs = losses(storage, single.output.prefix, STEPS - 1)
    diffs = [abs(a - b) for a, b in zip(ours, theirs, strict=True)]
    print(
        f"2 nodes x batch 8 vs 1 x 16: max |loss diff| first 10 {max(diffs[:10]):.1e}, all {max(diffs):.1e}"
    )
    assert max(diffs[:10]) <= 1e-3
    assert max(diffs) <= 2e-2


@pytest.fixture
def api(cluster: Cluster, namespace: str) -> Api:
    return Api(cluster, namespace)
