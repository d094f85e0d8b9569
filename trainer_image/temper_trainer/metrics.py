"""The trainer pod's Prometheus endpoint (scraped through a PodMonitor).

Gauges carry no labels: one pod is one stage attempt, and the PodMonitor adds pod/namespace.

A stage can end between two scrapes (an eval stage often lives a few seconds), and its final values
would then never reach Prometheus. ``await_final_scrape`` keeps the endpoint up until one scrape
has read them, for at most ``metricsFinalScrapeSeconds`` of the contract (chart value
``trainer.metricsFinalScrapeSeconds``).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Gauge, start_http_server
from prometheus_client.metrics_core import Metric

log = logging.getLogger(__name__)


class TrainerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self._updated = time.monotonic()
        self._scraped = threading.Event()  # set by a scrape that began after the last update
        r.register(_ScrapeWitness(self))  # first: a scrape notes its start before reading a gauge
        self.loss = Gauge("temper_trainer_loss", "Latest training loss", registry=r)
        self.reward = Gauge("temper_trainer_reward", "Latest mean reward (RL stages)", registry=r)
        self.kl = Gauge("temper_trainer_kl", "Latest KL to the reference policy (RL stages)", registry=r)
        self.tokens_per_second = Gauge(
            "temper_trainer_tokens_per_second", "Training throughput in tokens per second", registry=r
        )
        self.progress_ratio = Gauge(
            "temper_trainer_progress_ratio", "Completed steps / total (0..1)", registry=r
        )
        self.step = Gauge("temper_trainer_step", "Current optimizer step", registry=r)
        self.server: object | None = None

    def serve(self, port: int, addr: str = "0.0.0.0") -> int:  # noqa: S104 - a pod's scrape port
        """Serve on ``port``; returns the port actually bound.

        Metrics must never fail a training stage: where pods share a network namespace (the exec
        node, hostNetwork) the port can be taken, so fall back to an ephemeral one and say so.
        """
        try:
            self.server = start_http_server(port, addr=addr, registry=self.registry)
        except OSError as err:
            server, _thread = start_http_server(0, addr=addr, registry=self.registry)
            self.server = (server, _thread)
            bound = int(server.server_port)
            log.warning("metrics port %d unavailable (%s); serving on %d instead", port, err, bound)
            return bound
        return port

    def update(
        self,
        *,
        step: int,
        total: int,
        loss: float | None = None,
        tokens_per_second: float | None = None,
        reward: float | None = None,
        kl: float | None = None,
        **_ignored: float,
    ) -> None:
        self._updated = time.monotonic()
        self._scraped.clear()
        self.step.set(step)
        self.progress_ratio.set(step / total if total else 0.0)
        for gauge, value in (
            (self.loss, loss),
            (self.tokens_per_second, tokens_per_second),
            (self.reward, reward),
            (self.kl, kl),
        ):
            if value is not None and math.isfinite(value):
                gauge.set(value)

    def scraped(self, began: float) -> None:
        if began >= self._updated:
            self._scraped.set()

    def await_final_scrape(
        self, timeout: float, *, stopping: Callable[[], bool] = lambda: False, poll: float = 0.2
    ) -> bool:
        """Serve until a scrape has read the latest values, at most ``timeout`` s; True if one did.

        Nothing waits when no server runs, ``timeout`` is 0, or a stop (SIGTERM) is due: the
        grace period is the checkpoint's, not the metrics'.
        """
        if self.server is None or timeout <= 0:
            return self._scraped.is_set()
        deadline = time.monotonic() + timeout
        while not self._scraped.is_set() and not stopping():
            left = deadline - time.monotonic()
            if left <= 0:
                log.info("no scrape of the final metrics within %.0f s; exiting", timeout)
                return False
            self._scraped.wait(min(poll, left))
        return self._scraped.is_set()


class _ScrapeWitness:
    """A collector that yields nothing and notes when a scrape (a registry collect) begins."""

    def __init__(self, metrics: TrainerMetrics) -> None:
        self.metrics = metrics

    def describe(self) -> list[Metric]:  # no collect() at registration: that is not a scrape
        return []

    def collect(self) -> Iterator[Metric]:
        self.metrics.scraped(time.monotonic())
        return iter(())
