"""Helpers for the trainer tests: build contracts and run stages the way a pod does."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
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
    return Storage(StorageConfig.model_validate({"endpointUrl": server.endpoint_url}))


def manifest_of(storage: Storage, result: StageResult) -> Manifest:
    assert result.manifest_uri, result.error
    return storage.read_manifest(result.manifest_uri)[0]


# -- RL stages (dpo, grpo, reward-model, synthetic-preferences, merge) -------------------------------
@dataclass
class RlStages:
    """One test's handle on the RL stages: contracts writing into the test bucket, real runs
    through the trainer's entry point, and the storage the artifacts land in."""

    storage: Storage
    bucket: str
    endpoint: str
    tmp_path: Path
    monkeypatch: pytest.MonkeyPatch

    def doc(self, name: str, stage_type: str, **fields: Any) -> dict[str, Any]:
        return {
            "run": {"namespace": "ns", "name": "rl"},
            "stage": {"name": name, "type": stage_type},
            "baseModel": "builtin://tiny",
            "storage": {"endpointUrl": self.endpoint},
            "output": {"prefix": f"s3://{self.bucket}/rl/{name}/"},
            "checkpoint": {"everySteps": 1000, "everySeconds": 3600},
            **fields,
        }

    def run(self, doc: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """Run one stage through the trainer's real entry point; (exit code, termination message)."""
        from temper_trainer.__main__ import run_stage

        name = doc["stage"]["name"]
        log = self.tmp_path / f"{name}.termination"
        self.monkeypatch.setenv("TEMPER_TERMINATION_LOG", str(log))
        code = run_stage(StageContract.model_validate(doc).to_env(), self.tmp_path / f"work-{name}")
        return code, json.loads(log.read_text())

    def published(self, result: dict[str, Any]) -> dict[str, Any]:
        """The manifest of a finished stage, after checking every file it lists."""
        verified = self.storage.verify_manifest(result["manifestUri"])
        assert verified.ok, verified.problems
        assert verified.manifest is not None
        return verified.manifest.model_dump(by_alias=True)

    def download(self, manifest_uri: str, folder: str) -> Path:
        dest = self.tmp_path / folder
        self.storage.download_verified(manifest_uri, dest)
        return dest


@pytest.fixture(name="rl")
def rl_fixture(
    s3_server: S3Server, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_model: Path
) -> Iterator[RlStages]:
    """The ``rl`` fixture (import ``rl_fixture`` to use it). Tiny models train fastest on one
    thread; two threads on a shared 2-core box spin-wait."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield RlStages(
        storage_for(s3_server, monkeypatch), s3_bucket, s3_server.endpoint_url, tmp_path, monkeypatch
    )
    torch.set_num_threads(threads)
