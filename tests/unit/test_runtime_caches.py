"""The controller's caches and S3 clients: they shrink when objects go, and rebuild only on change."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from temper.config import OperatorConfig
from temper.handlers import storage_clients
from temper.handlers.runtime import Caches, Runtime
from temper.storage import Credentials

pytestmark = pytest.mark.unit
RUN = ("ml", "r1")


def _obj(kind: str, name: str, rv: int = 1, **labels: str) -> dict[str, Any]:
    return {
        "kind": kind,
        "metadata": {"name": name, "namespace": "ml", "resourceVersion": str(rv), "labels": labels},
    }


def test_deleting_every_child_leaves_no_empty_buckets() -> None:
    caches = Caches()
    job = _obj("Job", "r1-sft-c1-a1", **{"temper.dev/run": "r1"})
    pod = _obj("Pod", "r1-sft-c1-a1-x", **{"temper.dev/run": "r1", "job-name": "r1-sft-c1-a1"})
    svc = _obj("Service", "r1-sft-c1-a1", **{"temper.dev/run": "r1"})
    adapter = _obj("Adapter", "r1-sft-g1", **{"temper.dev/run": "r1"})
    caches.put_job(job)
    caches.put_pod(pod)
    caches.put_service(svc)
    caches.put_adapter(adapter)
    caches.put_pod(pod, deleted=True)
    caches.put_job(job, deleted=True)
    caches.put_service(svc, deleted=True)
    caches.put_adapter(adapter, deleted=True)
    # A DELETED event for something never seen must not create a bucket either.
    caches.put_job(_obj("Job", "other", **{"temper.dev/run": "gone"}), deleted=True)
    assert (caches.jobs, caches.pods, caches.services, caches.adapters, caches.adapters_by_run) == (
        {},
        {},
        {},
        {},
        {},
    )


def test_a_deleted_cycle_run_leaves_its_parents_index() -> None:
    caches = Caches()
    child = _obj("PostTrainingRun", "bot-g1", **{"temper.dev/continual-run": "bot"})
    caches.put_run(child)
    assert caches.children == {("ml", "bot"): {"bot-g1"}}
    caches.drop_run(("ml", "bot-g1"))
    assert caches.children == {}
    assert caches.runs == {}


def test_forgetting_a_run_cancels_its_timers_and_failure_counts() -> None:
    async def scenario() -> Runtime:
        rt = Runtime(kube=None, config=OperatorConfig())  # type: ignore[arg-type]
        rt.caches.put_run(_obj("PostTrainingRun", "r1"))
        rt.enqueue("run", RUN, delay=60)
        rt.enqueue("progress", RUN, delay=60)
        rt.failures[("run", RUN)] = 3
        rt.forget_run(RUN)
        rt.storage.close()
        return rt

    rt = asyncio.run(scenario())
    assert rt.timers == {}
    assert rt.failures == {}
    assert rt.caches.runs == {}


class FakeKube:
    """Answers Secret reads like temper.kube.Kube.storage_credentials, counting them."""

    def __init__(self) -> None:
        self.version = "1"
        self.reads: list[tuple[str, str]] = []

    async def storage_credentials(self, namespace: str, secret: str) -> tuple[str, Credentials | None]:
        self.reads.append((namespace, secret))
        return self.version, Credentials("key", "secret")


def test_clients_are_cached_per_secret_version(monkeypatch: pytest.MonkeyPatch) -> None:
    kube = FakeKube()
    config = OperatorConfig(
        default_storage_endpoint="http://127.0.0.1:9", default_storage_secret="s3-default"
    )

    async def scenario() -> None:
        clients = storage_clients.StorageClients(kube, config)  # type: ignore[arg-type]
        first = await clients.get("ml", {})
        assert await clients.get("ml", {}) is first  # within the TTL: no Secret read, no rebuild
        assert kube.reads == [("ml", "s3-default")]  # TEMPER_DEFAULT_STORAGE_SECRET is honoured
        monkeypatch.setattr(storage_clients, "CREDENTIALS_TTL", 0.0)
        assert await clients.get("ml", {}) is first  # re-read, same version: kept
        kube.version = "2"  # the Secret was rotated
        rotated = await clients.get("ml", {})
        assert rotated is not first
        monkeypatch.setattr(storage_clients, "CREDENTIALS_TTL", 300.0)
        clients.refused("ml", {}, "cannot read s3://b/k: NoSuchKey")  # not about credentials
        assert await clients.get("ml", {}) is rotated
        reads = len(kube.reads)
        clients.refused("ml", {}, "cannot read s3://b/k: InvalidAccessKeyId")
        kube.version = "3"
        assert await clients.get("ml", {}) is not rotated  # re-read at once, before the TTL
        assert len(kube.reads) == reads + 1
        other = await clients.get("ml", {"secretRef": {"name": "team"}})
        assert other is not rotated
        assert kube.reads[-1] == ("ml", "team")
        clients.close()

    asyncio.run(scenario())


class RecordingKube:
    """The Kube calls an Adapter re-verification makes: status patches and events."""

    def __init__(self) -> None:
        self.patches: list[dict[str, Any]] = []
        self.events: list[str] = []

    async def patch_status(
        self, plural: str, ns: str, name: str, desired: Any, current: Any, **_: Any
    ) -> None:
        self.patches.append(desired)

    async def emit(self, involved: Any, event: Any) -> None:
        self.events.append(event.reason)


class FakeStore:
    def __init__(self, result: Any) -> None:
        self.result = result
        self.calls = 0

    def verify_manifest(self, uri: str) -> Any:
        self.calls += 1
        return self.result


def _ready(name: str, uri: str) -> dict[str, Any]:
    adapter = _obj("Adapter", name)
    adapter["metadata"]["generation"] = 1
    adapter["spec"] = {"artifact": {"uri": uri}}
    adapter["status"] = {
        "observedGeneration": 1,
        "conditions": [{"type": "Ready", "status": "True", "reason": "ArtifactVerified"}],
        "artifact": {"sha256": "abc"},
    }
    return adapter


def test_ready_adapters_are_reverified_on_the_storage_lane_when_due_or_touched() -> None:
    from temper.storage import VerifyResult

    uri = "s3://b/ml/q/g1/sft/manifest.json"

    async def scenario() -> tuple[Runtime, RecordingKube, FakeStore, list[Any]]:
        kube = RecordingKube()
        rt = Runtime(kube=kube, config=OperatorConfig(adapter_reverify_seconds=3600))  # type: ignore[arg-type]
        store = FakeStore(VerifyResult(True, [], 1, "abc"))

        async def get(namespace: str, options: Any) -> FakeStore:
            return store

        rt.storage.get = get  # type: ignore[method-assign]
        for name in ("a1", "a2"):
            rt.caches.put_adapter(_ready(name, uri))
        rt.caches.put_adapter(_ready("other", "s3://b/ml/other/manifest.json"))
        await rt.reconcile_adapter(("ml", "a1"))  # first sight after a start: a timer, no S3 call
        assert store.calls == 0
        assert ("adapter", ("ml", "a1")) in rt.timers
        rt.recheck_touching([uri.replace("manifest.json", "attempts/1/a.bin")])
        queued = sorted(item[2] for item in rt.queues["storage"]._queue)  # type: ignore[attr-defined]
        assert rt.queues["api"].empty()  # never on the reconcile lane
        store.result = VerifyResult(True, [], 1, "abc")
        await rt.reconcile_adapter(("ml", "a1"))  # touched, unchanged: no write
        store.result = VerifyResult(False, ["attempts/1/a.bin: missing"])
        await rt.reconcile_adapter(("ml", "a2"))  # touched, gone: Ready=False ArtifactMissing
        rt.storage.close()
        return rt, kube, store, queued

    rt, kube, store, queued = asyncio.run(scenario())
    assert queued == [("adapter", ("ml", "a1")), ("adapter", ("ml", "a2"))]  # not "other"
    assert store.calls == 2
    assert len(kube.patches) == 1
    ready = kube.patches[0]["conditions"][0]
    assert (ready["status"], ready["reason"]) == ("False", "ArtifactMissing")
    assert kube.events == ["ArtifactMissing"]
    assert rt.recheck == set()
