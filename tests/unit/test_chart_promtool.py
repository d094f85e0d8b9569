"""The chart's PrometheusRule under Prometheus' own tool: ``promtool check rules`` on the rendered
rule file, and ``promtool test rules`` with input series for every alert (firing, not firing,
exact labels and annotations including the runbook URL).

promtool comes from hack/build-tools.sh (``$TEMPER_PROMETHEUS_BIN`` or the versioned cache);
missing, the tests fail, never skip.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from temper_dev.cluster import ClusterError
from temper_dev.prometheus import binary, rule_file

from tests.unit.test_chart_helm import MONITORING_APIS, one, render

pytestmark = pytest.mark.unit

VALUES = {"metrics": {"prometheusRule": {"enabled": True}}}
RUNBOOK = "https://github.com/temper/temper/blob/main/docs/runbooks.md"
OPERATOR = 'job="rel-temper-metrics", namespace="temper-system"'
POD = 'instance="10.0.0.7:9090", pod="rel-temper-0", endpoint="metrics", service="rel-temper-metrics"'


def promtool() -> Path:
    try:
        return binary("promtool")
    except ClusterError as exc:
        pytest.fail(str(exc))


def rendered_rules(tmp_path: Path) -> Path:
    rule = one(render(VALUES, api_versions=MONITORING_APIS), "PrometheusRule")
    path = tmp_path / "temper-rules.yaml"
    path.write_text(yaml.safe_dump(rule_file(rule)))
    return path


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(promtool()), *args], capture_output=True, text=True, timeout=120, check=False)


def alert(name: str, labels: dict[str, str], summary: str, description: str) -> dict[str, Any]:
    return {
        "exp_labels": labels,
        "exp_annotations": {
            "summary": summary,
            "description": description,
            "runbook_url": f"{RUNBOOK}#{name.lower()}",
        },
    }


def case(
    series: list[tuple[str, str]], checks: list[tuple[str, str, list[dict[str, Any]]]]
) -> dict[str, Any]:
    return {
        "interval": "1m",
        "input_series": [{"series": s, "values": v} for s, v in series],
        "alert_rule_test": [{"eval_time": t, "alertname": n, "exp_alerts": a} for t, n, a in checks],
    }


def rule_tests() -> list[dict[str, Any]]:
    failed = alert(
        "TemperRunFailed",
        {"severity": "warning"},
        "A PostTrainingRun failed.",
        "1.071 more run(s) are Failed than 15 minutes ago. List them with kubectl get ptr -A.",
    )
    stuck = alert(
        "TemperStageStuck",
        {
            "severity": "warning",
            "namespace": "team-a",
            "run": "quickstart",
            **_labels(POD),
            "job": "rel-temper-metrics",
        },
        "A training stage has made no progress.",
        "Run team-a/quickstart has been at 40% for 30m.",
    )
    gate = alert(
        "TemperGateFailed",
        {"severity": "warning", "suite": "arith"},
        "A regression gate blocked a promotion.",
        "Suite arith failed its regression gate in the last hour.",
    )
    verify = alert(
        "TemperAdapterVerificationFailed",
        {"severity": "critical", "reason": "Sha256Mismatch"},
        "An adapter artifact failed verification.",
        "Adapter verification failed with reason Sha256Mismatch in the last 15 minutes.",
    )
    down = alert(
        "TemperOperatorDown",
        {"severity": "critical", "job": "rel-temper-metrics", "namespace": "temper-system"},
        "The temper operator is down.",
        "No temper operator in namespace temper-system has been up for 5m.",
    )
    job = 'job="rel-temper-metrics"'
    return [
        # A run fails at 20m: fires while the 15m window holds the step, quiet before and after.
        case(
            [
                (f'temper_runs{{state="Failed", {job}}}', "0x20 1x40"),
                (f'temper_runs{{state="Running", {job}}}', "1x20 0x40"),
            ],
            [
                ("19m", "TemperRunFailed", []),
                ("30m", "TemperRunFailed", [failed]),
                ("40m", "TemperRunFailed", []),
            ],
        ),
        # Progress flat at 40% for an hour fires after 30m + for 5m; a moving one never does,
        # nor one that is done (100%), nor one that only just started (no sample 30m ago).
        case(
            [
                (
                    f'temper_run_progress_ratio{{namespace="team-a", run="quickstart", {job}, {POD}}}',
                    "0.4x60",
                ),
                (f'temper_run_progress_ratio{{namespace="team-a", run="moving", {job}, {POD}}}', "0+0.01x60"),
                (f'temper_run_progress_ratio{{namespace="team-a", run="done", {job}, {POD}}}', "1x60"),
                (
                    f'temper_run_progress_ratio{{namespace="team-a", run="fresh", {job}, {POD}}}',
                    "_x40 0.1x20",
                ),
            ],
            [
                ("30m", "TemperStageStuck", []),
                ("36m", "TemperStageStuck", [stuck]),
                ("60m", "TemperStageStuck", [stuck]),
            ],
        ),
        # A suite's gate-failure counter is born at 1 (no earlier sample), then increases again.
        case(
            [(f'temper_gate_failures_total{{suite="arith", {job}}}', "_x10 1x100 2x30")],
            [
                ("5m", "TemperGateFailed", []),
                ("12m", "TemperGateFailed", [gate]),
                ("100m", "TemperGateFailed", []),
                ("115m", "TemperGateFailed", [gate]),
            ],
        ),
        case(
            [
                (
                    f'temper_adapter_verification_failures_total{{reason="Sha256Mismatch", {job}}}',
                    "_x10 1x40 3x20",
                )
            ],
            [
                ("5m", "TemperAdapterVerificationFailed", []),
                ("12m", "TemperAdapterVerificationFailed", [verify]),
                ("40m", "TemperAdapterVerificationFailed", []),
                ("55m", "TemperAdapterVerificationFailed", [verify]),
            ],
        ),
        # up 1 for 10m, then 0 (scrape fails), then the target vanishes: fires after 5m of either.
        case(
            [(f"up{{{OPERATOR}, {POD}}}", "1x10 0x10 _x20")],
            [
                ("10m", "TemperOperatorDown", []),
                ("13m", "TemperOperatorDown", []),
                ("17m", "TemperOperatorDown", [down]),
                ("35m", "TemperOperatorDown", [down]),
            ],
        ),
        # A standby replica down while the leader is up is fine; another namespace's is not ours.
        case(
            [
                (f"up{{{OPERATOR}, {POD}}}", "1x30"),
                ('up{job="rel-temper-metrics", namespace="other"}', "0x30"),
                (f'up{{{OPERATOR}, instance="10.0.0.8:9090", pod="rel-temper-1"}}', "0x30"),
            ],
            [("25m", "TemperOperatorDown", [])],
        ),
    ]


def _labels(text: str) -> dict[str, str]:
    return {k.strip(): v.strip().strip('"') for k, v in (p.split("=", 1) for p in text.split(","))}


def test_promtool_check_rules_accepts_the_rendered_prometheus_rule(tmp_path: Path) -> None:
    proc = run_promtool("check", "rules", str(rendered_rules(tmp_path)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS: 5 rules found" in proc.stdout, proc.stdout


def test_promtool_rule_unit_tests_cover_every_alert(tmp_path: Path) -> None:
    rules = rendered_rules(tmp_path)
    tests = rule_tests()
    covered = {c["alertname"] for t in tests for c in t["alert_rule_test"] if c["exp_alerts"]}
    quiet = {c["alertname"] for t in tests for c in t["alert_rule_test"] if not c["exp_alerts"]}
    alerts = {r["alert"] for g in yaml.safe_load(rules.read_text())["groups"] for r in g["rules"]}
    assert covered == alerts == quiet  # every alert both fires and stays quiet somewhere
    spec = tmp_path / "temper-rules.test.yaml"
    spec.write_text(yaml.safe_dump({"rule_files": [rules.name], "evaluation_interval": "1m", "tests": tests}))
    proc = run_promtool("test", "rules", str(spec))
    assert proc.returncode == 0, proc.stdout + proc.stderr
