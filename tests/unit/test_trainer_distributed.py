"""One pod, two processes: the real ``python -m temper_trainer run`` launching 2 CPU workers over gloo.

DDP equivalence: 2 ranks x batch 8 must train like 1 process x batch 16 (same global batch, same
examples per step, gradients all-reduced). Only fp32 summation order differs, and learning rate
3e-3 amplifies it over the steps, so the tolerance grows with them: per-step loss within 1e-3 for
the first 10 steps and 2e-2 (about 1% of the loss) after; adapter weights within 1e-2.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from temper.api.contract import EXIT_OK, EXIT_PREEMPTED, StageContract, StageProgress, StageResult
from temper.storage import S3Uri, Storage
from temper_dev.s3server import S3Server
from temper_trainer.checkpoint import Checkpointer

from .trainer_helpers import make_contract, manifest_of, run_in_process, storage_for

pytestmark = [pytest.mark.unit, pytest.mark.slow]

STEPS = 30
EARLY_STEPS, EARLY_TOLERANCE, LOSS_TOLERANCE = 10, 1e-3, 2e-2
WEIGHT_TOLERANCE = 1e-2


def start(contract: StageContract, server: S3Server, term: Path, workdir: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        **server.env,
        "TEMPER_STAGE_CONTRACT": contract.to_env(),
        "TEMPER_TERMINATION_LOG": str(term),
        "TEMPER_WORKDIR": str(workdir),
        "TEMPER_NPROC_PER_NODE": "2",
    }
    return subprocess.Popen([sys.executable, "-m", "temper_trainer", "run"], env=env, stderr=subprocess.PIPE)


def worker_pids(agent: int) -> dict[int, int]:
    """Global rank -> pid of the agent's worker processes (read from /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = dict(
                item.split("=", 1) for item in (entry / "environ").read_text().split("\0") if "=" in item
            )
        except (OSError, ValueError, IndexError):
            continue
        if ppid == agent and "RANK" in env:
            found[int(env["RANK"])] = int(entry.name)
    return found


def logged_losses(storage: Storage, prefix: str, step: int) -> list[float]:
    """The per-step training losses in the Trainer state of checkpoint ``step``."""
    uri = S3Uri.parse(prefix).join("checkpoints", f"step-{step}", "trainer_state.json")
    state = json.loads(storage.get_bytes(str(uri)))
    return [float(entry["loss"]) for entry in state["log_history"] if "loss" in entry]


def adapter_weights(storage: Storage, manifest_uri: str, tmp: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    storage.download_verified(manifest_uri, tmp)
    return load_file(str(tmp / "adapter_model.safetensors"))


def test_two_ranks_match_one_process_publish_once_and_resume_after_sigterm(
    s3_server: S3Server, s3_bucket: str, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = storage_for(s3_server, monkeypatch)
    common = {"progressIntervalSeconds": 1, "checkpoint": {"everySteps": STEPS - 1, "everySeconds": 3600}}
    single = make_contract(
        s3_server, s3_bucket, "single", hyperparameters={"maxSteps": STEPS, "batchSize": 16}, **common
    )
    code, reference = run_in_process(single, monkeypatch, s3_server, tmp_path)
    assert code == EXIT_OK, reference.error
    assert reference.topology is not None
    assert reference.topology.world_size == 1

    ddp = make_contract(
        s3_server, s3_bucket, "ddp", hyperparameters={"maxSteps": STEPS, "batchSize": 8}, **common
    )
    progress_uri = f"{ddp.output.prefix}attempts/1/progress.json"
    proc = start(ddp, s3_server, tmp_path / "term1", tmp_path / "w1")
    seen, deadline = 0, time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None and seen < 5:
        if storage.exists(progress_uri):
            seen = StageProgress.model_validate_json(storage.get_bytes(progress_uri)).step
        time.sleep(0.2)
    assert proc.poll() is None, "the stage finished or died before it could be interrupted"
    assert seen >= 5
    ranks = worker_pids(proc.pid)
    assert sorted(ranks) == [0, 1]
    os.kill(ranks[1], signal.SIGTERM)  # one rank only: the stop must be agreed by both
    _, stderr = proc.communicate(timeout=180)
    assert proc.returncode == EXIT_PREEMPTED, stderr.decode()[-3000:]
    interrupted = StageResult.model_validate_json((tmp_path / "term1").read_text())
    assert interrupted.error
    assert interrupted.error.startswith("rank "), interrupted.error
    assert "Preempted" in interrupted.error
    checkpoints = Checkpointer(ddp, storage, tmp_path / "ck").complete_steps()
    assert len(checkpoints) == 1
    assert seen <= checkpoints[0] < STEPS - 1, checkpoints
    assert not storage.exists(f"{ddp.output.prefix}manifest.json")

    retry = ddp.model_copy(update={"stage": ddp.stage.model_copy(update={"attempt": 2})})
    proc = start(retry, s3_server, tmp_path / "term2", tmp_path / "w2")
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_OK, stderr.decode()[-3000:]
    result = StageResult.model_validate_json((tmp_path / "term2").read_text())
    manifest = manifest_of(storage, result)
    assert manifest.lineage["resumedFromStep"] == checkpoints[0]
    assert result.topology is not None
    assert (result.topology.world_size, result.topology.procs_per_node, result.topology.strategy) == (
        2,
        2,
        "ddp",
    )
    assert manifest.metrics["dist/replicas_identical"] == 1.0  # both ranks hashed identical weights
    keys = storage.list_keys(S3Uri.parse(ddp.output.prefix))
    assert keys.count("manifest.json") == 1
    assert {k.split("/")[1] for k in keys if k.startswith("attempts/") and "adapter" in k} == {"2"}

    ddp_losses = logged_losses(storage, ddp.output.prefix, STEPS - 1)
    single_losses = logged_losses(storage, single.output.prefix, STEPS - 1)
    assert len(ddp_losses) == len(single_losses) == STEPS - 1
    diffs = [abs(a - b) for a, b in zip(ddp_losses, single_losses, strict=True)]
    ours = adapter_weights(storage, result.manifest_uri or "", tmp_path / "a")
    theirs = adapter_weights(storage, reference.manifest_uri or "", tmp_path / "b")
    weight_diff = max(float((ours[k] - theirs[k]).abs().max()) for k in theirs)
    print(
        f"DDP 2x8 vs 1x16, {len(diffs)} steps: max |loss diff| "
        f"first {EARLY_STEPS} {max(diffs[:EARLY_STEPS]):.1e}, all {max(diffs):.1e}; "
        f"max |adapter weight diff| {weight_diff:.1e}"
    )
    assert max(diffs[:EARLY_STEPS]) <= EARLY_TOLERANCE
    assert max(diffs) <= LOSS_TOLERANCE
    assert weight_diff <= WEIGHT_TOLERANCE
