"""The real trainer on the exec node: the operator's Job runs ``python -m temper_trainer run``.

Tiny builtin model, builtin data, two optimiser steps: the contract, credentials by secretKeyRef,
S3 publishing, the termination message and Adapter verification all take the production path.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from temper.api.contract import StorageConfig
from temper.storage import Storage
from temper_dev.cluster import Cluster
from temper_dev.s3server import S3Server

from tests.cluster.test_operator_pipeline import Api, pipeline, wait_for
from tests.fixtures.operator import OperatorProcess

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

EXEC = {
    "nodeSelector": {"kubernetes.io/hostname": "exec-node"},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
}


@pytest.fixture
def api(cluster: Cluster, namespace: str) -> Api:
    return Api(cluster, namespace)


def test_real_trainer_runs_sft_then_eval_on_the_exec_node(
    api: Api,
    cluster: Cluster,
    operator: OperatorProcess,
    s3_server: S3Server,
    s3_bucket: str,
    s3_secret: str,
    tiny_model: Path,
) -> None:
    hp = {"maxSteps": 2, "batchSize": 4, "maxLength": 48}
    stages = [
        {
            "name": "sft",
            "type": "sft",
            "data": {"train": ["tickets"]},
            "hyperparameters": hp,
            "resources": EXEC,
            "checkpoint": {"everySteps": 1},
        },
        {
            "name": "check",
            "type": "eval",
            "from": "sft",
            "hyperparameters": {"maxNewTokens": 8},  # eval stages take only generation settings
            "resources": EXEC,
            # Gated suites make the trainer measure the baseline (the base model, sft's parent) in the
            # same stage. Two steps at lr 2e-4 barely move the loss: a 50% allowance always passes.
            "suites": [
                {"name": "arith", "dataset": "heldout", "metric": "exact_match", "maxRegression": 1.0},
                {"name": "arith-loss", "dataset": "heldout", "metric": "loss", "maxRegression": 0.5},
            ],
        },
    ]
    body = pipeline("real", s3_bucket, stages=stages)
    body["spec"]["storage"]["endpointUrl"] = s3_server.endpoint_url
    body["spec"]["trainer"] = {"env": [{"name": "TEMPER_MODEL_CACHE", "value": str(tiny_model.parent)}]}
    api.create_run(body)
    wait_for("run finished", lambda: api.succeeded("real") or api.failed("real"), 240, operator)
    status = api.run("real")["status"]
    logs = [cluster.pod_log(api.ns, p.metadata.name)[-3000:] for p in api.pods("real")]
    assert api.succeeded("real"), (status, logs)
    sft = status["stages"][0]
    assert sft["adapter"] == "real-sft-g1"
    assert sft["metrics"]["train/steps"] == 2  # from the trainer's termination message
    assert all(p.spec.node_name == "exec-node" for p in api.pods("real"))
    adapter = next(a for a in api.adapters() if a["metadata"]["name"] == "real-sft-g1")
    assert adapter["status"]["conditions"][0]["reason"] == "ArtifactVerified"
    storage = Storage(
        StorageConfig.model_validate({"endpointUrl": s3_server.endpoint_url}), s3_server.client()
    )
    manifest, digest = storage.read_manifest(sft["manifestUri"])
    assert adapter["status"]["artifact"]["sha256"] == digest
    assert {f.path.rsplit("/", 1)[-1] for f in manifest.files} >= {
        "adapter_config.json",
        "adapter_model.safetensors",
    }
    assert any(k.startswith("suite/arith") for k in status["stages"][1]["metrics"]), status["stages"][1]
    # The eval stage measured the base model (sft's parent) in the same stage; its results are on
    # the Adapter it evaluated, and it published no Adapter of its own.
    assert "adapter" not in status["stages"][1]
    assert not any(a["metadata"]["name"] == "real-check-g1" for a in api.adapters())
    arith = adapter["status"]["evals"]["arith"]
    assert (arith["baselineSource"], arith["outcome"], arith["examples"]) == ("base model", "Passed", 8)
    assert 0.0 <= arith["baseline"] <= 1.0
    loss = adapter["status"]["evals"]["arith-loss"]
    assert (loss["baselineSource"], loss["outcome"]) == ("base model", "Passed"), loss
    assert status["stages"][1]["message"].startswith("regression gates passed: suite arith exact_match")
    print(f"gate: {status['stages'][1]['message']}")
    lineage = adapter["status"]["lineage"]
    assert lineage["datasets"][0]["name"] == "tickets"
    assert len(lineage["datasets"][0]["sha256"]) == 64
    assert len(lineage["contractHash"]) == 64
