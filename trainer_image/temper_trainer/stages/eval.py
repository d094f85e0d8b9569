"""Eval: held-out metrics plus per-suite results in the form regression gates consume.

Metric keys: ``eval/exact_match`` (+ ``eval/exact_match/<task>``), ``eval/loss``,
``eval/preference_accuracy`` for the stage's ``data.eval``; ``suite/<name>/<metric>`` for each
``contract.suites`` entry. The eval stage also publishes ``eval_results.json``: a list of
``{"suite", "metric", "value", "maxRegression", "examples"}``.
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

from temper.api.contract import EvalSuite

from temper_trainer.data import DataError, Record, load_records, record_format
from temper_trainer.evaluation import (
    completion_loss,
    evaluate_metric,
    exact_match_by_task,
    preference_accuracy,
)
from temper_trainer.peft_setup import adapter_method
from temper_trainer.stage import InvalidInput, StageContext, StageOutcome
from temper_trainer.stages import register_stage


def heldout_metrics(
    model: Any, tokenizer: Any, records: list[Record], max_new_tokens: int
) -> dict[str, float]:
    metrics: dict[str, float] = {}
    by_format: dict[str, list[Record]] = defaultdict(list)
    for record in records:
        by_format["preference" if record_format(record) == "preference" else "generative"].append(record)
    if by_format["generative"]:
        gen = by_format["generative"]
        for task, value in exact_match_by_task(model, tokenizer, gen, max_new_tokens=max_new_tokens).items():
            metrics["eval/exact_match" if task == "all" else f"eval/exact_match/{task}"] = value
        scored = [r for r in gen if record_format(r) != "prompt" or r.get("answer")]
        if scored:
            metrics["eval/loss"] = completion_loss(model, tokenizer, scored)
            tasks = sorted({str(r.get("task")) for r in scored})
            if len(tasks) > 1:  # per-task loss: a smooth forgetting signal for continual learning
                for task in tasks:
                    subset = [r for r in scored if str(r.get("task")) == task]
                    metrics[f"eval/loss/{task}"] = completion_loss(model, tokenizer, subset)
    if by_format["preference"]:
        metrics["eval/preference_accuracy"] = preference_accuracy(model, tokenizer, by_format["preference"])
    return metrics


def suite_results(
    ctx: StageContext, model: Any, tokenizer: Any, suites: list[EvalSuite]
) -> list[dict[str, Any]]:
    results = []
    for suite in suites:
        try:
            records = load_records(suite.dataset, ctx.storage)
        except DataError as exc:
            raise InvalidInput(f"suites[{suite.name}].dataset: {exc}") from exc
        value = evaluate_metric(
            model,
            tokenizer,
            suite.metric,
            records,
            max_new_tokens=ctx.contract.hyperparameters.max_new_tokens,
        )
        results.append(
            {
                "suite": suite.name,
                "metric": suite.metric,
                "value": value,
                "maxRegression": suite.max_regression,
                "examples": len(records),
            }
        )
    return results


def evaluate_model(ctx: StageContext, model: Any, tokenizer: Any) -> dict[str, float]:
    """Held-out metrics for ``data.eval`` plus every suite; also writes eval_results.json."""
    max_new = ctx.contract.hyperparameters.max_new_tokens
    metrics = heldout_metrics(model, tokenizer, ctx.load_dataset("eval"), max_new)
    results = suite_results(ctx, model, tokenizer, ctx.contract.suites)
    for result in results:
        metrics[f"suite/{result['suite']}/{result['metric']}"] = float(result["value"])
    if results:
        (ctx.artifact_dir / "eval_results.json").write_text(json.dumps(results, indent=2))
    return metrics


@register_stage("eval")
def run(ctx: StageContext) -> StageOutcome:
    model, tokenizer = ctx.load_base_model()
    method = "full"
    if ctx.contract.parent is not None:
        method = adapter_method(ctx.fetch_adapter(ctx.contract.parent))
        model = ctx.load_parent(model, trainable=False)
    if not ctx.contract.data.eval and not ctx.contract.suites:
        raise InvalidInput("data.eval / suites: an eval stage needs at least one eval dataset or suite")
    ctx.set_phase("evaluating")
    metrics = evaluate_model(ctx, model, tokenizer)
    (ctx.artifact_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    return StageOutcome(
        artifact_dir=ctx.artifact_dir,
        metrics=metrics,
        method=method,
        servable={},
        lineage={
            "evaluated": ctx.contract.parent.manifest_uri if ctx.contract.parent else ctx.contract.base_model
        },
    )
