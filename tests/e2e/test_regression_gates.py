"""A regression gate fails a run end to end, on the user's path (``helm install`` -> ``kubectl apply``).

``examples/eval-regression-suites.yaml``, through the same transform as the every-example e2e
(:func:`temper_dev.demo.for_hermetic_cluster`), with a real regression: ``learn-subtraction``
continues a good addition adapter (``learn-addition``, the quickstart's SFT recipe) and destroys it
(2 unclipped steps at learning rate 3.0). The suites and thresholds are the example's; the baseline
is the evaluated adapter's parent, ``learn-addition``, measured in the same eval stage. (Against the
untrained base the gate would have nothing to lose: the base scores ~0 in the SFT format.)

The run must fail on its gate, the condition and event naming suite, metric, baseline, value and
threshold; the eval stage publishes no Adapter, and the evaluated Adapter stays Ready with the
verdict in its ``status.evals`` (nothing lost). ``test_quickstart.py`` is the run whose gates pass.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from temper_dev.cluster import Cluster
from temper_dev.demo import REPO, for_hermetic_cluster, load_manifest
from temper_dev.incluster import HelmOperator

from tests.cluster.test_operator_pipeline import Api, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(1200)]

EXAMPLE = REPO / "examples" / "eval-regression-suites.yaml"
GATE_LOSS = re.compile(
    r"suite old-task-loss loss: baseline ([\d.]+) \(adapter [\w-]+\) -> ([\d.]+), drop ([\d.]+)% exceeds "
    r"maxRegression 5\.00%"
)


def regressed_variant(example: dict[str, Any]) -> dict[str, Any]:
    """The example with a good parent adapter that its SFT stage then destroys."""
    run = copy.deepcopy(example)
    name = run["metadata"]["name"]
    run["metadata"]["name"] = f"{name}-regressed"
    spec = run["spec"]
    spec["storage"]["uri"] = spec["storage"]["uri"].replace(f"/{name}/", f"/{name}-regressed/")
    spec["datasets"].append(
        {"name": "add", "uri": "builtin://arith?n=400&seed=22&split=train", "format": "prompt-completion"}
    )
    learn_addition = {
        "name": "learn-addition",
        "type": "sft",
        "peft": {"method": "lora", "r": 16, "alpha": 32},
        "data": {"train": ["add"]},
        "hyperparameters": {"maxSteps": 200, "learningRate": 3.0e-3, "batchSize": 16, "maxLength": 32},
    }
    sft = spec["stages"][0]
    sft["from"] = "learn-addition"
    sft["hyperparameters"] = {**sft["hyperparameters"], "maxSteps": 2, "learningRate": 3.0, "maxGradNorm": 0}
    spec["stages"].insert(0, learn_addition)
    return run


def adapter(api: Api, name: str) -> dict[str, Any]:
    return next((a for a in api.adapters() if a["metadata"]["name"] == name), {})


def ready(obj: dict[str, Any]) -> bool:
    conditions = (obj.get("status") or {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def test_a_destroyed_adapter_fails_its_regression_gate_and_nothing_is_lost(
    cluster: Cluster,
    namespace: str,
    helm_operator: HelmOperator,
    s3_bucket: str,
    s3_secret: str,
    tmp_path: Path,
) -> None:
    api = Api(cluster, namespace)
    example = for_hermetic_cluster(load_manifest(EXAMPLE), namespace=namespace, bucket=s3_bucket)
    example["spec"]["storage"]["secretRef"] = {"name": s3_secret}
    body = regressed_variant(example)
    name = body["metadata"]["name"]
    manifest = tmp_path / "regressed.yaml"
    manifest.write_text(yaml.safe_dump(body, sort_keys=False))
    cluster.kubectl("apply", "-f", str(manifest))
    wait_for(f"{name} finished", lambda: api.succeeded(name) or api.failed(name), 900, helm_operator)

    assert api.failed(name), api.run(name)["status"]
    message = api.condition(name, "Failed")["message"]
    assert message.startswith("stage regress failed: regression gate failed: "), message
    loss = GATE_LOSS.search(message)
    assert loss is not None, message
    assert float(loss[2]) > 1.05 * float(loss[1]), message  # measured: the destroyed SFT is worse
    assert api.condition(name, "Stalled")["reason"] == "RegressionGateFailed"
    events = {e.reason: e for e in api.events(name)}
    assert events["RegressionGateFailed"].type == "Warning", events
    assert loss[0] in events["RegressionGateFailed"].message, events["RegressionGateFailed"].message
    regress, sft = api.stage(name, "regress"), api.stage(name, "learn-subtraction")
    assert (regress["state"], sft["state"]) == ("Failed", "Succeeded"), api.run(name)["status"]
    assert "adapter" not in regress, regress  # an eval stage publishes no Adapter
    evaluated = adapter(api, sft["adapter"])
    assert ready(evaluated), evaluated
    parent = api.stage(name, "learn-addition")["adapter"]
    verdict = evaluated["status"]["evals"]["old-task-loss"]
    assert (verdict["outcome"], verdict["baselineSource"], verdict["maxRegression"]) == (
        "Failed",
        f"adapter {parent}",
        0.05,
    ), verdict
    assert (verdict["run"], verdict["stage"]) == (name, "regress"), verdict
    print(f"regression gate e2e: {message}")
