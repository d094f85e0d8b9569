"""Eval: held-out metrics plus per-suite results in the form regression gates consume.

Metric keys: ``eval/exact_match`` (+ ``eval/exact_match/<task>``), ``eval/loss``,
``eval/preference_accuracy`` for the stage's ``data.eval``; ``suite/<name>/<metric>`` for each
``contract.suites`` entry (judge suites also ``suite/<name>/judge_win_rate``). Each suite with
``maxRegression``, and each judge suite, is also measured on the baseline (``contract.baseline``:
the evaluated adapter's parent, else the base model) in this same stage; the operator's gate
compares the two, and a judge suite's win rate compares their completions prompt by prompt. The
results (``SuiteResult``: suite, metric, value, examples, maxRegression, baseline, baselineSource,
winRate) go to the StageResult, the manifest and ``eval_results.json``. The eval stage's artifact
is no Adapter: the operator writes the results to the evaluated Adapter's ``status.evals``.
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
    judge_scores,
    preference_accuracy,
    win_rate,
)
from temper_trainer.peft_setup import adapter_method
from temper_trainer.rewards import ScoreFn, published_scorer
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


def _judges(ctx: StageContext, suites: list[EvalSuite]) -> dict[str, ScoreFn]:
    """Each judge suite's reward model, downloaded, verified and loaded before anything is measured."""
    return {
        s.name: published_scorer(ctx, s.judge, f"suites[{s.name}].judge")
        for s in suites
        if s.metric == "judge" and s.judge is not None  # the contract requires judge for judge suites
    }


def _measure(
    model: Any,
    tokenizer: Any,
    suite: EvalSuite,
    records: list[Record],
    *,
    max_new: int,
    judges: dict[str, ScoreFn],
) -> tuple[float, list[float] | None]:
    """A suite's value, and for judge suites the per-prompt scores (for the win rate)."""
    if suite.metric == "judge":
        scores = judge_scores(model, tokenizer, records, judges[suite.name], max_new_tokens=max_new)
        return sum(scores) / max(len(scores), 1), scores
    return evaluate_metric(model, tokenizer, suite.metric, records, max_new_tokens=max_new), None


def suite_results(  # noqa: PLR0917 - one suite list and what it is measured with
    ctx: StageContext,
    model: Any,
    tokenizer: Any,
    suites: list[EvalSuite],
    records: list[list[Record]],
    judges: dict[str, ScoreFn],
) -> tuple[list[SuiteResult], dict[int, list[float]]]:
    """The suites on the evaluated model, and the judge suites' per-prompt scores by suite index."""
    max_new = ctx.contract.hyperparameters.max_new_tokens
    results, scored = [], {}
    for i, (suite, recs) in enumerate(zip(suites, records, strict=True)):
        value, scores = _measure(model, tokenizer, suite, recs, max_new=max_new, judges=judges)
        if scores is not None:
            scored[i] = scores
        results.append(
            SuiteResult(
                suite=suite.name,
                metric=suite.metric,
                value=value,
                examples=len(recs),
                max_regression=suite.max_regression,
            )
        )
    return results, scored


def measure_baseline(  # noqa: PLR0917 - suite_results' inputs and outputs
    ctx: StageContext,
    suites: list[EvalSuite],
    records: list[list[Record]],
    results: list[SuiteResult],
    judges: dict[str, ScoreFn],
    scored: dict[int, list[float]],
) -> None:
    """Gated and judge suites on the baseline, in this same stage: the evaluated adapter's parent,
    else the base. A judge suite also gets its win rate against the baseline's completions.

    An eval of the base model itself (no ``from``) has no baseline: its gates report NoBaseline."""
    needed = [i for i, s in enumerate(suites) if s.max_regression is not None or i in scored]
    if not needed or ctx.contract.parent is None:
        return
    model, tokenizer = ctx.load_base_model()  # fresh: PEFT wrapped the first copy in place
    source = "base model"
    if ctx.contract.baseline is not None:
        model = ctx.load_parent(model, trainable=False, ref=ctx.contract.baseline)
        source = f"adapter {ctx.contract.baseline.name or ctx.contract.baseline.manifest_uri}"
    model.eval()
    max_new = ctx.contract.hyperparameters.max_new_tokens
    for i in needed:
        if suites[i].metric == "kl_to_reference" and ctx.contract.baseline is None:
            # kl_to_reference is drift from the base: the base's own is 0 (it has no adapter to disable).
            results[i] = results[i].model_copy(update={"baseline": 0.0, "baseline_source": source})
            continue
        value, scores = _measure(model, tokenizer, suites[i], records[i], max_new=max_new, judges=judges)
        update: dict[str, Any] = {"baseline": value, "baseline_source": source}
        if scores is not None:
            update["win_rate"] = win_rate(scored[i], scores)
        results[i] = results[i].model_copy(update=update)


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
    judges = _judges(ctx, suites)
    results, scored = suite_results(ctx, model, tokenizer, suites, records, judges)
    if baseline:
        measure_baseline(ctx, suites, records, results, judges, scored)
    for result in results:
        metrics[f"suite/{result.suite}/{result.metric}"] = float(result.value)
        if result.win_rate is not None:
            metrics[f"suite/{result.suite}/judge_win_rate"] = result.win_rate
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
