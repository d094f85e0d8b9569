"""Each alert of the chart's PrometheusRule fires in a real Prometheus when its scenario happens.

Prometheus scrapes the real operator (ServiceMonitor job) and the stage pods (PodMonitor job)
with the configuration prometheus-operator would generate from the chart (tests/fixtures/
prometheus.py). Stage pods are kwok pods, so the scenarios take seconds:

- a failing run (non-retryable exit)            -> TemperRunFailed
- an adapter whose artifact was altered in S3   -> TemperAdapterVerificationFailed
- a run whose stage makes no progress           -> TemperStageStuck
- the operator process stopped                  -> TemperOperatorDown

On the way, the failure panels, which the quickstart leaves at 0, count these failures.

TemperGateFailed fires in tests/e2e/test_continual.py's blocked gate (a real continual cycle).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from temper_dev.cluster import Cluster
from temper_dev.s3server import S3Server

from tests.cluster.test_operator_pipeline import KWOK, Api, pipeline, publish
from tests.e2e.prometheus_checks import alert_states, panel_peaks, wait_firing, wait_target_up
from tests.fixtures.operator import OperatorProcess
from tests.fixtures.prometheus import RELEASE, Monitoring

pytestmark = [pytest.mark.e2e]

ONE_STAGE = [{"name": "sft", "type": "sft", "data": {"train": ["tickets"]}, "resources": {"gpus": 1, **KWOK}}]
RUNBOOK = "https://github.com/temper/temper/blob/main/docs/runbooks.md#"


def test_each_alert_fires_in_its_scenario(
    cluster: Cluster,
    namespace: str,
    operator: OperatorProcess,
    monitoring: Monitoring,
    s3_server: S3Server,
    s3_bucket: str,
    s3_secret: str,
    tmp_path: Path,
) -> None:
    api = Api(cluster, namespace)
    started = time.time()
    operator_target = wait_target_up(monitoring, f"serviceMonitor/{namespace}/{RELEASE}/")
    assert operator_target["labels"]["job"] == f"{RELEASE}-metrics"
    assert operator_target["labels"]["namespace"] == namespace
    # Quiet once the operator is scraped (before its first scrape, it was absent).
    deadline = time.monotonic() + 20
    while alert_states(monitoring) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert alert_states(monitoring) == {}, monitoring.prometheus.alerts()

    # Stalled: the kwok pod runs for minutes and the stage's progress never moves.
    api.create_run(
        pipeline("stalled", s3_bucket, stages=ONE_STAGE, pod_annotations={"temper.dev/fake-duration": "300s"})
    )
    # Failing: the trainer exits with a non-retryable code.
    api.create_run(
        pipeline(
            "broken",
            s3_bucket,
            stages=ONE_STAGE,
            pod_annotations={"temper.dev/fake-duration": "100ms", "temper.dev/fake-exit-code": "11"},
        )
    )
    # Verification: the published adapter's weights are replaced after the manifest was written.
    manifest = publish(s3_server, s3_bucket, "tampered", "sft", tmp_path)
    key = manifest.split(f"s3://{s3_bucket}/", 1)[1].replace(
        "manifest.json", "attempts/1/adapter_model.safetensors"
    )
    s3_server.client().put_object(Bucket=s3_bucket, Key=key, Body=bytes(reversed(range(256))) * 8)
    api.create_run(
        pipeline(
            "tampered", s3_bucket, stages=ONE_STAGE, pod_annotations={"temper.dev/fake-duration": "100ms"}
        )
    )

    fired = {}
    failed = wait_firing(monitoring, "TemperRunFailed", 60)
    fired["TemperRunFailed"] = failed
    assert api.failed("broken")
    verify = wait_firing(monitoring, "TemperAdapterVerificationFailed", 60)
    fired["TemperAdapterVerificationFailed"] = verify
    assert verify["labels"]["reason"] == "Sha256Mismatch", verify
    stuck = wait_firing(monitoring, "TemperStageStuck", 90)
    fired["TemperStageStuck"] = stuck
    assert (stuck["labels"]["run"], stuck["labels"]["namespace"]) == ("stalled", namespace), stuck
    assert api.run("stalled")["status"]["phase"] == "Running"

    # Failure panels count these failures (after the quickstart they draw their pre-created 0s).
    peaks = panel_peaks(monitoring, started)
    for title in ("Stage failures and retries", "Adapter verification failures", "Runs by state"):
        assert (peaks[title] or 0) > 0, (title, peaks)

    # The operator goes away: up drops to 0 and, after operatorDownFor, the alert fires.
    operator.stop()
    down = wait_firing(monitoring, "TemperOperatorDown", 60)
    fired["TemperOperatorDown"] = down
    assert down["labels"]["namespace"] == namespace, down
    for name, alert in fired.items():
        assert alert["annotations"]["runbook_url"] == RUNBOOK + name.lower(), alert
        assert alert["annotations"]["summary"], alert
    print("alerts fired:", {n: a["activeAt"] for n, a in fired.items()})
