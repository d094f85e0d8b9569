"""Every file in examples/, the user's path: ``helm install`` -> ``kubectl apply -f examples/...``.

One namespace, one Helm-installed operator, every example applied at once so their stages run
side by side (the only way to keep this affordable on 2 cores). Each example goes through
:func:`temper_dev.demo.for_hermetic_cluster` (namespace, bucket, exec node on CPU, a few steps,
small built-in eval sets) and nothing else: its methods, stage types, data, rewards, gates and
continual settings are the example's. What the examples expect to exist is set up first, as a user
would: the ``temper-s3`` and ``hf-token`` Secrets, the ``model-cache`` claim, the
``training-low`` PriorityClass (allowed by the chart's policy), the base model and data under
``s3://temper/``, and the Hub repositories (olah, a real Hub mirror on loopback, named by the
chart's ``trainer.hubEndpoint``).

The quickstart is left to ``test_quickstart.py``, which applies it as written (full steps).
Expected outcomes: every other run Succeeds with a Ready Adapter per publishing stage, except
``peft-qlora`` (bitsandbytes 4-bit needs CUDA), which Fails with a message naming CUDA while its
neighbours finish. The continual example runs two triggered cycles (the second replays the first's
data); the adapter examples then run on its outputs: ``adapter-retire`` is applied active (its
comment's first step), ``adapter-merge`` merges it with a second catalogued adapter (``legal-g3``,
registered here over cycle 2's output), then ``adapter-retire`` as written retires it; its files
stay, because the operator's own Adapter of that stage still catalogues them.
"""

from __future__ import annotations

import json
import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import yaml
from kubernetes import client
from temper.api.contract import StorageConfig
from temper.storage import Storage
from temper_dev.cluster import Cluster
from temper_dev.demo import REPO, for_hermetic_cluster
from temper_dev.hub import OlahHub
from temper_dev.incluster import TRAINER_IMAGE, HelmOperator
from temper_dev.s3server import FAKE_CREDENTIALS, S3Server
from temper_trainer.data import builtin_records

from tests.cluster.test_operator_pipeline import Api
from tests.e2e.conftest import FAST_ENV
from tests.fixtures.hub import HubModel
from tests.fixtures.waiting import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.examples, pytest.mark.timeout(1800)]

EXAMPLES = REPO / "examples"
GROUP, VERSION = "temper.dev", "v1alpha1"
HF_TOKEN = "hf_not-a-real-token-0123456789"
PRIORITY_CLASS = "training-low"
# GPU-only examples: (stage, words its failure message must carry) on a CPU-only cluster.
GPU_ONLY = {"peft-qlora": ("sft", ("qlora", "CUDA"))}
CONTINUAL = "continual-replay-gates"
ADAPTER_EXAMPLES = ("adapter-merge", "adapter-retire")
# Examples another e2e test applies as written, with stronger assertions than a few steps allow.
COVERED_ELSEWHERE = {"quickstart": "tests/e2e/test_quickstart.py (its full steps, learning and dashboards)"}
WAIT = 1200.0


def example_docs() -> dict[str, dict[str, Any]]:
    """Every example by file stem (each file holds one object)."""
    out = {}
    for path in sorted(EXAMPLES.glob("*.yaml")):
        (doc,) = [d for d in yaml.safe_load_all(path.read_text()) if d]
        out[path.stem] = doc
    return out


def _jsonl(records: list[dict[str, Any]]) -> bytes:
    rows = [{k: v for k, v in r.items() if not k.startswith("_")} for r in records]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _write(folder: Path, name: str, data: bytes) -> Path:
    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)
    return folder


def _publish_hub(hub: OlahHub, llama: HubModel, tmp: Path) -> dict[str, str]:
    """What examples/hub-model.yaml names on the Hub: its base model (a tiny Llama) and datasets."""
    import shutil

    model = tmp / "hub-llama"
    shutil.copytree(llama.folder, model)
    chat = _jsonl(builtin_records("builtin://arith?n=16&seed=40&turns=2", "chat"))
    prefs = _jsonl(builtin_records("builtin://arith?n=16&seed=41", "preference"))
    return {
        "model": hub.add_repo("meta-llama/Llama-3.1-8B-Instruct", model),
        # The datasets library's layout for a named split (ultrachat's is data/train_sft-*.parquet).
        "chat": hub.add_repo(
            "HuggingFaceH4/ultrachat_200k",
            _write(tmp / "ultrachat", "data/train_sft-00000-of-00001.jsonl", chat),
            repo_type="dataset",
        ),
        "prefs": hub.add_repo(
            "acme/support-preferences",
            _write(tmp / "prefs", "pairs.jsonl", prefs),
            repo_type="dataset",
            tags=("v2",),
        ),
    }


def _tickets(seed: int) -> bytes:
    return _jsonl(builtin_records(f"builtin://arith?n=16&seed={seed}&turns=2", "chat"))


def _seed_storage(storage: Storage, bucket: str, tiny_model: Path) -> None:
    """What the continual and adapter examples read under s3://temper/: base model and data."""
    for path in sorted(p for p in tiny_model.rglob("*") if p.is_file()):
        storage.put_bytes(f"s3://{bucket}/models/tiny/{path.relative_to(tiny_model)}", path.read_bytes())
    storage.put_bytes(f"s3://{bucket}/data/tickets/seed.jsonl", _tickets(50))
    old = builtin_records("builtin://arith?n=8&seed=51&split=eval", "prompt-completion")
    storage.put_bytes(f"s3://{bucket}/data/eval/old-tasks.jsonl", _jsonl(old))


def _cycle_keys(bucket: str) -> list[str]:
    """The continual example's uriTemplate for a cycle triggered now (today in Berlin, and the
    next day in case the trigger lands past midnight there)."""
    now = datetime.now(UTC).astimezone(ZoneInfo("Europe/Berlin"))
    return [f"s3://{bucket}/data/tickets/{d:%Y-%m-%d}.jsonl" for d in (now, now + timedelta(days=1))]


def _user_setup(cluster: Cluster, namespace: str, cache_dir: Path) -> str:
    """Secrets, the model-cache claim on a hostPath PersistentVolume, the PriorityClass; the PV name."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    cache_dir.chmod(0o777)  # the trainer's non-root UID writes the shared cache
    pv = f"{namespace}-model-cache"
    with cluster.api_client() as api_client:
        core = client.CoreV1Api(api_client)
        for name, data in (
            ("temper-s3", {k: FAKE_CREDENTIALS[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}),
            ("hf-token", {"HF_TOKEN": HF_TOKEN}),
        ):
            core.create_namespaced_secret(namespace, {"metadata": {"name": name}, "stringData": data})
        core.create_persistent_volume(
            {
                "metadata": {"name": pv},
                "spec": {
                    "capacity": {"storage": "1Gi"},
                    "accessModes": ["ReadWriteMany"],
                    "storageClassName": "",
                    "persistentVolumeReclaimPolicy": "Retain",
                    "hostPath": {"path": str(cache_dir), "type": "Directory"},
                    "claimRef": {"namespace": namespace, "name": "model-cache"},
                },
            }
        )
        core.create_namespaced_persistent_volume_claim(
            namespace,
            {
                "metadata": {"name": "model-cache"},
                "spec": {
                    "accessModes": ["ReadWriteMany"],
                    "storageClassName": "",
                    "volumeName": pv,
                    "resources": {"requests": {"storage": "1Gi"}},
                },
            },
        )
        scheduling = client.SchedulingV1Api(api_client)
        try:
            scheduling.create_priority_class({"metadata": {"name": PRIORITY_CLASS}, "value": 100})
        except client.ApiException as exc:
            if exc.status != 409:
                raise
    return pv


@pytest.fixture
def examples_operator(
    cluster: Cluster, temper_crds: None, namespace: str, s3_server: S3Server, olah_hub: OlahHub
) -> Any:
    """The chart as a platform team would set it for these examples: the Hub mirror, the
    PriorityClass peft-lora names allowed, and trainer requests (300m CPU) that let the 2-core exec
    node run 6 stages at once: the scheduler queues the rest. More at once only thrashes (18
    trainers at once starved the apiserver and the operator's lease renewals)."""
    operator = HelmOperator(
        Path(cluster.kubeconfig),
        namespace,
        cluster.state_dir,
        helm=cluster.bin("helm"),
        storage_endpoint=s3_server.endpoint_url,
        # A longer lease than the chart's 15 s (10 s to renew): with every example training, the
        # apiserver answers late on 2 cores.
        extra_env={
            **FAST_ENV,
            "TEMPER_CONTINUAL_INTERVAL_SECONDS": "1",
            "TEMPER_LEASE_RENEW_DEADLINE_SECONDS": "40",
        },
        lease_seconds=60,
        extra_values={
            "trainer": {
                "hubEndpoint": olah_hub.endpoint,
                "resources": {"requests": {"cpu": "300m", "memory": "1Gi", "ephemeral-storage": "256Mi"}},
            },
            "policy": {"allowedPriorityClasses": [PRIORITY_CLASS]},
        },
    )
    operator.install(timeout=180)
    try:
        yield operator
    finally:
        operator.uninstall()


def _terminal(api: Api, name: str) -> str | None:
    return "Succeeded" if api.succeeded(name) else "Failed" if api.failed(name) else None


def _seconds(stage: dict[str, Any]) -> float | None:
    if not (stage.get("startTime") and stage.get("completionTime")):
        return None
    start, end = (
        datetime.fromisoformat(stage[k].replace("Z", "+00:00")) for k in ("startTime", "completionTime")
    )
    return (end - start).total_seconds()


class Examples:
    """The test's handles: API, storage, the operator, and a log of what each example did."""

    def __init__(self, api: Api, storage: Storage, operator: HelmOperator, bucket: str) -> None:
        self.api, self.storage, self.operator, self.bucket = api, storage, operator, bucket
        self.rows: dict[str, str] = {}

    def adapter(self, name: str) -> dict[str, Any] | None:
        try:
            obj: dict[str, Any] = self.api.custom.get_namespaced_custom_object(
                GROUP, VERSION, self.api.ns, "adapters", name
            )
        except client.ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return obj

    def ready(self, name: str) -> bool:
        conds = ((self.adapter(name) or {}).get("status") or {}).get("conditions") or []
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)

    def cycle(self, run: str, number: int) -> dict[str, Any] | None:
        for entry in (self.api.run(run).get("status") or {}).get("cycles") or []:
            if entry.get("cycle") == number and entry.get("state") in ("Succeeded", "Failed"):
                return dict(entry)
        return None

    def detail(self) -> str:
        runs = self.api.custom.list_namespaced_custom_object(GROUP, VERSION, self.api.ns, "posttrainingruns")
        states = {
            r["metadata"]["name"]: [
                (s["name"], s.get("state"), s.get("message")) for s in r.get("status", {}).get("stages") or []
            ]
            for r in runs["items"]
        }
        return f"{json.dumps(states, indent=1)}\noperator log:\n{self.operator.log()[-3000:]}"

    def apply(self, cluster: Cluster, docs: list[dict[str, Any]], path: Path) -> None:
        path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
        cluster.kubectl("apply", "-f", str(path))


def _continual_and_adapters(ex: Examples, cluster: Cluster, hermetic: dict[str, Any], tmp: Path) -> None:
    """Two triggered cycles of the continual example, then the adapter examples over its outputs."""
    api, name = ex.api, hermetic[CONTINUAL]["metadata"]["name"]
    first = wait_until("continual cycle 1", lambda: ex.cycle(name, 1), ex.detail, WAIT)
    assert first["state"] == "Succeeded", (first, ex.detail())
    for key in _cycle_keys(ex.bucket):
        ex.storage.put_bytes(key, _tickets(2))  # the next week's tickets land
    api.patch_run(name, {"metadata": {"annotations": {"temper.dev/trigger-cycle": "2"}}})
    # adapter-retire.yaml, first step: apply it active (it registers cycle 1's output).
    retire = hermetic["adapter-retire"]
    active = {**retire, "spec": {**retire["spec"], "lifecycle": "active"}}
    ex.apply(cluster, [active], tmp / "adapter-active.yaml")
    support = retire["metadata"]["name"]
    wait_until(f"Adapter {support} Ready", lambda: ex.ready(support), ex.detail, 300)
    second = wait_until("continual cycle 2", lambda: ex.cycle(name, 2), ex.detail, WAIT)
    assert second["state"] == "Succeeded", (second, ex.detail())
    ex.rows[CONTINUAL] = f"2 cycles, gates {first.get('gates')}/{second.get('gates')}"
    # Cycle 2 trained on its new data plus 20% replayed from cycle 1's.
    child = api.run(f"{name}-g2")
    sft = next(s for s in child["spec"]["stages"] if s["name"] == "sft")
    assert sft["data"]["replay"]["ratio"] == 0.2, sft["data"]
    assert sft["data"]["replay"]["datasets"], sft["data"]
    status = api.run(name)["status"]
    if second.get("gates") == "Passed":
        assert {a["name"]: a["adapter"] for a in status["aliases"]}["stable"] == second["adapter"]

    # adapter-merge.yaml: support-bot-g1 with a second catalogued adapter on the same base.
    merge = hermetic["adapter-merge"]
    legal = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Adapter",
        "metadata": {"name": "legal-g3", "namespace": api.ns, "labels": {"temper.dev/task": "legal"}},
        "spec": {
            **{k: retire["spec"][k] for k in ("baseModel", "method")},
            "artifact": {**retire["spec"]["artifact"], "uri": child["status"]["stages"][0]["manifestUri"]},
        },
    }
    ex.apply(cluster, [legal, merge], tmp / "adapter-merge.yaml")
    merged = merge["metadata"]["name"]
    wait_until(f"merged Adapter {merged} Ready", lambda: ex.ready(merged), ex.detail, 600)
    artifact = ex.storage.verify_manifest(merge["spec"]["artifact"]["uri"])
    assert artifact.ok, artifact.problems
    ex.rows["adapter-merge"] = f"{merged} Ready (linear, verified)"

    # adapter-retire.yaml as written: retired with onRetire: delete. The operator's own Adapter of
    # cycle 1's sft stage catalogues the same manifest and is still live, so the files are kept and
    # the condition names it (nothing is lost); retention's deletion itself is test_adapter_lifecycle's.
    ex.apply(cluster, [retire], tmp / "adapter-retire.yaml")
    uri = retire["spec"]["artifact"]["uri"]

    def decided() -> dict[str, Any] | None:
        conds = ((ex.adapter(support) or {}).get("status") or {}).get("conditions") or []
        return next((c for c in conds if c["type"] == "ArtifactDeleted"), None)

    condition = wait_until(f"{support}'s retention decision", decided, ex.detail, 120)
    assert ex.adapter(support)["status"]["phase"] == "Retired"  # written with the decision
    assert (condition["status"], condition["reason"]) == ("False", "RetentionRefused"), condition
    assert "still catalogued by Adapter" in condition["message"], condition
    assert ex.storage.exists(uri), "a live Adapter's files were deleted"
    ex.rows["adapter-retire"] = f"{support} retired; files kept: {condition['message']}"


def _assert_hub_run(ex: Examples, run: dict[str, Any], shas: dict[str, str], hub: OlahHub) -> None:
    """hub-model: the base and both datasets pinned to their commits, the token by reference only,
    the shared model-cache claim mounted."""
    api, name = ex.api, run["metadata"]["name"]
    adapters = [ex.adapter(s["adapter"]) or {} for s in run["status"]["stages"]]
    for adapter in adapters:
        lineage = adapter["status"]["lineage"]
        assert lineage["baseModelRevision"] == shas["model"], lineage
    versions = {d["name"]: d.get("version") for a in adapters for d in a["status"]["lineage"]["datasets"]}
    assert (versions["chat"], versions["prefs"]) == (shas["chat"], shas["prefs"]), versions
    for pod in api.pods(name):
        spec = pod.to_dict()["spec"]
        env = {e["name"]: e for e in spec["containers"][0]["env"]}
        assert env["HF_ENDPOINT"]["value"] == hub.endpoint
        assert env["HF_TOKEN"]["value"] is None
        assert env["HF_TOKEN"]["value_from"]["secret_key_ref"]["name"] == "hf-token"
        cache = next(v for v in spec["volumes"] if v["name"] == "model-cache")
        assert cache["persistent_volume_claim"]["claim_name"] == "model-cache", cache
    text = json.dumps([run, adapters]) + "".join(str(e.message) for e in api.events(name))
    assert HF_TOKEN not in text


def _assert_run(ex: Examples, stem: str, body: dict[str, Any]) -> dict[str, Any]:
    api, name = ex.api, body["metadata"]["name"]
    run = api.run(name)
    stages = run["status"]["stages"]
    if stem in GPU_ONLY:
        stage_name, words = GPU_ONLY[stem]
        assert api.failed(name), (stem, run["status"])
        failed = next(s for s in stages if s["name"] == stage_name)
        message = failed.get("message") or ""
        assert all(w in message for w in words), failed
        assert "adapter" not in failed, failed
        ex.rows[stem] = f"Failed as expected: {message[:90]}"
        return run
    assert api.succeeded(name), (stem, ex.detail())
    assert [s["state"] for s in stages] == ["Succeeded"] * len(stages), stages
    types = {s["name"]: s["type"] for s in body["spec"]["stages"]}
    for stage in stages:
        if types[stage["name"]] == "eval":
            assert "adapter" not in stage, stage
        else:
            assert ex.ready(stage["adapter"]), (stem, stage, ex.adapter(stage["adapter"]))
    for pod in api.pods(name):
        assert pod.spec.node_name == "exec-node"
        assert pod.status.container_statuses[0].image.startswith(TRAINER_IMAGE)
    ex.rows[stem] = "Succeeded: " + ", ".join(
        f"{s['name']}={_seconds(s):.0f}s" if _seconds(s) is not None else s["name"] for s in stages
    )
    return run


def test_every_example_runs_through_the_helm_installed_operator(
    cluster: Cluster,
    namespace: str,
    examples_operator: HelmOperator,
    s3_server: S3Server,
    olah_hub: OlahHub,
    tiny_model: Path,
    tmp_path: Path,
) -> None:
    from temper_dev.archzoo import ensure_model

    started, load = time.monotonic(), os.getloadavg()
    docs = example_docs()
    bucket = s3_server.create_bucket()
    storage = Storage(
        StorageConfig.model_validate({"endpointUrl": s3_server.endpoint_url}), s3_server.client()
    )
    ex = Examples(Api(cluster, namespace), storage, examples_operator, bucket)
    pv = _user_setup(cluster, namespace, tmp_path / "model-cache")
    try:
        _seed_storage(storage, bucket, tiny_model)
        for key in _cycle_keys(bucket):
            storage.put_bytes(key, _tickets(1))
        llama = ensure_model("llama")
        shas = _publish_hub(
            olah_hub, HubModel("llama", "meta-llama/Llama-3.1-8B-Instruct", "", llama), tmp_path
        )
        hermetic = {
            stem: for_hermetic_cluster(doc, namespace=namespace, bucket=bucket) for stem, doc in docs.items()
        }
        runs = {
            stem: d
            for stem, d in hermetic.items()
            if d["kind"] == "PostTrainingRun" and stem not in COVERED_ELSEWHERE
        }
        assert set(runs) | set(ADAPTER_EXAMPLES) | set(COVERED_ELSEWHERE) == set(docs), (
            "an example no test runs"
        )
        annotations = runs[CONTINUAL]["metadata"].setdefault("annotations", {})
        annotations["temper.dev/trigger-cycle"] = "1"  # kubectl annotate: the schedule is weekly
        ex.apply(cluster, list(runs.values()), tmp_path / "examples.yaml")
        applied = time.monotonic()

        _continual_and_adapters(ex, cluster, hermetic, tmp_path)
        for stem, body in runs.items():
            if stem == CONTINUAL:
                continue
            name = body["metadata"]["name"]
            wait_until(f"{stem} finished", lambda n=name: _terminal(ex.api, n), ex.detail, WAIT)
        finished = time.monotonic()
        for stem, body in runs.items():
            if stem != CONTINUAL:
                run = _assert_run(ex, stem, body)
                if stem == "hub-model":
                    _assert_hub_run(ex, run, shas, olah_hub)
        lora = ex.api.pods(runs["peft-lora"]["metadata"]["name"])
        assert {p.spec.priority_class_name for p in lora} == {PRIORITY_CLASS}
        report = {
            "examples": len(docs),
            "load_average_at_start": [round(x, 2) for x in load],
            "setup_seconds": round(applied - started, 1),
            "apply_to_all_finished_seconds": round(finished - applied, 1),
            "outcomes": dict(sorted(ex.rows.items())),
        }
        print("examples e2e:", json.dumps(report, indent=1))
        assert set(ex.rows) | set(COVERED_ELSEWHERE) == set(docs), set(docs) - set(ex.rows)
    finally:
        with cluster.api_client() as api_client:
            client.CoreV1Api(api_client).delete_persistent_volume(pv)
