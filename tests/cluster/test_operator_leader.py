"""Leader election against the real apiserver: skewed clocks and a partition never give two leaders.

Two electors (the operator's own :class:`temper.leader.LeaderElector`, each with its own client)
race for one Lease. Their wall clocks are ten minutes apart. Each "acts" by creating ConfigMaps
through the operator's fenced write path as fast as it may; the apiserver's resourceVersions then
order every write, so the written sequence must read ``a…a b…b``: one handover, no interleaving.
The holder's Lease calls are then partitioned (they hang, as on a black-holed connection) while
its other writes still get through, the worst case: it must stop writing before the standby starts.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from kubernetes import client
from temper.config import OperatorConfig
from temper.kube import Kube, NotLeader
from temper.leader import LeaderElector
from temper_dev.cluster import Cluster

pytestmark = pytest.mark.cluster
SKEW = timedelta(minutes=10)
LABEL = "temper.dev/leader-test"


class PartitionableKube(Kube):
    """The operator's Kube whose Lease calls can be made to hang (an apiserver partition)."""

    partitioned = False

    async def _call(self, verb: str, resource: str, **kwargs: Any) -> dict[str, Any]:
        if self.partitioned and resource == "leases":
            await asyncio.sleep(3600)
        return await super()._call(verb, resource, **kwargs)


class Contender:
    def __init__(self, cluster: Cluster, namespace: str, identity: str, skew: timedelta) -> None:
        self.identity = identity
        self.namespace = namespace
        self.kube = PartitionableKube(workers=4)  # logs in from KUBECONFIG, as the operator does
        config = OperatorConfig(
            lease_name="leader-test",
            lease_namespace=namespace,
            lease_duration_seconds=3.0,
            lease_renew_deadline_seconds=2.0,
            lease_renew_seconds=0.5,
            identity=identity,
        )
        self.lost = False
        self.elector = LeaderElector(
            self.kube, config, wall=lambda: datetime.now(UTC) + skew, on_lost=self._lost
        )
        self.kube.fence = self.elector.may_act
        self.writes: list[tuple[float, float]] = []  # (sent, answered) on the shared monotonic clock
        self.refused = 0

    def _lost(self) -> None:
        self.lost = True

    async def elect(self) -> None:
        await self.elector.acquire()
        await self.elector.keep()

    async def act(self) -> None:
        """Write as fast as it can once it has led, even after stepping down (a leader that has
        not noticed yet): the fence alone must stop it."""
        n = 0
        while True:
            await asyncio.sleep(0.02)
            if not (self.elector.is_leader or self.lost):
                continue
            n += 1
            body = {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {
                    "name": f"w-{self.identity}-{n}",
                    "namespace": self.namespace,
                    "labels": {LABEL: self.identity},
                },
                "data": {"by": self.identity},
            }
            sent = time.monotonic()
            try:
                await self.kube.create(body)
            except NotLeader:
                self.refused += 1
                continue
            self.writes.append((sent, time.monotonic()))


async def _until(what: str, check: Callable[[], bool], within: float) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def _scenario(a: Contender, b: Contender) -> None:
    tasks: list[asyncio.Task[Any]] = []

    def spawn(coro: Coroutine[Any, Any, None]) -> None:
        tasks.append(asyncio.create_task(coro))

    try:
        spawn(a.elect())
        spawn(a.act())
        await _until("a leads", a.elector.may_act, 10)
        spawn(b.elect())
        spawn(b.act())
        await asyncio.sleep(5.0)  # well past one lease duration: a renews, so b must wait
        assert not b.writes, "the standby acted while the holder was renewing"
        a.kube.partitioned = True  # a's renewals hang; its other writes still land
        await _until("b takes over", lambda: bool(b.writes), 15)
        await asyncio.sleep(1.0)
        a.kube.partitioned = False  # healed: a must not come back
        await asyncio.sleep(2.0)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for contender in (a, b):
            await contender.kube.close()


@pytest.mark.parametrize("holder_skew", [SKEW, -SKEW], ids=["holder-ahead", "holder-behind"])
def test_skewed_clocks_and_a_partition_never_give_two_leaders(
    cluster: Cluster, namespace: str, holder_skew: timedelta, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(cluster.kubeconfig))
    a = Contender(cluster, namespace, "a", holder_skew)
    b = Contender(cluster, namespace, "b", -holder_skew)
    asyncio.run(_scenario(a, b))

    assert a.lost, "the partitioned holder never stepped down"
    assert a.writes
    assert b.writes
    assert max(done for _, done in a.writes) < min(sent for sent, _ in b.writes), "leaders overlapped"
    # The apiserver as referee: its resourceVersions order every write that landed.
    with cluster.api_client() as api_client:
        items = client.CoreV1Api(api_client).list_namespaced_config_map(namespace, label_selector=LABEL).items
    order = [
        cm.metadata.labels[LABEL] for cm in sorted(items, key=lambda c: int(c.metadata.resource_version))
    ]
    counts = {who: order.count(who) for who in ("a", "b")}
    assert counts == {"a": len(a.writes), "b": len(b.writes)}, counts
    assert order == ["a"] * counts["a"] + ["b"] * counts["b"], f"interleaved writes: {counts}"
    assert a.refused > 0  # a kept trying after its deadline and the fence refused every write
