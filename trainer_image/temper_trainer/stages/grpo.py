"""grpo: Group Relative Policy Optimization on TRL's ``GRPOTrainer`` + ``GRPOConfig``.

TRL has dropped PPO; "reward model + RL" here is GRPO with a ``reward-model`` reward. A step takes
``batchSize`` completions: ``batchSize / numGenerations`` prompts, ``numGenerations`` samples each
(``temperature``, ``maxNewTokens``), scored by the weighted ``rewards`` (each a TRL reward function,
``reward_weights`` their weights); TRL normalizes the rewards per group into advantages.
``lossType`` (default ``dapo``), ``numIterations`` (updates per generation batch, PPO-style
clipping when > 1) and ``beta`` (KL coefficient to the reference: the policy the stage started
from, a frozen copy of the adapter) are TRL's fields. With a curriculum, prompts keep the
dataset's order (``shuffle_dataset=False``).

Learning rate: policy gradients are noisy and Adam turns them into full-size steps, so continue a
trained adapter with a small one (tiny model, SFT parent, exact-match: 1e-4 kept improving greedy
exact match, 1e-3 destroyed it within 40 steps). Large rates only suit shaping a base model.

Metrics: ``eval/reward`` and ``eval/reward_before`` (mean weighted reward of greedy completions
on the held-out ``data.eval`` prompts; temper's own evaluation), the same per reward
(``eval/reward/<i>-<type>``); without eval data the same numbers on the first 64 training prompts
are ``train/greedy_reward``, ``train/greedy_reward_before``... (never labelled ``eval/``);
``train/reward`` and ``train/reward_first`` (mean of the last / first logged TRL ``reward``
values, sampled), ``train/kl``, ``train/loss``, ``drift/kl_to_base`` / ``drift/kl_to_parent``
(``_trl_common.stage_drift``), plus the eval stage's metrics for ``data.eval``/``suites``.
"""

from __future__ import annotations

from typing import Any

from temper_trainer.callbacks import is_main_process
from temper_trainer.data import Record, prompt_and_target
from temper_trainer.rewards import Candidate, RewardSet, ScoreFn, build_rewards
from temper_trainer.stage import InvalidInput, StageContext, StageOutcome
from temper_trainer.stages import register_stage
from temper_trainer.stages._rl_common import (
    decode_response,
    generate,
    load_policy,
    policy_method,
    prompt_token_ids,
    publish_policy,
    reference_answer,
)
from temper_trainer.stages._trl_common import (
    drop_reference_adapter,
    find_resume,
    fit,
    stage_drift,
    total_steps,
    train_metrics,
    trainer_args,
)

EVAL_PROMPTS = 64
EVAL_BATCH = 64
TRAIN_REWARD_WINDOW = 5  # logged values averaged into train/reward


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


def trl_reward_funcs(rewards: RewardSet) -> list[Any]:
    """Each contract reward as a TRL reward function (named ``<i>-<type>`` in TRL's logs)."""

    def wrap(name: str, fn: ScoreFn) -> Any:
        def reward(
            completions: list[str], prompt_text: list[str], answer: list[Any], **_: Any
        ) -> list[float]:
            # prompt_text: the prompt as rewards see it (no <bos>), as in temper's own evaluation
            triples = zip(prompt_text, completions, answer, strict=True)
            return fn([Candidate(p, c, a) for p, c, a in triples])

        reward.__name__ = name
        return reward

    return [wrap(name, fn) for name, fn in zip(rewards.names, rewards.fns, strict=True)]


def logged(state: Any, key: str) -> list[float]:
    return [float(e[key]) for e in state.log_history if key in e]


@register_stage("grpo")
def run(ctx: StageContext) -> StageOutcome:
    from datasets import Dataset
    from trl.trainer.grpo_config import GRPOConfig
    from trl.trainer.grpo_trainer import GRPOTrainer

    contract, hp = ctx.contract, ctx.contract.hyperparameters
    rewards = build_rewards(ctx)
    train_records = ctx.load_dataset("train")
    if not train_records:
        raise InvalidInput("data.train: a grpo stage needs at least one prompt dataset")
    if hp.batch_size % hp.num_generations:
        raise InvalidInput(
            f"hyperparameters.batchSize: {hp.batch_size} completions per step must be a multiple of "
            f"numGenerations ({hp.num_generations})"
        )
    eval_records = ctx.load_dataset("eval")
    prompts_per_step = hp.batch_size * hp.gradient_accumulation_steps // hp.num_generations
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

    resume = find_resume(ctx)
    if "before" in resume.stage_state:
        before = {k: float(v) for k, v in resume.stage_state["before"].items()}
    else:
        ctx.set_phase("evaluating")
        before = mean_greedy_reward(ctx, model, tokenizer, held_out, rewards)

    config = GRPOConfig(
        **trainer_args(ctx, steps, scheduler="constant_with_warmup"),
        num_generations=hp.num_generations,
        max_completion_length=hp.max_new_tokens,
        temperature=hp.temperature,
        beta=hp.beta,
        loss_type=hp.loss_type or "dapo",
        num_iterations=hp.num_iterations,
        reward_weights=[spec.weight for spec in rewards.specs],
        shuffle_dataset=contract.data.curriculum.order_by == "none",
        remove_unused_columns=False,
    )
    dataset = Dataset.from_dict(
        {
            "prompt": [tokenizer.decode(ids) for ids in train.ids],  # what the policy is conditioned on
            "prompt_text": train.texts,
            "answer": list(train.answers),
        }
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=trl_reward_funcs(rewards),
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    callback = fit(ctx, trainer, resume, stage_state=lambda: {"before": before})
    model = drop_reference_adapter(trainer.model)

    from temper_trainer.stages.eval import evaluate_model

    ctx.set_phase("evaluating")
    model.eval()
    after = mean_greedy_reward(ctx, model, tokenizer, held_out, rewards)
    metrics = evaluate_model(ctx, model, tokenizer)
    # greedy rewards on training prompts are a training-set number: named so
    prefix = "eval/" if eval_records else "train/greedy_"
    for key, value in after.items():
        metrics[f"{prefix}{key}"] = value
    for key, value in before.items():
        metrics[f"{prefix}{key.replace('reward', 'reward_before', 1)}"] = value
    metrics.update(stage_drift(ctx, model, tokenizer, eval_records or train_records))
    history = logged(trainer.state, "reward")
    window, first = history[-TRAIN_REWARD_WINDOW:], history[:TRAIN_REWARD_WINDOW]
    metrics.update(
        {
            **train_metrics(trainer.state),
            "train/reward": sum(window) / max(1, len(window)),
            "train/reward_first": sum(first) / max(1, len(first)),
            "train/kl": callback.last_logs.get("kl", 0.0),
        }
    )
    lineage = {
        "rewards": [s.model_dump(by_alias=True, exclude_none=True) for s in contract.rewards],
        "numGenerations": hp.num_generations,
        "beta": hp.beta,
        "lossType": config.loss_type,
        "numIterations": hp.num_iterations,
        "trainer": "trl.GRPOTrainer",
    }
    if not is_main_process():
        return StageOutcome(ctx.artifact_dir, metrics, method, lineage=lineage)
    return publish_policy(ctx, model, tokenizer, method, metrics=metrics, lineage=lineage)
