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
COMPONENT = "temper-operator"
MERGE_PATCH = "application/merge-patch+json"


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

    async def _call(self, verb: str, resource: str, fn: Callable[[], T]) -> T:
        metrics.API_REQUESTS.labels(verb, resource).inc()
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn)
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
        elif kind == "Adapter":
            resource = ADAPTER_PLURAL
            fn = lambda: self.custom.create_namespaced_custom_object(  # noqa: E731
                GROUP, VERSION, ns, ADAPTER_PLURAL, obj, _preload_content=False
            )
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

    async def delete_job(self, namespace: str, name: str) -> None:
        """Delete a Job and (in the background) its pods; gone already is success."""
        try:
            await self._call(
                "delete",
                "jobs",
                lambda: self.batch.delete_namespaced_job(
                    name, namespace, propagation_policy="Background", _preload_content=False
                ),
            )
        except ApiException as exc:
            if exc.status != 404:
                raise

    # -- status -----------------------------------------------------------------------------
    async def patch_status(
        self, plural: str, namespace: str, name: str, desired: dict[str, Any], current: dict[str, Any] | None
    ) -> dict[str, Any] | None:
        """Merge-patch our status fields if they differ from ``current``; the updated object, or
        None when nothing needed writing (or the object is gone)."""
        if not status_changed(desired, current):
            return None
        body = {"status": desired}
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
            if exc.status == 404:
                return None  # deleted meanwhile
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
    async def storage_credentials(self, namespace: str, secret: str) -> Credentials | None:
        """S3 credentials from a Secret. Values stay in memory: never logged, never written anywhere."""
        try:
            resp = await self._call(
                "get",
                "secrets",
                lambda: self.core.read_namespaced_secret(secret, namespace, _preload_content=False),
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        data = json.loads(resp.data).get("data") or {}

        def value(key: str) -> str | None:
            raw = data.get(key)
            return base64.b64decode(raw).decode() if raw else None

        key_id, secret_key = value("AWS_ACCESS_KEY_ID"), value("AWS_SECRET_ACCESS_KEY")
        if not key_id or not secret_key:
            return None
        return Credentials(key_id, secret_key, value("AWS_SESSION_TOKEN"))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


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
