"""Shared pieces of the preference and RL stages (dpo, grpo, reward-model, synthetic-preferences).

These stages run lean loops instead of TRL's trainers: on CPU with a tiny model the trainers'
setup dominates, and a hand loop gives exact control over checkpoint/resume and progress.

Tokenization follows the sft stage so a parent adapter sees the prompts it was trained on:
prompt-completion style prompts are ``<bos> + prompt``, chat prompts are the rendered template.
A response is its tokens followed by ``<eos>``; log-probabilities cover the response only.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from temper.api.contract import Hyperparameters

from temper_trainer.data import Record, prompt_and_target, record_format
from temper_trainer.stage import InvalidInput, Preempted, StageContext, StageOutcome

if TYPE_CHECKING:
    import torch


def token_ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def prompt_token_ids(record: Record, tokenizer: Any) -> list[int]:
    """The ids the policy is conditioned on, exactly as the sft stage renders the prompt."""
    text, _ = prompt_and_target(record, tokenizer)
    ids = token_ids(tokenizer, text)
    if record_format(record) == "chat" or tokenizer.bos_token_id is None:
        return ids
    return [tokenizer.bos_token_id, *ids]


def reference_answer(record: Record, tokenizer: Any) -> str | None:
    """The record's reference answer (prompt ``answer``, ``completion``, final assistant turn)."""
    if record_format(record) == "prompt":
        answer = record.get("answer")
        return None if answer is None else str(answer)
    return prompt_and_target(record, tokenizer)[1]


def response_token_ids(tokenizer: Any, text: str) -> list[int]:
    return [*token_ids(tokenizer, text), tokenizer.eos_token_id]


def require_records(records: list[Record], split: str, fmt: str | None = None) -> None:
    if not records:
        raise InvalidInput(f"data.{split}: no datasets listed (this stage needs at least one)")
    if fmt is not None:
        bad = [r.get("_dataset", "?") for r in records if record_format(r) != fmt]
        if bad:
            raise InvalidInput(f"data.{split}: dataset {bad[0]!r} must have format {fmt!r}")


# -- log-probabilities ---------------------------------------------------------------------
def response_logprobs(
    model: Any,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    *,
    pad_id: int,
    device: torch.device,
    max_length: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of each response given its prompt: ``(logps, mask)``, both (B, T).

    Sequences are right-padded; ``mask`` is 1 on response tokens. A sequence longer than
    ``max_length`` loses prompt tokens from the left, so the response is always scored whole.
    """
    import torch

    seqs: list[list[int]] = []
    starts: list[int] = []
    for prompt, response in zip(prompts, responses, strict=True):
        seq = [*prompt, *response]
        if max_length is not None and len(seq) > max_length:
            seq = seq[len(seq) - max_length :]
        seqs.append(seq)
        starts.append(max(1, len(seq) - len(response)))  # the first token has no prediction
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    mask = torch.zeros((len(seqs), width - 1), dtype=torch.float32)
    for i, seq in enumerate(seqs):
        ids[i, : len(seq)] = torch.tensor(seq)
        attention[i, : len(seq)] = 1
        mask[i, starts[i] - 1 : len(seq) - 1] = 1.0
    ids, attention, mask = ids.to(device), attention.to(device), mask.to(device)
    # prompt-learning adapters prepend virtual-token positions: keep the last ``width`` ones
    logits = model(input_ids=ids, attention_mask=attention).logits[:, -width:-1].float()
    logps = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return logps * mask, mask


def sequence_logprobs(
    model: Any,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    *,
    pad_id: int,
    device: torch.device,
    max_length: int | None = None,
) -> torch.Tensor:
    logps, _ = response_logprobs(
        model, prompts, responses, pad_id=pad_id, device=device, max_length=max_length
    )
    return logps.sum(-1)


def batched_sequence_logprobs(
    model: Any,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    *,
    pad_id: int,
    device: torch.device,
    batch_size: int,
    max_length: int | None = None,
) -> torch.Tensor:
    """No-grad summed log-probs over many sequences (reference values, evaluation)."""
    import torch

    out = []
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            end = start + batch_size
            out.append(
                sequence_logprobs(
                    model,
                    prompts[start:end],
                    responses[start:end],
                    pad_id=pad_id,
                    device=device,
                    max_length=max_length,
                )
            )
    return torch.cat(out).cpu() if out else torch.zeros(0)


# -- sampling --------------------------------------------------------------------------------
def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    *,
    num_samples: int,
    max_new_tokens: int,
    temperature: float,
    greedy: bool,
    device: torch.device,
) -> list[list[int]]:
    """``num_samples`` responses per prompt (prompt-major order), each cut after its first eos."""
    import torch

    width = max(len(p) for p in prompts)
    pad_id = tokenizer.pad_token_id
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for i, prompt in enumerate(prompts):  # left padding: every prompt ends where generation starts
        ids[i, width - len(prompt) :] = torch.tensor(list(prompt))
        attention[i, width - len(prompt) :] = 1
    sampling: dict[str, Any] = (
        {"do_sample": False}
        if greedy
        else {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
    )
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=attention.to(device),
            max_new_tokens=max_new_tokens,
            num_return_sequences=num_samples,
            pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id,
            **sampling,
        )
    if was_training:
        model.train()
    responses = []
    for row in out[:, width:].tolist():
        cut = row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)
        responses.append(row[:cut])
    return responses


def decode_response(tokenizer: Any, response: Sequence[int]) -> str:
    return str(tokenizer.decode(list(response), skip_special_tokens=True))


# -- optimisation, checkpoint and resume -----------------------------------------------------
def total_steps(hp: Hyperparameters, n_items: int, items_per_step: int) -> int:
    if hp.max_steps is not None:
        return hp.max_steps
    return max(1, math.ceil(hp.epochs * n_items / max(1, items_per_step)))


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Indices of optimizer step ``step`` (0-based): one seeded permutation per epoch.

    A pure function of (step, seed), so a resumed run sees the very batches it would have.
    """
    batch_size = min(batch_size, n)
    per_epoch = max(1, n // batch_size)
    epoch, offset = divmod(step, per_epoch)
    order = list(range(n))
    random.Random(f"{seed}/{epoch}").shuffle(order)
    return order[offset * batch_size : (offset + 1) * batch_size]


def trainable_parameters(model: Any) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def trainable_state(model: Any) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().clone() for name, p in trainable_parameters(model)}


def load_trainable_state(model: Any, state: dict[str, torch.Tensor]) -> None:
    import torch

    params = dict(trainable_parameters(model))
    if set(params) != set(state):
        raise InvalidInput("checkpoint does not match this stage's trainable parameters (peft changed?)")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))


@contextmanager
def reference_weights(model: Any, reference: dict[str, torch.Tensor]) -> Iterator[None]:
    """Temporarily swap the trainable parameters for their starting values (the reference policy).

    The reference is the policy the stage started from (base, or base + parent adapter); only the
    trainable tensors differ from it, so keeping those is all a reference model costs.
    """
    import torch

    params = dict(trainable_parameters(model))
    saved = {}
    with torch.no_grad():
        for name, value in reference.items():
            saved[name] = params[name].detach().clone()
            params[name].copy_(value.to(params[name].device, params[name].dtype))
    try:
        yield
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)


def make_optimizer(model: Any, hp: Hyperparameters) -> torch.optim.Optimizer:
    import torch

    params = [p for _, p in trainable_parameters(model)]
    if not params:
        raise InvalidInput("peft: the model has no trainable parameters")
    return torch.optim.AdamW(params, lr=hp.learning_rate, weight_decay=0.0)


def set_learning_rate(optimizer: torch.optim.Optimizer, hp: Hyperparameters, step: int, total: int) -> None:
    """Linear warmup over ``warmupRatio`` of the steps, then constant."""
    warmup = int(hp.warmup_ratio * total)
    scale = (step + 1) / warmup if warmup and step < warmup else 1.0
    for group in optimizer.param_groups:
        group["lr"] = hp.learning_rate * scale


def checkpoint_or_stop(ctx: StageContext, step: int, make_state: Callable[[], dict[str, Any]]) -> None:
    """After optimizer step ``step`` (1-based count of finished steps): save when due; on SIGTERM
    save and raise :class:`Preempted` so the runner exits with the documented code."""
    if ctx.stop_requested:
        ctx.checkpointer.save(step, make_state())
        raise Preempted(f"stopped by SIGTERM after step {step}; checkpoint saved")
    if ctx.checkpointer.should_checkpoint(step):
        ctx.checkpointer.save(step, make_state())


def training_state(model: Any, optimizer: Any, **extra: Any) -> dict[str, Any]:
    """A checkpoint of an RL stage: trainable weights, optimizer and RNG, plus the stage's own values."""
    return {
        "trainable": trainable_state(model),
        "optimizer": optimizer.state_dict(),
        "rng": rng_state(),
        **extra,
    }


def restore_training(model: Any, optimizer: Any, saved: dict[str, Any]) -> None:
    """Undo :func:`training_state` (the stage reads its own values from ``saved``)."""
    load_trainable_state(model, saved["trainable"])
    optimizer.load_state_dict(saved["optimizer"])
    restore_rng(saved["rng"])


def rng_state() -> dict[str, Any]:
    import torch

    return {"torch": torch.get_rng_state()}


def restore_rng(state: dict[str, Any]) -> None:
    import torch

    torch.set_rng_state(state["torch"])


def policy_method(ctx: StageContext) -> str:
    """The artifact's method: the parent adapter's (which training continues), else ``peft.method``."""
    from temper_trainer.peft_setup import adapter_method

    if ctx.contract.parent is None:
        return ctx.contract.peft.method
    return adapter_method(ctx.fetch_adapter(ctx.contract.parent))


def publish_policy(
    ctx: StageContext,
    model: Any,
    tokenizer: Any,
    method: str,
    *,
    metrics: dict[str, float],
    lineage: dict[str, Any],
) -> StageOutcome:
    """Save the trained policy adapter and describe it (dpo, grpo)."""
    from temper_trainer.peft_setup import servable_flags

    ctx.save_model(model, tokenizer)
    return StageOutcome(
        artifact_dir=ctx.artifact_dir,
        metrics=metrics,
        method=method,
        servable=servable_flags(method),
        lineage=lineage,
    )


def load_policy(ctx: StageContext, total: int) -> tuple[Any, Any]:
    """Base model plus, trainable, the parent adapter, or a fresh adapter per ``contract.peft``."""
    model, tokenizer = ctx.load_base_model()
    if ctx.contract.parent is not None:
        model = ctx.load_parent(model, trainable=True)
    else:
        model = ctx.apply_peft(model, total_steps=total)
    model.train()
    return model, tokenizer


def after_optimizer_step(model: Any, step: int) -> None:
    """AdaLoRA reallocates its ranks on a schedule driven by the optimizer step."""
    from temper_trainer.peft_setup import is_adalora

    if is_adalora(model):
        model.base_model.update_and_allocate(step)
