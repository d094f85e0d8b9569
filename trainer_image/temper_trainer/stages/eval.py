"""Eval: held-out metrics plus per-suite results in the form regression gates consume.

Metric keys: ``eval/exact_match`` (+ ``eval/exact_match/<task>``), ``eval/loss``,
``eval/preference_accuracy`` for the stage's ``data.eval``; ``suite/<name>/<metric>`` for each
``contract.suites`` entry. Each suite with ``maxRegression`` is also measured on the baseline
(``contract.baseline``: the evaluated adapter's parent, else the base model) in this same stage;
the operator's gate compares the two. The results (``SuiteResult``: suite, metric, value,
examples, maxRegression, baseline, baselineSource) go to the StageResult, the manifest and
``eval_results.json``. The eval stage's artifact is no Adapter: the operator writes the results to
the evaluated Adapter's ``status.evals``.
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

from temper.api.contract import EvalSuite, SuiteResult

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


def _suite_records(ctx: StageContext, suites: list[EvalSuite]) -> list[list[Record]]:
    out = []
    for suite in suites:
        try:
            out.append(load_records(suite.dataset, ctx.storage))
        except DataError as exc:
            raise InvalidInput(f"suites[{suite.name}].dataset: {exc}") from exc
    return out


def suite_results(
    ctx: StageContext, model: Any, tokenizer: Any, suites: list[EvalSuite], records: list[list[Record]]
) -> list[SuiteResult]:
    max_new = ctx.contract.hyperparameters.max_new_tokens
    return [
        SuiteResult(
            suite=suite.name,
            metric=suite.metric,
            value=evaluate_metric(model, tokenizer, suite.metric, recs, max_new_tokens=max_new),
            examples=len(recs),
            max_regression=suite.max_regression,
        )
        for suite, recs in zip(suites, records, strict=True)
    ]


def measure_baseline(
    ctx: StageContext, suites: list[EvalSuite], records: list[list[Record]], results: list[SuiteResult]
) -> None:
    """Gated suites on the baseline, in this same stage: the evaluated adapter's parent, else the base.

    An eval of the base model itself (no ``from``) has no baseline: its gates report NoBaseline."""
    gated = [i for i, s in enumerate(suites) if s.max_regression is not None]
    if not gated or ctx.contract.parent is None:
        return
    model, tokenizer = ctx.load_base_model()  # fresh: PEFT wrapped the first copy in place
    source = "base model"
    if ctx.contract.baseline is not None:
        model = ctx.load_parent(model, trainable=False, ref=ctx.contract.baseline)
        source = f"adapter {ctx.contract.baseline.name or ctx.contract.baseline.manifest_uri}"
    model.eval()
    max_new = ctx.contract.hyperparameters.max_new_tokens
    for i in gated:
        value = evaluate_metric(model, tokenizer, suites[i].metric, records[i], max_new_tokens=max_new)
        results[i] = results[i].model_copy(update={"baseline": value, "baseline_source": source})


def evaluate_model(ctx: StageContext, model: Any, tokenizer: Any) -> dict[str, float]:
    """Held-out metrics for ``data.eval`` plus every suite; what every training stage reports."""
    return evaluate_suites(ctx, model, tokenizer, baseline=False)[0]


def evaluate_suites(
    ctx: StageContext, model: Any, tokenizer: Any, *, baseline: bool
) -> tuple[dict[str, float], list[SuiteResult]]:
    """Metrics and suite results (eval_results.json); ``baseline``: gated suites on the baseline too."""
    max_new = ctx.contract.hyperparameters.max_new_tokens
    metrics = heldout_metrics(model, tokenizer, ctx.load_dataset("eval"), max_new)
    suites = ctx.contract.suites
    records = _suite_records(ctx, suites)
    results = suite_results(ctx, model, tokenizer, suites, records)
    if baseline:
        measure_baseline(ctx, suites, records, results)
    for result in results:
        metrics[f"suite/{result.suite}/{result.metric}"] = float(result.value)
    if results:
        body = [r.model_dump(by_alias=True, exclude_none=True) for r in results]
        (ctx.artifact_dir / "eval_results.json").write_text(json.dumps(body, indent=2))
    return metrics, results


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
    metrics, results = evaluate_suites(ctx, model, tokenizer, baseline=True)
    (ctx.artifact_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    parent = ctx.contract.parent
    return StageOutcome(
        artifact_dir=ctx.artifact_dir,
        metrics=metrics,
        method=method,
        servable={},
        lineage={"evaluated": parent.manifest_uri if parent else ctx.contract.base_model},
        evals=results,
    )
