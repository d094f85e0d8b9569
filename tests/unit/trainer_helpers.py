"""Helpers for the trainer tests: build contracts and run stages the way a pod does."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pytest
from temper.api.contract import Manifest, StageContract, StageResult, StorageConfig
from temper.storage import Storage
from temper_dev.s3server import S3Server


def make_contract(server: S3Server, bucket: str, name: str, **overrides: Any) -> StageContract:
    body: dict[str, Any] = {
        "run": {"namespace": "test", "name": "run"},
        "stage": {"name": name, "type": "sft"},
        "baseModel": "builtin://tiny",
        "storage": {"endpointUrl": server.endpoint_url},
        "output": {"prefix": f"s3://{bucket}/runs/run/{name}/"},
        "peft": {"method": "lora", "r": 8, "alpha": 16},
        "data": {
            "train": [{"name": "arith", "uri": "builtin://arith?n=80", "format": "chat"}],
            "eval": [{"name": "arith-eval", "uri": "builtin://arith?n=20&split=eval", "format": "chat"}],
        },
        "hyperparameters": {"maxSteps": 100, "learningRate": 3e-3, "batchSize": 16, "packing": True},
        "checkpoint": {"everySteps": 1000},
        "progressIntervalSeconds": 5,
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(body.get(key), dict):
            body[key] = {**body[key], **value}
        else:
            body[key] = value
    return StageContract.model_validate(body)


def run_in_process(
    contract: StageContract, monkeypatch: pytest.MonkeyPatch, server: S3Server, tmp: Path | None = None
) -> tuple[int, StageResult]:
    from temper_trainer.__main__ import run_stage

    for key, value in server.env.items():
        monkeypatch.setenv(key, value)
    scratch = Path(tempfile.mkdtemp(dir=tmp))
    term = scratch / "termination-log"
    monkeypatch.setenv("TEMPER_TERMINATION_LOG", str(term))
    code = run_stage(contract.to_env(), scratch / "work")
    return code, StageResult.model_validate_json(term.read_text())


def storage_for(server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Storage:
    for key, value in server.env.items():
        monkeypatch.setenv(key, value)
    return Storage(StorageConfig(endpointUrl=server.endpoint_url))


def manifest_of(storage: Storage, result: StageResult) -> Manifest:
    assert result.manifest_uri, result.error
    return storage.read_manifest(result.manifest_uri)[0]
