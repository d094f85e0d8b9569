"""What a real Prometheus says about the chart's dashboard and alerts (shared by the e2e tests)."""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path
from typing import Any

from tests.fixtures.prometheus import Monitoring

DASHBOARD = Path(__file__).resolve().parents[2] / "charts" / "temper" / "files" / "dashboards" / "temper.json"


def panels() -> list[tuple[str, list[str]]]:
    """(title, PromQL exprs) of every panel with queries."""
    board = json.loads(DASHBOARD.read_text())
    return [
        (p["title"], [t["expr"] for t in p.get("targets") or []]) for p in board["panels"] if p.get("targets")
    ]


def template_values(mon: Monitoring) -> dict[str, str]:
    """The dashboard's variables as Grafana fills them: the namespace from its label_values
    query (first value), the window from its first option, $__rate_interval from the scrape."""
    board = json.loads(DASHBOARD.read_text())
    values: dict[str, str] = {"__rate_interval": "4s", "__interval": "1s", "__range": "1h"}
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
            assert match, f"variable {var['name']}: unsupported query {query}"
            found = mon.prometheus.label_values(match.group(2), match.group(1))
            assert found, f"variable {var['name']}: {query} returned nothing"
            values[var["name"]] = found[0]
        elif var["type"] in ("custom", "interval"):
            values[var["name"]] = var["query"].split(",")[0]
    return values


def fill(expr: str, values: dict[str, str]) -> str:
    for name in sorted(values, key=len, reverse=True):
        expr = expr.replace(f"${{{name}}}", values[name]).replace(f"${name}", values[name])
    assert "$" not in expr, f"unfilled variable in {expr}"
    return expr


def panel_peaks(mon: Monitoring, since: float) -> dict[str, float | None]:
    """Panel title -> the largest value any of its queries returned since ``since`` (a range
    query over the test's span, as the dashboard's time picker would ask), or None for "No data".
    NaN counts as no data: a histogram_quantile over buckets that never moved draws nothing."""
    values = template_values(mon)
    out: dict[str, float | None] = {}
    for title, exprs in panels():
        finite = [
            float(v)
            for e in exprs
            for series in mon.prometheus.query_range(fill(e, values), since, time.time(), "2s")
            for _, v in series["values"]
            if math.isfinite(float(v))
        ]
        out[title] = max(finite) if finite else None
    return out


def panel_data(mon: Monitoring, since: float) -> dict[str, bool]:
    """Panel title -> whether any of its queries returned a finite sample since ``since``."""
    return {title: peak is not None for title, peak in panel_peaks(mon, since).items()}


def alert_states(mon: Monitoring) -> dict[str, str]:
    """Alert name -> 'firing' or 'pending', for the alerts Prometheus has active now."""
    states: dict[str, str] = {}
    for alert in mon.prometheus.alerts():
        name = alert["labels"]["alertname"]
        if states.get(name) != "firing":
            states[name] = alert["state"]
    return states


def alerts_fired_since(mon: Monitoring, since: float) -> dict[str, int]:
    """Alert name -> samples of ALERTS{alertstate="firing"} since ``since`` (Prometheus' own record)."""
    series = mon.prometheus.query_range('ALERTS{alertstate="firing"}', since, time.time(), "1s")
    return {s["metric"]["alertname"]: len(s["values"]) for s in series}


def wait_firing(mon: Monitoring, name: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for alert in mon.prometheus.alerts():
            if alert["labels"]["alertname"] == name and alert["state"] == "firing":
                return dict(alert)
        time.sleep(0.5)
    raise AssertionError(f"{name} never fired; active alerts: {mon.prometheus.alerts()}")


def wait_target_up(mon: Monitoring, job_prefix: str, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for target in mon.prometheus.targets():
            if target["scrapePool"].startswith(job_prefix) and target["health"] == "up":
                return dict(target)
        time.sleep(0.3)
    raise AssertionError(f"no healthy {job_prefix} target: {mon.prometheus.targets()}")


# Panels a successful quickstart (one run, no failures, no continual learning) cannot fill,
# and why; test_continual fills them. (Failure panels draw pre-created 0s here and count real
# failures in test_prometheus_alerts.)
NO_DATA_AFTER_QUICKSTART = {
    "Forgetting per suite": "per-run series of spec.continual runs only",
    "Gate failures by suite": "a blocked continual promotion; suites are user-defined, so no 0 series",
    "Generation per run": "per-run series of spec.continual runs only",
}


def settled_peaks(mon: Monitoring, since: float, timeout: float = 30) -> dict[str, float | None]:
    """panel_peaks once every panel outside NO_DATA_AFTER_QUICKSTART has data (the last stage's
    result lands in the scrape after the run finished), or at ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        peaks = panel_peaks(mon, since)
        missing = {t for t, p in peaks.items() if p is None} - set(NO_DATA_AFTER_QUICKSTART)
        if not missing or time.monotonic() > deadline:
            return peaks
        time.sleep(1)


def trainer_targets(mon: Monitoring, namespace: str) -> set[tuple[str, str, str, str]]:
    """(job, run, stage, pod) of every trainer pod Prometheus scraped since the monitor started."""
    query = f'temper_trainer_step{{namespace="{namespace}"}}'
    return {
        (m["job"], m.get("run", ""), m.get("stage", ""), m.get("pod", ""))
        for m in (s["metric"] for s in mon.prometheus.query_range(query, mon.started, time.time(), "1s"))
    }
