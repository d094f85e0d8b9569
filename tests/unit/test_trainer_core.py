"""Trainer plumbing: registry, contract errors, progress.json, Prometheus endpoint, checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from temper.api.contract import (
    EXIT_INVALID_CONTRACT,
    StageContract,
    StageProgress,
    StageResult,
    StorageConfig,
)
from temper.storage import Storage
from temper_dev.s3server import S3Server, free_port
from temper_trainer.__main__ import termination_message
from temper_trainer.checkpoint import Checkpointer
from temper_trainer.metrics import TrainerMetrics
from temper_trainer.progress import ProgressReporter, progress_uri
from temper_trainer.stages import STAGE_MODULES, get_stage, register_stage

pytestmark = pytest.mark.unit


def contract(bucket: str, endpoint: str, **extra: object) -> StageContract:
    return StageContract.model_validate(
        {
            "run": {"namespace": "ns", "name": "run"},
            "stage": {"name": "sft", "type": "sft", "attempt": 2},
            "baseModel": "builtin://tiny",
            "storage": {"endpointUrl": endpoint},
            "output": {"prefix": f"s3://{bucket}/out/sft/"},
            **extra,
        }
    )


@pytest.fixture
def storage(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Storage:
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    return Storage(StorageConfig(endpointUrl=s3_server.endpoint_url))


def test_registry_knows_every_stage_type_and_rejects_unknown() -> None:
    assert set(STAGE_MODULES) == {
        "sft",
        "dpo",
        "grpo",
        "reward-model",
        "synthetic-preferences",
        "eval",
        "merge",
    }
    assert callable(get_stage("sft"))
    assert callable(get_stage("eval"))
    with pytest.raises(KeyError, match="unknown stage type 'ppo'"):
        get_stage("ppo")
    with pytest.raises(ValueError, match="unknown stage type"):
        register_stage("ppo")


def test_invalid_contract_exits_10_naming_the_field(tmp_path: Path) -> None:
    term = tmp_path / "termination"
    bad = {
        "run": {"namespace": "ns", "name": "r"},
        "stage": {"name": "s", "type": "sft"},
        "baseModel": "x",
        "output": {"prefix": "s3://b/p/"},
        "hyperparameters": {"learningRate": -1},
    }
    env = {**os.environ, "TEMPER_STAGE_CONTRACT": json.dumps(bad), "TEMPER_TERMINATION_LOG": str(term)}
    proc = subprocess.run(
        [sys.executable, "-m", "temper_trainer", "run"],
        env=env,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == EXIT_INVALID_CONTRACT
    result = StageResult.model_validate_json(term.read_text())
    assert result.error is not None
    assert "hyperparameters.learningRate" in result.error
    env.pop("TEMPER_STAGE_CONTRACT")
    proc = subprocess.run(
        [sys.executable, "-m", "temper_trainer", "run"],
        env=env,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == EXIT_INVALID_CONTRACT
    assert "is not set" in term.read_text()


def test_termination_message_stays_under_4k() -> None:
    metrics = {f"suite/very-long-suite-name-{i}/exact_match": 0.5 for i in range(200)} | {"eval/loss": 1.0}
    body = termination_message(StageResult(manifestUri="s3://b/m.json", sha256="a" * 64, metrics=metrics))
    parsed = StageResult.model_validate_json(body)
    assert len(body.encode()) <= 4096
    assert parsed.metrics["eval/loss"] == 1.0
    assert parsed.manifest_uri


def test_progress_json_is_written_rate_limited(storage: Storage, s3_bucket: str, s3_server: S3Server) -> None:
    c = contract(s3_bucket, s3_server.endpoint_url, progressIntervalSeconds=3600)
    reporter = ProgressReporter(c, storage)
    assert progress_uri(c) == f"s3://{s3_bucket}/out/sft/attempts/2/progress.json"
    reporter.set_phase("starting")
    assert reporter.interval == 30.0  # the progress contract: at least every 30 s
    reporter.update(step=1, total=100, loss=2.0, tokens=100)
    reporter.update(step=2, total=100, loss=1.5, tokens=100)  # within the interval: not written
    first = StageProgress.model_validate_json(storage.get_bytes(progress_uri(c)))
    assert first.phase == "starting"
    assert first.step == 0
    reporter.update(step=10, total=100, loss=1.2, tokens=100)  # crossed the 10% mark: written
    tenth = StageProgress.model_validate_json(storage.get_bytes(progress_uri(c)))
    assert (tenth.step, tenth.percent) == (10, 10.0)
    reporter.update(step=11, total=100, loss=1.1, tokens=100)  # same decile, within 30 s: not written
    assert StageProgress.model_validate_json(storage.get_bytes(progress_uri(c))).step == 10
    reporter.update(step=50, total=100, loss=1.0, tokens=100, force=True)
    now = StageProgress.model_validate_json(storage.get_bytes(progress_uri(c)))
    assert (now.step, now.total_steps, now.percent, now.loss, now.phase) == (50, 100, 50.0, 1.0, "training")
    assert now.eta_seconds is not None
    assert now.tokens_per_second
    assert now.updated_at.endswith("Z")
    reporter.set_phase("done")
    done = StageProgress.model_validate_json(storage.get_bytes(progress_uri(c)))
    assert done.phase == "done"
    assert done.percent == 100.0


def test_metrics_endpoint_serves_the_agreed_names() -> None:
    metrics = TrainerMetrics()
    port = free_port()
    metrics.serve(port, addr="127.0.0.1")
    metrics.update(step=3, total=12, loss=0.75, tokens_per_second=1234.0, reward=0.5, kl=0.01)
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    values = {
        line.split()[0]: float(line.split()[1])
        for line in body.splitlines()
        if line and not line.startswith("#")
    }
    assert values["temper_trainer_loss"] == 0.75
    assert values["temper_trainer_step"] == 3
    assert values["temper_trainer_progress_ratio"] == 0.25
    assert values["temper_trainer_tokens_per_second"] == 1234.0
    assert values["temper_trainer_reward"] == 0.5
    assert values["temper_trainer_kl"] == 0.01


def test_metrics_endpoint_waits_for_a_scrape_of_the_final_values() -> None:
    metrics = TrainerMetrics()
    assert metrics.await_final_scrape(30) is False  # no server: nothing to wait for
    port = free_port()
    metrics.serve(port, addr="127.0.0.1")
    url = f"http://127.0.0.1:{port}/metrics"
    urllib.request.urlopen(url, timeout=5).read()
    metrics.update(step=12, total=12, loss=0.5)  # the final values: the earlier scrape missed them
    start = time.monotonic()
    assert metrics.await_final_scrape(0.3) is False  # nobody scraped them: give up at the bound
    assert time.monotonic() - start >= 0.3
    assert metrics.await_final_scrape(30, stopping=lambda: True) is False  # SIGTERM: no waiting
    scraper = threading.Timer(0.3, lambda: urllib.request.urlopen(url, timeout=5).read())
    scraper.start()
    start = time.monotonic()
    assert metrics.await_final_scrape(30) is True  # returns once a scrape read them
    scraper.join()
    assert metrics.await_final_scrape(30) is True  # already scraped: at once


def test_checkpoints_resume_from_newest_complete_and_prune(
    storage: Storage, s3_bucket: str, s3_server: S3Server, tmp_path: Path
) -> None:
    import torch

    c = contract(
        s3_bucket, s3_server.endpoint_url, checkpoint={"everySteps": 5, "everySeconds": 3600, "keep": 2}
    )
    ckpt = Checkpointer(c, storage, tmp_path)
    assert ckpt.latest() is None
    assert [s for s in range(1, 16) if ckpt.should_checkpoint(s)] == [5, 10, 15]
    extra = tmp_path / "extra.txt"
    extra.write_text("side file")
    for step in (5, 10, 15):
        ckpt.save(step, {"step": step, "w": torch.full((3,), float(step))}, files={"extra.txt": extra})
    assert ckpt.complete_steps() == [10, 15]  # keep=2 pruned step 5
    # an upload cut short (no marker) is ignored; so is one whose file was corrupted
    storage.put_bytes(f"s3://{s3_bucket}/out/sft/checkpoints/step-20/state.pt", b"partial")
    storage.put_bytes(f"s3://{s3_bucket}/out/sft/checkpoints/step-15/state.pt", b"corrupted")
    latest = ckpt.latest()
    assert latest is not None
    assert latest.step == 10
    assert torch.equal(latest.state["w"], torch.full((3,), 10.0))
    assert (latest.dir / "extra.txt").read_text() == "side file"


def test_tiny_model_build_is_deterministic(tmp_path: Path) -> None:
    from temper.storage import sha256_file
    from temper_trainer.tinymodel import build_tiny_model

    build_tiny_model(tmp_path / "a", steps=15)
    build_tiny_model(tmp_path / "b", steps=15)
    a, b = tmp_path / "a" / "model.safetensors", tmp_path / "b" / "model.safetensors"
    assert sha256_file(a) == sha256_file(b)
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (
        tmp_path / "b" / "tokenizer.json"
    ).read_bytes()
