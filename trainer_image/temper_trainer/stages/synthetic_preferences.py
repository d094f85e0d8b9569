"""synthetic-preferences: sample candidates, a teacher scores them, DPO trains on the pairs.

One stage, as the API documents (every stage but eval publishes an Adapter):

1. The policy (``baseModel`` plus, if ``from`` is set, the parent adapter, frozen) samples
   ``numGenerations`` completions for every prompt of ``data.train`` (``temperature``,
   ``maxNewTokens``).
2. The teacher scores them: the weighted ``rewards``, i.e. a reward model (``{type: reward-model,
   adapter|stage}``: a published reward-model Adapter) and/or built-in functions. The best and the
   worst candidate become one ``{prompt, chosen, rejected}`` pair when their scores differ by at
   least ``minMargin`` (and strictly); other prompts are skipped (``pairs/skipped_ties``).
3. The dpo stage's training (``stages.dpo.train_on_pairs``: TRL's DPOTrainer, the same
   hyperparameters, ``beta``, ``rpoAlpha``, ``lossType``) trains the policy on those pairs, from
   the parent adapter or a fresh one; preference ``data.eval`` datasets give held-out
   ``eval/preference_accuracy``.

The artifact is the trained adapter plus ``preferences.jsonl`` (format ``preference``; extra fields
``chosen_score``, ``rejected_score``, ``task``), listed in the manifest; a later dpo or reward-model
stage may also read it as a dataset at ``<manifest folder>/preferences.jsonl``.

Sampling of prompt ``i`` is seeded with ``seed + i``, so the pairs do not depend on batching or on
where a resumed run picked up. Generation checkpoints (``checkpoints/step-<n>``) hold the pairs
produced so far; DPO's own checkpoints live under ``dpo/checkpoints/``.
"""

from __future__ import annotations

import json
from typing import Any

from temper_trainer.checkpoint import Checkpointer
from temper_trainer.data import Record, prompt_and_target, record_format
from temper_trainer.rewards import Candidate, build_rewards
from temper_trainer.stage import InvalidInput, StageContext, StageOutcome
from temper_trainer.stages import register_stage
from temper_trainer.stages._rl_common import (
    checkpoint_or_stop,
    decode_response,
    generate,
    prompt_token_ids,
    reference_answer,
)

OUTPUT_FILE = "preferences.jsonl"
PROMPTS_PER_STEP = 8  # one progress step / checkpoint unit


def pairs_for_prompt(
    record: Record, completions: list[str], scores: list[float], tokenizer: Any, min_margin: float = 0.0
) -> Record | None:
    """The best-vs-worst pair, or None when every candidate scores the same or the teacher's
    margin is below ``min_margin``."""
    best = max(range(len(scores)), key=lambda k: (scores[k], -k))
    worst = min(range(len(scores)), key=lambda k: (scores[k], k))
    if scores[best] <= scores[worst] or scores[best] - scores[worst] < min_margin:
        return None
    prompt = prompt_and_target(record, tokenizer)[0] if "messages" in record else str(record["prompt"])
    return {
        "prompt": prompt,
        "chosen": completions[best],
        "rejected": completions[worst],
        "chosen_score": scores[best],
        "rejected_score": scores[worst],
        "task": record.get("task"),
    }


@register_stage("synthetic-preferences")
def run(ctx: StageContext) -> StageOutcome:
    from temper_trainer.stages.dpo import train_on_pairs

    produced, skipped, scores_seen = build_pairs(ctx)
    eval_pairs = [r for r in ctx.load_dataset("eval") if record_format(r) == "preference"]
    # DPO's checkpoints beside the generation ones, so neither resumes from the other's
    dpo_prefix = f"{ctx.contract.output.prefix.rstrip('/')}/dpo/"
    dpo_contract = ctx.contract.model_copy(
        update={"output": ctx.contract.output.model_copy(update={"prefix": dpo_prefix})}
    )
    ctx.checkpointer = Checkpointer(dpo_contract, ctx.storage, ctx.workdir / "dpo-checkpoints")
    ctx.set_phase("training")
    outcome = train_on_pairs(ctx, produced, eval_pairs)
    with (ctx.artifact_dir / OUTPUT_FILE).open("w") as fh:
        for record in produced:
            fh.write(json.dumps(record, sort_keys=True) + "\n")
    margins = [r["chosen_score"] - r["rejected_score"] for r in produced]
    outcome.metrics.update(
        {
            "pairs/count": float(len(produced)),
            "pairs/skipped_ties": float(skipped),
            "pairs/mean_margin": sum(margins) / len(margins),
            "pairs/mean_chosen_score": sum(r["chosen_score"] for r in produced) / len(produced),
            "candidates/mean_reward": sum(scores_seen) / max(1, len(scores_seen)),
        }
    )
    contract = ctx.contract
    outcome.lineage.update(
        {
            "dataset": {"file": OUTPUT_FILE, "format": "preference", "records": len(produced)},
            "sampler": contract.parent.manifest_uri if contract.parent else contract.base_model,
            "teacher": [s.model_dump(by_alias=True, exclude_none=True) for s in contract.rewards],
            "minMargin": contract.hyperparameters.min_margin,
            "numGenerations": contract.hyperparameters.num_generations,
        }
    )
    return outcome


def build_pairs(ctx: StageContext) -> tuple[list[Record], int, list[float]]:
    """(pairs, prompts skipped, every candidate's score): sampling and scoring, checkpointed."""
    import torch

    hp = ctx.contract.hyperparameters
    rewards = build_rewards(ctx)
    records = ctx.load_dataset("train")
    if not records:
        raise InvalidInput("data.train: a synthetic-preferences stage needs at least one prompt dataset")
    model, tokenizer = ctx.load_base_model()
    model = ctx.load_parent(model, trainable=False)
    model.eval()
    answers = [reference_answer(r, tokenizer) for r in records]
    if rewards.needs_answers and any(a is None for a in answers):
        index = answers.index(None)
        raise InvalidInput(
            f"data.train: record {index} has no reference answer ('answer' field), "
            "which the exact-match reward needs"
        )

    produced: list[Record] = []
    skipped = 0
    scores_seen: list[float] = []
    start = 0
    resumed = ctx.checkpointer.latest()
    if resumed is not None:
        produced = json.loads(resumed.state["records"])
        skipped = int(resumed.state["skipped"])
        scores_seen = [float(x) for x in resumed.state["scores"]]
        start = resumed.step

    def state() -> dict[str, Any]:
        return {"records": json.dumps(produced), "skipped": skipped, "scores": scores_seen}

    steps = -(-len(records) // PROMPTS_PER_STEP)
    ctx.set_phase("training")
    for step in range(start, steps):
        chunk = range(step * PROMPTS_PER_STEP, min(len(records), (step + 1) * PROMPTS_PER_STEP))
        tokens = 0
        for i in chunk:
            torch.manual_seed(ctx.seed + i)
            responses = generate(
                model,
                tokenizer,
                [prompt_token_ids(records[i], tokenizer)],
                num_samples=hp.num_generations,
                max_new_tokens=hp.max_new_tokens,
                temperature=hp.temperature,
                greedy=False,
                device=ctx.device,
            )
            tokens += sum(len(r) for r in responses)
            prompt_text = prompt_and_target(records[i], tokenizer)[0]
            completions = [decode_response(tokenizer, r) for r in responses]
            totals, _ = rewards.score([Candidate(prompt_text, c, answers[i]) for c in completions])
            scores_seen.extend(totals)
            pair = pairs_for_prompt(records[i], completions, totals, tokenizer, hp.min_margin)
            if pair is None:
                skipped += 1
            else:
                produced.append(pair)
        mean = sum(scores_seen) / max(1, len(scores_seen))
        ctx.report(step=step + 1, total=steps, tokens=tokens, reward=mean)
        checkpoint_or_stop(ctx, step + 1, state)

    if not produced:
        raise InvalidInput(
            "rewards: no prompt's candidates differed by minMargin, so no preference pair could be "
            "built; raise numGenerations or temperature, lower minMargin, or use a finer reward"
        )
    if start < steps:  # the complete set, so a resume during DPO needs no sampling
        ctx.checkpointer.save(steps, state())
    return produced, skipped, scores_seen
