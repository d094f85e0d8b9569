"""The operator end to end on the hermetic cluster: kwok GPU pods, manifests in real (moto) S3.

kwok pods cannot run the trainer, so each test publishes the stages' outputs to the loopback S3
server where the trainer would (``<storage>/g1/<stage>/manifest.json``); the operator still
verifies every byte before it calls an Adapter Ready.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from kubernetes import client
from temper.api.contract import StorageConfig
from temper.storage import Storage
from temper_dev.cluster import Cluster
from temper_dev.s3server import S3Server

from tests.fixtures.operator import OperatorProcess

pytestmark = pytest.mark.cluster

T = TypeVar("T")
GROUP, VERSION, PLURAL = "temper.dev", "v1alpha1", "posttrainingruns"
KWOK = {
    "nodeSelector": {"temper.dev/node-pool": "kwok"},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
}


def wait_for(
    what: str, probe: Callable[[], T | None], timeout: float = 30, proc: OperatorProcess | None = None
) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            tail = f"\noperator log:\n{proc.log()[-3000:]}" if proc else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {what}{tail}")
        time.sleep(0.1)


def pipeline(
    name: str,
    bucket: str,
    *,
    stages: list[dict[str, Any]] | None = None,
    pod_annotations: dict[str, str] | None = None,
    **spec: Any,
) -> dict[str, Any]:
    resources = {"gpus": 1, **KWOK}
    body: dict[str, Any] = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "PostTrainingRun",
        "metadata": {"name": name},
        "spec": {
            "baseModel": {"uri": "builtin://tiny"},
            "storage": {"uri": f"s3://{bucket}/runs/{name}/", "secretRef": {"name": "s3-creds"}},
            "datasets": [
                {"name": "tickets", "uri": "builtin://arith?n=16"},
                {"name": "prefs", "uri": f"s3://{bucket}/prefs.jsonl", "format": "preference"},
                {"name": "heldout", "uri": "builtin://arith?n=8&split=eval"},
            ],
            "stages": stages
            or [
                {"name": "sft", "type": "sft", "data": {"train": ["tickets"]}, "resources": resources},
                {
                    "name": "align",
                    "type": "dpo",
                    "from": "sft",
                    "data": {"train": ["prefs"]},
                    "resources": resources,
                },
                {
                    "name": "regress",
                    "type": "eval",
                    "from": "align",
                    "resources": resources,
                    "suites": [{"name": "old", "dataset": "heldout", "metric": "exact_match"}],
                },
            ],
            **spec,
        },
    }
    if pod_annotations:
        body["metadata"]["annotations"] = {"temper.dev/pod-annotations": json.dumps(pod_annotations)}
    return body


def publish(
    s3_server: S3Server, bucket: str, run: str, stage: str, tmp_path: Path, stage_type: str = "sft"
) -> str:
    """What the trainer would publish for ``stage``: adapter files, then the manifest."""
    local = tmp_path / f"{run}-{stage}"
    local.mkdir(parents=True, exist_ok=True)
    (local / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    (local / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 8)
    storage = Storage(
        StorageConfig.model_validate({"endpointUrl": s3_server.endpoint_url}), s3_server.client()
    )
    result = storage.publish_atomic(
        local,
        f"s3://{bucket}/runs/{run}/g1/{stage}/",
        1,
        {
            "baseModel": "builtin://tiny",
            "method": "lora",
            "stageType": stage_type,
            "trainerVersion": "fake",
            "metrics": {"train_loss": 0.5},
            "lineage": {"datasets": ["tickets@etag1"]},
        },
    )
    return result.manifest_uri


class Api:
    def __init__(self, cluster: Cluster, namespace: str) -> None:
        self.ns = namespace
        self.api_client = cluster.api_client()
        self.custom = client.CustomObjectsApi(self.api_client)
        self.batch = client.BatchV1Api(self.api_client)
        self.core = client.CoreV1Api(self.api_client)

    def create_run(self, body: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = self.custom.create_namespaced_custom_object(
            GROUP, VERSION, self.ns, PLURAL, body
        )
        return out

    def run(self, name: str) -> dict[str, Any]:
        out: dict[str, Any] = self.custom.get_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, name)
        return out

    def patch_run(self, name: str, patch: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, name, patch)

    def condition(self, name: str, ctype: str) -> dict[str, Any]:
        status = self.run(name).get("status") or {}
        return next((c for c in status.get("conditions") or [] if c["type"] == ctype), {})

    def stage(self, name: str, stage: str) -> dict[str, Any]:
        status = self.run(name).get("status") or {}
        return next((s for s in status.get("stages") or [] if s["name"] == stage), {})

    def jobs(self, run: str) -> list[Any]:
        return list(self.batch.list_namespaced_job(self.ns, label_selector=f"temper.dev/run={run}").items)

    def pods(self, run: str) -> list[Any]:
        return list(self.core.list_namespaced_pod(self.ns, label_selector=f"temper.dev/run={run}").items)

    def adapters(self) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.custom.list_namespaced_custom_object(
            GROUP, VERSION, self.ns, "adapters"
        )["items"]
        return items

    def events(self, name: str) -> list[Any]:
        return [e for e in self.core.list_namespaced_event(self.ns).items if e.involved_object.name == name]

    def succeeded(self, name: str) -> bool:
        return self.condition(name, "Succeeded").get("status") == "True"

    def failed(self, name: str) -> bool:
        return self.condition(name, "Failed").get("status") == "True"


@pytest.fixture
def api(cluster: Cluster, namespace: str) -> Api:
    return Api(cluster, namespace)


def test_sft_dpo_eval_completes_with_conditions_events_and_adapters(
    api: Api,
    cluster: Cluster,
    operator: OperatorProcess,
    s3_server: S3Server,
    s3_bucket: str,
    s3_secret: str,
    tmp_path: Path,
) -> None:
    for stage, kind in (("sft", "sft"), ("align", "dpo")):
        publish(s3_server, s3_bucket, "chain", stage, tmp_path, kind)
    api.create_run(pipeline("chain", s3_bucket, pod_annotations={"temper.dev/fake-duration": "300ms"}))
    # kubectl wait is what users and CI scripts run: it must see the condition.
    waiter = subprocess.Popen(
        [
            cluster.bin("kubectl"),
            "--kubeconfig",
            str(cluster.kubeconfig),
            "-n",
            api.ns,
            "wait",
            "--for=condition=Succeeded",
            "--timeout=60s",
            "ptr/chain",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    wait_for("run Succeeded", lambda: api.succeeded("chain"), 60, operator)
    out, _ = waiter.communicate(timeout=30)
    assert waiter.returncode == 0, out.decode()
    assert b"condition met" in out

    run = api.run("chain")
    status = run["status"]
    assert status["observedGeneration"] == run["metadata"]["generation"]
    assert status["phase"] == "Succeeded"
    conds = {c["type"]: c["status"] for c in status["conditions"]}
    assert conds == {
        "Ready": "True",
        "Succeeded": "True",
        "Failed": "False",
        "Suspended": "False",
        "Reconciling": "False",
        "Stalled": "False",
    }
    assert [(s["name"], s["state"], s["attempts"]) for s in status["stages"]] == [
        ("sft", "Succeeded", 1),
        ("align", "Succeeded", 1),
        ("regress", "Succeeded", 1),
    ]
    assert status["stages"][0]["adapter"] == "chain-sft-g1"

    jobs = {j.metadata.name: j for j in api.jobs("chain")}
    assert set(jobs) == {"chain-sft-c1-a1", "chain-align-c1-a1", "chain-regress-c1-a1"}
    sft_job = jobs["chain-sft-c1-a1"]
    assert sft_job.metadata.owner_references[0].kind == "PostTrainingRun"
    assert sft_job.metadata.labels["temper.dev/attempt"] == "1"
    env = {e.name: e for e in sft_job.spec.template.spec.containers[0].env}
    assert env["AWS_SECRET_ACCESS_KEY"].value_from.secret_key_ref.name == "s3-creds"

    adapters = {a["metadata"]["name"]: a for a in api.adapters()}
    assert set(adapters) == {"chain-sft-g1", "chain-align-g1"}
    sft = adapters["chain-sft-g1"]
    assert "ownerReferences" not in sft["metadata"]
    assert sft["metadata"]["labels"]["temper.dev/run"] == "chain"
    assert sft["status"]["conditions"][0]["status"] == "True"
    assert sft["status"]["artifact"]["files"] == 2
    assert sft["status"]["lineage"]["stage"] == "sft"
    assert adapters["chain-align-g1"]["status"]["lineage"]["parent"] == "chain-sft-g1"

    reasons = [e.reason for e in api.events("chain")]
    for reason in ("StageStarted", "StageSucceeded", "RunSucceeded"):
        assert reason in reasons, reasons
    assert reasons.count("StageStarted") == 3
    # The credentials never leak into status, events or the operator's log.
    secret = "temper-test-secret-do-not-log"
    assert secret not in json.dumps(status)
    assert all(secret not in (e.message or "") for e in api.events("chain"))
    assert secret not in operator.log()
    assert operator.metric("temper_runs", state="Succeeded") == 1


def test_idle_run_costs_no_api_writes(
    api: Api, operator: OperatorProcess, s3_server: S3Server, s3_bucket: str, s3_secret: str, tmp_path: Path
) -> None:
    publish(s3_server, s3_bucket, "idle", "sft", tmp_path)
    api.create_run(
        pipeline(
            "idle",
            s3_bucket,
            stages=[
                {
                    "name": "sft",
                    "type": "sft",
                    "data": {"train": ["tickets"]},
                    "resources": {"gpus": 1, **KWOK},
                }
            ],
            pod_annotations={"temper.dev/fake-duration": "200ms"},
        )
    )
    wait_for("run Succeeded", lambda: api.succeeded("idle"), 30, operator)
    time.sleep(1.0)  # let trailing watch events settle

    def writes() -> float:
        return sum(operator.metric("temper_api_requests_total", verb=v) for v in ("create", "patch"))

    before = writes()
    api.patch_run("idle", {"metadata": {"labels": {"touched": "yes"}}})  # an event, but nothing to do
    time.sleep(3.0)
    assert writes() == before


def test_live_progress_from_storage_reaches_status_and_metrics(
    api: Api, operator: OperatorProcess, s3_server: S3Server, s3_bucket: str, s3_secret: str, tmp_path: Path
) -> None:
    publish(s3_server, s3_bucket, "live", "sft", tmp_path)
    stages = [
        {"name": "sft", "type": "sft", "data": {"train": ["tickets"]}, "resources": {"gpus": 1, **KWOK}}
    ]
    api.create_run(
        pipeline("live", s3_bucket, stages=stages, pod_annotations={"temper.dev/fake-duration": "5s"})
    )
    wait_for("pod running", lambda: any(p.status.phase == "Running" for p in api.pods("live")), 20, operator)
    progress = {
        "step": 42,
        "totalSteps": 100,
        "percent": 42.0,
        "loss": 0.61,
        "etaSeconds": 12,
        "updatedAt": "2026-11-26T12:00:00Z",
        "phase": "training",
    }
    s3_server.client().put_object(
        Bucket=s3_bucket, Key="runs/live/g1/sft/attempts/1/progress.json", Body=json.dumps(progress).encode()
    )

    def block() -> dict[str, Any] | None:
        got = (api.run("live").get("status") or {}).get("progress") or {}
        return got if got.get("step") == 42 else None

    got = wait_for("progress in status", block, 10, operator)
    assert got == {
        "stage": "sft",
        "percent": 42,
        "step": 42,
        "totalSteps": 100,
        "loss": 0.61,
        "etaSeconds": 12,
        "updatedAt": "2026-11-26T12:00:00Z",
    }
    assert "42%" in api.condition("live", "Reconciling")["message"]
    assert operator.metric("temper_run_progress_ratio", run="live") == 0.42
    assert operator.metric("temper_run_loss", run="live") == 0.61
    wait_for("run Succeeded", lambda: api.succeeded("live"), 30, operator)
    assert 'run="live"' not in operator.metrics()  # per-run series end with the stage


def eval_termination(bucket: str, run: str, value: float, baseline: float) -> str:
    """The fake trainer's StageResult for both kwok pods: sft's manifest, and the eval's suite results
    (the eval stage publishes no Adapter, so its pod reporting sft's manifest changes nothing)."""
    return json.dumps(
        {
            "manifestUri": f"s3://{bucket}/runs/{run}/g1/sft/manifest.json",
            "metrics": {"suite/arith/exact_match": value, "drift/kl_to_base": 0.125},
            "evals": [
                {
                    "suite": "arith",
                    "metric": "exact_match",
                    "value": value,
                    "examples": 40,
                    "maxRegression": 0.05,
                    "baseline": baseline,
                    "baselineSource": "base model",
                }
            ],
        }
    )


def test_regression_gate_fails_one_run_passes_another_and_results_land_on_the_evaluated_adapter(
    api: Api, operator: OperatorProcess, s3_server: S3Server, s3_bucket: str, s3_secret: str, tmp_path: Path
) -> None:
    resources = {"gpus": 1, **KWOK}
    stages = [
        {"name": "sft", "type": "sft", "data": {"train": ["tickets"]}, "resources": resources},
        {
            "name": "gate",
            "type": "eval",
            "from": "sft",
            "resources": resources,
            "suites": [
                {"name": "arith", "dataset": "heldout", "metric": "exact_match", "maxRegression": 0.05}
            ],
        },
    ]
    for run, value in (("gated-bad", 0.5), ("gated-good", 0.94)):
        publish(s3_server, s3_bucket, run, "sft", tmp_path)
        message = eval_termination(s3_bucket, run, value, 0.95)
        annotations = {"temper.dev/fake-duration": "200ms", "temper.dev/fake-termination-message": message}
        api.create_run(pipeline(run, s3_bucket, stages=stages, pod_annotations=annotations))
    for run in ("gated-bad", "gated-good"):
        wait_for(f"{run} finished", lambda r=run: api.succeeded(r) or api.failed(r), 60, operator)

    expected = (
        "regression gate failed: suite arith exact_match: baseline 0.95 (base model) -> 0.5, "
        "drop 47.37% exceeds maxRegression 5.00%"
    )
    assert api.failed("gated-bad")
    failed = api.condition("gated-bad", "Failed")
    assert failed["message"] == f"stage gate failed: {expected}", failed
    assert api.condition("gated-bad", "Stalled")["reason"] == "RegressionGateFailed"
    events = {e.reason: e.message for e in api.events("gated-bad")}
    assert events["RegressionGateFailed"] == f"stage gate: {expected}", events

    assert api.succeeded("gated-good"), api.run("gated-good")["status"]
    gate = api.stage("gated-good", "gate")
    assert gate["message"].startswith("regression gates passed: suite arith exact_match: baseline 0.95")
    assert "adapter" not in gate
    assert api.stage("gated-good", "sft")["drift"] == {"klToBase": 0.125}
    adapters = {a["metadata"]["name"]: a for a in api.adapters()}
    assert not any(name.endswith("-gate-g1") for name in adapters), sorted(adapters)  # no eval Adapter
    good = adapters["gated-good-sft-g1"]["status"]["evals"]["arith"]
    assert {k: good[k] for k in ("metric", "value", "baseline", "outcome", "run", "stage", "cycle")} == {
        "metric": "exact_match",
        "value": 0.94,
        "baseline": 0.95,
        "outcome": "Passed",
        "run": "gated-good",
        "stage": "gate",
        "cycle": 1,
    }
    assert good["time"] == gate["completionTime"]
    assert adapters["gated-bad-sft-g1"]["status"]["evals"]["arith"]["outcome"] == "Failed"
    assert adapters["gated-good-sft-g1"]["status"]["metrics"] == {"train_loss": 0.5}  # the manifest's own
    assert operator.metric("temper_stage_drift_kl", run="gated-good", stage="sft", reference="base") == 0.125
