"""Evaluation metrics shared by the eval stage, the SFT stage's held-out eval and RL stages.

Exact match (greedy decoding), loss / perplexity on completion tokens, preference accuracy
(log p(chosen) > log p(rejected)) and distinct-n (a mode-collapse signal). All deterministic.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from temper_trainer.data import IGNORE_INDEX, Record, encode_sft, prompt_and_target


def normalize(text: str) -> str:
    return " ".join(text.strip().split()).rstrip(".")


def generate(
    model: Any, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int = 16, batch_size: int = 64
) -> list[str]:
    """Greedy completions (special tokens stripped)."""
    import torch

    device = next(model.parameters()).device
    outputs: list[str] = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            enc = tokenizer(chunk, add_special_tokens=False, padding=True, return_tensors="pt").to(device)
            with torch.no_grad():
                out = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
            new_tokens = out[:, enc["input_ids"].shape[1] :]
            outputs.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outputs


def _generation_prompt(record: Record, tokenizer: Any) -> str:
    prompt, _ = prompt_and_target(record, tokenizer)
    if "messages" not in record and tokenizer.bos_token:
        return str(tokenizer.bos_token) + prompt  # the same framing encode_sft trains on
    return prompt


def exact_match_by_task(
    model: Any, tokenizer: Any, records: Sequence[Record], *, max_new_tokens: int = 8
) -> dict[str, float]:
    """``{"all": em, "<task>": em, ...}`` with em in [0, 1]."""
    prompts = [_generation_prompt(r, tokenizer) for r in records]
    targets = [prompt_and_target(r, tokenizer)[1] for r in records]
    completions = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens)
    hits: dict[str, list[int]] = defaultdict(list)
    for record, completion, target in zip(records, completions, targets, strict=True):
        ok = int(normalize(completion) == normalize(target))
        hits["all"].append(ok)
        hits[str(record.get("task", "all"))].append(ok)
    return {task: sum(v) / len(v) for task, v in hits.items()}


def exact_match(model: Any, tokenizer: Any, records: Sequence[Record], *, max_new_tokens: int = 8) -> float:
    return exact_match_by_task(model, tokenizer, records, max_new_tokens=max_new_tokens)["all"]


def completion_loss(model: Any, tokenizer: Any, records: Sequence[Record], *, max_length: int = 512) -> float:
    """Mean cross-entropy per completion token (the SFT objective) over ``records``."""
    import torch

    device = next(model.parameters()).device
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for record in records:
            ids, labels = encode_sft(record, tokenizer, max_length)
            logits = model(input_ids=torch.tensor([ids], device=device)).logits[0, -len(ids) : -1].float()
            target = torch.tensor(labels[1:], device=device)
            mask = target != IGNORE_INDEX
            if not mask.any():
                continue
            loss = torch.nn.functional.cross_entropy(logits[mask], target[mask], reduction="sum")
            total += float(loss)
            count += int(mask.sum())
    return total / max(count, 1)


def sequence_logprob(model: Any, tokenizer: Any, prompt: str, completion: str) -> float:
    """log p(completion + eos | prompt), summed over the completion's tokens."""
    import torch

    device = next(model.parameters()).device
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    p_ids = bos + list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    c_ids = [*tokenizer(completion, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    ids = torch.tensor([p_ids + c_ids], device=device)
    with torch.no_grad():
        # prompt-tuning models prepend virtual-token logits: keep the last len(ids) positions
        logprobs = model(input_ids=ids).logits[0, -ids.shape[1] : -1].float().log_softmax(-1)
    positions = torch.arange(len(p_ids) - 1, ids.shape[1] - 1, device=device)
    return float(logprobs[positions, ids[0, len(p_ids) :]].sum())


def preference_accuracy(model: Any, tokenizer: Any, records: Sequence[Record]) -> float:
    """Share of pairs where the model prefers ``chosen`` over ``rejected``."""
    model.eval()
    wins = [
        sequence_logprob(model, tokenizer, r["prompt"], r["chosen"])
        > sequence_logprob(model, tokenizer, r["prompt"], r["rejected"])
        for r in records
    ]
    return sum(wins) / max(len(wins), 1)


def distinct_n(texts: Sequence[str], n: int = 2) -> float:
    """Unique n-grams / all n-grams over ``texts`` (characters for short outputs)."""
    grams: list[str] = []
    for text in texts:
        tokens = text.split() if len(text.split()) > n else list(text)
        grams.extend(" ".join(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    return len(set(grams)) / len(grams) if grams else 0.0


def sample_completions(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    num: int = 4,
    max_new_tokens: int = 16,
    temperature: float = 1.0,
) -> list[list[str]]:
    """``num`` sampled completions per prompt (seeded by the caller's torch RNG)."""
    import torch

    device = next(model.parameters()).device
    out: list[list[str]] = []
    model.eval()
    for prompt in prompts:
        enc = tokenizer([prompt] * num, add_special_tokens=False, return_tensors="pt").to(device)
        with torch.no_grad():
            gen = model.generate(
                **enc,
                do_sample=True,
                temperature=temperature,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        out.append(tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True))
    return out


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


def evaluate_metric(
    model: Any, tokenizer: Any, metric: str, records: Sequence[Record], *, max_new_tokens: int = 8
) -> float:
    if metric == "exact_match":
        return exact_match(model, tokenizer, records, max_new_tokens=max_new_tokens)
    if metric == "loss":
        return completion_loss(model, tokenizer, records)
    if metric == "perplexity":
        return perplexity(completion_loss(model, tokenizer, records))
    if metric == "preference_accuracy":
        return preference_accuracy(model, tokenizer, records)
    if metric == "distinct_n":
        prompts = [_generation_prompt(r, tokenizer) for r in records]
        samples = sample_completions(model, tokenizer, prompts, num=4, max_new_tokens=max_new_tokens)
        return distinct_n([s for group in samples for s in group], n=2)
    raise ValueError(f"unknown metric {metric!r}")
