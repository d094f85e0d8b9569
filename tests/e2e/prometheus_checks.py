"""What a real Prometheus says about the chart's dashboard and alerts (shared by the e2e tests)."""

from __future__ import annotations

import json
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


def panel_data(mon: Monitoring, since: float) -> dict[str, bool]:
    """Panel title -> whether any of its queries returned a sample since ``since`` (a range
    query over the test's span, as the dashboard's time picker would ask)."""
    values = template_values(mon)
    out = {}
    for title, exprs in panels():
        out[title] = any(
            any(
                series["values"]
                for series in mon.prometheus.query_range(fill(e, values), since, time.time(), "2s")
            )
            for e in exprs
        )
    return out


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
