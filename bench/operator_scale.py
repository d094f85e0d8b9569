"""Operator scale benchmark on the hermetic cluster (kwok GPU nodes), with a baseline. Prints JSON.

    python bench/operator_scale.py --runs 1000 [--steady-seconds 60] [--brownout-seconds 60]

One cluster, one process, phases in this order:

1. **baseline**: the bench's own client creates the Jobs temper would build for N runs (rendered
   by temper's planner, owner references dropped), at the same client concurrency, in a namespace
   the operator does not watch. Its drain time and rate are what this cluster can do.
2. **burst**: N runs applied at that concurrency; apply → first Job (client create call to the Job
   seen on a watch), p50/p99, and the admission rate ÷ the baseline's (the efficiency).
3. **steady**: every run Running (kwok pods run for an hour); LIST calls per minute, API writes
   per minute (Lease aside), S3 requests per minute per running run, RSS.
4. **paced**: runs applied at half the baseline's rate; p99 apply → first Job.
5. **brownout**: another burst of N while S3 is black-holed for ``--brownout-seconds``.

Operator timings are production's (lease 15/10/2 s, progress poll 30 s), not the fixture's.
API requests per run come from two counters: the operator's own ``temper_api_requests_total``
(every call through ``temper.kube``) and the apiserver's ``apiserver_request_total`` (every
layer: kopf's watches too, and the cluster's own controllers, which the baseline also pays).
The machine may be shared: ``load_average_1m`` is recorded beside each phase.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
from kubernetes import client, watch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from temper.config import OperatorConfig  # noqa: E402
from temper.planner import Observed, plan  # noqa: E402
from temper_dev.cluster import Cluster  # noqa: E402
from temper_dev.s3server import S3Server  # noqa: E402

from tests.fixtures.operator import OperatorProcess, install_crds  # noqa: E402

KWOK = {
    "nodeSelector": {"temper.dev/node-pool": "kwok"},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
}
WRITE_VERBS = ("create", "patch", "update", "delete")
PRODUCTION = {
    "TEMPER_LEASE_DURATION_SECONDS": "15",
    "TEMPER_LEASE_RENEW_DEADLINE_SECONDS": "10",
    "TEMPER_LEASE_RENEW_SECONDS": "2",
    "TEMPER_PROGRESS_INTERVAL_SECONDS": "30",
    "TEMPER_TRAINER_PROGRESS_INTERVAL_SECONDS": "10",
}
REQUEST_TOTAL = re.compile(r"^apiserver_request_total\{(?P<labels>[^}]*)\} (?P<value>\S+)$")
GROUP, VERSION, RUNS = "temper.dev", "v1alpha1", "posttrainingruns"


def run_body(name: str, namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "PostTrainingRun",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "annotations": {"temper.dev/pod-annotations": json.dumps({"temper.dev/fake-duration": "1h"})},
        },
        "spec": {
            "baseModel": {"uri": "builtin://tiny"},
            "storage": {"uri": f"s3://bench/runs/{name}/"},
            "datasets": [{"name": "d", "uri": "builtin://arith?n=16"}],
            "stages": [{"name": "sft", "type": "sft", "data": {"train": ["d"]}, "resources": KWOK}],
        },
    }


def temper_job(name: str, namespace: str, config: OperatorConfig) -> dict[str, Any]:
    """The Job temper's planner builds for this run's first reconcile, without the owner reference."""
    body = run_body(name, namespace)
    body["metadata"]["uid"] = "00000000-0000-0000-0000-000000000000"
    job = next(o for o in plan(body, Observed(), datetime.now(UTC), config).create if o["kind"] == "Job")
    job["metadata"].pop("ownerReferences", None)
    return job


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def prom(text: str, name: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, _, value = line.partition("} ")
            out[labels.split("{", 1)[1]] = float(value)
    return out


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0)}


def writes(counts: dict[str, float], leases: bool) -> float:
    return sum(
        v
        for k, v in counts.items()
        if any(f'verb="{w}"' in k for w in WRITE_VERBS) and ('resource="leases"' in k) == leases
    )


class Apiserver:
    """The apiserver's own request counter: every client, every layer."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    def counts(self) -> Counter[tuple[str, str]]:
        out: Counter[tuple[str, str]] = Counter()
        for line in self.cluster.kubectl("get", "--raw", "/metrics").stdout.splitlines():
            match = REQUEST_TOTAL.match(line)
            if match:
                labels = dict(re.findall(r'(\w+)="([^"]*)"', match["labels"]))
                out[(labels.get("verb", ""), labels.get("resource", ""))] += int(float(match["value"]))
        return out


class JobWatch:
    """First Job seen per run (label temper.dev/run) in one namespace, on the monotonic clock."""

    def __init__(self, cluster: Cluster, namespace: str) -> None:
        self.first: dict[str, float] = {}
        self.expected = 0
        self.done = threading.Event()
        self._stream = watch.Watch()
        self._thread = threading.Thread(target=self._run, args=(cluster, namespace), daemon=True)
        self._thread.start()
        time.sleep(1.0)  # let the watch establish

    def _run(self, cluster: Cluster, namespace: str) -> None:
        batch = client.BatchV1Api(cluster.api_client())
        stream = self._stream.stream(
            batch.list_namespaced_job, namespace, label_selector="temper.dev/run", timeout_seconds=3600
        )
        with contextlib.suppress(Exception):  # the stream ends when stopped
            for event in stream:
                run = event["object"].metadata.labels["temper.dev/run"]
                self.first.setdefault(run, time.monotonic())
                if self.expected and len(self.first) >= self.expected:
                    self.done.set()

    def wait(self, n: int, timeout: float) -> None:
        self.expected = n
        if len(self.first) >= n:
            return
        if not self.done.wait(timeout):
            raise SystemExit(f"only {len(self.first)} of {n} Jobs seen")

    def stop(self) -> None:
        self._stream.stop()


class Rss:
    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak = 0
        self.running = True
        threading.Thread(target=self._sample, daemon=True).start()

    def now(self) -> int:
        return int(self.proc.memory_info().rss)

    def _sample(self) -> None:
        while self.running:
            try:
                self.peak = max(self.peak, self.now())
            except psutil.Error:
                return
            time.sleep(0.1)


class CpuShare:
    """CPU seconds per component over a phase: the bench's own processes (apiserver, etcd,
    controller-manager, scheduler, kwok, the operator, this client) and everything else on the
    machine. It answers whose CPU a phase's rate was bounded by."""

    def __init__(self) -> None:
        self.start = self._sample()

    @staticmethod
    def _sample() -> dict[str, float]:
        out: Counter[str] = Counter()
        me = psutil.Process()
        for proc in [me, *me.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                times = proc.cpu_times()
                name = "bench client" if proc.pid == me.pid else proc.name()
                if name.startswith("python"):
                    argv = proc.cmdline()[1:3]
                    name = {"temper": "operator", "moto.server": "s3 (moto)"}.get(argv[-1], " ".join(argv))
                out[name] += times.user + times.system
        total = psutil.cpu_times()
        out["machine"] = total.user + total.nice + total.system
        return dict(out)

    def seconds(self) -> dict[str, float]:
        end = self._sample()
        spent = {k: round(v - self.start.get(k, 0.0), 1) for k, v in end.items()}
        ours = sum(v for k, v in spent.items() if k != "machine")
        spent["everything else"] = round(spent.pop("machine") - ours, 1)
        return dict(sorted(spent.items(), key=lambda kv: -kv[1]))


def apply_all(
    names: list[str], create: Callable[[str], None], threads: int, rate: float | None = None
) -> tuple[dict[str, float], float]:
    """Create every name from ``threads`` threads (at ``rate`` per second when given); the
    monotonic time just before each create call, and the moment the first call started."""
    applied: dict[str, float] = {}
    start = time.monotonic()

    def one(i: int) -> None:
        if rate:
            time.sleep(max(0.0, start + i / rate - time.monotonic()))
        applied[names[i]] = time.monotonic()
        create(names[i])

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(len(names))))
    return applied, start


def burst_stats(applied: dict[str, float], seen: dict[str, float], start: float) -> dict[str, Any]:
    latencies = [seen[n] - applied[n] for n in applied]
    drain = max(seen[n] for n in applied) - start
    return {
        "p50_s": round(statistics.median(latencies), 3),
        "p99_s": round(percentile(latencies, 0.99), 3),
        "max_s": round(max(latencies), 3),
        "drain_s": round(drain, 2),
        "per_second": round(len(applied) / drain, 1),
        "load_average_1m": round(psutil.getloadavg()[0], 2),
    }


def wait_namespace_gone(core: client.CoreV1Api, name: str, timeout: float = 600) -> None:
    core.delete_namespace(name, propagation_policy="Background")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            core.read_namespace(name)
        except client.exceptions.ApiException as exc:
            if exc.status == 404:
                return
            raise
        time.sleep(1)


RSS_SPLIT = """
import json, os, sys, psutil
proc = psutil.Process()
rss = lambda: proc.memory_info().rss / 2**20
out, last = {}, rss()
out["python"] = round(last, 1)
def step(name, fn):
    global last
    fn()
    now = rss()
    out[name] = round(now - last, 1)
    last = now
sys.modules.setdefault("kubernetes", None)  # as temper.__main__ does
step("pydantic + temper.api", lambda: __import__("temper.api.run"))
step("aiohttp + kopf", lambda: __import__("kopf"))
step("prometheus_client", lambda: __import__("prometheus_client"))
step("temper operator modules", lambda: __import__("temper.__main__"))
from temper.kube import _ssl_context, connection_info
step("TLS context (kubeconfig CA + client cert)", lambda: _ssl_context(connection_info()))
from temper.api.contract import StorageConfig
from temper.storage import make_client
step("boto3 + first S3 client (on first storage use)", lambda: make_client(StorageConfig(endpointUrl="http://127.0.0.1:9")))
step("each further S3 client", lambda: make_client(StorageConfig(endpointUrl="http://127.0.0.1:8")))
out["total"] = round(rss(), 1)
print(json.dumps(out))
"""


def rss_split(cluster: Cluster) -> dict[str, float]:
    """Where the operator's RSS goes before any run: one import (or client) after another, MB."""
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}
    done = subprocess.run(
        [sys.executable, "-c", RSS_SPLIT], env=env, capture_output=True, text=True, check=True, cwd=REPO
    )
    split: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return split


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--paced-runs", type=int, default=0, help="default: runs / 2")
    parser.add_argument("--steady-seconds", type=float, default=60.0)
    parser.add_argument("--brownout-seconds", type=float, default=60.0)
    parser.add_argument("--brownout-runs", type=int, default=0, help="default: runs")
    parser.add_argument("--create-threads", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="temper-bench-") as tmp:
        cluster = Cluster(state_dir=Path(tmp) / "cluster")
        cluster.up(timeout=180)
        s3 = S3Server(outages=True).start()
        out: dict[str, Any] = {}
        try:
            bench(cluster, s3, Path(tmp), args, out)
        except Exception as exc:
            # The phases done so far still count; the operator's log says why the rest did not.
            out["error"] = f"{type(exc).__name__}: {exc}"
            for log in Path(tmp).glob("operator-*.log"):
                kept = Path(tempfile.gettempdir()) / f"temper-bench-{log.name}"
                kept.write_bytes(log.read_bytes())
                out["operator_log"] = str(kept)
            raise
        finally:
            print(json.dumps(out, indent=2))
            s3.stop()
            cluster.down()


def bench(cluster: Cluster, s3: S3Server, tmp: Path, args: argparse.Namespace, out: dict[str, Any]) -> None:
    install_crds(cluster)
    api_client = cluster.api_client()
    api_client.configuration.connection_pool_maxsize = args.create_threads + 2
    core, batch = client.CoreV1Api(api_client), client.BatchV1Api(api_client)
    custom = client.CustomObjectsApi(api_client)
    s3.client().create_bucket(Bucket="bench")
    apiserver = Apiserver(cluster)
    n, threads = args.runs, args.create_threads
    out.update({"runs": n, "cpu_cores": psutil.cpu_count(), "create_threads": threads})
    out["rss_split_mb"] = rss_split(cluster)

    # 1. baseline: temper's Jobs, created by this client directly.
    base_ns = "bench-base"
    core.create_namespace({"metadata": {"name": base_ns}})
    config = OperatorConfig.from_env({})
    jobs = {f"run-{i:05d}": temper_job(f"run-{i:05d}", base_ns, config) for i in range(n)}
    seen = JobWatch(cluster, base_ns)
    before, cpu = apiserver.counts(), CpuShare()
    applied, start = apply_all(
        list(jobs), lambda name: batch.create_namespaced_job(base_ns, jobs[name]), threads
    )
    seen.wait(n, max(300.0, n * 0.5))
    baseline = burst_stats(applied, seen.first, start)
    baseline["cpu_seconds"] = cpu.seconds()
    time.sleep(5.0)
    baseline["apiserver_requests_per_run"] = round(sum((apiserver.counts() - before).values()) / n, 2)
    seen.stop()
    out["baseline"] = baseline
    wait_namespace_gone(core, base_ns)

    # 2. burst through temper
    namespaces = ["bench", "bench-paced", "bench-brownout"]
    for ns in namespaces:
        core.create_namespace({"metadata": {"name": ns}})
    env = {
        **PRODUCTION,
        "TEMPER_NAMESPACES": ",".join(namespaces),
        "TEMPER_DEFAULT_STORAGE_ENDPOINT": s3.endpoint_url,
        "TEMPER_DEFAULT_STORAGE_SECRET": "s3-creds",
    }
    for ns in namespaces:
        core.create_namespaced_secret(
            ns,
            {
                "metadata": {"name": "s3-creds"},
                "stringData": {k: v for k, v in s3.env.items() if k.startswith("AWS_")},
            },
        )
    op = OperatorProcess(cluster, "bench", "bench-op", tmp, env)
    op.start()
    op.wait_role("leader", timeout=120)
    rss = Rss(op.proc.pid if op.proc else 0)
    time.sleep(3.0)
    out["rss_mb_started"] = round(rss.now() / 2**20, 1)

    def create_run(ns: str) -> Callable[[str], None]:
        return lambda name: custom.create_namespaced_custom_object(
            GROUP, VERSION, ns, RUNS, run_body(name, ns)
        )

    seen = JobWatch(cluster, "bench")
    ops_before, api_before = prom(op.metrics(), "temper_api_requests_total"), apiserver.counts()
    cpu = CpuShare()
    applied, start = apply_all([f"run-{i:05d}" for i in range(n)], create_run("bench"), threads)
    seen.wait(n, max(300.0, n * 0.5))
    burst = burst_stats(applied, seen.first, start)
    burst["cpu_seconds"] = cpu.seconds()
    seen.stop()
    burst["efficiency"] = round(burst["per_second"] / baseline["per_second"], 3)
    burst["p99_over_baseline_drain"] = round(burst["p99_s"] / baseline["drain_s"], 3)

    def settled(ns: str) -> bool:
        items = custom.list_namespaced_custom_object(GROUP, VERSION, ns, RUNS)["items"]
        return all((i.get("status") or {}).get("phase") == "Running" for i in items)

    deadline = time.monotonic() + 600
    while not settled("bench") and time.monotonic() < deadline:
        time.sleep(2)
    time.sleep(5.0)
    ops_after = prom(op.metrics(), "temper_api_requests_total")
    burst["operator_api_requests_per_run"] = round(
        (
            sum(ops_after.values())
            - sum(ops_before.values())
            - (writes(ops_after, True) - writes(ops_before, True))
        )
        / n,
        2,
    )
    burst["operator_api_requests_by_kind"] = {
        k: int(v) for k, v in sorted(delta(ops_after, ops_before).items())
    }
    burst["apiserver_requests_per_run"] = round(sum((apiserver.counts() - api_before).values()) / n, 2)
    burst["peak_rss_mb"] = round(rss.peak / 2**20, 1)
    out["burst"] = burst

    # 3. steady state
    window = args.steady_seconds
    text0, api0, cpu = op.metrics(), apiserver.counts(), CpuShare()
    time.sleep(window)
    text1, api1 = op.metrics(), apiserver.counts()
    ops0, ops1 = prom(text0, "temper_api_requests_total"), prom(text1, "temper_api_requests_total")
    s3_0, s3_1 = prom(text0, "temper_storage_requests_total"), prom(text1, "temper_storage_requests_total")
    minutes = window / 60.0
    lists = sum(v for (verb, _), v in (api1 - api0).items() if verb == "LIST")
    out["steady"] = {
        "window_s": window,
        "running_runs": n,
        "apiserver_list_calls_per_minute": round(lists / minutes, 2),
        "operator_list_calls_per_minute": round(
            sum(v for k, v in delta(ops1, ops0).items() if 'verb="list"' in k) / minutes, 2
        ),
        "operator_api_writes_per_minute": round((writes(ops1, False) - writes(ops0, False)) / minutes, 2),
        "operator_api_requests_by_kind": {k: int(v) for k, v in sorted(delta(ops1, ops0).items())},
        "lease_writes_per_minute": round((writes(ops1, True) - writes(ops0, True)) / minutes, 2),
        "s3_requests_per_minute_per_running_run": round(
            (sum(s3_1.values()) - sum(s3_0.values())) / minutes / n, 3
        ),
        "rss_mb": round(rss.now() / 2**20, 1),
        "load_average_1m": round(psutil.getloadavg()[0], 2),
        "cpu_seconds": cpu.seconds(),
    }

    # 4. paced at half the baseline's rate
    paced_n = args.paced_runs or max(1, n // 2)
    rate = baseline["per_second"] / 2
    seen = JobWatch(cluster, "bench-paced")
    applied, start = apply_all(
        [f"paced-{i:05d}" for i in range(paced_n)], create_run("bench-paced"), threads, rate
    )
    seen.wait(paced_n, max(300.0, paced_n * 0.5))
    paced = burst_stats(applied, seen.first, start)
    seen.stop()
    out["paced"] = {"runs": paced_n, "rate_per_second": round(rate, 1), **paced}

    # 5. the burst again, S3 black-holed for its first seconds
    seen = JobWatch(cluster, "bench-brownout")
    s3.outage("blackhole")
    timer = threading.Timer(args.brownout_seconds, s3.restore)
    timer.start()
    brown_n = args.brownout_runs or n
    applied, start = apply_all(
        [f"brown-{i:05d}" for i in range(brown_n)], create_run("bench-brownout"), threads
    )
    seen.wait(brown_n, max(300.0, brown_n * 0.5))
    brownout = burst_stats(applied, seen.first, start)
    seen.stop()
    brownout["efficiency"] = round(brownout["per_second"] / baseline["per_second"], 3)
    brownout["p99_vs_burst"] = round(brownout["p99_s"] / burst["p99_s"], 3) if burst["p99_s"] else None
    brownout["outage_s"] = args.brownout_seconds
    timer.join()
    out["brownout"] = brownout
    out["peak_rss_mb"] = round(rss.peak / 2**20, 1)
    out["final_rss_mb"] = round(rss.now() / 2**20, 1)
    out["total_runs_at_end"] = n + paced_n + brown_n
    rss.running = False
    op.stop()


if __name__ == "__main__":
    main()
