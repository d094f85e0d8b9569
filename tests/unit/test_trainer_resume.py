"""SIGTERM mid-stage, then restart: the real ``python -m temper_trainer run`` path as subprocesses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from temper.api.contract import EXIT_OK, EXIT_PREEMPTED, StageProgress, StageResult
from temper_dev.s3server import S3Server
from temper_trainer.checkpoint import Checkpointer

from .trainer_helpers import make_contract, manifest_of, run_in_process, storage_for

pytestmark = [pytest.mark.unit, pytest.mark.slow]


def start(contract_env: str, server: S3Server, term: Path, workdir: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        **server.env,
        "TEMPER_STAGE_CONTRACT": contract_env,
        "TEMPER_TERMINATION_LOG": str(term),
        "TEMPER_WORKDIR": str(workdir),
    }
    return subprocess.Popen([sys.executable, "-m", "temper_trainer", "run"], env=env, stderr=subprocess.PIPE)


def test_sigterm_checkpoints_then_restart_resumes_and_matches_uninterrupted(
    s3_server: S3Server, s3_bucket: str, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    steps = 120
    overrides = {
        "hyperparameters": {"maxSteps": steps},
        "progressIntervalSeconds": 1,
        "checkpoint": {"everySteps": 1000, "everySeconds": 3600},
    }
    contract = make_contract(s3_server, s3_bucket, "resumed", **overrides)
    storage = storage_for(s3_server, monkeypatch)
    progress_uri = f"{contract.output.prefix}attempts/1/progress.json"

    proc = start(contract.to_env(), s3_server, tmp_path / "term1", tmp_path / "w1")
    deadline = time.monotonic() + 180
    seen = 0
    while time.monotonic() < deadline and proc.poll() is None:
        if storage.exists(progress_uri):
            seen = StageProgress.model_validate_json(storage.get_bytes(progress_uri)).step
            if seen >= 5:
                break
        time.sleep(0.2)
    assert proc.poll() is None, "the stage finished or died before it could be interrupted"
    assert seen >= 5, "the stage finished or died before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, stderr.decode()[-2000:]
    interrupted = StageResult.model_validate_json((tmp_path / "term1").read_text())
    assert interrupted.error
    assert "Preempted" in interrupted.error
    checkpoints = Checkpointer(contract, storage, tmp_path / "ck").complete_steps()
    assert len(checkpoints) == 1
    assert seen <= checkpoints[0] < steps
    assert not storage.exists(f"{contract.output.prefix}manifest.json")

    second = contract.model_copy(update={"stage": contract.stage.model_copy(update={"attempt": 2})})
    proc = start(second.to_env(), s3_server, tmp_path / "term2", tmp_path / "w2")
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_OK, stderr.decode()[-2000:]
    resumed = StageResult.model_validate_json((tmp_path / "term2").read_text())
    manifest = manifest_of(storage, resumed)
    assert manifest.lineage["resumedFromStep"] == checkpoints[0]
    assert manifest.lineage["attempt"] == 2
    assert all(f.path.startswith("attempts/2/") for f in manifest.files)
    done = StageProgress.model_validate_json(
        storage.get_bytes(f"{contract.output.prefix}attempts/2/progress.json")
    )
    assert (done.phase, done.step, done.total_steps) == ("done", steps, steps)

    straight = make_contract(s3_server, s3_bucket, "straight", **overrides)
    code, result = run_in_process(straight, monkeypatch, s3_server, tmp_path)
    assert code == EXIT_OK, result.error
    reference = manifest_of(storage, result).metrics
    print(
        f"final train loss: resumed {manifest.metrics['train/loss']:.4f}, "
        f"uninterrupted {reference['train/loss']:.4f}"
    )
    assert manifest.metrics["train/loss"] == pytest.approx(reference["train/loss"], abs=0.02, rel=0.05)
    assert manifest.metrics["eval/loss"] == pytest.approx(reference["eval/loss"], abs=0.02, rel=0.05)


def test_restart_after_publish_is_idempotent(
    s3_server: S3Server, s3_bucket: str, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    contract = make_contract(s3_server, s3_bucket, "twice", hyperparameters={"maxSteps": 3})
    code, first = run_in_process(contract, monkeypatch, s3_server, tmp_path)
    assert code == EXIT_OK, first.error
    again = contract.model_copy(update={"stage": contract.stage.model_copy(update={"attempt": 2})})
    started = time.monotonic()
    code, second = run_in_process(again, monkeypatch, s3_server, tmp_path)
    assert code == EXIT_OK
    assert (second.manifest_uri, second.sha256) == (first.manifest_uri, first.sha256)
    assert time.monotonic() - started < 10  # no retraining: the verified manifest is reused
