"""Every PromQL expression the chart and the docs ship is parsed by a real PromQL parser, and
every metric it queries is one the operator or the trainer really exports.

``promql-parser`` (PyPI) is the Python binding of the Rust port of Prometheus' own parser: it
rejects syntax errors, unknown functions and type errors (``rate`` of an instant vector). Grafana
variables are replaced by values of the right type before parsing, as Grafana does at query time.
"""

from __future__ import annotations

import json
import re
from typing import Any

import promql_parser
import pytest
import temper.metrics  # noqa: F401 - registers the operator's metrics in the default registry
from prometheus_client import CollectorRegistry
from prometheus_client.registry import REGISTRY
from temper_trainer.metrics import TrainerMetrics

from tests.unit.test_chart_helm import EVERYTHING_ON, MONITORING_APIS, ROOT, one, render

pytestmark = pytest.mark.unit

# Series Prometheus itself writes for every scrape target.
PROMETHEUS_BUILTINS = {"up"}
# $__rate_interval and range variables stand for a duration, the others for a label value.
GRAFANA_RANGE_VARIABLES = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h", "window": "1h"}


def exported_series(registry: CollectorRegistry) -> set[str]:
    """Series names a registry can expose, including declared-but-unset labelled metrics."""
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_sum", "_count"),
        "summary": ("_sum", "_count"),
    }
    names = set()
    for family in registry.collect():
        names |= {family.name + s for s in suffixes.get(family.type, ("",))}
    return names


def known_series() -> set[str]:
    return exported_series(REGISTRY) | exported_series(TrainerMetrics().registry) | PROMETHEUS_BUILTINS


def parse(expr: str) -> promql_parser.Expr:
    try:
        return promql_parser.parse(expr)
    except ValueError as exc:
        raise AssertionError(f"invalid PromQL {expr!r}: {exc}") from exc


def selected_metrics(expr: promql_parser.Expr) -> set[str]:
    """Metric names of every selector, ``{__name__=~"a|b"}`` alternatives included."""
    names: set[str] = set()

    def visit(node: Any) -> None:
        if not isinstance(node, promql_parser.VectorSelector):
            return
        if node.name:
            names.add(node.name)
        for matcher in node.matchers.matchers:
            if matcher.name == "__name__":
                names.update(re.split(r"\|", matcher.value))

    promql_parser.walk(expr, visit)
    return names


def grafana_to_promql(query: str) -> str:
    """What Grafana sends: ranges become durations, other variables label values."""
    for name, duration in GRAFANA_RANGE_VARIABLES.items():
        query = query.replace(f"${{{name}}}", duration).replace(f"${name}", duration)
    return re.sub(r"\$\{?(\w+)\}?", "value", query)


def rule_exprs() -> dict[str, str]:
    rule = one(render(EVERYTHING_ON, api_versions=MONITORING_APIS), "PrometheusRule")
    return {r["alert"]: r["expr"] for group in rule["spec"]["groups"] for r in group["rules"]}


def dashboard_queries() -> dict[str, str]:
    configmap = one(render(EVERYTHING_ON, api_versions=MONITORING_APIS), "ConfigMap", "rel-temper-dashboard")
    board: dict[str, Any] = json.loads(configmap["data"]["temper.json"])
    queries = {
        f"{panel['title']} [{target.get('refId', i)}]": grafana_to_promql(target["expr"])
        for panel in board["panels"]
        for i, target in enumerate(panel.get("targets") or [])
    }
    for variable in board["templating"]["list"]:
        if variable.get("type") != "query":
            continue
        query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        # label_values(<selector>, label) is Grafana's; its selector is PromQL.
        match = re.fullmatch(r"label_values\((.+),\s*\w+\)", query)
        assert match, f"variable {variable['name']}: unexpected query {query!r}"
        queries[f"variable {variable['name']}"] = grafana_to_promql(match[1])
    return queries


def test_every_alert_expression_parses_and_queries_exported_metrics() -> None:
    exprs = rule_exprs()
    assert len(exprs) == 5
    known = known_series()
    for alert, expr in exprs.items():
        metrics = selected_metrics(parse(expr))
        assert metrics, alert
        assert metrics <= known, f"{alert} queries metrics nobody exports: {metrics - known}"


def test_every_dashboard_query_parses_and_queries_exported_metrics() -> None:
    queries = dashboard_queries()
    assert len(queries) > 10
    known = known_series()
    for where, query in queries.items():
        metrics = selected_metrics(parse(query))
        assert metrics, where
        assert metrics <= known, f"{where} queries metrics nobody exports: {metrics - known}"


def docs_queries() -> dict[str, str]:
    """Each line of the docs' ```promql blocks that is not a comment."""
    queries = {}
    for page in sorted((ROOT / "docs").glob("*.md")):
        for block in re.findall(r"```promql\n(.*?)```", page.read_text(), re.S):
            for line in block.splitlines():
                if line.strip() and not line.lstrip().startswith("#"):
                    queries[f"{page.name}: {line.strip()}"] = line
    return queries


def test_every_documented_query_parses_and_queries_exported_metrics() -> None:
    queries = docs_queries()
    assert any(k.startswith("metrics.md") for k in queries)
    known = known_series()
    for where, query in queries.items():
        metrics = selected_metrics(parse(query))
        assert metrics <= known, f"{where} queries metrics nobody exports: {metrics - known}"


def test_the_checks_catch_what_they_are_for() -> None:
    # Controls: the parser is strict (syntax, function names, types) and the metric check bites.
    for broken in (
        "sum(rate(temper_runs[5m])",
        "increse(temper_stage_retries_total[5m])",
        "rate(temper_runs)",
        "temper_runs{state=}",
    ):
        with pytest.raises(AssertionError, match="invalid PromQL"):
            parse(broken)
    assert grafana_to_promql('rate(x{namespace=~"$namespace"}[$__rate_interval])') == (
        'rate(x{namespace=~"value"}[5m])'
    )
    typo = selected_metrics(parse('max(temper_run{state="Failed"}) or {__name__=~"temper_adapters|up"}'))
    assert typo == {"temper_run", "temper_adapters", "up"}
    assert typo - known_series() == {"temper_run"}
    known = known_series()
    assert {"temper_runs", "temper_stage_duration_seconds_bucket", "temper_api_errors_total"} <= known
    assert {"temper_trainer_loss", "temper_trainer_tokens_per_second"} <= known
