"""Job builder: where models and data come from — Hub endpoint and token, pvc:// claims mounted
read-only, and the model-cache volume (emptyDir, ephemeral or a shared PVC)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError
from temper.api.common import ModelCache
from temper.api.run import PostTrainingRun
from temper.builders import build_job, stage_contract
from temper.config import ConfigError, OperatorConfig

from tests.unit.test_planner import sample_run

pytestmark = pytest.mark.unit

HUB = OperatorConfig(trainer_image="trainer:test", hf_endpoint="https://hub.internal.example")


def _pod(config: OperatorConfig = HUB, **spec: Any) -> dict[str, Any]:
    run = PostTrainingRun.model_validate(sample_run(**spec))
    stage = run.spec.stages[0]
    contract = stage_contract(run, stage, cycle=1, attempt=1, config=config)
    job = build_job(run, stage, contract, cycle=1, attempt=1, suspend=False, config=config)
    return dict(job["spec"]["template"]["spec"])


def _env(pod: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in pod["containers"][0]["env"]}


def _volumes(pod: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in pod["volumes"]}


def _mounts(pod: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}


def test_hf_base_model_gets_the_endpoint_and_the_token_by_reference() -> None:
    pod = _pod(baseModel={"uri": "hf://meta-llama/Llama-3.1-8B@main", "secretRef": {"name": "hf"}})
    env = _env(pod)
    assert env["HF_ENDPOINT"]["value"] == "https://hub.internal.example"
    assert env["HF_TOKEN"] == {
        "name": "HF_TOKEN",
        "valueFrom": {"secretKeyRef": {"name": "hf", "key": "HF_TOKEN"}},
    }
    assert env["HF_HUB_DISABLE_TELEMETRY"]["value"] == "1"
    assert env["HF_HUB_DISABLE_PROGRESS_BARS"]["value"] == "1"
    # a user's env can neither replace the token reference nor the operator's endpoint
    pod = _pod(
        baseModel={"uri": "hf://org/m", "secretRef": {"name": "hf"}},
        trainer={"env": [{"name": "HF_TOKEN", "value": "leak"}, {"name": "HF_ENDPOINT", "value": "x"}]},
    )
    assert "value" not in _env(pod)["HF_TOKEN"]
    assert _env(pod)["HF_ENDPOINT"]["value"] == "https://hub.internal.example"


def test_no_token_without_a_secret_nor_for_other_sources() -> None:
    assert "HF_TOKEN" not in _env(_pod(baseModel={"uri": "hf://org/m"}))
    assert "HF_TOKEN" not in _env(_pod(baseModel={"uri": "s3://b/m/", "secretRef": {"name": "aws"}}))
    assert "HF_ENDPOINT" not in _env(_pod(OperatorConfig(), baseModel={"uri": "hf://org/m"}))


def test_pvc_base_model_mounts_its_claim_read_only() -> None:
    pod = _pod(baseModel={"uri": "pvc://weights/llama-3-8b"})
    assert _volumes(pod)["base-model"] == {
        "name": "base-model",
        "persistentVolumeClaim": {"claimName": "weights", "readOnly": True},
    }
    assert _mounts(pod)["base-model"] == {
        "name": "base-model",
        "mountPath": "/mnt/temper/pvc/weights",
        "readOnly": True,
    }
    assert json.loads(_env(pod)["TEMPER_PVC_MOUNTS"]["value"]) == {"weights": "/mnt/temper/pvc/weights"}


def test_model_cache_defaults_to_an_empty_dir_at_the_configured_path() -> None:
    pod = _pod()
    assert _volumes(pod)["model-cache"] == {"name": "model-cache", "emptyDir": {}}
    assert _mounts(pod)["model-cache"]["mountPath"] == "/var/cache/temper/models"
    assert _env(pod)["TEMPER_MODEL_CACHE"]["value"] == "/var/cache/temper/models"
    sized = OperatorConfig(model_cache=ModelCache(type="emptyDir", size="50Gi"))
    assert _volumes(_pod(sized))["model-cache"]["emptyDir"] == {"sizeLimit": "50Gi"}


def test_model_cache_ephemeral_and_pvc() -> None:
    config = OperatorConfig(
        model_cache=ModelCache.model_validate(
            {"type": "ephemeral", "size": "200Gi", "storageClassName": "nvme"}
        )
    )
    template = _volumes(_pod(config))["model-cache"]["ephemeral"]["volumeClaimTemplate"]
    assert template["spec"] == {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": "200Gi"}},
        "storageClassName": "nvme",
    }
    # the run's own choice wins over the operator's
    pod = _pod(config, trainer={"modelCache": {"type": "pvc", "claimName": "models"}})
    assert _volumes(pod)["model-cache"]["persistentVolumeClaim"] == {"claimName": "models"}


def test_model_cache_set_by_the_users_env_mounts_nothing() -> None:
    pod = _pod(trainer={"env": [{"name": "TEMPER_MODEL_CACHE", "value": "/shared/models"}]})
    assert "model-cache" not in _volumes(pod)
    assert _env(pod)["TEMPER_MODEL_CACHE"]["value"] == "/shared/models"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"type": "ephemeral"}, "size: required for an ephemeral model cache"),
        ({"type": "pvc"}, "claimName: required for, and only for, a pvc model cache"),
        ({"type": "emptyDir", "claimName": "x"}, "claimName: required for, and only for"),
        ({"type": "pvc", "claimName": "x", "storageClassName": "s"}, "storageClassName: only an ephemeral"),
    ],
)
def test_model_cache_rules_name_the_field(fields: dict[str, str], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ModelCache.model_validate(fields)


def test_operator_config_reads_hub_and_cache_settings() -> None:
    config = OperatorConfig.from_env(
        {
            "TEMPER_HF_ENDPOINT": "http://olah.mirrors:8090/",
            "TEMPER_MODEL_CACHE_TYPE": "pvc",
            "TEMPER_MODEL_CACHE_CLAIM": "models",
            "TEMPER_MODEL_CACHE_PATH": "/models",
        }
    )
    assert config.hf_endpoint == "http://olah.mirrors:8090"
    assert config.model_cache == ModelCache(type="pvc", claim_name="models")
    assert config.model_cache_path == "/models"
    with pytest.raises(ConfigError, match="TEMPER_HF_ENDPOINT: expected an http"):
        OperatorConfig.from_env({"TEMPER_HF_ENDPOINT": "olah:8090"})
    with pytest.raises(ConfigError, match="TEMPER_MODEL_CACHE_"):
        OperatorConfig.from_env({"TEMPER_MODEL_CACHE_TYPE": "ephemeral"})
    with pytest.raises(ConfigError, match="TEMPER_MODEL_CACHE_PATH: expected an absolute path"):
        OperatorConfig.from_env({"TEMPER_MODEL_CACHE_PATH": "models"})


@pytest.mark.parametrize(
    ("uri", "ok"),
    [
        ("hf://meta-llama/Llama-3.1-8B", True),
        ("hf://org/name@v1.0", True),
        ("hf://org/name@refs%2Fpr%2F1", True),
        ("hf://gpt2", False),
        ("hf://datasets/org/name", False),
        ("hf://org/name/extra", False),
        ("pvc://weights/llama", True),
        ("pvc://weights", True),
        ("pvc://Weights/x", False),
        ("pvc://weights/../secrets", False),
        ("/models/../etc", False),
    ],
)
def test_base_model_uri_rules(uri: str, ok: bool) -> None:
    from temper.api.common import ModelSource

    if ok:
        ModelSource(uri=uri)
    else:
        with pytest.raises(ValidationError):
            ModelSource(uri=uri)


@pytest.mark.parametrize(
    ("uri", "ok"),
    [
        ("hf://datasets/org/name", True),
        ("hf://datasets/org/name@main?split=validation", True),
        ("hf://datasets/org/name@abc123/data/train.jsonl", True),
        ("hf://org/name", False),
        ("hf://datasets/org/name?rows=3", False),
    ],
)
def test_dataset_uri_rules(uri: str, ok: bool) -> None:
    from temper.api.run import Dataset

    if ok:
        Dataset(name="d", uri=uri)
    else:
        with pytest.raises(ValidationError):
            Dataset(name="d", uri=uri)
