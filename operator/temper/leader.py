"""Leader election on a coordination.k8s.io Lease: one active operator, standbys wait.

kopf's own peering is disabled (standalone mode): the Lease is the single source of truth.
The rules are client-go's (``tools/leaderelection``), so that no two operators ever act at once:

- Expiry is never judged from the holder's ``renewTime`` (another node's wall clock). A standby
  notes, on its own monotonic clock, the moment it *observed* the record change, and takes over
  only after a full ``leaseDurationSeconds`` without a change. Clock skew cannot shorten that.
- The leader acts only until ``renew_deadline`` after the *start* of its last successful renewal
  (the write may have landed any time after it was sent). ``renew_deadline < lease_duration``, so
  it has stopped before any standby's wait, which began no earlier than that write, can end.
- The deadline is enforced at the write itself (:meth:`LeaderElector.may_act` fences every write
  in :class:`temper.kube.Kube`), not only by a renew loop that a hung call could hold up; and the
  renew loop runs on a thread of its own, so a busy event loop never delays a renewal.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from temper.config import OperatorConfig
from temper.kube import ApiException, Kube

log = logging.getLogger("temper.leader")
EXIT_LOST_LEADERSHIP = 70


def _micro(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class Record:
    """What a standby compares between reads: any change means the holder is alive."""

    holder: str
    renew_time: str
    transitions: int
    duration: float


def _record(lease: dict[str, Any]) -> Record:
    spec = lease.get("spec") or {}
    return Record(
        spec.get("holderIdentity") or "",
        str(spec.get("renewTime") or ""),
        int(spec.get("leaseTransitions") or 0),
        float(spec.get("leaseDurationSeconds") or 0),
    )


def _exit_lost() -> None:
    log.error("lost the lease: exiting so a standby takes over")
    logging.shutdown()
    os._exit(EXIT_LOST_LEADERSHIP)


class LeaderElector:
    """``wall`` only stamps renewTime/acquireTime for humans; ``mono`` makes every decision."""

    def __init__(
        self,
        kube: Kube,
        config: OperatorConfig,
        *,
        wall: Callable[[], datetime] = lambda: datetime.now(UTC),
        mono: Callable[[], float] = time.monotonic,
        on_lost: Callable[[], None] = _exit_lost,
    ) -> None:
        self.kube = kube
        self.main_kube = kube  # the operator loop's client (release); keep_in_thread has its own
        self.released = False
        self.config = config
        self.wall = wall
        self.mono = mono
        self.on_lost = on_lost
        self.is_leader = False
        self.observed: Record | None = None
        self.observed_at = 0.0  # mono() when ``observed`` last changed
        self.act_until = float("-inf")  # mono() deadline for acting as leader
        self.lost = False

    def may_act(self) -> bool:
        """True while this process may write: it holds the Lease and its renew deadline is ahead."""
        return self.is_leader and not self.lost and self.mono() < self.act_until

    def _body(self, acquire: str, rv: str | None, transitions: int) -> dict[str, Any]:
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
                "acquireTime": acquire,
                "renewTime": _micro(self.wall()),
                "leaseTransitions": transitions,
            },
        }

    def _observe(self, record: Record, now: float) -> None:
        if record != self.observed:
            self.observed, self.observed_at = record, now

    async def try_acquire(self) -> bool | None:
        """One attempt: create the Lease, renew our own, or take over one unchanged for a lease
        duration. True: we hold it (acting window extended); False: someone else holds it;
        None: a write race (409), try again. Writes carry the read's resourceVersion."""
        name, ns = self.config.lease_name, self.config.lease_namespace
        started = self.mono()  # the write below can land no earlier than this
        try:
            lease = await self.kube._call("get", "leases", namespace=ns, name=name)
        except ApiException as exc:
            if exc.status != 404:
                raise
            body = self._body(_micro(self.wall()), None, 0)
            try:
                await self.kube._call("create", "leases", namespace=ns, body=body)
            except ApiException as create_exc:
                if create_exc.status == 409:
                    return None
                raise
            return self._won(started)
        record = _record(lease)
        self._observe(record, self.mono())
        mine = record.holder == self.config.identity
        duration = record.duration or self.config.lease_duration_seconds
        if record.holder and not mine and self.mono() < self.observed_at + duration:
            return False
        acquired = str((lease.get("spec") or {}).get("acquireTime") or "") if mine else ""
        transitions = record.transitions + (0 if mine else 1)
        rv = (lease.get("metadata") or {}).get("resourceVersion")
        body = self._body(acquired or _micro(self.wall()), rv, transitions)
        try:
            written = await self.kube._call("update", "leases", namespace=ns, name=name, body=body)
        except ApiException as exc:
            if exc.status == 409:
                return None
            raise
        self._observe(_record(written), self.mono())
        return self._won(started)

    def _won(self, started: float) -> bool:
        if not self.lost:
            self.is_leader = True
            self.act_until = started + self.config.lease_renew_deadline_seconds
        return not self.lost

    async def acquire(self) -> None:
        while True:
            try:
                if await self.try_acquire():
                    log.info(
                        "%s acquired lease %s/%s",
                        self.config.identity,
                        self.config.lease_namespace,
                        self.config.lease_name,
                    )
                    return
            except Exception as exc:  # apiserver unreachable: keep waiting as a standby
                log.warning("lease not acquired: %s", _describe(exc))
            await asyncio.sleep(self.config.lease_renew_seconds)

    async def keep(self) -> None:
        """Renew every ``lease_renew_seconds``; step down at the renew deadline or when another
        holder appears. A renewal that hangs is abandoned at the deadline."""
        while not self.lost:
            await asyncio.sleep(self.config.lease_renew_seconds)
            remaining = self.act_until - self.mono()
            ok: bool | None = None
            if remaining > 0:
                try:
                    ok = await asyncio.wait_for(self.try_acquire(), timeout=remaining)
                except Exception as exc:  # includes TimeoutError: retried until the deadline
                    log.warning("lease renewal failed: %s", _describe(exc))
            if self.released:
                return
            if ok is False or self.mono() >= self.act_until:
                self.step_down()
                return

    def keep_in_thread(self) -> threading.Thread:
        """:meth:`keep` on a thread and event loop of its own, with its own connections: a burst
        of work on the operator's loop (or a long GIL holder) cannot delay a renewal."""
        kube = Kube(self.kube.info, workers=1)
        kube.fence = self.kube.fence

        def run() -> None:
            self.kube = kube
            asyncio.run(self.keep())

        thread = threading.Thread(target=run, name="lease", daemon=True)
        thread.start()
        return thread

    def step_down(self) -> None:
        self.lost = True
        self.is_leader = False
        self.on_lost()

    async def release(self) -> None:
        """Hand over at once on a clean shutdown instead of waiting out the lease."""
        if not self.may_act():
            return
        self.released = True
        self.lost, self.is_leader = True, False  # nothing more is written after this
        name, ns = self.config.lease_name, self.config.lease_namespace
        kube = self.main_kube
        try:
            lease = await kube._call("get", "leases", namespace=ns, name=name)
            if (lease.get("spec") or {}).get("holderIdentity") == self.config.identity:
                lease["spec"]["holderIdentity"] = None
                await kube._call("update", "leases", namespace=ns, name=name, body=lease)
        except ApiException as exc:
            log.warning("lease not released: HTTP %s", exc.status)


def _describe(exc: BaseException) -> str:
    status = getattr(exc, "status", None)
    return f"HTTP {status}" if status else type(exc).__name__
