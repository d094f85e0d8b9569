"""dpo: Direct Preference Optimization on TRL's ``DPOTrainer`` + ``DPOConfig``.

``lossType`` is TRL's DPO loss (default ``sigmoid``). ``rpoAlpha`` adds that weight x the chosen
responses' per-token NLL (RPO, Pang et al. 2024): TRL's ``sft`` loss combined through
``loss_weights``. Pure DPO (``rpoAlpha: 0``) only moves the *difference* of the two log-probs, so on
a new prompt format it memorizes the training pairs; the NLL term teaches the format too, which is
what carries the preference to held-out prompts (tiny model, arith: pure DPO plateaus near 75%
held-out accuracy, RPO reaches over 90%). Unset, it is :data:`DEFAULT_RPO_ALPHA`; the value used
is recorded in the lineage.

The policy starts from the parent adapter (``from``) or a fresh adapter on the base model; the
reference is that starting policy (TRL keeps a frozen ``ref`` copy of the adapter, dropped before
publishing); its log-probs are computed once before training. Prompts are rendered as the sft
stage renders them (``<bos>`` + prompt), so a parent adapter sees the prompts it was trained on.

Metrics: ``eval/preference_accuracy`` (share of held-out pairs whose chosen response has the
higher policy log-prob; ``train/...`` when no eval data is given) and its ``_before`` value
(measured once, kept in checkpoints); from TRL's logs ``train/reward_margin``
(``rewards/margins``), ``train/reward_accuracy`` (``rewards/accuracies``), ``train/kl`` (chosen
log-ratio policy vs reference, ``rewards/chosen`` / beta), ``train/loss``, ``drift/kl_to_base`` /
``drift/kl_to_parent`` (``_trl_common.stage_drift``, on the prompts and chosen responses), plus
the eval stage's metrics for ``data.eval``/``suites``.
"""

from __future__ import annotations

from typing import Any

from temper_trainer.callbacks import is_main_process
from temper_trainer.data import Record
from temper_trainer.stage import StageContext, StageOutcome
from temper_trainer.stages import register_stage
from temper_trainer.stages._rl_common import (
    batched_sequence_logprobs,
    load_policy,
    policy_method,
    prompt_token_ids,
    publish_policy,
    require_records,
    response_token_ids,
)
from temper_trainer.stages._trl_common import (
    drop_reference_adapter,
    find_resume,
    fit,
    ordered,
    stage_drift,
    total_steps,
    train_metrics,
    trainer_args,
)

EVAL_BATCH = 32
DEFAULT_RPO_ALPHA = 1.0


class _Pairs:
    """Tokenized preference pairs (for temper's own accuracy metric)."""

    def __init__(self, records: list[Record], tokenizer: Any) -> None:
        self.prompts = [prompt_token_ids(r, tokenizer) for r in records]
        self.chosen = [response_token_ids(tokenizer, str(r["chosen"])) for r in records]
        self.rejected = [response_token_ids(tokenizer, str(r["rejected"])) for r in records]

    def __len__(self) -> int:
        return len(self.prompts)

    def logprobs(self, ctx: StageContext, model: Any, pad_id: int, max_length: int) -> tuple[Any, Any]:
        """No-grad summed log-probs of the chosen and of the rejected responses."""

        def summed(responses: list[list[int]]) -> Any:
            return batched_sequence_logprobs(
                model,
                self.prompts,
                responses,
                pad_id=pad_id,
                device=ctx.device,
                batch_size=EVAL_BATCH,
                max_length=max_length,
            )

        return summed(self.chosen), summed(self.rejected)


def preference_accuracy(ctx: StageContext, model: Any, pairs: _Pairs, pad_id: int, max_length: int) -> float:
    was_training = model.training
    model.eval()
    chosen, rejected = pairs.logprobs(ctx, model, pad_id, max_length)
    if was_training:
        model.train()
    return float((chosen > rejected).float().mean())


def preference_dataset(records: list[Record], tokenizer: Any) -> Any:
    """prompt/chosen/rejected text for TRL, the prompt rendered exactly as the sft stage's."""
    from datasets import Dataset

    prompts = [tokenizer.decode(prompt_token_ids(r, tokenizer)) for r in records]
    return Dataset.from_dict(
        {
            "prompt": prompts,
            "chosen": [str(r["chosen"]) for r in records],
            "rejected": [str(r["rejected"]) for r in records],
        }
    )


def loss_config(ctx: StageContext) -> tuple[dict[str, Any], float]:
    """DPOConfig's loss fields: the DPO loss, plus TRL's ``sft`` term weighted by rpoAlpha."""
    hp = ctx.contract.hyperparameters
    rpo_alpha = DEFAULT_RPO_ALPHA if hp.rpo_alpha is None else float(hp.rpo_alpha)
    loss = hp.loss_type or "sigmoid"
    if not rpo_alpha:
        return {"loss_type": [loss]}, rpo_alpha
    return {"loss_type": [loss, "sft"], "loss_weights": [1.0, rpo_alpha]}, rpo_alpha


@register_stage("dpo")
def run(ctx: StageContext) -> StageOutcome:
    train_records = ctx.load_dataset("train")
    require_records(train_records, "train", "preference")
    eval_records = ctx.load_dataset("eval")
    if eval_records:
        require_records(eval_records, "eval", "preference")
    return train_on_pairs(ctx, train_records, eval_records)


def train_on_pairs(
    ctx: StageContext, train_records: list[Record], eval_records: list[Record], resume: Any = None
) -> StageOutcome:
    """DPO on preference records, published as the stage's adapter (dpo, synthetic-preferences).
    ``resume``: the checkpoint to continue from (default: the stage's newest)."""
    from trl.trainer.dpo_config import DPOConfig
    from trl.trainer.dpo_trainer import DPOTrainer

    contract, hp = ctx.contract, ctx.contract.hyperparameters
    steps = total_steps(hp, len(train_records), hp.batch_size * hp.gradient_accumulation_steps)
    method = policy_method(ctx)
    model, tokenizer = load_policy(ctx, steps)
    pad_id = tokenizer.pad_token_id
    held_out = _Pairs(eval_records or train_records, tokenizer)

    resume = find_resume(ctx) if resume is None else resume
    if "accuracy_before" in resume.stage_state:
        accuracy_before = float(resume.stage_state["accuracy_before"])
    else:
        ctx.set_phase("evaluating")
        accuracy_before = preference_accuracy(ctx, model, held_out, pad_id, hp.max_length)

    losses, rpo_alpha = loss_config(ctx)
    config = DPOConfig(
        **trainer_args(ctx, steps, scheduler="constant_with_warmup"),
        **losses,
        beta=hp.beta,
        max_length=hp.max_length,
        # reference log-probs once, up front (no reference forward per step); recomputed on resume
        # from the same starting policy, so a resumed run sees the same values
        precompute_ref_log_probs=True,
        precompute_ref_batch_size=EVAL_BATCH,
        remove_unused_columns=False,
    )
    trainer_cls = ordered(DPOTrainer, contract.data.curriculum.order_by != "none")
    trainer = trainer_cls(
        model=model,
        args=config,
        train_dataset=preference_dataset(train_records, tokenizer),
        processing_class=tokenizer,
    )
    callback = fit(
        ctx,
        trainer,
        resume,
        stage_state=lambda: {"accuracy_before": accuracy_before},
        gauges={"reward": "rewards/margins"},
    )
    model = drop_reference_adapter(trainer.model)
    logs = callback.last_logs

    from temper_trainer.stages.eval import evaluate_model

    ctx.set_phase("evaluating")
    model.eval()
    accuracy_after = preference_accuracy(ctx, model, held_out, pad_id, hp.max_length)
    metrics = evaluate_model(ctx, model, tokenizer)  # data.eval and suites, as the eval stage computes them
    split = "eval" if eval_records else "train"
    metrics.update(
        {
            **train_metrics(trainer.state),
            f"{split}/preference_accuracy_before": accuracy_before,
            "train/reward_margin": logs.get("rewards/margins", 0.0),
            "train/reward_accuracy": logs.get("rewards/accuracies", 0.0),
            "train/kl": logs.get("rewards/chosen", 0.0) / hp.beta,
        }
    )
    # the eval stage's own number wins when data.eval has one, so both stages report the same value
    metrics.setdefault(f"{split}/preference_accuracy", accuracy_after)
    metrics.update(stage_drift(ctx, model, tokenizer, eval_records or train_records))
    lineage = {
        "pairs": len(train_records),
        "evalPairs": len(held_out),
        "beta": hp.beta,
        "rpoAlpha": rpo_alpha,
        "lossType": config.loss_type,
        "trainer": "trl.DPOTrainer",
    }
    if not is_main_process():
        return StageOutcome(ctx.artifact_dir, metrics, method, lineage=lineage)
    return publish_policy(ctx, model, tokenizer, method, metrics=metrics, lineage=lineage)
