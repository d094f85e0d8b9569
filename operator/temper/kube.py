"""The apply layer: the only module that writes to the Kubernetes API.

- Creates are idempotent: names are deterministic, so AlreadyExists means "done earlier" and is
  success. A crash between any two calls loses nothing (the next pass re-plans from what exists)
  and duplicates nothing (the same name cannot be created twice).
- Status is patched only when our fields differ from what is stored: an idle cluster sees no writes.
- Every call is counted (``temper_api_requests_total``) and failures are counted by code.

The synchronous ``kubernetes`` client runs in worker threads; calls are short and bounded.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, TypeVar

from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException

from temper import metrics
from temper.api.common import GROUP, VERSION
from temper.planner import Event
from temper.storage import Credentials

log = logging.getLogger("temper.kube")
T = TypeVar("T")

RUN_PLURAL = "posttrainingruns"
ADAPTER_PLURAL = "adapters"
CUSTOM_PLURALS = {"PostTrainingRun": RUN_PLURAL, "Adapter": ADAPTER_PLURAL}
COMPONENT = "temper-operator"
MERGE_PATCH = "application/merge-patch+json"
WRITE_VERBS = frozenset({"create", "patch", "update", "delete"})


class NotLeader(RuntimeError):
    """A write refused because this process is past its leader renew deadline."""


def load_api_client(pool_size: int = 16) -> k8s.ApiClient:
    """In-cluster config when running in a pod, else KUBECONFIG (tests, local runs)."""
    configuration = k8s.Configuration()
    if os.environ.get("KUBERNETES_SERVICE_HOST") and not os.environ.get("KUBECONFIG"):
        k8s_config.load_incluster_config(client_configuration=configuration)
    else:
        k8s_config.load_kube_config(client_configuration=configuration)
    configuration.connection_pool_maxsize = pool_size
    return k8s.ApiClient(configuration)


def _same(desired: Any, current: Any) -> bool:
    """Deep equality where a missing key equals None and 1 equals 1.0 (the apiserver's JSON)."""
    if isinstance(desired, dict) and isinstance(current, dict | type(None)):
        current = current or {}
        keys = set(desired) | set(current)
        return all(_same(desired.get(k), current.get(k)) for k in keys)
    if isinstance(desired, list) and isinstance(current, list):
        return len(desired) == len(current) and all(
            _same(a, b) for a, b in zip(desired, current, strict=True)
        )
    if desired in (None, {}, []) and current in (None, {}, []):
        return True
    return bool(desired == current)


def status_changed(desired: dict[str, Any], current: dict[str, Any] | None) -> bool:
    current = current or {}
    return not all(_same(value, current.get(key)) for key, value in desired.items())


class Kube:
    def __init__(self, api: k8s.ApiClient, workers: int = 8) -> None:
        self.api = api
        self.batch = k8s.BatchV1Api(api)
        self.core = k8s.CoreV1Api(api)
        self.custom = k8s.CustomObjectsApi(api)
        self.coordination = k8s.CoordinationV1Api(api)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kube")
        # The Lease has a thread of its own: a renewal never queues behind a burst of creates.
        self._lease_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lease")
        # Leader election's fence: every write but the Lease's own asks it first (None: no election).
        self.fence: Callable[[], bool] | None = None

    async def _call(self, verb: str, resource: str, fn: Callable[[], T]) -> T:
        if verb in WRITE_VERBS and resource != "leases" and self.fence is not None and not self.fence():
            raise NotLeader(f"{verb} {resource}: not the leader (renew deadline passed)")
        metrics.API_REQUESTS.labels(verb, resource).inc()
        pool = self._lease_pool if resource == "leases" else self._pool
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, fn)
        except ApiException as exc:
            metrics.API_ERRORS.labels(verb, resource, str(exc.status)).inc()
            raise

    # -- creates ----------------------------------------------------------------------------
    async def create(self, obj: dict[str, Any]) -> bool:
        """Create ``obj``; True if created now, False if it already existed (also success)."""
        kind, ns = obj["kind"], obj["metadata"]["namespace"]
        if kind == "Job":
            resource, fn = "jobs", lambda: self.batch.create_namespaced_job(ns, obj, _preload_content=False)
        elif kind == "Service":
            resource, fn = (
                "services",
                lambda: self.core.create_namespaced_service(ns, obj, _preload_content=False),
            )
        elif kind in CUSTOM_PLURALS:
            resource = CUSTOM_PLURALS[kind]
            fn = lambda: self.custom.create_namespaced_custom_object(  # noqa: E731
                GROUP, VERSION, ns, resource, obj, _preload_content=False
            )
        elif kind == "ConfigMap":
            resource = "configmaps"
            fn = lambda: self.core.create_namespaced_config_map(ns, obj, _preload_content=False)  # noqa: E731
        else:
            raise ValueError(f"kind: cannot create {kind}")
        try:
            await self._call("create", resource, fn)
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        return True

    async def patch_job(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        try:
            await self._call(
                "patch",
                "jobs",
                lambda: self.batch.patch_namespaced_job(
                    name, namespace, patch, _preload_content=False, _content_type=MERGE_PATCH
                ),
            )
        except ApiException as exc:
            if exc.status != 404:  # gone already: nothing to suspend
                raise

    async def write_configmap(self, obj: dict[str, Any], exists: bool) -> dict[str, Any] | None:
        """Create (or replace, when ``exists``) a ConfigMap; the stored object, or None when a
        create found one already there."""
        ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
        if exists:
            verb, fn = (
                "update",
                lambda: self.core.replace_namespaced_config_map(name, ns, obj, _preload_content=False),
            )
        else:
            verb, fn = (
                "create",
                lambda: self.core.create_namespaced_config_map(ns, obj, _preload_content=False),
            )
        try:
            resp = await self._call(verb, "configmaps", fn)
        except ApiException as exc:
            if exc.status == 409 and not exists:
                return None
            raise
        out: dict[str, Any] = json.loads(resp.data)
        return out

    async def delete(self, plural: str, namespace: str, name: str) -> None:
        """Delete a custom object in the background (its children go by garbage collection)."""
        options = {"propagationPolicy": "Background"}
        try:
            await self._call(
                "delete",
                plural,
                lambda: self.custom.delete_namespaced_custom_object(
                    GROUP, VERSION, namespace, plural, name, body=options, _preload_content=False
                ),
            )
        except ApiException as exc:
            if exc.status != 404:
                raise

    async def patch(
        self, plural: str, namespace: str, name: str, patch: dict[str, Any]
    ) -> dict[str, Any] | None:
        """Merge-patch a custom object (e.g. its finalizers); None if it is gone."""
        try:
            resp = await self._call(
                "patch",
                plural,
                lambda: self.custom.patch_namespaced_custom_object(
                    GROUP,
                    VERSION,
                    namespace,
                    plural,
                    name,
                    patch,
                    _preload_content=False,
                    _content_type=MERGE_PATCH,
                ),
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        out: dict[str, Any] = json.loads(resp.data)
        return out

    # -- status -----------------------------------------------------------------------------
    async def patch_status(
        self,
        plural: str,
        namespace: str,
        name: str,
        desired: dict[str, Any],
        current: dict[str, Any] | None,
        *,
        resource_version: str | None = None,
    ) -> dict[str, Any] | None:
        """Merge-patch our status fields if they differ from ``current``; the updated object, or
        None when nothing needed writing (or the object is gone). With ``resource_version`` the
        write is refused (None) if the object changed since that version."""
        if not status_changed(desired, current):
            return None
        body: dict[str, Any] = {"status": desired}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        try:
            resp = await self._call(
                "patch",
                f"{plural}/status",
                lambda: self.custom.patch_namespaced_custom_object_status(
                    GROUP,
                    VERSION,
                    namespace,
                    plural,
                    name,
                    body,
                    _preload_content=False,
                    _content_type=MERGE_PATCH,
                ),
            )
        except ApiException as exc:
            if exc.status == 404 or (exc.status == 409 and resource_version):
                return None  # deleted meanwhile, or changed since the version we planned from
            raise
        out: dict[str, Any] = json.loads(resp.data)
        return out

    # -- events -----------------------------------------------------------------------------
    async def emit(self, involved: dict[str, Any], event: Event) -> None:
        meta = involved["metadata"]
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:16]}", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": involved.get("apiVersion", f"{GROUP}/{VERSION}"),
                "kind": involved["kind"],
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
            },
            "reason": event.reason,
            "message": event.message[:1024],
            "type": event.type,
            "source": {"component": COMPONENT},
            "reportingComponent": COMPONENT,
            "reportingInstance": os.environ.get("HOSTNAME", COMPONENT),
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            await self._call(
                "create",
                "events",
                lambda: self.core.create_namespaced_event(meta["namespace"], body, _preload_content=False),
            )
        except ApiException as exc:  # events are best-effort: never fail a reconcile over one
            log.warning(
                "event %s on %s/%s not recorded: HTTP %s",
                event.reason,
                meta["namespace"],
                meta["name"],
                exc.status,
            )

    # -- reads ------------------------------------------------------------------------------
    async def storage_credentials(self, namespace: str, secret: str) -> tuple[str, Credentials | None]:
        """The Secret's resourceVersion ("" if absent) and its S3 credentials (None without both
        keys). Values stay in memory: never logged, never written anywhere."""
        try:
            resp = await self._call(
                "get",
                "secrets",
                lambda: self.core.read_namespaced_secret(secret, namespace, _preload_content=False),
            )
        except ApiException as exc:
            if exc.status == 404:
                return "", None
            raise
        secret_obj = json.loads(resp.data)
        version = str((secret_obj.get("metadata") or {}).get("resourceVersion") or "")
        data = secret_obj.get("data") or {}

        def value(key: str) -> str | None:
            raw = data.get(key)
            return base64.b64decode(raw).decode() if raw else None

        key_id, secret_key = value("AWS_ACCESS_KEY_ID"), value("AWS_SECRET_ACCESS_KEY")
        if not key_id or not secret_key:
            return version, None
        return version, Credentials(key_id, secret_key, value("AWS_SESSION_TOKEN"))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._lease_pool.shutdown(wait=False, cancel_futures=True)


async def list_objects(
    kube: Kube, resource: str, namespaces: tuple[str, ...], label_selector: str = ""
) -> list[dict[str, Any]]:
    """One LIST per namespace (or one cluster-wide): primes the caches before the first reconcile."""
    targets: tuple[str | None, ...] = namespaces or (None,)
    out: list[dict[str, Any]] = []
    for ns in targets:

        def call(ns: str | None = ns) -> Any:
            kw: dict[str, Any] = {"label_selector": label_selector, "_preload_content": False}
            if resource == "jobs":
                return (
                    kube.batch.list_namespaced_job(ns, **kw)
                    if ns
                    else kube.batch.list_job_for_all_namespaces(**kw)
                )
            if resource == "pods":
                return (
                    kube.core.list_namespaced_pod(ns, **kw)
                    if ns
                    else kube.core.list_pod_for_all_namespaces(**kw)
                )
            if resource == "configmaps":
                return (
                    kube.core.list_namespaced_config_map(ns, **kw)
                    if ns
                    else kube.core.list_config_map_for_all_namespaces(**kw)
                )
            if resource == "services":
                return (
                    kube.core.list_namespaced_service(ns, **kw)
                    if ns
                    else kube.core.list_service_for_all_namespaces(**kw)
                )
            plural = resource
            if ns:
                return kube.custom.list_namespaced_custom_object(GROUP, VERSION, ns, plural, **kw)
            return kube.custom.list_cluster_custom_object(GROUP, VERSION, plural, **kw)

        resp = await kube._call("list", resource, call)
        out.extend(json.loads(resp.data).get("items") or [])
    return out
