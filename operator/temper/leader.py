"""Leader election on a coordination.k8s.io Lease: one active operator, standbys wait.

kopf's own peering is disabled (standalone mode): the Lease is the single source of truth.
A leader that cannot renew within the lease duration exits, so two leaders never overlap for
longer than one renew period; even then, deterministic names keep them from duplicating Jobs.
"""

from __future__ import annotations

import asyncio
import logging
import os
from datetime import UTC, datetime, timedelta
from typing import Any

from kubernetes.client.exceptions import ApiException

from temper.config import OperatorConfig
from temper.kube import Kube

log = logging.getLogger("temper.leader")
EXIT_LOST_LEADERSHIP = 70


def _micro(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse(value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))


class LeaderElector:
    def __init__(self, kube: Kube, config: OperatorConfig) -> None:
        self.kube = kube
        self.config = config
        self.is_leader = False

    def _body(self, now: datetime, acquire: datetime, rv: str | None, transitions: int) -> dict[str, Any]:
        meta: dict[str, Any] = {"name": self.config.lease_name, "namespace": self.config.lease_namespace}
        if rv:
            meta["resourceVersion"] = rv
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": meta,
            "spec": {
                "holderIdentity": self.config.identity,
                "leaseDurationSeconds": max(1, round(self.config.lease_duration_seconds)),
                "acquireTime": _micro(acquire),
                "renewTime": _micro(now),
                "leaseTransitions": transitions,
            },
        }

    async def try_acquire(self) -> bool:
        """One attempt: create the Lease, renew our own, or take over an expired one.

        Every write carries the read's resourceVersion, so of two contenders exactly one wins."""
        name, ns = self.config.lease_name, self.config.lease_namespace
        api = self.kube.coordination
        now = datetime.now(UTC)
        try:
            lease = await self.kube._call("get", "leases", lambda: api.read_namespaced_lease(name, ns))
        except ApiException as exc:
            if exc.status != 404:
                raise
            try:
                await self.kube._call(
                    "create", "leases", lambda: api.create_namespaced_lease(ns, self._body(now, now, None, 0))
                )
            except ApiException as create_exc:
                if create_exc.status == 409:
                    return False
                raise
            return True
        spec = lease.spec
        holder = spec.holder_identity or ""
        renewed = _parse(spec.renew_time)
        duration = spec.lease_duration_seconds or self.config.lease_duration_seconds
        expired = renewed is None or now > renewed + timedelta(seconds=duration)
        if holder and holder != self.config.identity and not expired:
            return False
        mine = holder == self.config.identity
        acquire = _parse(spec.acquire_time) if mine and spec.acquire_time else now
        transitions = (spec.lease_transitions or 0) + (0 if mine else 1)
        body = self._body(now, acquire or now, lease.metadata.resource_version, transitions)
        try:
            await self.kube._call("update", "leases", lambda: api.replace_namespaced_lease(name, ns, body))
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        return True

    async def acquire(self) -> None:
        while True:
            try:
                if await self.try_acquire():
                    self.is_leader = True
                    log.info(
                        "%s acquired lease %s/%s",
                        self.config.identity,
                        self.config.lease_namespace,
                        self.config.lease_name,
                    )
                    return
            except ApiException as exc:
                log.warning("lease not acquired: HTTP %s", exc.status)
            await asyncio.sleep(self.config.lease_renew_seconds)

    async def keep(self) -> None:
        """Renew until the process ends; exit hard when leadership cannot be confirmed in time."""
        last = asyncio.get_running_loop().time()
        while True:
            await asyncio.sleep(self.config.lease_renew_seconds)
            try:
                ok = await self.try_acquire()
            except Exception as exc:
                log.warning("lease renewal failed: %s", type(exc).__name__)
                ok = None
            now = asyncio.get_running_loop().time()
            if ok:
                last = now
            elif ok is False or now - last > self.config.lease_duration_seconds:
                log.error("lost the lease: exiting so a standby takes over")
                os._exit(EXIT_LOST_LEADERSHIP)

    async def release(self) -> None:
        """Hand over at once on a clean shutdown instead of waiting out the lease."""
        if not self.is_leader:
            return
        name, ns = self.config.lease_name, self.config.lease_namespace
        api = self.kube.coordination
        try:
            lease = await self.kube._call("get", "leases", lambda: api.read_namespaced_lease(name, ns))
            if lease.spec.holder_identity == self.config.identity:
                lease.spec.holder_identity = None
                await self.kube._call(
                    "update", "leases", lambda: api.replace_namespaced_lease(name, ns, lease)
                )
        except ApiException as exc:
            log.warning("lease not released: HTTP %s", exc.status)
