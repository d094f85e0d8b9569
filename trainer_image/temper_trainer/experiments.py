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
        "peft": {"method": "lora", "r": 16, "alpha": 32},
        "data": {"train": train, "eval": eval_},
        "hyperparameters": {"learningRate": 3e-3, "batchSize": 16, "packing": True, "maxGradNorm": 1.0},
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
        {"name": "arith-eval", "uri": "builtin://arith?n=100&split=eval", "format": "chat"},
        {"name": "subtract-eval", "uri": "builtin://subtract?n=100&split=eval", "format": "chat"},
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


def _stage(
    endpoint: str, prefix: str, name: str, stage_type: str, seed: int, **fields: Any
) -> dict[str, float]:
    data = fields.pop("data")
    extra = {k: v for k, v in data.items() if k not in ("train", "eval")}
    if extra:  # replay, curriculum: merged into the contract's data
        fields["data"] = extra
    return run_contract(
        _contract(
            endpoint,
            prefix,
            name,
            data["train"],
            data.get("eval", []),
            stage={"name": name, "type": stage_type},
            seed=seed,
            **fields,
        )
    )


def _builtin(task: str, n: int, seed: int, split: str, fmt: str) -> dict[str, Any]:
    return {
        "name": f"{task}-{split}-{fmt}",
        "uri": f"builtin://{task}?n={n}&seed={seed}&split={split}",
        "format": fmt,
        "task": task,
    }


def quality(
    endpoint: str, prefix: str, seed: int, *, sft_steps: int = 200, heldout: int = 150
) -> dict[str, Any]:
    """One seed of ``bench/quality.py``: every number on held-out problems no stage trained on (nor
    the tiny model's pretraining), each stage run through the trainer's real entry point."""
    prefix = f"{prefix.rstrip('/')}/seed-{seed}"
    s = seed * 10
    arith_eval = _builtin("arith", heldout, s + 1, "eval", "prompt-completion")
    sub_eval = _builtin("subtract", heldout, s + 2, "eval", "prompt-completion")
    sft = _stage(
        endpoint,
        prefix,
        "sft",
        "sft",
        seed,
        data={
            "train": [_builtin("arith", 400, s + 3, "train", "prompt-completion")],
            "eval": [arith_eval, sub_eval],
        },
        hyperparameters={"maxSteps": sft_steps, "maxLength": 32},
    )
    parent = {"manifestUri": f"{prefix}/sft/manifest.json"}
    prefs = {
        "train": [_builtin("arith", 200, s + 4, "train", "preference")],
        "eval": [_builtin("arith", heldout, s + 5, "eval", "preference")],
    }
    dpo = _stage(
        endpoint,
        prefix,
        "dpo",
        "dpo",
        seed,
        data=prefs,
        parent=parent,
        hyperparameters={"maxSteps": 40, "learningRate": 3e-4, "batchSize": 8, "beta": 0.1, "maxLength": 32},
    )
    grpo = _stage(
        endpoint,
        prefix,
        "grpo",
        "grpo",
        seed,
        parent=parent,
        data={
            "train": [_builtin("arith", 200, s + 6, "train", "prompt")],
            "eval": [_builtin("arith", 64, s + 7, "eval", "prompt")],
        },
        rewards=[{"type": "exact-match"}],
        hyperparameters={
            "maxSteps": 20,
            "batchSize": 32,
            "numGenerations": 8,
            "maxNewTokens": 6,
            "learningRate": 1e-4,
            "temperature": 1.0,
        },
    )
    rm = _stage(
        endpoint,
        prefix,
        "rm",
        "reward-model",
        seed,
        data={"train": [_builtin("arith", 800, s + 9, "train", "preference")], "eval": prefs["eval"]},
        hyperparameters={"maxSteps": 400, "learningRate": 1e-3, "batchSize": 32, "maxLength": 32},
    )
    continual = _continual(endpoint, prefix, seed, parent, [arith_eval, sub_eval], steps=sft_steps)
    return {
        "sft": {
            "base_exact_match": sft["eval/exact_match_before"],
            "base_exact_match_pretrain_format": sft["eval/exact_match_pretrain_format_before"],
            "exact_match": sft["eval/exact_match/arith"],
            "gain": sft["eval/exact_match/arith"] - sft["eval/exact_match_before"],
            "drift_kl_to_base": sft["drift/kl_to_base"],
        },
        "dpo": {
            "accuracy_before": dpo["eval/preference_accuracy_before"],
            "accuracy": dpo["eval/preference_accuracy"],
        },
        "grpo": {
            "reward_before": grpo["eval/reward_before"],
            "reward": grpo["eval/reward"],
            "gain": grpo["eval/reward"] - grpo["eval/reward_before"],
        },
        "reward_model": {"accuracy_before": rm["eval/accuracy_before"], "accuracy": rm["eval/accuracy"]},
        "continual": {
            **continual,
            "after_a": sft["eval/exact_match/arith"],
            "b_before": sft["eval/exact_match/subtract"],
        },
    }


def _continual(
    endpoint: str, prefix: str, seed: int, parent: dict[str, str], evals: list[dict[str, Any]], *, steps: int
) -> dict[str, float]:
    """Task B (subtract) from task A's adapter, without and with 10% replay of A."""
    s = seed * 10
    out: dict[str, float] = {}
    for ratio in (0.0, 0.1):
        data: dict[str, Any] = {
            "train": [_builtin("subtract", 400, s + 8, "train", "prompt-completion")],
            "eval": evals,
        }
        if ratio:
            data["replay"] = {
                "ratio": ratio,
                "datasets": [_builtin("arith", 400, s + 3, "train", "prompt-completion")],
                "seed": seed,
            }
        m = _stage(
            endpoint,
            prefix,
            f"b-replay-{int(ratio * 100)}",
            "sft",
            seed,
            data=data,
            parent=parent,
            hyperparameters={"maxSteps": steps, "maxLength": 32},
        )
        key = f"replay_{int(ratio * 100)}"
        out[f"{key}_arith"] = m["eval/exact_match/arith"]
        out[f"{key}_subtract"] = m["eval/exact_match/subtract"]
    return out
