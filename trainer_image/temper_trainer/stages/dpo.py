"""dpo: Direct Preference Optimization on prompt/chosen/rejected pairs (sigmoid loss).

The loss adds ``rpoAlpha`` x the chosen responses' per-token NLL (RPO, Pang et al. 2024; TRL's
``rpo_alpha``). Pure DPO (``rpoAlpha: 0``) only moves the *difference* of the two log-probs, so on a
new prompt format it memorizes the training pairs; the NLL term teaches the format too, which is
what carries the preference to held-out prompts (tiny model, arith: pure DPO plateaus near 75%
held-out accuracy, RPO reaches over 90%). The contract has no field for it yet: the default is
:data:`DEFAULT_RPO_ALPHA` and the value used is recorded in the lineage.

The policy starts from the parent adapter (``from``) or a fresh adapter on the base model; the
reference is that starting policy. Reference log-probs are computed once, up front, and kept in
every checkpoint, so no second model is held in memory and a resumed run uses the same values.

Metrics: ``eval/preference_accuracy`` (share of held-out pairs whose chosen response has the
higher policy log-prob; ``train/...`` when no eval data is given) and its ``_before`` value;
``train/reward_margin`` and ``train/reward_accuracy`` (DPO's implicit reward
beta * (log pi - log ref)), ``train/loss``, ``train/kl`` (mean per-token log pi - log ref on the
chosen responses of the last batch), plus the eval stage's metrics for ``data.eval``/``suites``.
"""

from __future__ import annotations

from typing import Any

from temper_trainer.data import Record
from temper_trainer.stage import StageContext, StageOutcome
from temper_trainer.stages import register_stage
from temper_trainer.stages._rl_common import (
    after_optimizer_step,
    batch_indices,
    batched_sequence_logprobs,
    checkpoint_or_stop,
    load_policy,
    make_optimizer,
    policy_method,
    prompt_token_ids,
    publish_policy,
    require_records,
    response_logprobs,
    response_token_ids,
    restore_training,
    set_learning_rate,
    total_steps,
    training_state,
)

EVAL_BATCH = 32
DEFAULT_RPO_ALPHA = 1.0


class _Pairs:
    """Tokenized preference pairs."""

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


@register_stage("dpo")
def run(ctx: StageContext) -> StageOutcome:
    import torch
    import torch.nn.functional as F

    contract, hp = ctx.contract, ctx.contract.hyperparameters
    train_records = ctx.load_dataset("train")
    require_records(train_records, "train", "preference")
    eval_records = ctx.load_dataset("eval")
    if eval_records:
        require_records(eval_records, "eval", "preference")

    steps = total_steps(hp, len(train_records), hp.batch_size)
    method = policy_method(ctx)
    model, tokenizer = load_policy(ctx, steps)
    pad_id = tokenizer.pad_token_id
    train, held_out = _Pairs(train_records, tokenizer), _Pairs(eval_records or train_records, tokenizer)
    optimizer = make_optimizer(model, hp)

    resumed = ctx.checkpointer.latest()
    if resumed is not None:
        saved = resumed.state
        restore_training(model, optimizer, saved)
        ref_chosen, ref_rejected = saved["ref_chosen"], saved["ref_rejected"]
        accuracy_before = float(saved["accuracy_before"])
        start = resumed.step
    else:
        ctx.set_phase("evaluating")
        model.eval()
        ref_chosen, ref_rejected = train.logprobs(ctx, model, pad_id, hp.max_length)
        accuracy_before = preference_accuracy(ctx, model, held_out, pad_id, hp.max_length)
        model.train()
        start = 0

    def snapshot() -> dict[str, Any]:
        return training_state(
            model,
            optimizer,
            ref_chosen=ref_chosen,
            ref_rejected=ref_rejected,
            accuracy_before=accuracy_before,
        )

    configured = hp.rpo_alpha
    rpo_alpha = DEFAULT_RPO_ALPHA if configured is None else float(configured)
    ctx.set_phase("training")
    micro = max(1, hp.batch_size // hp.gradient_accumulation_steps)
    loss_value, margin, reward_acc, kl = float("nan"), 0.0, 0.0, 0.0
    for step in range(start, steps):
        set_learning_rate(optimizer, hp, step, steps)
        batch = batch_indices(len(train), hp.batch_size, step, contract.seed)
        step_loss, margins, correct, kls, tokens = 0.0, [], 0.0, [], 0
        for chunk_start in range(0, len(batch), micro):
            chunk = batch[chunk_start : chunk_start + micro]
            prompts = [train.prompts[i] for i in chunk] * 2
            responses = [train.chosen[i] for i in chunk] + [train.rejected[i] for i in chunk]
            logps, mask = response_logprobs(
                model, prompts, responses, pad_id=pad_id, device=ctx.device, max_length=hp.max_length
            )
            sums = logps.sum(-1)
            n = len(chunk)
            ref_c = ref_chosen[chunk].to(ctx.device)
            ref_r = ref_rejected[chunk].to(ctx.device)
            chosen_reward = hp.beta * (sums[:n] - ref_c)
            rejected_reward = hp.beta * (sums[n:] - ref_r)
            loss = -F.logsigmoid(chosen_reward - rejected_reward).mean()
            if rpo_alpha:
                loss = loss - rpo_alpha * (sums[:n] / mask[:n].sum(-1)).mean()
            (loss * n / len(batch)).backward()  # type: ignore[no-untyped-call]
            step_loss += float(loss.detach()) * n / len(batch)
            margins.append((chosen_reward - rejected_reward).detach())
            correct += float((chosen_reward > rejected_reward).float().sum())
            kls.append(((sums[:n].detach() - ref_c) / mask[:n].sum(-1)).mean())
            tokens += int(mask.sum())
        torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], 1.0)
        optimizer.step()
        after_optimizer_step(model, step)
        optimizer.zero_grad(set_to_none=True)
        loss_value = step_loss
        margin = float(torch.cat(margins).mean())
        reward_acc = correct / len(batch)
        kl = float(torch.stack(kls).mean())
        ctx.report(step=step + 1, total=steps, loss=loss_value, tokens=tokens, reward=margin, kl=kl)
        checkpoint_or_stop(ctx, step + 1, snapshot)

    from temper_trainer.stages.eval import evaluate_model

    ctx.set_phase("evaluating")
    model.eval()
    accuracy_after = preference_accuracy(ctx, model, held_out, pad_id, hp.max_length)
    metrics = evaluate_model(ctx, model, tokenizer)  # data.eval and suites, as the eval stage computes them
    split = "eval" if eval_records else "train"
    metrics.update(
        {
            f"{split}/preference_accuracy_before": accuracy_before,
            "train/loss": loss_value,
            "train/reward_margin": margin,
            "train/reward_accuracy": reward_acc,
            "train/kl": kl,
            "train/steps": float(steps),
        }
    )
    # the eval stage's own number wins when data.eval has one, so both stages report the same value
    metrics.setdefault(f"{split}/preference_accuracy", accuracy_after)
    return publish_policy(
        ctx,
        model,
        tokenizer,
        method,
        metrics=metrics,
        lineage={"pairs": len(train), "evalPairs": len(held_out), "beta": hp.beta, "rpoAlpha": rpo_alpha},
    )
