"""reward-model: a one-logit sequence classifier trained on preference pairs (Bradley-Terry).

Loss ``-log sigmoid(r(prompt, chosen) - r(prompt, rejected))``. ``peft.method``:

- ``lora`` (or ``qlora`` on a GPU): LoRA on the backbone plus a fully trained score head (PEFT
  ``SEQ_CLS`` puts the head in ``modules_to_save``). Published in the PEFT layout; loads the stock
  way: ``AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)`` then
  ``PeftModel.from_pretrained(model, folder)``.
- ``full``: every weight trained; published as a complete ``save_pretrained`` folder.

The text a reward model reads is ``temper_trainer.rewards.reward_model_input_ids`` (shared with
scoring, so training and use agree). The model starts from ``baseModel``; a ``from`` parent is
not supported (its causal-LM adapter does not transfer to a classifier load).

Metrics: ``eval/accuracy`` and ``eval/accuracy_before`` (share of held-out pairs scored
chosen > rejected; ``train/...`` without eval data), ``eval/margin``, ``train/loss``.
"""

from __future__ import annotations

from typing import Any

from temper_trainer.data import Record
from temper_trainer.rewards import load_sequence_classifier, reward_model_input_ids, score_ids
from temper_trainer.stage import InvalidInput, StageContext, StageOutcome, Unsupported
from temper_trainer.stages import register_stage
from temper_trainer.stages._rl_common import (
    batch_indices,
    checkpoint_or_stop,
    make_optimizer,
    require_records,
    restore_training,
    set_learning_rate,
    total_steps,
    training_state,
)

EVAL_BATCH = 64
SUPPORTED = ("lora", "qlora", "full")


class _Pairs:
    def __init__(self, records: list[Record], tokenizer: Any, max_length: int) -> None:
        self.chosen = [
            reward_model_input_ids(tokenizer, r["prompt"], r["chosen"], max_length) for r in records
        ]
        self.rejected = [
            reward_model_input_ids(tokenizer, r["prompt"], r["rejected"], max_length) for r in records
        ]

    def __len__(self) -> int:
        return len(self.chosen)


def pairwise_accuracy(model: Any, pairs: _Pairs, pad_id: int, device: Any) -> tuple[float, float]:
    """(accuracy, mean margin) of chosen-vs-rejected scores."""
    import torch

    was_training = model.training
    model.eval()
    margins = []
    with torch.no_grad():
        for start in range(0, len(pairs), EVAL_BATCH):
            end = start + EVAL_BATCH
            chosen = score_ids(model, pairs.chosen[start:end], pad_id, device)
            rejected = score_ids(model, pairs.rejected[start:end], pad_id, device)
            margins.append(chosen - rejected)
    model.train(was_training)
    margin = torch.cat(margins)
    return float((margin > 0).float().mean()), float(margin.mean())


def build_model(ctx: StageContext, tokenizer: Any) -> Any:
    import peft

    from temper_trainer.models import resolve_model_dir
    from temper_trainer.peft_setup import check_supported, quantization_config

    spec = ctx.contract.peft
    if spec.method not in SUPPORTED:
        raise Unsupported(f"peft.method {spec.method!r}: a reward model supports {', '.join(SUPPORTED)}")
    check_supported(spec, ctx.device.type)
    try:
        folder = resolve_model_dir(ctx.contract.base_model, ctx.storage)
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"baseModel {ctx.contract.base_model!r}: {exc}") from exc
    quantization = quantization_config(spec)
    if quantization is not None:
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(
            str(folder), num_labels=1, quantization_config=quantization
        )
        model.config.pad_token_id = tokenizer.pad_token_id
        model = peft.prepare_model_for_kbit_training(model)  # type: ignore[no-untyped-call]
    else:
        model = load_sequence_classifier(folder, tokenizer).to(ctx.device)
    if spec.method == "full":
        for param in model.parameters():
            param.requires_grad_(True)
        return model
    targets: Any = "all-linear" if spec.target_modules == ["all-linear"] else list(spec.target_modules)
    config = peft.LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=targets,
        task_type=peft.TaskType.SEQ_CLS,
    )
    return peft.get_peft_model(model, config)


@register_stage("reward-model")
def run(ctx: StageContext) -> StageOutcome:
    import torch
    import torch.nn.functional as F
    from transformers import AutoTokenizer

    from temper_trainer.models import resolve_model_dir

    contract, hp = ctx.contract, ctx.contract.hyperparameters
    if contract.parent is not None:
        raise Unsupported("from: a reward-model stage starts from baseModel; a parent adapter cannot be used")
    train_records = ctx.load_dataset("train")
    require_records(train_records, "train", "preference")
    eval_records = ctx.load_dataset("eval")
    if eval_records:
        require_records(eval_records, "eval", "preference")

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model_dir(contract.base_model, ctx.storage)))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = build_model(ctx, tokenizer)
    pad_id = tokenizer.pad_token_id
    train = _Pairs(train_records, tokenizer, hp.max_length)
    held_out = _Pairs(eval_records or train_records, tokenizer, hp.max_length)
    steps = total_steps(hp, len(train), hp.batch_size)
    optimizer = make_optimizer(model, hp)

    resumed = ctx.checkpointer.latest()
    if resumed is not None:
        saved = resumed.state
        restore_training(model, optimizer, saved)
        accuracy_before = float(saved["accuracy_before"])
        start = resumed.step
    else:
        ctx.set_phase("evaluating")
        accuracy_before, _ = pairwise_accuracy(model, held_out, pad_id, ctx.device)
        start = 0

    def snapshot() -> dict[str, Any]:
        return training_state(model, optimizer, accuracy_before=accuracy_before)

    ctx.set_phase("training")
    model.train()
    loss_value = float("nan")
    for step in range(start, steps):
        set_learning_rate(optimizer, hp, step, steps)
        batch = batch_indices(len(train), hp.batch_size, step, contract.seed)
        sequences = [train.chosen[i] for i in batch] + [train.rejected[i] for i in batch]
        scores = score_ids(model, sequences, pad_id, ctx.device)
        margin = scores[: len(batch)] - scores[len(batch) :]
        loss = -F.logsigmoid(margin).mean()
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = float(loss.detach())
        accuracy = float((margin.detach() > 0).float().mean())
        ctx.report(
            step=step + 1,
            total=steps,
            loss=loss_value,
            tokens=sum(len(s) for s in sequences),
            accuracy=accuracy,
        )
        checkpoint_or_stop(ctx, step + 1, snapshot)

    ctx.set_phase("evaluating")
    accuracy_after, margin_after = pairwise_accuracy(model, held_out, pad_id, ctx.device)
    split = "eval" if eval_records else "train"
    model.eval()
    model.save_pretrained(str(ctx.artifact_dir))
    tokenizer.save_pretrained(str(ctx.artifact_dir))  # scorers tokenize exactly as training did
    method = contract.peft.method
    return StageOutcome(
        artifact_dir=ctx.artifact_dir,
        metrics={
            f"{split}/accuracy": accuracy_after,
            f"{split}/accuracy_before": accuracy_before,
            f"{split}/margin": margin_after,
            "train/loss": loss_value,
            "train/steps": float(steps),
        },
        method=method,
        servable={"peft": method != "full", "vllm": False},  # a scorer, not a generator
        lineage={"pairs": len(train), "evalPairs": len(held_out), "head": "score", "numLabels": 1},
    )
