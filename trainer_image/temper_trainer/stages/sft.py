"""SFT on TRL's ``SFTTrainer`` + ``SFTConfig``.

- loss on completions / assistant turns only: examples are tokenized here (``data.encode_sft``,
  which splits any chat template's rendering into turns) and reach TRL as ``input_ids`` + ``labels``;
  TRL's own ``assistant_only_loss`` needs ``{% generation %}`` markers most templates lack;
- curriculum order and replay mixing come from ``ctx.load_dataset`` and are kept: with a
  curriculum the trainer samples sequentially, otherwise TRL's seeded shuffle per epoch;
- ``packing``: TRL's padding-free batches (one row of concatenated examples, ``position_ids``
  restarting per example, no label across a boundary); prompt-learning methods (virtual
  tokens) use padded batches instead;
- checkpoints, resume, progress and metrics: ``temper_trainer.callbacks`` via ``_trl_common.fit``.

Metrics: the eval stage's (``eval/exact_match``... for ``data.eval`` and ``suites``), plus
``eval/exact_match_before`` (the starting policy: the parent, else the base, in the same format)
and, for builtin tasks, ``eval/exact_match_pretrain_format`` and its ``_before``: the same held-out
problems posed in the tiny model's pretraining form, so a gain that is only format learning shows
(``before`` in pretraining form high, in SFT form low); ``drift/kl_to_base`` /
``drift/kl_to_parent`` (``_trl_common.stage_drift``); ``train/...``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from temper_trainer.callbacks import is_main_process
from temper_trainer.data import IGNORE_INDEX, Record, encode_sft, record_format
from temper_trainer.peft_setup import PROMPT_LEARNING, adapter_method, servable_flags
from temper_trainer.stage import InvalidInput, StageContext, StageOutcome
from temper_trainer.stages import register_stage
from temper_trainer.stages._trl_common import (
    find_resume,
    fit,
    ordered,
    stage_drift,
    total_steps,
    train_metrics,
    trainer_args,
)

Example = tuple[list[int], list[int]]


def encode_examples(records: Sequence[Record], tokenizer: Any, max_length: int) -> list[Example]:
    examples = []
    for record in records:
        ids, labels = encode_sft(record, tokenizer, max_length)
        if any(label != IGNORE_INDEX for label in labels[1:]):
            examples.append((ids, labels))
    return examples


def collate(examples: Sequence[Example], pad_id: int, *, padding_free: bool) -> dict[str, Any]:
    """The batch TRL's SFT collator builds from these examples (what the stage trains on)."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    collator = DataCollatorForLanguageModeling(pad_token_id=pad_id, padding_free=padding_free)
    batch = collator([{"input_ids": ids, "labels": labels} for ids, labels in examples])
    keep = (
        ("input_ids", "labels", "position_ids") if padding_free else ("input_ids", "labels", "attention_mask")
    )
    return {key: batch[key] for key in keep}


def format_metrics(model: Any, tokenizer: Any, records: Sequence[Record], max_new: int) -> dict[str, float]:
    """Held-out exact match in the SFT format and, for builtin tasks, in the pretraining format."""
    from temper_trainer.evaluation import exact_match, pretrain_format_exact_match

    gen = [r for r in records if record_format(r) != "preference"]
    if not gen:
        return {}
    out = {"eval/exact_match": exact_match(model, tokenizer, gen, max_new_tokens=max_new)}
    pre = pretrain_format_exact_match(model, tokenizer, gen, max_new_tokens=max_new)
    if pre is not None:
        out["eval/exact_match_pretrain_format"] = pre
    return out


def packed_batch(examples: Sequence[Example]) -> dict[str, Any]:
    """One [1, total_tokens] row; position_ids restart per example (padding-free)."""
    return collate(examples, 0, padding_free=True)


def padded_batch(examples: Sequence[Example], pad_id: int) -> dict[str, Any]:
    return collate(examples, pad_id, padding_free=False)


@register_stage("sft")
def run(ctx: StageContext) -> StageOutcome:
    from datasets import Dataset
    from trl.trainer.sft_config import SFTConfig
    from trl.trainer.sft_trainer import SFTTrainer

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
    total = total_steps(hp, len(examples), hp.batch_size * hp.gradient_accumulation_steps)
    if parent_dir is not None:  # continue training the parent's adapter: one artifact per lineage
        model = ctx.load_parent(model, trainable=True)
    else:
        model = ctx.apply_peft(model, total_steps=total)
    packing = hp.packing and method not in PROMPT_LEARNING
    config = SFTConfig(
        **trainer_args(ctx, total),
        padding_free=packing,
        max_length=None if packing else hp.max_length,  # examples are truncated already
        dataset_kwargs={"skip_prepare_dataset": True},  # tokenized and labelled here
        remove_unused_columns=False,
    )
    dataset = Dataset.from_dict({"input_ids": [e[0] for e in examples], "labels": [e[1] for e in examples]})
    trainer_cls = ordered(SFTTrainer, contract.data.curriculum.order_by != "none")
    trainer = trainer_cls(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    resume = find_resume(ctx)
    eval_records = ctx.load_dataset("eval")
    if "before" in resume.stage_state:
        before = {k: float(v) for k, v in resume.stage_state["before"].items()}
    else:
        ctx.set_phase("evaluating")
        before = format_metrics(model, tokenizer, eval_records, hp.max_new_tokens)
    started = time.monotonic()
    fit(ctx, trainer, resume, stage_state=lambda: {"before": before})
    state = trainer.state
    train_seconds = time.monotonic() - started
    model = trainer.model

    from temper_trainer.stages.eval import evaluate_model

    ctx.set_phase("evaluating")
    model.eval()
    metrics = evaluate_model(ctx, model, tokenizer)
    after = format_metrics(model, tokenizer, eval_records, hp.max_new_tokens)
    tokens = float(state.num_input_tokens_seen or 0)
    metrics.update(
        {
            **{f"{k}_before": v for k, v in before.items()},
            **{k: v for k, v in after.items() if k not in metrics},
            **stage_drift(ctx, model, tokenizer, eval_records or records),
            **train_metrics(state),
            "train/examples": float(len(examples)),
            "train/tokens_per_second": tokens / train_seconds if train_seconds > 0 else 0.0,
        }
    )
    if is_main_process():
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
            "resumedFromStep": resume.step,
            "trainer": "trl.SFTTrainer",
        },
    )
