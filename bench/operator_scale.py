"""Operator scale benchmark on the hermetic cluster (kwok GPU nodes). Prints one JSON object.

    python bench/operator_scale.py --runs 1000 [--idle-seconds 60]

Measures (issue 5 goals in brackets):
- apply -> first Job created, p50/p99 [p99 <= 0.5 s]: from just before the create call to the
  moment a watch on Jobs delivers the run's first Job;
- runs admitted per second [>= 100/s]: runs / (last first-Job seen - first apply);
- Kubernetes API requests per run: the operator's own ``temper_api_requests_total`` once every
  run has its first Job and a written status, divided by runs;
- operator peak RSS [<= 150 MB], sampled every 100 ms;
- API writes per minute while idle with every run present [0/min], split into reconcile
  writes and Lease renewals (inherent to leader election: 60 / renew period).
Stage pods run for an hour on kwok, so runs stay Running (the steady state of a busy cluster).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
from kubernetes import client, watch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from temper_dev.cluster import Cluster  # noqa: E402
from temper_dev.s3server import S3Server  # noqa: E402

from tests.fixtures.operator import OperatorProcess  # noqa: E402

KWOK = {
    "nodeSelector": {"temper.dev/node-pool": "kwok"},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
}
WRITE_VERBS = ("create", "patch", "update", "delete")


def run_body(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "temper.dev/v1alpha1",
        "kind": "PostTrainingRun",
        "metadata": {
            "name": name,
            "annotations": {"temper.dev/pod-annotations": json.dumps({"temper.dev/fake-duration": "1h"})},
        },
        "spec": {
            "baseModel": {"uri": "builtin://tiny"},
            "storage": {"uri": f"s3://bench/runs/{name}/"},
            "datasets": [{"name": "d", "uri": "builtin://arith?n=16"}],
            "stages": [{"name": "sft", "type": "sft", "data": {"train": ["d"]}, "resources": KWOK}],
        },
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def api_counts(op: OperatorProcess) -> dict[str, float]:
    counts: dict[str, float] = {}
    for line in op.metrics().splitlines():
        if line.startswith("temper_api_requests_total{"):
            labels, _, value = line.partition("} ")
            counts[labels.split("{", 1)[1]] = float(value)
    return counts


def reconcile_stats(op: OperatorProcess) -> dict[str, float]:
    total = op.metric("temper_reconcile_duration_seconds_sum", kind="PostTrainingRun")
    count = op.metric("temper_reconcile_duration_seconds_count", kind="PostTrainingRun")
    return {"reconciles": count, "mean_ms": round(1000 * total / count, 2) if count else 0.0}


def writes(counts: dict[str, float], leases: bool) -> float:
    return sum(
        v
        for k, v in counts.items()
        if any(f'verb="{w}"' in k for w in WRITE_VERBS) and ('resource="leases"' in k) == leases
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--idle-seconds", type=float, default=60.0)
    parser.add_argument("--create-threads", type=int, default=8)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="temper-bench-") as tmp:
        cluster = Cluster(state_dir=Path(tmp) / "cluster")
        cluster.up(timeout=120)
        s3 = S3Server().start()
        try:
            print(json.dumps(bench(cluster, s3, Path(tmp), args), indent=2))
        finally:
            s3.stop()
            cluster.down()


def bench(cluster: Cluster, s3: S3Server, tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds"))
    api_client = cluster.api_client()
    core = client.CoreV1Api(api_client)
    custom = client.CustomObjectsApi(api_client)
    ns = "bench"
    core.create_namespace({"metadata": {"name": ns}})
    deadline = time.monotonic() + 60
    while True:  # the CRDs become servable asynchronously
        try:
            custom.list_namespaced_custom_object("temper.dev", "v1alpha1", ns, "posttrainingruns")
            break
        except client.exceptions.ApiException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    s3.client().create_bucket(Bucket="bench")

    op = OperatorProcess(cluster, ns, "bench-op", tmp, {"TEMPER_DEFAULT_STORAGE_ENDPOINT": s3.endpoint_url})
    op.start()
    op.wait_role("leader", timeout=60)
    proc = psutil.Process(op.proc.pid if op.proc else 0)
    peak_rss = 0
    sampling = True

    def sample() -> None:
        nonlocal peak_rss
        while sampling:
            try:
                peak_rss = max(peak_rss, proc.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()

    first_job: dict[str, float] = {}
    applied: dict[str, float] = {}
    done = threading.Event()

    def watch_jobs() -> None:
        batch = client.BatchV1Api(cluster.api_client())
        stream = watch.Watch()
        for event in stream.stream(
            batch.list_namespaced_job, ns, label_selector="temper.dev/run", timeout_seconds=900
        ):
            run = event["object"].metadata.labels["temper.dev/run"]
            first_job.setdefault(run, time.monotonic())
            if len(first_job) >= args.runs:
                done.set()
                stream.stop()

    watcher = threading.Thread(target=watch_jobs, daemon=True)
    watcher.start()
    time.sleep(1.0)  # let the watch establish
    before = api_counts(op)

    def create(i: int) -> None:
        name = f"run-{i:05d}"
        applied[name] = time.monotonic()
        custom.create_namespaced_custom_object(
            "temper.dev", "v1alpha1", ns, "posttrainingruns", run_body(name)
        )

    start = time.monotonic()
    with ThreadPoolExecutor(args.create_threads) as pool:
        list(pool.map(create, range(args.runs)))
    apply_seconds = time.monotonic() - start
    if not done.wait(timeout=max(120.0, args.runs * 0.5)):
        raise SystemExit(f"only {len(first_job)} of {args.runs} runs got a Job:\n{op.log()[-3000:]}")
    latencies = [first_job[n] - applied[n] for n in applied]
    admitted_seconds = max(first_job.values()) - start

    # Settled: every run has a written status (phase) before counting requests per run.
    def settled() -> bool:
        items = custom.list_namespaced_custom_object("temper.dev", "v1alpha1", ns, "posttrainingruns")[
            "items"
        ]
        return all((i.get("status") or {}).get("phase") for i in items)

    deadline = time.monotonic() + 300
    while not settled() and time.monotonic() < deadline:
        time.sleep(1)
    time.sleep(2.0)
    after = api_counts(op)
    requests = sum(after.values()) - sum(before.values()) - (writes(after, True) - writes(before, True))
    idle_start = api_counts(op)
    time.sleep(args.idle_seconds)
    idle_end = api_counts(op)
    sampling = False
    sampler.join()
    minutes = args.idle_seconds / 60.0
    reconcile = reconcile_stats(op)
    op.stop()
    return {
        "runs": args.runs,
        "apply_to_first_job_seconds": {
            "p50": round(statistics.median(latencies), 4),
            "p99": round(percentile(latencies, 0.99), 4),
            "max": round(max(latencies), 4),
        },
        "client_apply_seconds": round(apply_seconds, 3),
        "runs_admitted_per_second": round(args.runs / admitted_seconds, 1),
        "api_requests_per_run": round(requests / args.runs, 2),
        "api_requests_by_kind": {
            k: after.get(k, 0) - before.get(k, 0) for k in sorted(after) if after.get(k, 0) - before.get(k, 0)
        },
        "operator_peak_rss_mb": round(peak_rss / 2**20, 1),
        "reconcile": reconcile,
        "load_average_1m": round(psutil.getloadavg()[0], 2),
        "cpu_cores": psutil.cpu_count(),
        "idle_window_seconds": args.idle_seconds,
        "idle_api_writes_per_minute": round(
            (writes(idle_end, False) - writes(idle_start, False)) / minutes, 2
        ),
        "idle_lease_renewals_per_minute": round(
            (writes(idle_end, True) - writes(idle_start, True)) / minutes, 2
        ),
    }


if __name__ == "__main__":
    main()
