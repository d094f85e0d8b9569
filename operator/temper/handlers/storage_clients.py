"""S3 clients for the controller, cached, and the bounded pool every S3 call runs in.

- A client is cached per (namespace, Secret, endpoint, region, addressing style) *and* the
  Secret's resourceVersion: a rotated Secret gets a new client; an unchanged one never rebuilds.
- The Secret is re-read (one GET) at most every ``CREDENTIALS_TTL`` seconds per key, and at once
  after the store refused the credentials, so a rotation is picked up without a watch on Secrets.
- Every S3 call runs in :attr:`StorageClients.pool`, its own few threads: a slow or partitioned S3
  can fill that pool, never the Kubernetes client's, so Job creation never waits on S3.
- ``spec.storage.secretRef`` unset: ``TEMPER_DEFAULT_STORAGE_SECRET``, then the environment's.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from temper import adapters as adapter_ctl
from temper import metrics
from temper.config import OperatorConfig
from temper.kube import Kube
from temper.storage import Storage, make_client

T = TypeVar("T")
CREDENTIALS_TTL = 300.0
# S3 error codes after which the Secret is re-read at once (it may have been rotated).
CREDENTIAL_ERRORS = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "AccessDenied")
Where = tuple[str, str, str, str, str]  # namespace, secret, endpoint, region, addressing style


@dataclass
class _Entry:
    version: str  # the Secret's resourceVersion ("" when there is no Secret)
    checked: float  # monotonic time of the last Secret read
    storage: Storage


def _count_request(model: Any, **_: Any) -> None:
    metrics.STORAGE_REQUESTS.labels(model.name).inc()


class StorageClients:
    def __init__(self, kube: Kube, config: OperatorConfig) -> None:
        self.kube = kube
        self.config = config
        self.pool = ThreadPoolExecutor(max_workers=config.storage_workers, thread_name_prefix="s3")
        self._clients: dict[Where, _Entry] = {}
        self.builds = 0  # clients built, for tests and the benchmark

    def where(self, namespace: str, options: Mapping[str, Any]) -> Where:
        secret = (options.get("secretRef") or {}).get("name") or self.config.default_storage_secret or ""
        endpoint = options.get("endpointUrl") or self.config.default_storage_endpoint or ""
        return (
            namespace,
            secret,
            endpoint,
            options.get("region") or "",
            options.get("addressingStyle") or "",
        )

    async def get(self, namespace: str, options: Mapping[str, Any]) -> Storage:
        """The Storage for an S3Options-shaped mapping (secretRef, endpointUrl, region, addressingStyle)."""
        where = self.where(namespace, options)
        entry = self._clients.get(where)
        now = time.monotonic()
        if entry is not None and now - entry.checked < CREDENTIALS_TTL:
            return entry.storage
        secret = where[1]
        version, credentials = (
            await self.kube.storage_credentials(namespace, secret) if secret else ("", None)
        )
        if entry is not None and entry.version == version and (credentials is not None or not secret):
            entry.checked = now
            return entry.storage
        config = adapter_ctl.storage_config(dict(options), self.config.default_storage_endpoint)
        storage = await self.run(lambda: Storage(config, make_client(config, credentials)))
        storage.client.meta.events.register("before-call.s3", _count_request)
        self.builds += 1
        # A named Secret that is missing (or lacks keys) is looked up again on the next call:
        # once someone creates it, storage must not keep using a credential-less client.
        if credentials is not None or not secret:
            self._clients[where] = _Entry(version, now, storage)
        return storage

    def refused(self, namespace: str, options: Mapping[str, Any], error: str) -> None:
        """If ``error`` says the store refused the credentials, re-read the Secret on the next call."""
        entry = self._clients.get(self.where(namespace, options))
        if entry is not None and any(code in error for code in CREDENTIAL_ERRORS):
            entry.checked = float("-inf")

    def forget_namespace(self, namespace: str) -> None:
        for where in [w for w in self._clients if w[0] == namespace]:
            del self._clients[where]

    async def run(self, fn: Callable[[], T]) -> T:
        """Run one blocking S3 call (or a few) in the storage pool."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
