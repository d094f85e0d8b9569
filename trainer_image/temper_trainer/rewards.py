"""Rewards for the grpo and synthetic-preferences stages (``contract.rewards``).

Each :class:`~temper.api.contract.RewardSpec` becomes one scoring function; a :class:`RewardSet`
sums them with their weights. Built-ins (all in [0, 1]):

- ``exact-match``: 1 when the completion equals the record's reference answer after the eval
  stage's normalization (so the reward and ``eval/exact_match`` agree). Needs a reference answer.
- ``regex``: 1 when the whole stripped completion matches ``pattern`` (a format check).
- ``length``: ``exp(-|len - targetLength| / targetLength)``, in characters (tokenizer independent);
  1 at the target and never flat, so every group of samples still ranks by length.
- ``reward-model``: the scalar score of a sequence-classification model published by a
  reward-model stage (``model`` is its manifest), on ``prompt + completion``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from temper.api.contract import AdapterRef, RewardSpec

from temper_trainer.evaluation import normalize
from temper_trainer.stage import InvalidInput

if TYPE_CHECKING:
    import torch

    from temper_trainer.stage import StageContext

REWARD_MODEL_STAGE = "reward-model"
SCORE_BATCH = 32


@dataclass(frozen=True)
class Candidate:
    prompt: str  # as the policy saw it (chat prompts rendered through the template)
    completion: str
    answer: str | None  # the record's reference answer, if any


ScoreFn = Callable[[Sequence[Candidate]], list[float]]


def exact_match_reward(candidates: Sequence[Candidate]) -> list[float]:
    return [
        float(c.answer is not None and normalize(c.completion) == normalize(c.answer)) for c in candidates
    ]


def regex_reward(pattern: re.Pattern[str]) -> ScoreFn:
    def score(candidates: Sequence[Candidate]) -> list[float]:
        return [float(pattern.fullmatch(c.completion.strip()) is not None) for c in candidates]

    return score


def length_reward(target: int) -> ScoreFn:
    def score(candidates: Sequence[Candidate]) -> list[float]:
        return [math.exp(-abs(len(c.completion.strip()) - target) / target) for c in candidates]

    return score


# -- reward models ---------------------------------------------------------------------------
def reward_model_input_ids(tokenizer: Any, prompt: str, response: str, max_length: int) -> list[int]:
    """What a reward model reads: ``<bos> prompt response <eos>``, cut from the left if too long
    (the score is read at the last token, so the end must survive)."""
    ids = list(tokenizer(prompt + response, add_special_tokens=False)["input_ids"])
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id, *ids]
    ids.append(tokenizer.eos_token_id)
    return ids[-max_length:]


def score_ids(
    model: Any, sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> torch.Tensor:
    """Reward-model scores (B,) for already-tokenized sequences; differentiable."""
    import torch

    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for i, seq in enumerate(sequences):  # left padding: the last position is always a real token
        ids[i, width - len(seq) :] = torch.tensor(list(seq))
        attention[i, width - len(seq) :] = 1
    out = model(input_ids=ids.to(device), attention_mask=attention.to(device))
    scores: torch.Tensor = out.logits[:, 0].float()  # the classifier pools at the last real token
    return scores


def load_sequence_classifier(model_dir: Path, tokenizer: Any) -> Any:
    """A base model folder loaded as a one-logit sequence classifier (the reward head fresh)."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def load_reward_model(folder: Path, storage: Any, device: torch.device) -> tuple[Any, Any]:
    """(model, tokenizer) of a published reward model; ``folder`` holds its verified files.

    LoRA reward models are loaded the stock way: the base as ``AutoModelForSequenceClassification``
    plus ``PeftModel.from_pretrained``; full ones are a complete model folder.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from temper_trainer.models import manifest_base_uri, resolve_model_dir

    manifest = json.loads((folder / "manifest.json").read_text())
    if manifest.get("stageType") != REWARD_MODEL_STAGE:
        raise ValueError(
            f"it was published by a {manifest.get('stageType')!r} stage, not a reward-model stage"
        )
    if (folder / "adapter_config.json").exists():
        from peft import PeftModel

        base_dir = resolve_model_dir(manifest_base_uri(manifest), storage)
        tokenizer = AutoTokenizer.from_pretrained(
            str(folder if (folder / "tokenizer.json").exists() else base_dir)
        )
        model = PeftModel.from_pretrained(load_sequence_classifier(base_dir, tokenizer), str(folder))
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        model = AutoModelForSequenceClassification.from_pretrained(str(folder))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(device).eval(), tokenizer


def reward_model_scorer(model: Any, tokenizer: Any, device: torch.device, max_length: int) -> ScoreFn:
    import torch

    def score(candidates: Sequence[Candidate]) -> list[float]:
        scores: list[float] = []
        with torch.no_grad():
            for start in range(0, len(candidates), SCORE_BATCH):
                chunk = candidates[start : start + SCORE_BATCH]
                seqs = [reward_model_input_ids(tokenizer, c.prompt, c.completion, max_length) for c in chunk]
                scores.extend(score_ids(model, seqs, tokenizer.pad_token_id, device).tolist())
        return scores

    return score


# -- the weighted set --------------------------------------------------------------------------
def reward_name(spec: RewardSpec, index: int) -> str:
    return f"{index}-{spec.type}"


class RewardSet:
    """The contract's rewards: ``score`` returns the weighted totals and each reward's values."""

    def __init__(self, specs: Sequence[RewardSpec], fns: Sequence[ScoreFn]) -> None:
        self.specs, self.fns = list(specs), list(fns)
        self.names = [reward_name(spec, i) for i, spec in enumerate(specs)]

    @property
    def needs_answers(self) -> bool:
        return any(spec.type == "exact-match" for spec in self.specs)

    def score(self, candidates: Sequence[Candidate]) -> tuple[list[float], dict[str, list[float]]]:
        parts = {name: fn(candidates) for name, fn in zip(self.names, self.fns, strict=True)}
        totals = [
            sum(spec.weight * parts[name][i] for spec, name in zip(self.specs, self.names, strict=True))
            for i in range(len(candidates))
        ]
        return totals, parts


def validate_reward_specs(specs: Sequence[RewardSpec]) -> None:
    """Check every reward's own fields; errors name the field (``rewards[i].<field>``)."""
    if not specs:
        raise InvalidInput(
            "rewards: this stage needs at least one reward (exact-match, regex, length, reward-model)"
        )
    for i, spec in enumerate(specs):
        if spec.type == "regex":
            if not spec.pattern:
                raise InvalidInput(f"rewards[{i}].pattern: a regex reward needs a pattern")
            try:
                re.compile(spec.pattern)
            except re.error as exc:
                raise InvalidInput(f"rewards[{i}].pattern: not a valid regular expression: {exc}") from exc
        elif spec.type == "length" and spec.target_length is None:
            raise InvalidInput(f"rewards[{i}].targetLength: a length reward needs a target length")
        elif spec.type == "reward-model" and spec.model is None:
            raise InvalidInput(f"rewards[{i}].model: a reward-model reward needs the reward model's manifest")


def build_rewards(ctx: StageContext) -> RewardSet:
    """The contract's rewards, reward models downloaded, verified and loaded."""
    specs = ctx.contract.rewards
    validate_reward_specs(specs)
    fns: list[ScoreFn] = []
    for i, spec in enumerate(specs):
        if spec.type == "exact-match":
            fns.append(exact_match_reward)
        elif spec.type == "regex":
            fns.append(regex_reward(re.compile(str(spec.pattern))))
        elif spec.type == "length":
            fns.append(length_reward(int(spec.target_length or 1)))
        else:
            assert spec.model is not None  # validate_reward_specs
            fns.append(published_scorer(ctx, spec.model, f"rewards[{i}].model"))
    return RewardSet(specs, fns)


def published_scorer(ctx: StageContext, ref: AdapterRef, where: str) -> ScoreFn:
    """A published reward model as a scorer (rewards, the eval suites' ``judge``); errors name ``where``."""
    try:
        model, tokenizer = load_reward_model(ctx.fetch_adapter(ref), ctx.storage, ctx.device)
    except InvalidInput as exc:  # not downloadable or not verified
        raise InvalidInput(f"{where}: {exc}") from exc
    except (OSError, ValueError, KeyError) as exc:
        raise InvalidInput(f"{where} ({ref.manifest_uri}): {exc}") from exc
    return reward_model_scorer(model, tokenizer, ctx.device, ctx.contract.hyperparameters.max_length)
