"""The apply layer: the only module that talks to (and writes to) the Kubernetes API.

- Creates are idempotent: names are deterministic, so AlreadyExists means "done earlier" and is
  success. A crash between any two calls loses nothing (the next pass re-plans from what exists)
  and duplicates nothing (the same name cannot be created twice).
- Status is patched only when our fields differ from what is stored: an idle cluster sees no writes.
- Every call is counted (``temper_api_requests_total``) and failures are counted by code.
- Past the leader's renew deadline every write but the Lease's is refused (:class:`NotLeader`).

Requests are plain JSON over kopf's own HTTP stack (aiohttp), with the credentials kopf logs in
with (:func:`connection_info`): no worker threads, and none of the generated ``kubernetes``
client, whose ~1,000 model modules would cost the operator 50 MB of memory for nothing.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import os
import ssl
import tempfile
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import aiohttp
import kopf

from temper import metrics
from temper.api.common import GROUP, VERSION
from temper.planner import Event
from temper.storage import Credentials

log = logging.getLogger("temper.kube")

RUN_PLURAL = "posttrainingruns"
ADAPTER_PLURAL = "adapters"
CUSTOM_PLURALS = {"PostTrainingRun": RUN_PLURAL, "Adapter": ADAPTER_PLURAL}
COMPONENT = "temper-operator"
MERGE_PATCH = "application/merge-patch+json"
WRITE_VERBS = frozenset({"create", "patch", "update", "delete"})
HTTP_VERBS = {
    "get": "GET",
    "list": "GET",
    "create": "POST",
    "update": "PUT",
    "patch": "PATCH",
    "delete": "DELETE",
}
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=30, sock_connect=5)
THROTTLE_RETRIES = 5  # 429 (e.g. a CRD still initialising, priority and fairness): Retry-After, again
# Where each resource lives: (API prefix, namespaced).
PREFIXES = {
    "jobs": "/apis/batch/v1",
    "networkpolicies": "/apis/networking.k8s.io/v1",
    "pods": "/api/v1",
    "services": "/api/v1",
    "configmaps": "/api/v1",
    "events": "/api/v1",
    "secrets": "/api/v1",
    "leases": "/apis/coordination.k8s.io/v1",
    RUN_PLURAL: f"/apis/{GROUP}/{VERSION}",
    ADAPTER_PLURAL: f"/apis/{GROUP}/{VERSION}",
}


class ApiException(Exception):
    """The apiserver answered an error status."""

    def __init__(self, status: int, reason: str = "", body: str = "") -> None:
        super().__init__(f"HTTP {status} {reason}".strip())
        self.status = status
        self.reason = reason
        self.body = body


class NotLeader(RuntimeError):
    """A write refused because this process is past its leader renew deadline."""


def connection_info() -> kopf.ConnectionInfo:
    """In-cluster service account when running in a pod (and no KUBECONFIG), else KUBECONFIG.

    Also kopf's login handler (``temper.handlers``), so kopf and temper share one identity."""
    settings = kopf.OperatorSettings()
    info = None
    host = os.environ.get("KUBERNETES_SERVICE_HOST", "")
    if host and not os.environ.get("KUBECONFIG"):
        info = kopf.login_with_service_account(settings=settings)
        if info is not None:
            # As client-go's InClusterConfig: the kubelet's env, not kubernetes.default.svc, which
            # needs cluster DNS (absent for hostNetwork pods with a custom dnsPolicy, or here).
            port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
            info = dataclasses.replace(info, server=f"https://{f'[{host}]' if ':' in host else host}:{port}")
    info = info or kopf.login_with_kubeconfig(settings=settings)
    if info is None:
        raise kopf.LoginError("no service account token and no KUBECONFIG")
    return info


def _ssl_context(info: kopf.ConnectionInfo) -> ssl.SSLContext:
    ca_data = info.ca_data
    if isinstance(ca_data, str) and "BEGIN CERTIFICATE" not in ca_data:
        ca_data = base64.b64decode(ca_data).decode()
    elif isinstance(ca_data, bytes):
        ca_data = ca_data.decode()
    ctx = ssl.create_default_context(cafile=str(info.ca_path) if info.ca_path else None, cadata=ca_data)
    if info.insecure:
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    cert, key = (
        _pem(info.certificate_path, info.certificate_data),
        _pem(info.private_key_path, info.private_key_data),
    )
    if cert:
        with tempfile.TemporaryDirectory() as tmp:  # ssl loads a client certificate from files only
            paths = []
            for name, pem in (("tls.crt", cert), ("tls.key", key or cert)):
                path = os.path.join(tmp, name)
                with open(path, "wb") as fh:
                    fh.write(pem)
                paths.append(path)
            ctx.load_cert_chain(paths[0], paths[1])
    return ctx


def _pem(path: Any, data: Any) -> bytes | None:
    if path:
        with open(path, "rb") as fh:
            return fh.read()
    if not data:
        return None
    raw = data.encode() if isinstance(data, str) else data
    return raw if b"-----BEGIN" in raw else base64.b64decode(raw)


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
    def __init__(self, info: kopf.ConnectionInfo | None = None, workers: int = 8) -> None:
        self.info = info
        self.workers = workers
        self._sessions: dict[str, aiohttp.ClientSession] = {}
        # Leader election's fence: every write but the Lease's own asks it first (None: no election).
        self.fence: Callable[[], bool] | None = None

    def _session(self, resource: str) -> aiohttp.ClientSession:
        """One pooled session for everything, and one of its own for the Lease: a renewal never
        queues behind a burst of creates."""
        lane = "lease" if resource == "leases" else "api"
        session = self._sessions.get(lane)
        if session is None or session.closed:
            info = self.info = self.info or connection_info()
            headers = {"Accept": "application/json", "User-Agent": COMPONENT}
            if info.token:
                headers["Authorization"] = f"{info.scheme or 'Bearer'} {info.token}"
            auth = aiohttp.BasicAuth(info.username, info.password or "") if info.username else None
            connector = aiohttp.TCPConnector(
                ssl=_ssl_context(info) if info.server.startswith("https") else False,
                limit=1 if lane == "lease" else self.workers,
            )
            session = aiohttp.ClientSession(
                base_url=None, headers=headers, auth=auth, connector=connector, timeout=REQUEST_TIMEOUT
            )
            self._sessions[lane] = session
        return session

    def url(self, resource: str, namespace: str | None = None, name: str = "", sub: str = "") -> str:
        self.info = self.info or connection_info()
        path = PREFIXES[resource] + (f"/namespaces/{namespace}" if namespace else "") + f"/{resource}"
        return self.info.server.rstrip("/") + path + (f"/{name}" if name else "") + (f"/{sub}" if sub else "")

    async def _call(
        self,
        verb: str,
        resource: str,
        *,
        namespace: str | None = None,
        name: str = "",
        sub: str = "",
        body: Any = None,
        params: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> dict[str, Any]:
        """One API request; the answer's JSON. Raises :class:`ApiException` on an error status."""
        if verb in WRITE_VERBS and resource != "leases" and self.fence is not None and not self.fence():
            raise NotLeader(f"{verb} {resource}: not the leader (renew deadline passed)")
        metrics.API_REQUESTS.labels(verb, f"{resource}/{sub}" if sub else resource).inc()
        data = json.dumps(body) if body is not None else None
        headers = {"Content-Type": content_type} if data is not None else None
        url = self.url(resource, namespace, name, sub)
        for attempt in range(1, THROTTLE_RETRIES + 1):
            async with self._session(resource).request(
                HTTP_VERBS[verb], url, data=data, headers=headers, params=params
            ) as resp:
                text = await resp.text()
                if resp.status == 429 and attempt < THROTTLE_RETRIES:  # not processed: safe to repeat
                    await asyncio.sleep(min(5.0, float(resp.headers.get("Retry-After") or 1)))
                    continue
                if resp.status >= 400:
                    metrics.API_ERRORS.labels(verb, resource, str(resp.status)).inc()
                    raise ApiException(resp.status, resp.reason or "", text[:1000])
                out: dict[str, Any] = json.loads(text) if text else {}
                return out
        raise AssertionError("unreachable")

    # -- creates ----------------------------------------------------------------------------
    async def create(self, obj: dict[str, Any]) -> bool:
        """Create ``obj``; True if created now, False if it already existed (also success)."""
        kind, ns = obj["kind"], obj["metadata"]["namespace"]
        resources = {
            "Job": "jobs",
            "Service": "services",
            "ConfigMap": "configmaps",
            "NetworkPolicy": "networkpolicies",
            **CUSTOM_PLURALS,
        }
        if kind not in resources:
            raise ValueError(f"kind: cannot create {kind}")
        try:
            await self._call("create", resources[kind], namespace=ns, body=obj)
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        return True

    async def patch_job(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        try:
            await self._call(
                "patch", "jobs", namespace=namespace, name=name, body=patch, content_type=MERGE_PATCH
            )
        except ApiException as exc:
            if exc.status != 404:  # gone already: nothing to suspend
                raise

    async def delete_job(self, namespace: str, name: str) -> None:
        """Delete a Job and (in the background) its pods; gone already is success."""
        try:
            await self._call(
                "delete", "jobs", namespace=namespace, name=name, body={"propagationPolicy": "Background"}
            )
        except ApiException as exc:
            if exc.status != 404:
                raise

    async def write_configmap(self, obj: dict[str, Any], exists: bool) -> dict[str, Any] | None:
        """Create (or replace, when ``exists``) a ConfigMap; the stored object, or None when a
        create found one already there."""
        ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
        try:
            if exists:
                return await self._call("update", "configmaps", namespace=ns, name=name, body=obj)
            return await self._call("create", "configmaps", namespace=ns, body=obj)
        except ApiException as exc:
            if exc.status == 409 and not exists:
                return None
            raise

    async def delete(self, plural: str, namespace: str, name: str) -> None:
        """Delete a custom object in the background (its children go by garbage collection)."""
        try:
            await self._call(
                "delete", plural, namespace=namespace, name=name, body={"propagationPolicy": "Background"}
            )
        except ApiException as exc:
            if exc.status != 404:
                raise

    async def patch(
        self, plural: str, namespace: str, name: str, patch: dict[str, Any]
    ) -> dict[str, Any] | None:
        """Merge-patch a custom object (e.g. its finalizers); None if it is gone."""
        try:
            return await self._call(
                "patch", plural, namespace=namespace, name=name, body=patch, content_type=MERGE_PATCH
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

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
            return await self._call(
                "patch",
                plural,
                namespace=namespace,
                name=name,
                sub="status",
                body=body,
                content_type=MERGE_PATCH,
            )
        except ApiException as exc:
            if exc.status == 404 or (exc.status == 409 and resource_version):
                return None  # deleted meanwhile, or changed since the version we planned from
            raise

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
            await self._call("create", "events", namespace=meta["namespace"], body=body)
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
            secret_obj = await self._call("get", "secrets", namespace=namespace, name=secret)
        except ApiException as exc:
            if exc.status == 404:
                return "", None
            raise
        version = str((secret_obj.get("metadata") or {}).get("resourceVersion") or "")
        data = secret_obj.get("data") or {}

        def value(key: str) -> str | None:
            raw = data.get(key)
            return base64.b64decode(raw).decode() if raw else None

        key_id, secret_key = value("AWS_ACCESS_KEY_ID"), value("AWS_SECRET_ACCESS_KEY")
        if not key_id or not secret_key:
            return version, None
        return version, Credentials(key_id, secret_key, value("AWS_SESSION_TOKEN"))

    async def close(self) -> None:
        for session in self._sessions.values():
            await session.close()


async def list_objects(
    kube: Kube, resource: str, namespaces: tuple[str, ...], label_selector: str = ""
) -> list[dict[str, Any]]:
    """One LIST per namespace (or one cluster-wide): primes the caches before the first reconcile."""
    out: list[dict[str, Any]] = []
    params = {"labelSelector": label_selector} if label_selector else None
    for ns in namespaces or (None,):
        page = await kube._call("list", resource, namespace=ns, params=params)
        out.extend(page.get("items") or [])
    return out
