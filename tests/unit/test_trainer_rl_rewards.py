"""Built-in rewards and their validation (no model needed)."""

from __future__ import annotations

import math
import re

import pytest
from temper.api.contract import RewardSpec
from temper_trainer.rewards import (
    Candidate,
    RewardSet,
    exact_match_reward,
    length_reward,
    regex_reward,
    validate_reward_specs,
)
from temper_trainer.stage import InvalidInput

pytestmark = pytest.mark.unit


def cands(*completions: str, answer: str | None = "12") -> list[Candidate]:
    return [Candidate("7+5=", c, answer) for c in completions]


def test_exact_match_uses_the_eval_normalization() -> None:
    assert exact_match_reward(cands("12", " 12 ", "12.", "13", "1 2")) == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert exact_match_reward(cands("12", answer=None)) == [0.0]


def test_regex_matches_the_whole_stripped_completion() -> None:
    score = regex_reward(re.compile(r"\d{1,2}"))
    assert score(cands("12", " 7\n", "123", "12 apples", "")) == [1.0, 1.0, 0.0, 0.0, 0.0]


def test_length_reward_peaks_at_the_target_and_decays_with_the_distance() -> None:
    score = length_reward(4)
    values = score(cands("abcd", "ab", "abcdef", "abcdefghij", ""))
    assert values == pytest.approx([1.0, math.exp(-0.5), math.exp(-0.5), math.exp(-1.5), math.exp(-1.0)])


def test_reward_set_sums_weighted_rewards() -> None:
    specs = [
        RewardSpec(type="exact-match", weight=2.0),
        RewardSpec(type="length", target_length=2, weight=0.5),
    ]
    rewards = RewardSet(specs, [exact_match_reward, length_reward(2)])
    totals, parts = rewards.score(cands("12", "1"))
    assert totals == pytest.approx([2.5, 0.5 * math.exp(-0.5)])
    assert parts["0-exact-match"] == [1.0, 0.0]
    assert rewards.needs_answers


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"type": "regex"}, "rewards[0].pattern"),
        ({"type": "regex", "pattern": "[a-"}, "rewards[0].pattern"),
        ({"type": "length"}, "rewards[0].targetLength"),
        ({"type": "reward-model"}, "rewards[0].model"),
    ],
)
def test_invalid_rewards_name_the_field(spec: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidInput, match=re.escape(field)):
        validate_reward_specs([RewardSpec.model_validate(spec)])


def test_no_rewards_is_an_error() -> None:
    with pytest.raises(InvalidInput, match="rewards"):
        validate_reward_specs([])
