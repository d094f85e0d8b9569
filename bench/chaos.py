"""Reliability (chaos) campaign on the hermetic cluster. Prints one JSON object.

    python bench/chaos.py [--runs 20] [--seed 7] [--small] [--json-out report.json]

The operator runs as users run it: ``helm install charts/temper`` from the locally built operator
image, a Deployment pod on the exec node (container mode). Trainer pods run from the trainer image.

Runs: most are SFT -> DPO -> eval on kwok GPU nodes (their adapters are pre-published to S3
where the trainer would put them; the operator still verifies every byte); every
``EXEC_EVERY``-th run (at least one) is SFT -> eval on the exec node with the REAL trainer (tiny
model, checkpoints every ``CHECKPOINT_EVERY`` steps).

Faults, at seeded random moments while the runs advance:
- ``operator_kill``: the operator's process SIGKILLed in its pod; the exec node restarts the
  container (restartPolicy Always), as a kubelet does (several times);
- ``operator_pod_kill``: the operator's pod deleted with no grace; its Deployment brings a new one;
- ``apiserver_restart``: kube-apiserver stopped and started again (once);
- ``s3_outage``: S3 blackholed for a few seconds (a TCP proxy in front of moto; no data lost);
- ``preemption``: an exec trainer pod deleted once its first checkpoint is complete;
- ``publish_crash``: a trainer dies after uploading its files, before the manifest (the
  test-only failpoint ``TEMPER_FAILPOINT=publish-before-manifest`` in ``temper.storage``, passed on
  by an operator started with ``TEMPER_TEST_FAILPOINTS`` from the run's ``temper.dev/test-failpoints``).

Report (goals): ``runs_lost`` 0, ``duplicate_jobs`` 0, ``ready_adapters_corrupt`` 0,
``runs_terminal`` == runs, ``preemption_steps_redone_max`` <= ``checkpoint_interval_steps``,
plus the fault counts actually injected and the wall time. ``--small`` is the CI version
(a handful of runs, one exec run, every fault kind once).
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import re
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from temper.api.contract import StorageConfig  # noqa: E402
from temper.builders.job import FAILPOINTS_ANNOTATION  # noqa: E402
from temper.storage import Storage, StorageError  # noqa: E402
from temper_dev.cluster import Cluster  # noqa: E402
from temper_dev.incluster import HelmOperator, build_images  # noqa: E402
from temper_dev.s3server import FAKE_CREDENTIALS, S3Server  # noqa: E402

from tests.cluster.test_operator_pipeline import Api, pipeline, publish  # noqa: E402
from tests.fixtures.operator import install_crds  # noqa: E402

EXEC = {"nodeSelector": {"kubernetes.io/hostname": "exec-node"}}
EXEC_EVERY = 5
# Long enough (~13 s of training after the first checkpoint, on one idle core) that a preemption
# still lands mid-training when an apiserver restart (~5 s) delays the harness's pod deletion.
TRAIN_STEPS = 96
CHECKPOINT_EVERY = 4
FAULT_KINDS = (
    "operator_kill",
    "operator_pod_kill",
    "apiserver_restart",
    "s3_outage",
    "preemption",
    "publish_crash",
)
FAST_ENV = {
    "TEMPER_LEASE_RENEW_SECONDS": "1",
    "TEMPER_PROGRESS_INTERVAL_SECONDS": "0.5",
    "TEMPER_TRAINER_PROGRESS_INTERVAL_SECONDS": "1",
}
_SIGTERM_AT = re.compile(r"SIGTERM at step (\d+)/")
_RESUMED_AT = re.compile(r"resuming from checkpoint step (\d+)")
_SAVED_AT = re.compile(r"checkpoint saved at step (\d+)")


@dataclass
class Campaign:
    cluster: Cluster
    s3: S3Server
    namespace: str
    work: Path
    model_dir: Path
    runs: int
    seed: int
    small: bool
    timeout: float = 600.0
    rng: random.Random = field(init=False)
    faults: Counter[str] = field(default_factory=Counter)
    exec_runs: list[str] = field(default_factory=list)
    kwok_runs: list[str] = field(default_factory=list)
    preempted: set[str] = field(default_factory=set)
    harness_errors: int = 0
    operator_restarts: int = 0
    s3_outage_seconds: float = 0.0
    _outage_began: float = 0.0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.bucket = self.s3.create_bucket("chaos")
        # The harness reads S3 behind the proxy's back: an outage must not blind the referee.
        self.direct = Storage(
            StorageConfig.model_validate({"endpointUrl": f"http://127.0.0.1:{self.s3.moto_port}"}),
            _client(f"http://127.0.0.1:{self.s3.moto_port}"),
        )

    # setup
    def prepare(self) -> HelmOperator:
        from kubernetes import client

        with self.cluster.api_client() as api:
            core = client.CoreV1Api(api)
            core.create_namespace({"metadata": {"name": self.namespace}})
            deadline = time.monotonic() + 30
            while not core.list_namespaced_service_account(self.namespace).items:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"namespace {self.namespace}: no default ServiceAccount")
                time.sleep(0.05)
            core.create_namespaced_secret(
                self.namespace,
                {
                    "metadata": {"name": "s3-creds"},
                    "stringData": {
                        k: FAKE_CREDENTIALS[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
                    },
                },
            )
        install_crds(self.cluster)
        operator = HelmOperator(
            Path(self.cluster.kubeconfig),
            self.namespace,
            self.cluster.state_dir,
            helm=self.cluster.bin("helm"),
            storage_endpoint=self.s3.endpoint_url,
            # Test mode: the operator passes the runs' temper.dev/test-failpoints on to their pods.
            extra_env={**FAST_ENV, "TEMPER_TEST_FAILPOINTS": "true"},
            # kwok's fake pod durations travel as pod annotations, which the platform must allow.
            extra_values={"policy": {"allowPodAnnotations": True}},
            lease_seconds=5,
        )
        return operator.install(timeout=180)

    def run_names(self) -> list[str]:
        n_exec = 1 if self.small else max(1, self.runs // EXEC_EVERY)
        names = [f"exec-{i}" for i in range(n_exec)] + [f"kwok-{i}" for i in range(self.runs - n_exec)]
        self.exec_runs = [n for n in names if n.startswith("exec-")]
        self.kwok_runs = [n for n in names if n.startswith("kwok-")]
        return names

    def kwok_body(self, name: str) -> dict[str, Any]:
        for stage, kind in (("sft", "sft"), ("align", "dpo")):
            publish(self.s3, self.bucket, name, stage, self.work, kind)
        duration = f"{self.rng.uniform(1.0, 4.0):.1f}s"
        body = pipeline(name, self.bucket, pod_annotations={"temper.dev/fake-duration": duration})
        body["spec"]["storage"]["endpointUrl"] = self.s3.endpoint_url
        return body

    def exec_body(self, name: str, index: int) -> dict[str, Any]:
        hp = {"maxSteps": TRAIN_STEPS, "batchSize": 4, "maxLength": 48}
        retries = {"maxRetries": 4, "backoffSeconds": 1}
        stages: list[dict[str, Any]] = [
            {
                "name": "sft",
                "type": "sft",
                "data": {"train": ["tickets"]},
                "hyperparameters": hp,
                "resources": EXEC,
                "checkpoint": {"everySteps": CHECKPOINT_EVERY},
                "retries": retries,
            },
            {
                "name": "check",
                "type": "eval",
                "from": "sft",
                "hyperparameters": {"maxNewTokens": 8},  # eval stages take only generation settings
                "resources": EXEC,
                "retries": retries,
                "suites": [{"name": "arith", "dataset": "heldout", "metric": "exact_match"}],
            },
        ]
        body = pipeline(name, self.bucket, stages=stages)
        body["spec"]["storage"]["endpointUrl"] = self.s3.endpoint_url
        # The image's baked tiny model: no model cache to share.
        if index % 2 == 0:  # every other exec run also crashes mid-publish (attempts 1-2 may)
            points = {
                "TEMPER_FAILPOINT": "publish-before-manifest",
                "TEMPER_FAILPOINT_ATTEMPTS": "1,2",
                "TEMPER_FAILPOINT_MATCH": "/sft/",
            }
            body["metadata"].setdefault("annotations", {})[FAILPOINTS_ANNOTATION] = json.dumps(points)
        return body

    # faults
    def schedule(self, horizon: float) -> list[tuple[float, str]]:
        kills = 2 if self.small else 6
        outages = 1 if self.small else 3
        plan = [(self.rng.uniform(0.1, 0.8) * horizon, "operator_kill") for _ in range(kills)]
        plan += [(self.rng.uniform(0.3, 0.7) * horizon, "operator_pod_kill")]
        plan += [(self.rng.uniform(0.2, 0.6) * horizon, "apiserver_restart")]
        for _ in range(outages):
            begin = self.rng.uniform(0.1, 0.7) * horizon
            plan += [(begin, "s3_outage"), (begin + self.rng.uniform(3.0, 6.0), "s3_restore")]
        return sorted(plan)

    def inject(self, kind: str, operator: HelmOperator) -> None:
        if kind == "operator_kill":
            _background(operator.kill_process)
        elif kind == "operator_pod_kill":
            _background(lambda: _say(f"deleted operator pod {operator.kill_pod() or '(none running)'}"))
        elif kind == "apiserver_restart":
            # In the background: the other faults keep their moments while it restarts.
            threading.Thread(target=self.cluster.restart, args=("kube-apiserver",), daemon=True).start()
        elif kind == "s3_outage":
            self.s3.outage("blackhole")
            self._outage_began = self._outage_began or time.monotonic()
        elif kind == "s3_restore":
            self.s3.restore()  # overlapping outages end at the first restore; counted as begun
            if self._outage_began:
                self.s3_outage_seconds += time.monotonic() - self._outage_began
                self._outage_began = 0.0
            return
        self.faults[kind] += 1

    def maybe_preempt(self, api: Api) -> None:
        """Delete an exec run's SFT pod once its first checkpoint is complete (mid-stage)."""
        for run in self.exec_runs:
            if run in self.preempted:
                continue
            keys = self.direct.list_keys(f"s3://{self.bucket}/runs/{run}/g1/sft/checkpoints/")
            if not any(k.endswith("/COMPLETE") for k in keys):
                continue
            listing = api.core.list_namespaced_pod(
                api.ns, label_selector=f"temper.dev/run={run}", _request_timeout=10
            )
            pods = [
                p
                for p in listing.items
                if p.metadata.labels.get("temper.dev/stage") == "sft" and p.status.phase == "Running"
            ]
            if not pods or not self.still_training(pods[0].metadata.name):
                continue
            api.core.delete_namespaced_pod(pods[0].metadata.name, api.ns)  # default grace: SIGTERM
            self.preempted.add(run)
            _say(f"preempted {pods[0].metadata.name}")
            self.faults["preemption"] += 1

    def still_training(self, pod: str) -> bool:
        """The pod's own log: its trainer is mid-training, with at least one step left to redo.

        (The apiserver may still say Running after the trainer finished, or died in publish.)
        """
        text = "".join(
            _read_logs(d) for d in (self.cluster.state_dir / "pods" / self.namespace / pod).glob("*/")
        )
        step = _last(_SAVED_AT, text) or _last(_RESUMED_AT, text)  # it trains, past its handlers
        return step is not None and "failpoint" not in text and step < TRAIN_STEPS - CHECKPOINT_EVERY

    # the campaign
    def execute(self) -> dict[str, Any]:
        started = time.monotonic()
        operator = self.prepare()
        api = Api(self.cluster, self.namespace)
        names = self.run_names()
        for name in names:
            body = (
                self.exec_body(name, self.exec_runs.index(name))
                if name in self.exec_runs
                else self.kwok_body(name)
            )
            api.create_run(body)
        horizon = 40.0 if self.small else 120.0
        plan = self.schedule(horizon)
        t0 = time.monotonic()
        deadline = t0 + self.timeout
        terminal: dict[str, str] = {}
        last_note = -1
        while time.monotonic() < deadline:
            now = time.monotonic() - t0
            while plan and plan[0][0] <= now:
                kind = plan.pop(0)[1]
                _say(f"t={now:5.1f}s inject {kind}")
                self.inject(kind, operator)
            for probe in ("preempt", "terminal"):
                try:
                    if probe == "preempt":
                        self.maybe_preempt(api)
                    else:
                        terminal.update(self.terminal_states(api))
                except Exception as exc:  # the apiserver may be down this instant
                    self.harness_errors += 1
                    _say(f"t={now:5.1f}s harness probe failed: {type(exc).__name__}: {str(exc)[:160]}")
            if len(terminal) == len(names) and not plan:
                break
            if int(now) % 15 == 0 and int(now) != last_note:
                last_note = int(now)
                _say(f"t={now:5.1f}s {len(terminal)}/{len(names)} runs terminal")
            time.sleep(0.3)
        self.faults["publish_crash"] = self.count_publish_crashes()
        try:
            # Kills and self-exits (it exits by design when it cannot renew its Lease) alike.
            self.operator_restarts = operator.restarts()
            report = self.report(api, names, terminal)
        finally:
            operator.uninstall()
        report["wall_seconds"] = round(time.monotonic() - started, 1)
        return report

    def count_publish_crashes(self) -> int:
        pods_root = self.cluster.state_dir / "pods" / self.namespace
        return sum("failpoint publish-before-manifest" in _read_logs(d) for d in pods_root.glob("*/*"))

    def terminal_states(self, api: Api) -> dict[str, str]:
        out = {}
        runs = api.custom.list_namespaced_custom_object(
            "temper.dev", "v1alpha1", api.ns, "posttrainingruns", _request_timeout=10
        )
        for run in runs["items"]:
            for condition in (run.get("status") or {}).get("conditions") or []:
                if condition["type"] in ("Succeeded", "Failed") and condition["status"] == "True":
                    out[run["metadata"]["name"]] = condition["type"]
        return out

    # the referee
    def report(self, api: Api, names: list[str], terminal: dict[str, str]) -> dict[str, Any]:
        from kubernetes.client.exceptions import ApiException

        lost = 0
        stage_attempts: dict[tuple[str, str], int] = {}
        run_uids: dict[str, str] = {}
        for name in names:
            try:
                run = api.run(name)
            except ApiException as exc:
                if exc.status != 404:
                    raise
                lost += 1
                continue
            run_uids[name] = run["metadata"]["uid"]
            for stage in (run.get("status") or {}).get("stages") or []:
                stage_attempts[(name, stage["name"])] = int(stage.get("attempts") or 0)
        jobs = api.batch.list_namespaced_job(api.ns, label_selector="temper.dev/run").items
        per_key: Counter[tuple[str, str, str | None, str | None]] = Counter()
        per_stage: Counter[tuple[str, str]] = Counter()
        foreign_owner = 0
        for job in jobs:
            labels = job.metadata.labels
            run, stage = labels["temper.dev/run"], labels["temper.dev/stage"]
            per_key[(run, stage, labels.get("temper.dev/cycle"), labels.get("temper.dev/attempt"))] += 1
            per_stage[(run, stage)] += 1
            owners = [o.uid for o in job.metadata.owner_references or []]
            if owners != [run_uids.get(run)]:
                foreign_owner += 1
        duplicates = sum(n - 1 for n in per_key.values() if n > 1)
        # More Jobs than the attempts the run's status admits is a duplicate too.
        duplicates += sum(max(0, n - stage_attempts.get(k, 0)) for k, n in per_stage.items())
        ready, corrupt, problems = self.verify_adapters(api)
        redone = self.preemption_redone(names)
        succeeded = sum(1 for s in terminal.values() if s == "Succeeded")
        return {
            "seed": self.seed,
            "small": self.small,
            "runs": len(names),
            "exec_runs": len(self.exec_runs),
            "kwok_runs": len(self.kwok_runs),
            "runs_lost": lost,
            "runs_terminal": len(terminal),
            "runs_succeeded": succeeded,
            "runs_not_terminal": sorted(set(names) - set(terminal)),
            "jobs": len(jobs),
            "duplicate_jobs": duplicates,
            "jobs_with_wrong_owner": foreign_owner,
            "ready_adapters": ready,
            "ready_adapters_corrupt": corrupt,
            "adapter_problems": problems[:10],
            "checkpoint_interval_steps": CHECKPOINT_EVERY,
            "preemption_steps_redone": redone["preemption"],
            "preemption_steps_redone_max": max(redone["preemption"], default=0),
            "crash_steps_redone": redone["crash"],
            "faults": {k: self.faults.get(k, 0) for k in FAULT_KINDS},
            "s3_outage_seconds": round(self.s3_outage_seconds, 1),
            "operator_container_restarts": self.operator_restarts,
            "harness_api_errors": self.harness_errors,
        }

    def verify_adapters(self, api: Api) -> tuple[int, int, list[str]]:
        ready = corrupt = 0
        problems: list[str] = []
        for adapter in api.adapters():
            conditions = (adapter.get("status") or {}).get("conditions") or []
            if not any(c["type"] == "Ready" and c["status"] == "True" for c in conditions):
                continue
            ready += 1
            verified = adapter["status"].get("artifact") or {}
            uri = str((adapter["spec"].get("artifact") or {}).get("uri"))
            try:
                result = self.direct.verify_manifest(uri)
            except (ValueError, StorageError) as exc:
                corrupt += 1
                problems.append(f"{adapter['metadata']['name']}: {exc}")
                continue
            if not result.ok or result.manifest_sha256 != verified.get("sha256"):
                corrupt += 1
                problems.append(f"{adapter['metadata']['name']}: {result.problems or 'sha256 differs'}")
        return ready, corrupt, problems

    def preemption_redone(self, names: list[str]) -> dict[str, list[int]]:
        """Steps trained twice, from the trainer's own records in each pod incarnation's log.

        A preempted pod logs the step it stopped at (``SIGTERM at step N``); the next pod of
        the stage logs the checkpoint it resumed from. A pod that died in publish had trained
        every step; the next resumes from the last periodic checkpoint.
        """
        out: dict[str, list[int]] = {"preemption": [], "crash": []}
        pods_root = self.cluster.state_dir / "pods" / self.namespace
        for run in self.exec_runs:
            incarnations = sorted(
                (d for pod in pods_root.glob(f"{run}-sft-*") for d in pod.iterdir() if d.is_dir()),
                key=lambda d: d.stat().st_mtime_ns,
            )
            logs = [_read_logs(d) for d in incarnations]
            for before, after in itertools.pairwise(logs):
                resumed = _last(_RESUMED_AT, after)
                if resumed is None:
                    continue
                stopped = _last(_SIGTERM_AT, before)
                if stopped is not None:
                    out["preemption"].append(stopped - resumed)
                elif "failpoint publish-before-manifest" in before:
                    out["crash"].append(TRAIN_STEPS - resumed)
        return out


def _background(action: Callable[[], object], timeout: float = 60.0) -> None:
    """Run a fault in a thread, retried while the apiserver is down (it may be restarting)."""

    def attempt() -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                action()
                return
            except Exception as exc:
                if time.monotonic() > deadline:
                    _say(f"fault gave up: {type(exc).__name__}: {str(exc)[:160]}")
                    return
                time.sleep(0.5)

    threading.Thread(target=attempt, daemon=True).start()


def _say(text: str) -> None:
    print(f"chaos: {text}", file=sys.stderr, flush=True)


def _read_logs(pod_dir: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted((pod_dir / "logs").glob("*.log")))


def _last(pattern: re.Pattern[str], text: str) -> int | None:
    found = pattern.findall(text)
    return int(found[-1]) if found else None


def _client(endpoint: str) -> Any:
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=FAKE_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    )


def run_campaign(
    cluster: Cluster, work: Path, model_dir: Path, *, runs: int, seed: int, small: bool
) -> dict[str, Any]:
    with S3Server(outages=True) as s3:
        campaign = Campaign(
            cluster, s3, f"chaos-{seed}-{int(time.time()) % 100000}", work, model_dir, runs, seed, small
        )
        # Containers add a start per pod, and a shared 2-core machine can be slow: room, not a goal.
        campaign.timeout = 480.0 if small else 1200.0
        try:
            return campaign.execute()
        finally:
            cluster.kubectl("delete", "namespace", campaign.namespace, "--wait=false", check=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--small", action="store_true", help="CI size: 6 runs, 1 exec run, each fault once")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    # Clean up (cluster, operator, S3) on SIGTERM too, not only on Ctrl-C.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    runs = 6 if args.small else args.runs
    from temper_trainer.tinymodel import ensure_tiny_model

    model_dir = ensure_tiny_model().parent
    with tempfile.TemporaryDirectory(prefix="temper-chaos-") as tmp:
        build_images(Path(tmp) / "build-images.log")
        cluster = Cluster(state_dir=Path(tmp) / "cluster", runtime="container")
        cluster.up(timeout=120)
        try:
            report = run_campaign(cluster, Path(tmp), model_dir, runs=runs, seed=args.seed, small=args.small)
        finally:
            cluster.down()
    text = json.dumps(report, indent=2)
    print(text)
    if args.json_out:
        args.json_out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
