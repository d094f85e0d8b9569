"""dpo and grpo stages: real training of the tiny model on CPU, real moto S3, the real runner."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
from temper.api.contract import EXIT_INVALID_INPUT, EXIT_OK, StageContract
from temper.storage import Storage
from temper_trainer.stage import Preempted, StageContext
from temper_trainer.stages import get_stage

from tests.unit.trainer_helpers import RlStages, rl_fixture  # noqa: F401  (the rl fixture)

pytestmark = pytest.mark.unit


ARITH_PREFS = {"name": "arith-prefs", "uri": "builtin://arith?n=200", "format": "preference"}
ARITH_PREFS_HELDOUT = {
    "name": "arith-prefs-heldout",
    "uri": "builtin://arith?n=100&split=eval",
    "format": "preference",
}


# -- dpo -------------------------------------------------------------------------------------
def test_dpo_learns_its_pairs_and_reports_heldout_accuracy(rl: RlStages) -> None:
    from peft import PeftModel
    from temper_trainer.data import builtin_records
    from temper_trainer.evaluation import preference_accuracy
    from temper_trainer.models import load_model

    doc = rl.doc(
        "align",
        "dpo",
        data={"train": [ARITH_PREFS], "eval": [ARITH_PREFS_HELDOUT]},
        peft={"method": "lora", "r": 8, "alpha": 16},
        # beta 0.3: on TRL's DPOTrainer (and on HEAD's loop with transformers 5.24) 0.1 plateaus near 85%
        hyperparameters={"maxSteps": 150, "batchSize": 16, "learningRate": 2e-3, "beta": 0.3},
    )
    code, result = rl.run(doc)
    assert code == EXIT_OK, result
    metrics = result["metrics"]
    print(metrics)
    assert metrics["eval/preference_accuracy_before"] < 0.8  # the base model has no such preference
    # Held-out pairs are unseen sums (issue 16): telling 55 from 57 needs the sum, which the tiny
    # model does not know (bench/quality.py: ~0.50 held out). Measured here: 0.48 -> 0.46 held out,
    # 0.68 on its own training pairs: DPO fits the pairs it saw, and the held-out number is the one
    # reported under eval/ (the old 0.9 goal held only on leaked items).
    assert "train/preference_accuracy" not in metrics
    assert 0.0 <= metrics["eval/preference_accuracy"] <= 1.0
    assert metrics["drift/kl_to_base"] > 0
    manifest = rl.published(result)
    assert manifest["stageType"] == "dpo"
    assert manifest["method"] == "lora"

    # the artifact loads with stock PEFT and reproduces the recorded held-out accuracy
    folder = rl.download(result["manifestUri"], "dpo-artifact")
    base, tokenizer = load_model("builtin://tiny", None)
    model = PeftModel.from_pretrained(base, str(folder))
    held_out = builtin_records(ARITH_PREFS_HELDOUT["uri"], "preference")
    assert preference_accuracy(model, tokenizer, held_out) == pytest.approx(
        metrics["eval/preference_accuracy"]
    )
    trained = preference_accuracy(model, tokenizer, builtin_records(ARITH_PREFS["uri"], "preference"))
    assert trained >= 0.6
    assert trained >= metrics["eval/preference_accuracy"] + 0.1  # the gap an honest split exposes


def test_dpo_rejects_data_that_is_not_preference_pairs(rl: RlStages) -> None:
    doc = rl.doc(
        "align",
        "dpo",
        data={"train": [{"name": "sums", "uri": "builtin://arith?n=8", "format": "prompt-completion"}]},
    )
    code, result = rl.run(doc)
    assert code == EXIT_INVALID_INPUT
    assert "data.train: dataset 'sums' must have format 'preference'" in result["error"]


def _trainable(model: Any) -> dict[str, Any]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _run_in_process(
    doc: dict[str, Any], workdir: Path, storage: Storage, stop_at: int | None = None
) -> tuple[Any, list[int]]:
    """Run the stage function, delivering a real SIGTERM after step ``stop_at``.

    Returns the outcome and the steps the stage reported, so a test can tell a resumed run
    (starting after the checkpoint) from one that silently started over.
    """
    ctx = StageContext(StageContract.model_validate(doc), workdir, storage)
    ctx.install_signal_handlers()
    steps: list[int] = []
    report = ctx.report

    def report_and_maybe_signal(**kwargs: Any) -> None:
        report(**kwargs)
        steps.append(kwargs["step"])
        if kwargs["step"] == stop_at:
            os.kill(os.getpid(), signal.SIGTERM)

    ctx.report = report_and_maybe_signal  # type: ignore[method-assign]
    try:
        return get_stage(doc["stage"]["type"])(ctx), steps
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


RESUMABLE: dict[str, tuple[dict[str, Any], str, str]] = {
    # stage type: (contract fields, output file compared, "before" metric that must survive)
    "dpo": (
        {
            "data": {"train": [{**ARITH_PREFS, "uri": "builtin://arith?n=48"}]},
            "hyperparameters": {"maxSteps": 8, "batchSize": 8, "learningRate": 2e-3},
        },
        "adapter_model.safetensors",
        "train/preference_accuracy_before",
    ),
    "grpo": (
        {
            "data": {"train": [{"name": "sums", "uri": "builtin://arith?n=24", "format": "prompt"}]},
            "rewards": [{"type": "length", "targetLength": 2}],
            "hyperparameters": {"maxSteps": 6, "batchSize": 8, "numGenerations": 4, "maxNewTokens": 4},
        },
        "adapter_model.safetensors",
        "train/greedy_reward_before",
    ),
    "reward-model": (
        {
            "data": {"train": [{**ARITH_PREFS, "uri": "builtin://arith?n=48"}]},
            "hyperparameters": {"maxSteps": 6, "batchSize": 8, "learningRate": 3e-3},
        },
        "adapter_model.safetensors",
        "train/accuracy_before",
    ),
    "synthetic-preferences": (
        {
            "data": {"train": [{"name": "sums", "uri": "builtin://arith?n=32", "format": "prompt"}]},
            "rewards": [{"type": "length", "targetLength": 2}],
            "hyperparameters": {"numGenerations": 4, "maxNewTokens": 4},
        },
        "preferences.jsonl",
        "",
    ),
}


@pytest.mark.parametrize("stage_type", sorted(RESUMABLE))
def test_sigterm_checkpoints_and_the_next_attempt_resumes_to_the_same_output(
    stage_type: str, rl: RlStages
) -> None:
    fields, output_file, before_key = RESUMABLE[stage_type]
    fields = {"peft": {"method": "lora", "r": 4, "alpha": 8}, **fields}
    interrupted = rl.doc(f"{stage_type}-resumed", stage_type, **fields)
    with pytest.raises(Preempted):
        _run_in_process(interrupted, rl.tmp_path / "attempt-1", rl.storage, stop_at=2)
    assert rl.storage.exists(f"s3://{rl.bucket}/rl/{stage_type}-resumed/checkpoints/step-2/COMPLETE")

    interrupted["stage"]["attempt"] = 2
    resumed, resumed_steps = _run_in_process(interrupted, rl.tmp_path / "attempt-2", rl.storage)
    straight = rl.doc(f"{stage_type}-straight", stage_type, **fields)
    reference, straight_steps = _run_in_process(straight, rl.tmp_path / "straight", rl.storage)
    assert straight_steps[0] == 1
    assert resumed_steps == straight_steps[2:]  # picked up after step 2, did not start over

    resumed_file, reference_file = resumed.artifact_dir / output_file, reference.artifact_dir / output_file
    if output_file.endswith(".safetensors"):
        from safetensors.torch import load_file

        resumed_weights, straight_weights = load_file(str(resumed_file)), load_file(str(reference_file))
        assert resumed_weights.keys() == straight_weights.keys()
        for key, value in straight_weights.items():
            assert (resumed_weights[key] - value).abs().max() < 1e-6, key
    else:
        assert resumed_file.read_bytes() == reference_file.read_bytes()
    if before_key:  # measured once on the starting weights, not again on half-trained ones
        assert resumed.metrics[before_key] == reference.metrics[before_key]


# -- grpo ------------------------------------------------------------------------------------
ARITH_PROMPTS = {"name": "sums", "uri": "builtin://arith?n=80", "format": "prompt"}
ARITH_PROMPTS_HELDOUT = {"name": "sums-heldout", "uri": "builtin://arith?n=20&split=eval", "format": "prompt"}


def test_grpo_with_builtin_rewards_raises_the_mean_reward(rl: RlStages) -> None:
    rewards = [
        {"type": "exact-match", "weight": 1.0},
        {"type": "regex", "pattern": r"\d{1,2}", "weight": 0.5},  # the answer format: digits only
        {"type": "length", "targetLength": 2, "weight": 0.5},
    ]
    doc = rl.doc(
        "rl",
        "grpo",
        data={"train": [ARITH_PROMPTS], "eval": [ARITH_PROMPTS_HELDOUT]},
        rewards=rewards,
        peft={"method": "lora", "r": 8, "alpha": 16},
        hyperparameters={
            "maxSteps": 30,
            "batchSize": 32,
            "numGenerations": 8,
            "maxNewTokens": 6,
            "learningRate": 1e-2,
            "beta": 0.04,
        },
    )
    code, result = rl.run(doc)
    assert code == EXIT_OK, result
    m = result["metrics"]
    assert m["eval/reward"] >= m["eval/reward_before"] + 0.2, m
    assert m["train/reward"] > m["train/reward_first"], m
    assert m["train/kl"] > 0  # the policy moved away from the reference, and the KL term saw it
    manifest = rl.published(result)
    assert manifest["lineage"]["rewards"][1]["pattern"] == r"\d{1,2}"
    assert manifest["servable"]["vllm"] is True


def test_grpo_reward_errors_name_the_field(rl: RlStages) -> None:
    doc = rl.doc(
        "rl",
        "grpo",
        data={"train": [ARITH_PROMPTS]},
        rewards=[{"type": "exact-match"}, {"type": "regex", "pattern": "(unclosed"}],
    )
    code, result = rl.run(doc)
    assert code == EXIT_INVALID_INPUT
    assert "rewards[1].pattern" in result["error"]

    doc["rewards"] = []
    code, result = rl.run(doc)
    assert code == EXIT_INVALID_INPUT
    assert "rewards: this stage needs at least one reward" in result["error"]
