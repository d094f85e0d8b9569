"""The platform policy in code (operator/temper/policy.py): every rule, one case each way."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from temper.api.adapter import AdapterSpec
from temper.api.run import PostTrainingRunSpec
from temper.policy import POLICY_ENV, PlatformPolicy, adapter_violations, run_violations

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
STRICT = PlatformPolicy(
    defaultTrainerImage="ghcr.io/temper/trainer:0.1.0",
    allowedImagePrefixes=("registry.corp/ml/",),
    allowedPriorityClasses=("ml-batch",),
    maxGpusPerStage=8,
    maxNodesPerStage=2,
    maxGpusPerRun=12,
    allowedStorage=("s3://temper/{namespace}/", "s3://shared-datasets/"),
    defaultStorageEndpoint="http://minio.storage:9000",
)


def spec(**changes: Any) -> dict[str, Any]:
    out = copy.deepcopy(QUICKSTART["spec"])
    out["storage"]["uri"] = "s3://temper/team-a/quickstart/"
    out.update(changes)
    return out


def fields(raw: dict[str, Any], annotations: dict[str, str] | None = None, ns: str = "team-a") -> list[str]:
    found = run_violations(PostTrainingRunSpec.model_validate(raw), ns, annotations, STRICT)
    return [message.split(":", 1)[0] for message in found]


def with_stage_resources(**resources: Any) -> dict[str, Any]:
    raw = spec()
    raw["stages"][0]["resources"] = resources
    return raw


def test_quickstart_in_its_own_prefix_is_allowed() -> None:
    assert fields(spec()) == []


def test_default_policy_allows_the_quickstart_anywhere() -> None:
    quickstart = PostTrainingRunSpec.model_validate(QUICKSTART["spec"])
    assert run_violations(quickstart, "default", None, PlatformPolicy()) == []


# (spec, annotations, the fields named): shared with tests/cluster/test_admission_policy.py,
# which holds the chart's ValidatingAdmissionPolicy to the same answers on the real apiserver.
CASES: list[tuple[dict[str, Any], dict[str, str] | None, list[str]]] = [
    (spec(trainer={"image": "evil.example/miner:latest"}), None, ["spec.trainer.image"]),
    (spec(trainer={"image": "registry.corp/ml/trainer:2"}), None, []),
    (spec(trainer={"image": "ghcr.io/temper/trainer:0.1.0"}), None, []),
    (spec(priorityClassName="system-cluster-critical"), None, ["spec.priorityClassName"]),
    (spec(priorityClassName="ml-batch"), None, []),
    (
        spec(trainer={"env": [{"name": "TEMPER_FAILPOINT", "value": "x"}]}),
        None,
        ["spec.trainer.env[name=TEMPER_FAILPOINT]"],
    ),
    (
        spec(trainer={"env": [{"name": "LD_PRELOAD", "value": "/x.so"}]}),
        None,
        ["spec.trainer.env[name=LD_PRELOAD]"],
    ),
    (spec(trainer={"env": [{"name": "WANDB_MODE", "value": "offline"}]}), None, []),
    (with_stage_resources(gpus=8, nodes=2), None, ["spec.stages[name=sft].resources", "spec.stages"]),
    (with_stage_resources(gpus=1, nodes=3), None, ["spec.stages[name=sft].resources.nodes"]),
    (with_stage_resources(gpus=4, nodes=2), None, []),
    (with_stage_resources(affinity={"nodeAffinity": {}}), None, ["spec.stages[name=sft].resources.affinity"]),
    (spec(), {"temper.dev/pod-annotations": "{}"}, ["metadata.annotations[temper.dev/pod-annotations]"]),
    (spec(storage={"uri": "s3://temper/team-b/quickstart/"}), None, ["spec.storage.uri"]),
    (
        spec(storage={"uri": "s3://temper/team-a/q/", "endpointUrl": "http://127.0.0.1:6443"}),
        None,
        ["spec.storage.endpointUrl"],
    ),
    (spec(storage={"uri": "s3://temper/team-a/q/", "endpointUrl": "http://minio.storage:9000"}), None, []),
    (spec(baseModel={"uri": "s3://temper/team-b/models/llama/"}), None, ["spec.baseModel.uri"]),
    (spec(baseModel={"uri": "s3://shared-datasets/models/llama/"}), None, []),
    (
        spec(
            continual={
                "schedule": "@daily",
                "newData": {"dataset": "arith", "prefix": "s3://temper/team-b/incoming/"},
                "replay": {"ratio": 0.2, "buffer": {"uri": "s3://temper/team-b/replay/"}},
            }
        ),
        None,
        ["spec.continual.newData.prefix", "spec.continual.replay.buffer.uri"],
    ),
]
# The chart values that render STRICT.
STRICT_VALUES: dict[str, Any] = {
    "trainer": {"image": {"repository": "ghcr.io/temper/trainer", "tag": "0.1.0"}},
    "storage": {"endpoint": "http://minio.storage:9000"},
    "policy": {
        "allowedImagePrefixes": ["registry.corp/ml/"],
        "allowedPriorityClasses": ["ml-batch"],
        "maxGpusPerStage": 8,
        "maxNodesPerStage": 2,
        "maxGpusPerRun": 12,
        "allowedStorage": ["s3://temper/{namespace}/", "s3://shared-datasets/"],
    },
}


@pytest.mark.parametrize(("raw", "annotations", "expected"), CASES)
def test_rules(raw: dict[str, Any], annotations: dict[str, str] | None, expected: list[str]) -> None:
    assert fields(raw, annotations) == expected


def test_per_run_gpu_total() -> None:
    raw = spec()
    for stage in raw["stages"]:
        stage["resources"] = {"gpus": 8}
    assert fields(raw) == ["spec.stages"]


def test_dataset_outside_the_namespace_prefix() -> None:
    raw = spec()
    raw["datasets"][0]["uri"] = "s3://temper/team-b/private.jsonl"
    assert fields(raw) == ["spec.datasets[name=arith].uri"]


def test_adapter_artifact_location_and_endpoint() -> None:
    def adapter(uri: str, endpoint: str | None = None) -> AdapterSpec:
        artifact: dict[str, Any] = {"uri": uri}
        if endpoint:
            artifact["endpointUrl"] = endpoint
        return AdapterSpec.model_validate(
            {"baseModel": {"uri": "builtin://tiny"}, "artifact": artifact, "method": "lora"}
        )

    own = "s3://temper/team-a/runs/q/g1/sft/manifest.json"
    other = "s3://temper/team-b/runs/q/g1/sft/manifest.json"
    assert adapter_violations(adapter(own), "team-a", STRICT) == []
    assert [m.split(":")[0] for m in adapter_violations(adapter(other), "team-a", STRICT)] == [
        "spec.artifact.uri"
    ]
    assert [
        m.split(":")[0] for m in adapter_violations(adapter(own, "http://10.0.0.1/"), "team-a", STRICT)
    ] == ["spec.artifact.endpointUrl"]


def test_policy_reads_the_chart_env() -> None:
    env = {POLICY_ENV: json.dumps({"allowedStorage": ["s3://b/{namespace}/"], "maxGpusPerStage": None})}
    policy = PlatformPolicy.from_env(env)
    assert policy.storage_allowed("s3://b/ns/x", "ns")
    assert not policy.storage_allowed("s3://b/other/x", "ns")
    assert PlatformPolicy.from_env({}) == PlatformPolicy()


# -- storage authority: the operator's own identity, continual locations, cached Adapters ---------
def test_ambient_identity_only_for_locations_the_platform_lists() -> None:
    raw = spec()
    raw["storage"].pop("secretRef")
    quickstart = PostTrainingRunSpec.model_validate(raw)
    open_policy = PlatformPolicy()
    found = run_violations(quickstart, "team-a", None, open_policy, credentials=False)
    assert [m.split(":", 1)[0] for m in found] == ["spec.storage.secretRef"]
    assert "allowedStorage" in found[0]
    # Listed locations may use it; a Secret of the namespace always may.
    assert run_violations(quickstart, "team-a", None, STRICT, credentials=False) == []
    assert run_violations(quickstart, "team-a", None, open_policy, credentials=True) == []


def test_cached_adapter_recheck_names_artifact_endpoint_and_base_model() -> None:
    from temper.policy import raw_adapter_violations

    adapter = {
        "metadata": {"namespace": "team-a", "name": "stolen"},
        "spec": {
            "baseModel": {"uri": "s3://temper/team-b/base/"},
            "artifact": {
                "uri": "s3://temper/team-b/runs/q/manifest.json",
                "endpointUrl": "http://127.0.0.1:6443",
                "secretRef": {"name": "mine"},
            },
        },
    }
    found = raw_adapter_violations(adapter, STRICT, None)
    assert [m.split(":", 1)[0] for m in found] == [
        "spec.artifact.endpointUrl",
        "spec.artifact.uri",
        "spec.baseModel.uri",
    ]
    assert raw_adapter_violations(adapter, None, None) == []  # no policy outside the chart
    adapter["spec"]["artifact"] = {"uri": "s3://temper/team-a/q/manifest.json"}
    adapter["spec"]["baseModel"] = {"uri": "builtin://tiny"}
    assert raw_adapter_violations(adapter, STRICT, None) == []
    assert raw_adapter_violations(adapter, PlatformPolicy(), None)[0].startswith("spec.artifact.secretRef")
    assert raw_adapter_violations(adapter, PlatformPolicy(), "temper-s3") == []


@pytest.mark.parametrize(
    "uri",
    ["s3://temper/team-a/../team-b/q/", "s3://temper/team-a/./x/../../team-b/", "s3://temper/team-a/.."],
)
def test_dot_segments_never_pass_the_prefix_check(uri: str) -> None:
    assert not STRICT.storage_allowed(uri, "team-a")
    assert not PlatformPolicy().storage_allowed(uri, "team-a")  # even with no allowedStorage


def test_manifest_paths_stay_in_their_folder() -> None:
    from pydantic import ValidationError
    from temper.api.contract import ManifestFile

    for path in ("../team-b/x.bin", "/etc/passwd", "a//b", "a/./b"):
        with pytest.raises(ValidationError, match="not a path inside the manifest's folder"):
            ManifestFile.model_validate({"path": path, "sha256": "0" * 64, "size": 1})
    assert ManifestFile.model_validate({"path": "attempts/1/a.bin", "sha256": "0", "size": 1}).path
