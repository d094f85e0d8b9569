"""Shared pieces of the preference and RL stages (dpo, grpo, reward-model, synthetic-preferences).

Training runs on TRL's trainers (``_trl_common``); what is here is temper's own: rendering
prompts the way the sft stage does, the log-prob and sampling helpers of temper's evaluation
metrics and of synthetic-preference generation, and loading/publishing the policy.

Tokenization follows the sft stage so a parent adapter sees the prompts it was trained on:
prompt-completion style prompts are ``<bos> + prompt``, chat prompts are the rendered template.
A response is its tokens followed by ``<eos>``; log-probabilities cover the response only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

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


# -- checkpoints (synthetic-preferences' own loop) ---------------------------------------------
def checkpoint_or_stop(ctx: StageContext, step: int, make_state: Callable[[], dict[str, Any]]) -> None:
    """After unit ``step`` (1-based count of finished units): save when due; on SIGTERM save and
    raise :class:`Preempted` so the runner exits with the documented code."""
    if ctx.stop_requested:
        ctx.checkpointer.save(step, make_state())
        raise Preempted(f"stopped by SIGTERM after step {step}; checkpoint saved")
    if ctx.checkpointer.should_checkpoint(step):
        ctx.checkpointer.save(step, make_state())


# -- policy ------------------------------------------------------------------------------
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
