"""grpo: Group Relative Policy Optimization with built-in rewards and/or a reward model.

TRL has dropped PPO; "reward model + RL" here is GRPO with a ``reward-model`` reward. Each step
takes ``max(1, batchSize // numGenerations)`` prompts, samples ``numGenerations`` completions per
prompt (``temperature``, ``maxNewTokens``), scores them with the weighted ``rewards`` and uses the
group-normalized reward as every token's advantage. One policy update per batch, so the PPO ratio
is 1 and needs no clipping; the loss is token-level (DAPO-style) and adds ``beta`` x the k3 KL
estimate to the reference: the policy the stage started from (base, or base + parent adapter),
whose trainable tensors are swapped in for the no-grad reference pass.

Learning rate: policy gradients are noisy and Adam turns them into full-size steps, so continue a
trained adapter with a small one (tiny model, SFT parent, exact-match: 1e-4 kept improving greedy
exact match, 1e-3 destroyed it within 40 steps). Large rates only suit shaping a base model.

Metrics: ``eval/reward`` and ``eval/reward_before`` (mean weighted reward of greedy completions
on ``data.eval``, or the first 64 training prompts), the same per reward (``eval/reward/<i>-<type>``),
``train/reward`` (mean sampled reward of the last steps), ``train/kl``, ``train/loss``, plus the
eval stage's metrics for ``data.eval``/``suites``.
"""

from __future__ import annotations

from typing import Any

from temper_trainer.data import Record, prompt_and_target
from temper_trainer.rewards import Candidate, RewardSet, build_rewards
from temper_trainer.stage import InvalidInput, StageContext, StageOutcome
from temper_trainer.stages import register_stage
from temper_trainer.stages._rl_common import (
    after_optimizer_step,
    batch_indices,
    checkpoint_or_stop,
    decode_response,
    generate,
    load_policy,
    make_optimizer,
    policy_method,
    prompt_token_ids,
    publish_policy,
    reference_answer,
    reference_weights,
    response_logprobs,
    restore_training,
    set_learning_rate,
    total_steps,
    trainable_state,
    training_state,
)

EVAL_PROMPTS = 64
EVAL_BATCH = 64
TRAIN_REWARD_WINDOW = 5  # steps averaged into train/reward


class _Prompts:
    def __init__(self, records: list[Record], tokenizer: Any) -> None:
        self.ids = [prompt_token_ids(r, tokenizer) for r in records]
        self.texts = [prompt_and_target(r, tokenizer)[0] for r in records]
        self.answers = [reference_answer(r, tokenizer) for r in records]

    def __len__(self) -> int:
        return len(self.ids)


def mean_greedy_reward(
    ctx: StageContext, model: Any, tokenizer: Any, prompts: _Prompts, rewards: RewardSet
) -> dict[str, float]:
    """Mean weighted reward (and each reward's mean) of greedy completions: deterministic."""
    hp = ctx.contract.hyperparameters
    candidates: list[Candidate] = []
    for start in range(0, len(prompts), EVAL_BATCH):
        end = start + EVAL_BATCH
        responses = generate(
            model,
            tokenizer,
            prompts.ids[start:end],
            num_samples=1,
            max_new_tokens=hp.max_new_tokens,
            temperature=hp.temperature,
            greedy=True,
            device=ctx.device,
        )
        for text, answer, response in zip(
            prompts.texts[start:end], prompts.answers[start:end], responses, strict=True
        ):
            candidates.append(Candidate(text, decode_response(tokenizer, response), answer))
    totals, parts = rewards.score(candidates)
    out = {"reward": sum(totals) / len(totals)}
    for name, values in parts.items():
        out[f"reward/{name}"] = sum(values) / len(values)
    return out


@register_stage("grpo")
def run(ctx: StageContext) -> StageOutcome:
    import torch

    contract, hp = ctx.contract, ctx.contract.hyperparameters
    rewards = build_rewards(ctx)
    train_records = ctx.load_dataset("train")
    if not train_records:
        raise InvalidInput("data.train: a grpo stage needs at least one prompt dataset")
    eval_records = ctx.load_dataset("eval")
    group = hp.num_generations
    prompts_per_step = max(1, hp.batch_size // group)
    steps = total_steps(hp, len(train_records), prompts_per_step)
    method = policy_method(ctx)
    model, tokenizer = load_policy(ctx, steps)
    train = _Prompts(train_records, tokenizer)
    held_out = _Prompts(eval_records or train_records[:EVAL_PROMPTS], tokenizer)
    if rewards.needs_answers:
        missing = [i for i, a in enumerate(train.answers) if a is None]
        if missing:
            raise InvalidInput(
                f"data.train: record {missing[0]} has no reference answer ('answer' field), "
                "which the exact-match reward needs"
            )
    optimizer = make_optimizer(model, hp)
    pad_id = tokenizer.pad_token_id

    resumed = ctx.checkpointer.latest()
    if resumed is not None:
        saved = resumed.state
        restore_training(model, optimizer, saved)
        reference = saved["reference"]
        before = {k: float(v) for k, v in saved["before"].items()}
        history = [float(x) for x in saved["history"]]
        start = resumed.step
    else:
        reference = trainable_state(model)
        ctx.set_phase("evaluating")
        before = mean_greedy_reward(ctx, model, tokenizer, held_out, rewards)
        history, start = [], 0

    def snapshot() -> dict[str, Any]:
        return training_state(model, optimizer, reference=reference, before=before, history=history)

    ctx.set_phase("training")
    model.train()
    loss_value, kl_value = float("nan"), 0.0
    for step in range(start, steps):
        set_learning_rate(optimizer, hp, step, steps)
        chosen = batch_indices(len(train), prompts_per_step, step, contract.seed)
        prompt_ids = [train.ids[i] for i in chosen]
        responses = generate(
            model,
            tokenizer,
            prompt_ids,
            num_samples=group,
            max_new_tokens=hp.max_new_tokens,
            temperature=hp.temperature,
            greedy=False,
            device=ctx.device,
        )
        expanded = [i for i in chosen for _ in range(group)]  # generate() is prompt-major
        candidates = [
            Candidate(train.texts[i], decode_response(tokenizer, r), train.answers[i])
            for i, r in zip(expanded, responses, strict=True)
        ]
        totals, _ = rewards.score(candidates)
        scores = torch.tensor(totals, dtype=torch.float32).view(-1, group)
        advantages = ((scores - scores.mean(1, keepdim=True)) / (scores.std(1, keepdim=True) + 1e-4)).view(-1)
        seq_prompts = [train.ids[i] for i in expanded]
        adv = advantages.to(ctx.device).unsqueeze(1)

        ref_logps = None
        if hp.beta > 0:  # before the policy pass: the swap writes the very tensors autograd saves
            model.eval()  # no dropout in the reference pass
            with torch.no_grad(), reference_weights(model, reference):
                ref_logps, _ = response_logprobs(
                    model, seq_prompts, responses, pad_id=pad_id, device=ctx.device, max_length=hp.max_length
                )
            model.train()
        logps, mask = response_logprobs(
            model, seq_prompts, responses, pad_id=pad_id, device=ctx.device, max_length=hp.max_length
        )
        ratio = torch.exp(logps - logps.detach())  # 1, but carries the policy gradient
        per_token = -ratio * adv
        if ref_logps is not None:
            delta = (ref_logps - logps) * mask
            kl = torch.exp(delta) - delta - 1.0  # k3: unbiased, always >= 0
            per_token = per_token + hp.beta * kl
            kl_value = float((kl * mask).sum() / mask.sum())
        loss = (per_token * mask).sum() / mask.sum()
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)
        optimizer.step()
        after_optimizer_step(model, step)
        optimizer.zero_grad(set_to_none=True)

        loss_value = float(loss.detach())
        mean_reward = float(scores.mean())
        history.append(mean_reward)
        ctx.report(
            step=step + 1,
            total=steps,
            loss=loss_value,
            tokens=int(mask.sum()),
            reward=mean_reward,
            kl=kl_value,
        )
        checkpoint_or_stop(ctx, step + 1, snapshot)

    from temper_trainer.stages.eval import evaluate_model

    ctx.set_phase("evaluating")
    model.eval()
    after = mean_greedy_reward(ctx, model, tokenizer, held_out, rewards)
    metrics = evaluate_model(ctx, model, tokenizer)
    for key, value in after.items():
        metrics[f"eval/{key}"] = value
    for key, value in before.items():
        metrics[f"eval/{key.replace('reward', 'reward_before', 1)}"] = value
    window = history[-TRAIN_REWARD_WINDOW:]
    first = history[:TRAIN_REWARD_WINDOW]
    metrics.update(
        {
            "train/reward": sum(window) / max(1, len(window)),
            "train/reward_first": sum(first) / max(1, len(first)),
            "train/kl": kl_value,
            "train/loss": loss_value,
            "train/steps": float(steps),
        }
    )
    return publish_policy(
        ctx,
        model,
        tokenizer,
        method,
        metrics=metrics,
        lineage={
            "rewards": [s.model_dump(by_alias=True, exclude_none=True) for s in contract.rewards],
            "numGenerations": group,
            "beta": hp.beta,
        },
    )
