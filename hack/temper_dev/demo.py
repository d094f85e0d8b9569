"""The README's main command: a real post-training pipeline on the embedded hermetic cluster.

    python -m temper_dev.demo            # run the quickstart, then stop what it started
    python -m temper_dev.demo --keep     # leave cluster, S3 and operator running; print KUBECONFIG
    python -m temper_dev.demo --down     # stop everything a --keep run left behind

Steps: the Go-built control plane (built once into ~/.cache/temper, with a progress display),
the two images (``hack/build-images.sh``, a no-op when current), the hermetic cluster (reused when
already up) whose exec node runs pods as containers, a moto S3 server on 127.0.0.1, the bucket and
the credentials Secret, the CRDs, ``helm install charts/temper`` (the operator in its pod, from the
operator image), then ``kubectl apply -f examples/quickstart.yaml`` (SFT -> DPO -> eval on
``builtin://tiny``) whose trainer pods run from the trainer image. It waits with live progress and
ends with ``kubectl get ptr,adp``, the adapter locations, the eval numbers and the operator's
/metrics URL. Any failure exits non-zero with a message that says which step failed and where its
log is.

The pieces (``prepare_namespace``, ``wait_for_run``, ...) are reused by the e2e tests.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import yaml

from temper_dev.incluster import OPERATOR_IMAGE, TRAINER_IMAGE, HelmOperator, InClusterError, build_images

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "examples" / "quickstart.yaml"
CRDS = REPO / "crds"
STATE_DIR = Path(os.environ.get("TEMPER_DEMO_DIR") or Path.home() / ".cache" / "temper" / "demo")
NAMESPACE = "temper-demo"
OPERATOR_NAMESPACE = "temper-system"
BUCKET = "temper-demo"
EXEC_POOL = {"temper.dev/node-pool": "exec"}
UNSCHEDULABLE_GRACE_SECONDS = 30.0
GROUP, VERSION = "temper.dev", "v1alpha1"
RUNS, ADAPTERS = "posttrainingruns", "adapters"


class DemoError(RuntimeError):
    """A step failed; the message says which one and what to look at."""


# -- small utilities --------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    """Status and body; (0, reason) when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status), resp.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode(errors="replace")
    except OSError as exc:
        return 0, str(exc)


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise DemoError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def fmt_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class Display:
    """Step lines plus one live status line: redrawn in place on a terminal, throttled otherwise."""

    def __init__(self, out: TextIO = sys.stdout) -> None:
        self.out = out
        self.tty = out.isatty()
        self._live = ""
        self._last_plain = 0.0
        self._lock = threading.Lock()

    def line(self, text: str) -> None:
        with self._lock:
            self._clear()
            print(text, file=self.out, flush=True)

    def live(self, text: str) -> None:
        with self._lock:
            if self.tty:
                width = shutil.get_terminal_size((100, 20)).columns - 1
                self._clear()
                self._live = text[:width]
                self.out.write(self._live)
                self.out.flush()
            elif text != self._live and time.monotonic() - self._last_plain >= 10:
                # Logs and CI: one line every 10 s at most, so they stay readable.
                self._live = text
                self._last_plain = time.monotonic()
                print(f"  .. {text}", file=self.out, flush=True)

    def _clear(self) -> None:
        if self.tty and self._live:
            self.out.write("\r" + " " * len(self._live) + "\r")
            self._live = ""

    @contextlib.contextmanager
    def step(self, title: str, detail: Callable[[], str] | None = None) -> Iterator[None]:
        """Runs a step with a spinner and elapsed time; prints ok/FAILED with its duration."""
        start = time.monotonic()
        stop = threading.Event()

        def spin() -> None:
            frames = "|/-\\"
            i = 0
            while not stop.wait(0.2):
                extra = detail() if detail else ""
                elapsed = fmt_duration(time.monotonic() - start)
                self.live(f"{frames[i % 4]} {title} {elapsed}" + (f"  {extra}" if extra else ""))
                i += 1

        spinner = threading.Thread(target=spin, daemon=True)
        spinner.start()
        try:
            yield
        except BaseException:
            stop.set()
            spinner.join()
            self.line(f"FAILED {title} ({fmt_duration(time.monotonic() - start)})")
            raise
        stop.set()
        spinner.join()
        self.line(f"ok  {title} ({time.monotonic() - start:.1f}s)")


# -- kubernetes helpers ---------------------------------------------------------------------------
@dataclass
class Kube:
    """The API clients for one kubeconfig, plus kubectl for what users would type themselves."""

    kubeconfig: Path
    kubectl_bin: str = "kubectl"

    def __post_init__(self) -> None:
        from kubernetes import client, config

        api = config.new_client_from_config(config_file=str(self.kubeconfig))
        self.api_client = api
        self.core = client.CoreV1Api(api)
        self.batch = client.BatchV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.ext = client.ApiextensionsV1Api(api)

    def kubectl(self, *args: str, check: bool = True, timeout: float = 120) -> str:
        proc = subprocess.run(
            [self.kubectl_bin, "--kubeconfig", str(self.kubeconfig), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise DemoError(f"kubectl {' '.join(args)} failed: {proc.stderr.strip() or proc.stdout.strip()}")
        return proc.stdout

    def get_run(self, namespace: str, name: str) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            obj = self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, RUNS, name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return dict(obj)

    def list_adapters(self, namespace: str, run: str | None = None) -> list[dict[str, Any]]:
        selector = f"temper.dev/run={run}" if run else ""
        items = self.custom.list_namespaced_custom_object(
            GROUP, VERSION, namespace, ADAPTERS, label_selector=selector
        )["items"]
        return [dict(i) for i in items]


def condition(obj: Mapping[str, Any] | None, kind: str) -> dict[str, Any] | None:
    for cond in ((obj or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind:
            return dict(cond)
    return None


def is_true(obj: Mapping[str, Any] | None, kind: str) -> bool:
    cond = condition(obj, kind)
    return bool(cond and cond.get("status") == "True")


def run_terminal(run: Mapping[str, Any] | None) -> str | None:
    """'Succeeded', 'Failed' or None while the run is still going."""
    if is_true(run, "Succeeded"):
        return "Succeeded"
    if is_true(run, "Failed"):
        return "Failed"
    return None


def install_crds(kube: Kube) -> list[str]:
    """Server-side apply of crds/*.yaml, then wait until every CRD is Established."""
    files = sorted(CRDS.glob("*.yaml"))
    if not files:
        raise DemoError(f"no CRDs in {CRDS}; run `make crds`")
    names = [yaml.safe_load(f.read_text())["metadata"]["name"] for f in files]
    kube.kubectl(
        "apply",
        "--server-side",
        "--force-conflicts",
        "--field-manager=temper-demo",
        *[a for f in files for a in ("-f", str(f))],
    )

    def established() -> bool:
        for name in names:
            crd = kube.ext.read_custom_resource_definition(name)
            conds = {c.type: c.status for c in (crd.status.conditions or [])}
            if conds.get("Established") != "True":
                return False
        return True

    wait_until(established, 60, "the CRDs to be Established")
    return names


def s3_secret_data(s3_env: Mapping[str, str]) -> dict[str, str]:
    """The keys the operator maps into trainer pods through secretKeyRef."""
    return {k: s3_env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}


def prepare_namespace(kube: Kube, namespace: str, secret_name: str, s3_env: Mapping[str, str]) -> None:
    """The namespace and the credentials Secret (replaced, so a reused cluster gets fresh keys)."""
    from kubernetes.client.exceptions import ApiException

    try:
        kube.core.create_namespace({"metadata": {"name": namespace, "labels": {"temper.dev/demo": "true"}}})
    except ApiException as exc:
        if exc.status != 409:
            raise
    body = {
        "metadata": {"name": secret_name, "namespace": namespace},
        "type": "Opaque",
        "stringData": s3_secret_data(s3_env),
    }
    try:
        kube.core.create_namespaced_secret(namespace, body)
    except ApiException as exc:
        if exc.status != 409:
            raise
        kube.core.replace_namespaced_secret(secret_name, namespace, body)


def load_manifest(path: Path) -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    runs = [d for d in docs if d.get("kind") == "PostTrainingRun"]
    if len(runs) != 1:
        raise DemoError(f"{path}: expected exactly one PostTrainingRun, found {len(runs)}")
    return dict(runs[0])


def pin_to_exec_node(run: dict[str, Any]) -> dict[str, Any]:
    """Every stage on the exec node, the one node whose pods really run the trainer.

    Done here rather than in the example, which must stay valid on a real cluster."""
    for stage in run["spec"]["stages"]:
        resources = stage.setdefault("resources", {})
        resources.setdefault("nodeSelector", {}).update(EXEC_POOL)
        resources["gpus"] = 0  # it trains on CPU; the node's fake GPUs stay free for GPU-shaped tests
    return run


EXAMPLES_BUCKET = "temper"  # the bucket every example names: s3://temper/...
HERMETIC_STEPS = 2
HERMETIC_EVAL_EXAMPLES = 8
HERMETIC_MAX_LENGTH = 64


def _rebucket(value: Any, bucket: str) -> Any:
    """Every ``s3://temper/...`` string under ``value``, moved to ``s3://<bucket>/...``."""
    if isinstance(value, dict):
        return {k: _rebucket(v, bucket) for k, v in value.items()}
    if isinstance(value, list):
        return [_rebucket(v, bucket) for v in value]
    if isinstance(value, str) and value.startswith(f"s3://{EXAMPLES_BUCKET}/"):
        return f"s3://{bucket}/" + value.removeprefix(f"s3://{EXAMPLES_BUCKET}/")
    return value


def _small_eval_set(uri: str) -> str:
    """A held-out ``builtin://`` set cut to a few examples: each is a generation or a forward pass
    at the end of a stage. Training sets stay whole: the steps bound their cost, and a teacher
    (synthetic-preferences) needs enough prompts to find pairs that differ."""
    from urllib.parse import parse_qsl, urlencode, urlsplit

    parts = urlsplit(uri)
    query = dict(parse_qsl(parts.query))
    if query.get("split") != "eval":
        return uri
    query["n"] = str(min(int(query.get("n", HERMETIC_EVAL_EXAMPLES)), HERMETIC_EVAL_EXAMPLES))
    return f"{parts.scheme}://{parts.netloc}{parts.path}?{urlencode(query)}"


def _shrink_stage(stage: dict[str, Any]) -> None:
    """A few optimizer steps; the method, data, rewards and stage type stay the example's."""
    params = stage.get("hyperparameters")
    if params is not None:
        params.pop("epochs", None)
        params["maxSteps"] = min(int(params.get("maxSteps", HERMETIC_STEPS)), HERMETIC_STEPS)
        if "gradientAccumulationSteps" in params:
            params["gradientAccumulationSteps"] = min(int(params["gradientAccumulationSteps"]), 2)
        if "maxLength" in params:
            params["maxLength"] = min(int(params["maxLength"]), HERMETIC_MAX_LENGTH)
    if stage.get("checkpoint", {}).get("everySteps"):
        stage["checkpoint"]["everySteps"] = 1  # still written (and kept) within the few steps
    resources = stage.setdefault("resources", {})
    for key in ("cpu", "memory", "tolerations"):
        resources.pop(key, None)  # the chart's trainer.resources size pods for the 2-core node
    selector = resources.get("nodeSelector") or {}
    resources["nodeSelector"] = {k: v for k, v in selector.items() if not k.startswith("nvidia.com/")}


def for_hermetic_cluster(doc: dict[str, Any], *, namespace: str, bucket: str) -> dict[str, Any]:
    """An example (PostTrainingRun or Adapter) as it runs on the 2-core hermetic cluster.

    The example stays what it is on a real cluster (method, stage types, data, rewards, gates,
    continual settings); only where it runs and how long changes: ``namespace``, its
    ``s3://temper/`` locations moved to ``bucket``, every stage on the exec node on CPU (no GPU
    selector or toleration, no per-stage cpu/memory: the chart's trainer requests size the pods),
    no Kueue queue (the hermetic cluster runs none), a few steps, small built-in eval sets."""
    out: dict[str, Any] = _rebucket(copy.deepcopy(doc), bucket)
    out["metadata"]["namespace"] = namespace
    if out.get("kind") != "PostTrainingRun":
        return out
    spec = out["spec"]
    spec.pop("queueName", None)
    for dataset in spec.get("datasets") or []:
        if str(dataset.get("uri", "")).startswith("builtin://"):
            dataset["uri"] = _small_eval_set(dataset["uri"])
    pin_to_exec_node(out)
    for stage in spec["stages"]:
        _shrink_stage(stage)
    return out


def delete_run_and_adapters(kube: Kube, namespace: str, name: str, timeout: float = 60) -> None:
    """Removes an earlier demo's run and its adapters so a reused cluster starts clean."""
    from kubernetes.client.exceptions import ApiException

    with contextlib.suppress(ApiException):
        kube.custom.delete_namespaced_custom_object(
            GROUP, VERSION, namespace, RUNS, name, body={"propagationPolicy": "Foreground"}
        )
    for adapter in kube.list_adapters(namespace, name):
        with contextlib.suppress(ApiException):
            kube.custom.delete_namespaced_custom_object(
                GROUP, VERSION, namespace, ADAPTERS, adapter["metadata"]["name"]
            )
    wait_until(
        lambda: kube.get_run(namespace, name) is None and not kube.list_adapters(namespace, name),
        timeout,
        f"the previous run {namespace}/{name} and its adapters to be deleted",
    )


def progress_line(run: Mapping[str, Any]) -> str:
    """One line from the run's status: stage, %, step, loss, ETA."""
    status = run.get("status") or {}
    prog = status.get("progress") or {}
    stages = status.get("stages") or []
    done = sum(1 for s in stages if s.get("state") == "Succeeded")
    parts = [f"stages {done}/{len(run['spec']['stages'])}"]
    if prog.get("stage"):
        parts.append(f"[{prog['stage']}]")
    if prog.get("percent") is not None:
        parts.append(f"{float(prog['percent']):5.1f}%")
    if prog.get("totalSteps"):
        parts.append(f"step {prog.get('step', 0)}/{prog['totalSteps']}")
    if prog.get("loss") is not None:
        parts.append(f"loss {float(prog['loss']):.3f}")
    if prog.get("etaSeconds") is not None:
        parts.append(f"ETA {fmt_duration(float(prog['etaSeconds']))}")
    running = [s for s in stages if s.get("state") == "Running"]
    if running and not prog.get("stage"):
        parts.append(f"[{running[0]['name']}] attempt {running[0].get('attempts', 1)}")
    return " ".join(parts)


def wait_for_run(
    kube: Kube,
    namespace: str,
    name: str,
    timeout: float,
    *,
    on_update: Callable[[dict[str, Any]], None] | None = None,
    healthy: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Polls the run until Succeeded or Failed; returns it. Prints each stage transition."""
    deadline = time.monotonic() + timeout
    last: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        run = kube.get_run(namespace, name)
        if run is None:
            raise DemoError(f"PostTrainingRun {namespace}/{name} disappeared")
        last = run
        if on_update:
            on_update(run)
        if run_terminal(run):
            return run
        if healthy is not None and not healthy():
            raise DemoError("the operator stopped while the run was in progress")
        stuck = unschedulable_pod(kube, namespace, name)
        if stuck:
            raise DemoError(stuck)
        time.sleep(1.0)
    state = progress_line(last) if last else "never seen"
    raise DemoError(f"PostTrainingRun {namespace}/{name} did not finish within {timeout:.0f}s ({state})")


def unschedulable_pod(kube: Kube, namespace: str, run: str) -> str | None:
    """A message when one of the run's pods has been unschedulable for a while; else None."""
    from datetime import UTC, datetime

    for pod in kube.core.list_namespaced_pod(namespace, label_selector=f"temper.dev/run={run}").items:
        for cond in pod.status.conditions or []:
            if cond.type == "PodScheduled" and cond.status == "False" and cond.reason == "Unschedulable":
                waited = (datetime.now(UTC) - cond.last_transition_time).total_seconds()
                if waited > UNSCHEDULABLE_GRACE_SECONDS:
                    return f"pod {namespace}/{pod.metadata.name} cannot be scheduled: {cond.message}"
    return None


def failure_reason(run: Mapping[str, Any]) -> str:
    cond = condition(run, "Failed") or condition(run, "Succeeded") or {}
    lines = [f"{cond.get('reason', '?')}: {cond.get('message', '')}"]
    for stage in (run.get("status") or {}).get("stages") or []:
        if stage.get("state") == "Failed":
            lines.append(f"  stage {stage['name']}: {stage.get('message', '')}")
    return "\n".join(lines)


# -- tools, cluster and S3 --------------------------------------------------------------------------
K8S_VERSION = "v1.36.3"
TOOLS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl", "kwok", "helm")


def tools_dir() -> Path:
    cache = Path(os.environ.get("TEMPER_CACHE") or Path.home() / ".cache" / "temper")
    return Path(os.environ.get("TEMPER_BIN") or cache / f"k8s-{K8S_VERSION}" / "bin")


def ensure_tools(display: Display) -> Path:
    """Builds the control plane from the Go module proxy once (tens of minutes cold), else no-op."""
    bin_dir = tools_dir()
    missing = [t for t in TOOLS if not (bin_dir / t).is_file()]
    if not missing:
        return bin_dir
    log_path = STATE_DIR / "build-tools.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    display.line(f"building {', '.join(missing)} from the Go module proxy (first time only); log {log_path}")
    with (
        log_path.open("w") as log,
        display.step("building the control plane", lambda: tail(log_path, 1)[-70:]),
    ):
        proc = subprocess.run(
            ["bash", str(REPO / "hack" / "build-tools.sh")], stdout=log, stderr=log, cwd=REPO, check=False
        )
        if proc.returncode != 0:
            raise DemoError(
                f"hack/build-tools.sh failed (rc={proc.returncode}); log {log_path}:\n" + tail(log_path)
            )
    return bin_dir


@dataclass
class S3Process:
    """moto's S3 server on 127.0.0.1 in its own session, so ``--keep`` can leave it running."""

    port: int
    pid: int

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    def start(cls, log_path: Path, timeout: float = 30.0) -> S3Process:
        port = free_port()
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "temper_dev.s3server", "--port", str(port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        server = cls(port, proc.pid)

        def up() -> bool:
            if proc.poll() is not None:
                raise DemoError(
                    f"the S3 server exited (rc={proc.returncode}); log {log_path}:\n" + tail(log_path)
                )
            return http_get(server.endpoint_url + "/moto-api/", 1.0)[0] == 200

        wait_until(up, timeout, f"the S3 server on {server.endpoint_url}")
        return server

    def alive(self) -> bool:
        return pid_alive(self.pid) and http_get(self.endpoint_url + "/moto-api/", 1.0)[0] == 200

    def stop(self) -> None:
        stop_pid(self.pid)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_pid(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``; only ever called with pids this module started."""
    if not pid_alive(pid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        if not pid_alive(pid):
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def s3_client(endpoint_url: str) -> Any:
    from temper.api.contract import StorageConfig
    from temper.storage import Credentials, make_client

    from temper_dev.s3server import FAKE_CREDENTIALS

    creds = Credentials(FAKE_CREDENTIALS["AWS_ACCESS_KEY_ID"], FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"])
    return make_client(StorageConfig(endpoint_url=endpoint_url), creds)


def storage_for(endpoint_url: str) -> Any:
    from temper.api.contract import StorageConfig
    from temper.storage import Storage

    return Storage(StorageConfig(endpoint_url=endpoint_url), s3_client(endpoint_url))


def ensure_bucket(endpoint_url: str, bucket: str) -> None:
    from botocore.exceptions import ClientError

    client = s3_client(endpoint_url)
    try:
        client.create_bucket(Bucket=bucket)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in (
            "BucketAlreadyOwnedByYou",
            "BucketAlreadyExists",
        ):
            raise


class DemoCluster:
    """The hermetic cluster in its default state dir: reused when already up, else started."""

    def __init__(self, display: Display) -> None:
        from temper_dev.cluster import Cluster

        self.display = display
        self.cluster = Cluster(runtime="container")
        self.reused = False

    def detail(self) -> str:
        return "reusing" if self.reused else ""

    def up(self, timeout: float = 120.0) -> Path:
        from temper_dev.cluster import ClusterError

        status = self.cluster.status()
        self.reused = bool(status["ready"]) and all(c["alive"] for c in status["components"].values())
        try:
            self.cluster.up(timeout=timeout)
        except ClusterError as exc:
            raise DemoError(f"the hermetic cluster did not start: {exc}") from None
        return Path(self.cluster.kubeconfig)

    def down(self) -> None:
        self.cluster.down()

    @staticmethod
    def node_summary(kube: Kube) -> list[str]:
        out = []
        for node in kube.core.list_node().items:
            gpus = (node.status.allocatable or {}).get("nvidia.com/gpu")
            pool = (node.metadata.labels or {}).get("temper.dev/node-pool", "")
            out.append(f"{node.metadata.name} ({pool}{f', {gpus} GPUs' if gpus else ''})")
        return out


# -- state shared between `demo --keep` and `demo --down` ----------------------------------------------
def state_path() -> Path:
    return STATE_DIR / "state.json"


def read_state() -> dict[str, Any]:
    try:
        return dict(json.loads(state_path().read_text()))
    except (OSError, ValueError):
        return {}


def write_state(state: Mapping[str, Any]) -> None:
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    state_path().write_text(json.dumps(state, indent=2))


# -- the summary -------------------------------------------------------------------------------------
def adapter_rows(kube: Kube, namespace: str, run: str) -> list[dict[str, Any]]:
    rows = []
    for adapter in sorted(kube.list_adapters(namespace, run), key=lambda a: a["metadata"]["name"]):
        status = adapter.get("status") or {}
        rows.append(
            {
                "name": adapter["metadata"]["name"],
                "stage": (adapter["metadata"].get("labels") or {}).get("temper.dev/stage", ""),
                "ready": is_true(adapter, "Ready"),
                "uri": ((adapter.get("spec") or {}).get("artifact") or {}).get("uri", ""),
                "sha256": (status.get("artifact") or {}).get("sha256", ""),
                "evals": status.get("evals") or {},
            }
        )
    return rows


def eval_numbers(run: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Per stage, the metrics its trainer reported (eval suites, held-out loss, train loss)."""
    out: dict[str, dict[str, float]] = {}
    for stage in (run.get("status") or {}).get("stages") or []:
        metrics = stage.get("metrics") or {}
        if metrics:
            out[stage["name"]] = {k: float(v) for k, v in sorted(metrics.items())}
    return out


def print_summary(
    display: Display, kube: Kube, namespace: str, run: Mapping[str, Any], metrics_url: str | None
) -> None:
    name = run["metadata"]["name"]
    display.line("")
    display.line(f"$ kubectl get ptr,adp -n {namespace}")
    display.line(kube.kubectl("get", "ptr,adp", "-n", namespace).rstrip())
    display.line("")
    display.line("Adapters (verified artifacts in S3):")
    for row in adapter_rows(kube, namespace, name):
        flag = "Ready" if row["ready"] else "NOT READY"
        display.line(f"  {row['name']:<28} {flag:<9} {row['uri']}  sha256 {row['sha256'][:12]}")
    display.line("")
    display.line("Eval numbers:")
    for stage, metrics in eval_numbers(run).items():
        shown = {
            k: v for k, v in metrics.items() if "eval" in k or "suite" in k or k.endswith("accuracy")
        } or metrics
        text = ", ".join(f"{k}={v:.4g}" for k, v in shown.items())
        display.line(f"  {stage:<10} {text}")
    for stage in (run.get("status") or {}).get("stages") or []:
        if (stage.get("message") or "").startswith("regression gate"):
            display.line(f"  {stage['name']:<10} {stage['message']}")
    for row in adapter_rows(kube, namespace, name):
        for suite, result in row["evals"].items():
            display.line(
                f"  {row['name']}.status.evals.{suite}: {result.get('outcome')} {result.get('value')}"
            )
    if metrics_url:
        display.line("")
        display.line(f"Operator metrics: curl -s {metrics_url} | grep ^temper_")


# -- main -------------------------------------------------------------------------------------------
@dataclass
class DemoOptions:
    keep: bool = False
    timeout: float = 600.0
    manifest: Path = QUICKSTART
    namespace: str = NAMESPACE


def run_demo(opts: DemoOptions, display: Display) -> int:
    started = time.monotonic()
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    state = read_state()
    run_obj = load_manifest(opts.manifest)
    run_name = run_obj["metadata"]["name"]
    secret_name = ((run_obj["spec"].get("storage") or {}).get("secretRef") or {}).get("name") or "temper-s3"
    bucket = run_obj["spec"]["storage"]["uri"].removeprefix("s3://").split("/", 1)[0]
    from temper_dev.s3server import FAKE_CREDENTIALS

    bin_dir = ensure_tools(display)
    os.environ["PATH"] = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"

    cluster = DemoCluster(display)
    cleanup: list[Callable[[], None]] = []
    try:
        with display.step(f"images {OPERATOR_IMAGE}, {TRAINER_IMAGE} (hack/build-images.sh)"):
            try:
                build_images(STATE_DIR / "build-images.log")
            except InClusterError as exc:
                raise DemoError(f"{exc}:\n{tail(STATE_DIR / 'build-images.log')}") from None
        with display.step(
            "hermetic cluster (etcd, apiserver, controller-manager, scheduler, kwok, exec node)",
            cluster.detail,
        ):
            kubeconfig = cluster.up()
        if not cluster.reused:
            cleanup.append(cluster.down)
        kube = Kube(kubeconfig, str(bin_dir / "kubectl"))
        display.line("    " + " | ".join(cluster.node_summary(kube)))

        s3: S3Process | None = None
        prior = state.get("s3") or {}
        if prior and pid_alive(int(prior["pid"])):
            candidate = S3Process(int(prior["port"]), int(prior["pid"]))
            if candidate.alive():
                s3 = candidate
        with display.step("S3 server (moto) on 127.0.0.1" + (" (reused)" if s3 else "")):
            if s3 is None:
                s3 = S3Process.start(STATE_DIR / "s3.log")
                cleanup.append(s3.stop)
            ensure_bucket(s3.endpoint_url, bucket)
            # A reused store may hold an earlier demo's manifests, which the trainer would adopt.
            storage_for(s3.endpoint_url).delete_prefix(run_obj["spec"]["storage"]["uri"])
        state.update({"s3": {"pid": s3.pid, "port": s3.port}, "kubeconfig": str(kubeconfig)})
        write_state(state)

        with display.step("CRDs installed"):
            install_crds(kube)
        with display.step(f"namespace {opts.namespace} with Secret {secret_name}"):
            prepare_namespace(kube, opts.namespace, secret_name, FAKE_CREDENTIALS)
            delete_run_and_adapters(kube, opts.namespace, run_name)

        operator = HelmOperator(
            kubeconfig,
            opts.namespace,
            cluster.cluster.state_dir,
            helm=str(bin_dir / "helm"),
            release_namespace=OPERATOR_NAMESPACE,
            storage_endpoint=s3.endpoint_url,
            extra_env={
                "TEMPER_PROGRESS_INTERVAL_SECONDS": "2",
                "TEMPER_TRAINER_PROGRESS_INTERVAL_SECONDS": "2",
            },
        )
        # An earlier --keep's release had another S3 endpoint and its ports: start afresh.
        operator.uninstall()
        with display.step(
            f"helm install temper charts/temper -n {OPERATOR_NAMESPACE} (operator pod from {OPERATOR_IMAGE})"
        ):
            try:
                operator.install(timeout=180)
            except InClusterError as exc:
                raise DemoError(str(exc)) from None
        cleanup.append(operator.uninstall)
        state["operator"] = {
            "namespace": OPERATOR_NAMESPACE,
            "health_port": operator.health_port,
            "metrics_port": operator.metrics_port,
        }
        write_state(state)

        run_obj["metadata"]["namespace"] = opts.namespace
        pin_to_exec_node(run_obj)
        applied = STATE_DIR / "quickstart.applied.yaml"
        applied.write_text(yaml.safe_dump(run_obj, sort_keys=False))
        shown = opts.manifest.relative_to(REPO) if opts.manifest.is_relative_to(REPO) else opts.manifest
        with display.step(f"applied {shown}"):
            kube.kubectl("apply", "-f", str(applied))

        seen: dict[str, str] = {}

        def on_update(run: dict[str, Any]) -> None:
            for stage in (run.get("status") or {}).get("stages") or []:
                if seen.get(stage["name"]) != stage.get("state"):
                    seen[stage["name"]] = stage.get("state", "")
                    if stage.get("state") in ("Running", "Succeeded", "Failed"):
                        extra = f" -> {stage['adapter']}" if stage.get("adapter") else ""
                        display.line(f"    stage {stage['name']}: {stage['state']}{extra}")
            display.live(f"{fmt_duration(time.monotonic() - started)}  {progress_line(run)}")

        display.line(f"training {opts.namespace}/{run_name} (real trainer pods on the exec node)")
        final = wait_for_run(
            kube, opts.namespace, run_name, opts.timeout, on_update=on_update, healthy=operator.alive
        )
        if run_terminal(final) != "Succeeded":
            raise DemoError(
                f"PostTrainingRun {run_name} failed:\n{failure_reason(final)}\n"
                f"operator log:\n{operator.log()[-2000:]}"
            )
        wait_until(
            lambda: (rows := adapter_rows(kube, opts.namespace, run_name)) and all(r["ready"] for r in rows),
            60,
            "every Adapter to be Ready",
        )
        print_summary(display, kube, opts.namespace, final, operator.metrics_url)
        display.line("")
        display.line(f"done in {fmt_duration(time.monotonic() - started)}")
        if opts.keep:
            cleanup.clear()
            display.line(
                "everything is still running (--keep); stop it with: python -m temper_dev.demo --down"
            )
            display.line(f"export KUBECONFIG={kubeconfig}")
        return 0
    finally:
        for action in reversed(cleanup):
            with contextlib.suppress(Exception):
                action()
        if cleanup:
            state.pop("operator", None)
            state.pop("s3", None)
            write_state(state)


def down(display: Display) -> int:
    """Stops what ``--keep`` left running: the S3 server and the cluster (with the operator pod)."""
    state = read_state()
    pid = (state.get("s3") or {}).get("pid")
    if pid:
        with display.step(f"stopped s3 (pid {pid})"):
            stop_pid(int(pid))
    with display.step("hermetic cluster stopped"):
        DemoCluster(display).down()
    with contextlib.suppress(OSError):
        state_path().unlink()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m temper_dev.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="leave cluster, S3 and operator running")
    parser.add_argument("--down", action="store_true", help="stop everything a --keep run left behind")
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="seconds to wait for the run (default 600)"
    )
    parser.add_argument("--manifest", type=Path, default=QUICKSTART, help="the PostTrainingRun to apply")
    parser.add_argument("--namespace", default=NAMESPACE)
    args = parser.parse_args(argv)
    display = Display()

    def on_sigterm(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt  # so the cleanup in run_demo's finally runs

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        if args.down:
            return down(display)
        return run_demo(
            DemoOptions(args.keep, args.timeout, args.manifest.resolve(), args.namespace), display
        )
    except DemoError as exc:
        display.line(f"\ndemo failed: {exc}")
        return 1
    except KeyboardInterrupt:
        display.line("\ninterrupted; stopped what this run started")
        return 130


if __name__ == "__main__":
    sys.exit(main())
