"""The gateable suite metrics beyond exact match, each on the real tiny model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from temper_trainer.data import builtin_records
from temper_trainer.evaluation import (
    bleu,
    evaluate_metric,
    is_refusal,
    judge,
    kl_to_reference,
    perturbed,
    pretrain_format_exact_match,
    safety,
    self_bleu,
)

pytestmark = pytest.mark.unit

HELD_OUT = "builtin://arith?n=24&split=eval&seed=9"


@pytest.fixture(name="tiny", scope="module")
def tiny_fixture(tiny_model: Path) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()  # type: ignore[no-untyped-call]
    return model, AutoTokenizer.from_pretrained(tiny_model)


def _lora(model: Any, scale: float) -> Any:
    """A LoRA on the tiny model; ``scale`` > 0 moves it off the base."""
    import copy

    import peft
    import torch

    wrapped = peft.get_peft_model(
        copy.deepcopy(model), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_B" in name:
                param.normal_(0, scale)
    return wrapped.eval()


def test_kl_to_reference_is_zero_at_the_base_and_grows_with_drift(tiny: tuple[Any, Any]) -> None:
    model, tok = tiny
    records = builtin_records(HELD_OUT, "prompt-completion")
    assert kl_to_reference(_lora(model, 0.0), tok, records) == pytest.approx(0.0, abs=1e-6)
    small, large = _lora(model, 0.02), _lora(model, 0.2)
    kl_small, kl_large = kl_to_reference(small, tok, records), kl_to_reference(large, tok, records)
    assert 0 < kl_small < kl_large
    assert kl_to_reference(large, tok, records, reference=model) == pytest.approx(kl_large, rel=1e-4)
    assert kl_to_reference(model, tok, records, reference=model) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="explicit reference"):
        kl_to_reference(model, tok, records)


def test_safety_scores_refusals_and_compliance(tiny: tuple[Any, Any]) -> None:
    model, tok = tiny
    assert is_refusal("Sorry, I can't help with that.")
    assert not is_refusal("55")
    probes = builtin_records("builtin://safety", "prompt")
    value = evaluate_metric(model, tok, "safety", probes)
    assert 0.0 <= value <= 0.5  # the tiny model never refuses: every refuse probe fails
    assert value == safety(model, tok, probes)
    with pytest.raises(ValueError, match="field 'expected'"):
        safety(model, tok, [{"prompt": "1+2="}])


def test_robustness_perturbs_prompts_by_seed(tiny: tuple[Any, Any]) -> None:
    model, tok = tiny
    records = builtin_records(HELD_OUT, "prompt-completion")
    once, again, other = perturbed(records, 0), perturbed(records, 0), perturbed(records, 1)
    assert once == again
    assert once != other
    assert all(p["completion"] == r["completion"] for p, r in zip(once, records, strict=True))
    assert sum(p["prompt"] != r["prompt"] for p, r in zip(once, records, strict=True)) > len(records) // 2
    value = evaluate_metric(model, tok, "robustness", records, seed=0)
    assert 0.0 <= value <= 1.0
    assert value == evaluate_metric(model, tok, "robustness", records, seed=0)


def test_self_bleu_is_one_for_collapsed_samples_and_lower_for_diverse(tiny: tuple[Any, Any]) -> None:
    assert self_bleu([["the cat sat down", "the cat sat down"]]) == pytest.approx(1.0)
    assert self_bleu([["the cat sat down", "a dog ran off far"]]) < 0.3
    assert bleu("55", ["55"]) == pytest.approx(1.0)
    model, tok = tiny
    records = builtin_records(HELD_OUT, "prompt")
    value = evaluate_metric(model, tok, "self_bleu", records, seed=3)
    assert 0.0 < value <= 1.0
    assert value == evaluate_metric(model, tok, "self_bleu", records, seed=3)


def test_judge_scores_completions_and_win_rate_against_the_reference(tiny: tuple[Any, Any]) -> None:
    from temper_trainer.rewards import length_reward

    model, tok = tiny
    records = builtin_records(HELD_OUT, "prompt")
    scorer = length_reward(2)
    same = judge(_lora(model, 0.0), tok, records, scorer)
    assert same["judge_win_rate"] == pytest.approx(0.5)  # against itself: all ties
    assert 0.0 <= same["judge"] <= 1.0
    moved = judge(_lora(model, 0.3), tok, records, scorer, reference=model)
    assert 0.0 <= moved["judge_win_rate"] <= 1.0
    with pytest.raises(ValueError, match="names no judge"):
        evaluate_metric(model, tok, "judge", records)


def test_pretrain_format_exact_match_poses_the_problem_in_the_pretraining_form(
    tiny: tuple[Any, Any],
) -> None:
    model, tok = tiny
    records = builtin_records(HELD_OUT, "prompt")
    pretrain = pretrain_format_exact_match(model, tok, records)
    sft_format = evaluate_metric(model, tok, "exact_match", records)
    assert pretrain is not None
    assert pretrain > sft_format  # the base has the skill, not the format
    assert pretrain_format_exact_match(model, tok, [{"prompt": "hi", "answer": "x"}]) is None
