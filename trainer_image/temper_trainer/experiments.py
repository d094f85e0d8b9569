"""Continual-learning experiment: task A, then task B with and without replay of A.

Runs real stages through the same runner the pods use (``run_stage``), so the numbers come from
published manifests. Used by ``bench/continual_forgetting.py`` and the quality tests.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from temper.api.contract import EXIT_OK, StageContract
from temper.storage import Storage


def _contract(
    endpoint: str,
    prefix: str,
    name: str,
    train: list[dict[str, Any]],
    eval_: list[dict[str, Any]],
    **extra: Any,
) -> StageContract:
    body: dict[str, Any] = {
        "run": {"namespace": "bench", "name": "continual"},
        "stage": {"name": name, "type": "sft"},
        "baseModel": "builtin://tiny",
        "storage": {"endpointUrl": endpoint},
        "output": {"prefix": f"{prefix.rstrip('/')}/{name}/"},
        "peft": {"method": "lora", "r": 8, "alpha": 16},
        "data": {"train": train, "eval": eval_},
        "hyperparameters": {"learningRate": 3e-3, "batchSize": 16, "packing": True, "maxGradNorm": 0},
        "checkpoint": {"everySteps": 1000},
        "progressIntervalSeconds": 60,
    }
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(body.get(key), dict):
            body[key] = {**body[key], **value}
        else:
            body[key] = value
    return StageContract.model_validate(body)


def run_contract(contract: StageContract) -> dict[str, float]:
    from temper_trainer.__main__ import run_stage

    os.environ.setdefault("TEMPER_TERMINATION_LOG", os.devnull)
    code = run_stage(contract.to_env(), Path(tempfile.mkdtemp(prefix="temper-exp-")))
    if code != EXIT_OK:
        raise RuntimeError(f"stage {contract.stage.name} exited {code}")
    storage = Storage(contract.storage)
    manifest, _ = storage.read_manifest(f"{contract.output.prefix}manifest.json")
    return manifest.metrics


def continual_forgetting(
    endpoint: str,
    prefix: str,
    *,
    steps: int = 100,
    replay_ratios: tuple[float, ...] = (0.0, 0.1),
    n: int = 400,
    lr_b: float = 3e-3,
) -> dict[str, Any]:
    """Forgetting on A (arith) and gain on B (subtract) for each replay ratio."""
    evals = [
        {"name": "arith-eval", "uri": "builtin://arith?n=20&split=eval", "format": "chat"},
        {"name": "subtract-eval", "uri": "builtin://subtract?n=11&split=eval", "format": "chat"},
    ]
    arith = {"name": "arith", "uri": f"builtin://arith?n={n}", "format": "chat"}
    subtract = {"name": "subtract", "uri": f"builtin://subtract?n={n}", "format": "chat"}
    a_metrics = run_contract(
        _contract(endpoint, prefix, "task-a", [arith], evals, hyperparameters={"maxSteps": steps})
    )
    parent = {"manifestUri": f"{prefix.rstrip('/')}/task-a/manifest.json"}
    a_on_a = a_metrics["eval/exact_match/arith"]
    b_before = a_metrics["eval/exact_match/subtract"]
    a_loss, b_loss_before = a_metrics["eval/loss/arith"], a_metrics["eval/loss/subtract"]
    result: dict[str, Any] = {
        "after_a": {
            "arith": a_on_a,
            "subtract": b_before,
            "arith_loss": a_loss,
            "subtract_loss": b_loss_before,
        },
        "runs": {},
    }
    for ratio in replay_ratios:
        name = f"task-b-replay-{int(ratio * 100)}"
        data = {"replay": {"ratio": ratio, "datasets": [arith], "seed": 7}} if ratio > 0 else {}
        metrics = run_contract(
            _contract(
                endpoint,
                prefix,
                name,
                [subtract],
                evals,
                parent=parent,
                hyperparameters={"maxSteps": steps, "learningRate": lr_b},
                data=data,
            )
        )
        after_a, after_b = metrics["eval/exact_match/arith"], metrics["eval/exact_match/subtract"]
        result["runs"][str(ratio)] = {
            "arith_after_b": after_a,
            "subtract_after_b": after_b,
            "forgetting_a": round(a_on_a - after_a, 4),
            "gain_b": round(after_b - b_before, 4),
            # loss-based: how much A's held-out loss rose, how much B's fell
            "forgetting_a_loss": round(metrics["eval/loss/arith"] - a_loss, 4),
            "gain_b_loss": round(b_loss_before - metrics["eval/loss/subtract"], 4),
        }
    return result
