"""synthetic-preferences: a teacher samples candidates, rewards rank them, pairs become data.

The teacher is ``baseModel`` plus, if ``from`` is set, the parent adapter (frozen). For every
prompt of ``data.train`` it samples ``numGenerations`` completions
(``temperature``, ``maxNewTokens``); the weighted ``rewards`` (built-in functions and/or a reward
model) score them; the best and the worst become one ``{prompt, chosen, rejected}`` record. Prompts
whose candidates all score the same carry no preference and are skipped (counted in
``pairs/skipped_ties``).

The artifact is ``preferences.jsonl`` (format ``preference``; extra fields ``chosen_score``,
``rejected_score``, ``task``), listed in the manifest like any file. A dpo or reward-model stage
reads it as a dataset at ``<manifest folder>/<its manifest path>``.

Sampling of prompt ``i`` is seeded with ``seed + i``, so the output does not depend on batching
or on where a resumed run picked up; checkpoints hold the records produced so far.
"""

from __future__ import annotations

import json
from typing import Any

from temper_trainer.data import Record, prompt_and_target
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
    record: Record, completions: list[str], scores: list[float], tokenizer: Any
) -> Record | None:
    """The best-vs-worst pair, or None when every candidate scores the same."""
    best = max(range(len(scores)), key=lambda k: (scores[k], -k))
    worst = min(range(len(scores)), key=lambda k: (scores[k], k))
    if scores[best] <= scores[worst]:
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
    import torch

    contract, hp = ctx.contract, ctx.contract.hyperparameters
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
            pair = pairs_for_prompt(records[i], completions, totals, tokenizer)
            if pair is None:
                skipped += 1
            else:
                produced.append(pair)
        mean = sum(scores_seen) / max(1, len(scores_seen))
        ctx.report(step=step + 1, total=steps, tokens=tokens, reward=mean)
        checkpoint_or_stop(ctx, step + 1, state)

    if not produced:
        raise InvalidInput(
            "rewards: every prompt's candidates scored the same, so no preference pair could be built; "
            "raise numGenerations or temperature, or use a finer reward"
        )
    with (ctx.artifact_dir / OUTPUT_FILE).open("w") as fh:
        for record in produced:
            fh.write(json.dumps(record, sort_keys=True) + "\n")
    margins = [r["chosen_score"] - r["rejected_score"] for r in produced]
    method = "full"  # a dataset, not an adapter
    return StageOutcome(
        artifact_dir=ctx.artifact_dir,
        metrics={
            "pairs/count": float(len(produced)),
            "pairs/skipped_ties": float(skipped),
            "pairs/mean_margin": sum(margins) / len(margins),
            "pairs/mean_chosen_score": sum(r["chosen_score"] for r in produced) / len(produced),
            "candidates/mean_reward": sum(scores_seen) / max(1, len(scores_seen)),
        },
        method=method,
        servable={"peft": False, "vllm": False},
        lineage={
            "dataset": {"file": OUTPUT_FILE, "format": "preference", "records": len(produced)},
            "teacher": contract.parent.manifest_uri if contract.parent else contract.base_model,
            "numGenerations": hp.num_generations,
        },
    )
