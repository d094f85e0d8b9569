"""reward-model: a one-logit sequence classifier on TRL's ``RewardTrainer`` + ``RewardConfig``.

Bradley-Terry loss ``-log sigmoid(r(prompt, chosen) - r(prompt, rejected))`` (TRL's). ``peft.method``:

- ``lora`` (or ``qlora`` on a GPU): LoRA on the backbone plus a fully trained score head (PEFT
  ``SEQ_CLS`` puts the head in ``modules_to_save``). Published in the PEFT layout; loads the stock
  way: ``AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)`` then
  ``PeftModel.from_pretrained(model, folder)``.
- ``full``: every weight trained; published as a complete ``save_pretrained`` folder.

The text a reward model reads is ``temper_trainer.rewards.reward_model_input_ids`` (shared with
scoring, so training and use agree). The model starts from ``baseModel``; a ``from`` parent is
not supported (its causal-LM adapter does not transfer to a classifier load).

Pairs reach TRL tokenized (``chosen_ids``/``rejected_ids``) by the same function scoring uses.

Metrics: ``eval/accuracy`` and ``eval/accuracy_before`` (share of held-out pairs scored
chosen > rejected; ``train/...`` without eval data; the ``before`` value is measured once and kept
in checkpoints), ``eval/margin``, ``train/loss``, ``train/accuracy`` (TRL's last logged value).
"""

from __future__ import annotations

from typing import Any

from temper_trainer.data import Record
from temper_trainer.rewards import load_sequence_classifier, reward_model_input_ids, score_ids
from temper_trainer.stage import InvalidInput, StageContext, StageOutcome, Unsupported
from temper_trainer.stages import register_stage
from temper_trainer.stages._rl_common import require_records
from temper_trainer.stages._trl_common import (
    find_resume,
    fit,
    ordered,
    total_steps,
    train_metrics,
    trainer_args,
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
    ctx.set_attention(model)
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
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl.trainer.reward_config import RewardConfig
    from trl.trainer.reward_trainer import RewardTrainer

    from temper_trainer.callbacks import is_main_process
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
    steps = total_steps(hp, len(train), hp.batch_size * hp.gradient_accumulation_steps)

    resume = find_resume(ctx)
    if "accuracy_before" in resume.stage_state:
        accuracy_before = float(resume.stage_state["accuracy_before"])
    else:
        ctx.set_phase("evaluating")
        accuracy_before, _ = pairwise_accuracy(model, held_out, pad_id, ctx.device)

    config = RewardConfig(
        **trainer_args(ctx, steps, scheduler="constant_with_warmup"),
        max_length=hp.max_length,
        remove_unused_columns=False,
    )
    trainer_cls = ordered(RewardTrainer, contract.data.curriculum.order_by != "none")
    trainer = trainer_cls(
        model=model,
        args=config,
        train_dataset=Dataset.from_dict({"chosen_ids": train.chosen, "rejected_ids": train.rejected}),
        processing_class=tokenizer,
    )
    callback = fit(
        ctx,
        trainer,
        resume,
        stage_state=lambda: {"accuracy_before": accuracy_before},
        gauges={"reward": "mean_reward"},
    )
    model = trainer.model

    ctx.set_phase("evaluating")
    accuracy_after, margin_after = pairwise_accuracy(model, held_out, pad_id, ctx.device)
    split = "eval" if eval_records else "train"
    model.eval()
    if is_main_process():
        model.save_pretrained(str(ctx.artifact_dir))
        tokenizer.save_pretrained(str(ctx.artifact_dir))  # scorers tokenize exactly as training did
    method = contract.peft.method
    return StageOutcome(
        artifact_dir=ctx.artifact_dir,
        metrics={
            **train_metrics(trainer.state),
            f"{split}/accuracy": accuracy_after,
            f"{split}/accuracy_before": accuracy_before,
            f"{split}/margin": margin_after,
            "train/accuracy": callback.last_logs.get("accuracy", 0.0),
        },
        method=method,
        servable={"peft": method != "full", "vllm": False},  # a scorer, not a generator
        lineage={
            "pairs": len(train),
            "evalPairs": len(held_out),
            "head": "score",
            "numLabels": 1,
            "trainer": "trl.RewardTrainer",
        },
    )
