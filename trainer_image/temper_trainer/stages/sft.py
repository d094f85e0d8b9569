"""SFT: temper's own loop (torch + transformers + peft).

- loss on completions / assistant turns only (``data.encode_sft``), chat template for chat data;
- curriculum order and replay mixing come from ``ctx.load_dataset`` and are kept (no reshuffle
  unless the curriculum is ``none``);
- padding-free packing: a micro-batch is one row of concatenated examples with ``position_ids``
  restarting per example, which transformers turns into a block-diagonal causal mask, so no token
  attends across examples; the first label of every example is ignored so no loss crosses a
  boundary either. Prompt-learning methods (virtual tokens) use padded batches instead;
- the micro-batch at a given step is a pure function of (seed, step), so a resumed run sees
  exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from typing import Any

from temper_trainer.data import IGNORE_INDEX, Record, encode_sft
from temper_trainer.peft_setup import (
    PROMPT_LEARNING,
    adapter_method,
    is_adalora,
    load_trainable_state,
    servable_flags,
    trainable_state_dict,
)
from temper_trainer.stage import InvalidInput, Preempted, StageContext, StageOutcome
from temper_trainer.stages import register_stage

Example = tuple[list[int], list[int]]


def encode_examples(records: Sequence[Record], tokenizer: Any, max_length: int) -> list[Example]:
    examples = []
    for record in records:
        ids, labels = encode_sft(record, tokenizer, max_length)
        if any(label != IGNORE_INDEX for label in labels[1:]):
            examples.append((ids, labels))
    return examples


def packed_batch(examples: Sequence[Example]) -> dict[str, Any]:
    """One [1, total_tokens] row; position_ids restart per example (padding-free)."""
    import torch

    input_ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for ids, labs in examples:
        input_ids += ids
        labels += [IGNORE_INDEX, *labs[1:]]  # never learn to predict across a boundary
        positions += list(range(len(ids)))
    return {
        "input_ids": torch.tensor([input_ids]),
        "labels": torch.tensor([labels]),
        "position_ids": torch.tensor([positions]),
    }


def padded_batch(examples: Sequence[Example], pad_id: int) -> dict[str, Any]:
    import torch

    width = max(len(ids) for ids, _ in examples)
    ids = [e[0] + [pad_id] * (width - len(e[0])) for e in examples]
    labels = [e[1] + [IGNORE_INDEX] * (width - len(e[1])) for e in examples]
    mask = [[1] * len(e[0]) + [0] * (width - len(e[0])) for e in examples]
    return {
        "input_ids": torch.tensor(ids),
        "labels": torch.tensor(labels),
        "attention_mask": torch.tensor(mask),
    }


class BatchPlan:
    """Micro-batch ``i`` (over all epochs) as a pure function of its index."""

    def __init__(self, n_examples: int, batch_size: int, reshuffle: bool, seed: int) -> None:
        self.n, self.batch_size, self.reshuffle, self.seed = n_examples, batch_size, reshuffle, seed
        self.per_epoch = math.ceil(n_examples / batch_size)
        self._orders: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            order = list(range(self.n))
            if self.reshuffle and epoch > 0:  # epoch 0 keeps load_dataset's (seeded) order
                random.Random(self.seed * 1000 + epoch).shuffle(order)
            self._orders = {epoch: order}
        return self._orders[epoch]

    def indices(self, micro: int) -> list[int]:
        epoch, pos = divmod(micro, self.per_epoch)
        return self._order(epoch)[pos * self.batch_size : (pos + 1) * self.batch_size]


def linear_schedule(total: int, warmup: int) -> Any:
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


@register_stage("sft")
def run(ctx: StageContext) -> StageOutcome:
    import torch

    contract, hp = ctx.contract, ctx.contract.hyperparameters
    model, tokenizer = ctx.load_base_model()
    records = ctx.load_dataset("train")
    if not records:
        raise InvalidInput("data.train: an sft stage needs at least one training dataset")
    examples = encode_examples(records, tokenizer, hp.max_length)
    if not examples:
        raise InvalidInput("data.train: no example keeps a completion token within hyperparameters.maxLength")

    parent_dir = ctx.fetch_adapter(contract.parent) if contract.parent else None
    method = adapter_method(parent_dir) if parent_dir else contract.peft.method
    micro_per_epoch = math.ceil(len(examples) / hp.batch_size)
    total = hp.max_steps or max(1, math.ceil(hp.epochs * micro_per_epoch / hp.gradient_accumulation_steps))
    if parent_dir is not None:  # continue training the parent's adapter: one artifact per lineage
        model = ctx.load_parent(model, trainable=True)
    else:
        model = ctx.apply_peft(model, total_steps=total)
    packing = hp.packing and method not in PROMPT_LEARNING
    plan = BatchPlan(len(examples), hp.batch_size, contract.data.curriculum.order_by == "none", ctx.seed)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=hp.learning_rate, weight_decay=0.0)
    warmup = int(hp.warmup_ratio * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(total, warmup))

    start, losses, resumed_from = 0, [], None
    checkpoint = ctx.checkpointer.latest()
    if checkpoint is not None:
        state = checkpoint.state
        load_trainable_state(model, state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        start, losses, resumed_from = int(state["step"]), list(state["losses"]), int(state["step"])

    def save_checkpoint(step: int) -> None:
        ctx.checkpointer.save(
            step,
            {
                "step": step,
                "model": trainable_state_dict(model),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "losses": losses,
            },
        )

    ctx.set_phase("training")
    model.train()
    tokens_total, started = 0, time.monotonic()
    for step in range(start, total):
        step_loss, step_tokens = 0.0, 0
        for k in range(hp.gradient_accumulation_steps):
            chosen = [examples[i] for i in plan.indices(step * hp.gradient_accumulation_steps + k)]
            batch = packed_batch(chosen) if packing else padded_batch(chosen, tokenizer.pad_token_id)
            batch = {key: value.to(ctx.device) for key, value in batch.items()}
            # use_cache=False: with a cache, transformers ignores packed position_ids in the mask
            loss = model(**batch, use_cache=False).loss / hp.gradient_accumulation_steps
            loss.backward()
            step_loss += float(loss.detach())
            step_tokens += sum(len(ids) for ids, _ in chosen)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        if is_adalora(model):
            model.base_model.update_and_allocate(step)
        optimizer.zero_grad(set_to_none=True)
        losses.append(step_loss)
        tokens_total += step_tokens
        done = step + 1
        ctx.report(step=done, total=total, loss=step_loss, tokens=step_tokens, force=done == total)
        if ctx.stop_requested:
            save_checkpoint(done)
            raise Preempted(f"SIGTERM at step {done}/{total}; checkpoint saved")
        if done < total and ctx.checkpointer.should_checkpoint(done):
            save_checkpoint(done)
    train_seconds = time.monotonic() - started

    from temper_trainer.stages.eval import evaluate_model

    ctx.set_phase("evaluating")
    metrics = evaluate_model(ctx, model, tokenizer)
    tail = losses[-max(1, min(10, len(losses))) :]
    metrics.update(
        {
            "train/loss": sum(tail) / len(tail),
            "train/steps": float(total),
            "train/examples": float(len(examples)),
            "train/tokens_per_second": tokens_total / train_seconds if train_seconds > 0 else 0.0,
        }
    )
    ctx.save_model(model, tokenizer)
    n_replay = sum(1 for r in records if r.get("_replay"))
    return StageOutcome(
        artifact_dir=ctx.artifact_dir,
        metrics=metrics,
        method=method,
        servable=servable_flags(method),
        lineage={
            "datasets": [{"name": d.name, "uri": d.uri} for d in contract.data.train],
            "replayExamples": n_replay,
            "packing": packing,
            "resumedFromStep": resumed_from,
        },
    )
