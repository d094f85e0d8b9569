"""The trainer pod's Prometheus endpoint (scraped through a PodMonitor).

Gauges carry no labels: one pod is one stage attempt, and the PodMonitor adds pod/namespace.
"""

from __future__ import annotations

import logging
import math

from prometheus_client import CollectorRegistry, Gauge, start_http_server

log = logging.getLogger(__name__)


class TrainerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
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
