"""Admission timelines from the real Kueue: who was admitted when, sampled from Workloads and runs."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes.client.exceptions import ApiException

from tests.cluster.test_operator_pipeline import Api
from tests.fixtures.kueue import Queues, admitted


@dataclass
class Timeline:
    """Samples Workloads and runs every ``period`` seconds in a thread until ``stop()``."""

    api: Api
    queues: Queues
    runs: list[str]
    period: float = 0.2
    started: float = field(default_factory=time.monotonic)
    # workload name -> [first admitted, last admitted] seconds since start
    admitted_at: dict[str, list[float]] = field(default_factory=dict)
    max_admitted: int = 0
    max_admitted_gpus: int = 0
    # run -> reasons its Reconciling condition had while a stage Job was suspended
    waiting_reasons: dict[str, set[str]] = field(default_factory=dict)
    waiting_messages: dict[str, set[str]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> Timeline:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sample()
            except Exception as exc:
                self.errors.append(repr(exc))
            self._stop.wait(self.period)

    def sample(self) -> None:
        now = round(time.monotonic() - self.started, 2)
        active = [w for w in self.queues.workloads() if admitted(w) and not _finished(w)]
        self.max_admitted = max(self.max_admitted, len(active))
        gpus = sum(_gpus(w) for w in active)
        self.max_admitted_gpus = max(self.max_admitted_gpus, gpus)
        for w in active:
            span = self.admitted_at.setdefault(w["metadata"]["name"], [now, now])
            span[1] = now
        before = {run: self._reconciling(run) for run in self.runs}
        suspended = {j.metadata.labels.get("temper.dev/run") for j in self._jobs() if j.spec.suspend}
        for run in self.runs:
            cond = self._reconciling(run)
            # Only a status that held across the Job read describes the suspended Job.
            if run not in suspended or not cond or cond != before[run]:
                continue
            self.waiting_reasons.setdefault(run, set()).add(cond.get("reason", ""))
            self.waiting_messages.setdefault(run, set()).add(cond.get("message", ""))

    def _reconciling(self, run: str) -> dict[str, Any]:
        try:
            return self.api.condition(run, "Reconciling")
        except ApiException as exc:
            if exc.status == 404:  # not created yet
                return {}
            raise

    def _jobs(self) -> list[Any]:
        return list(self.api.batch.list_namespaced_job(self.api.ns).items)

    def report(self) -> dict[str, Any]:
        return {
            "max_admitted": self.max_admitted,
            "max_admitted_gpus": self.max_admitted_gpus,
            "admitted_at": dict(sorted(self.admitted_at.items(), key=lambda kv: kv[1][0])),
            "waiting_reasons": {k: sorted(v) for k, v in self.waiting_reasons.items()},
        }


def _finished(workload: dict[str, Any]) -> bool:
    return any(
        c.get("type") == "Finished" and c.get("status") == "True"
        for c in (workload.get("status") or {}).get("conditions") or []
    )


def _gpus(workload: dict[str, Any]) -> int:
    total = 0
    for ps in ((workload.get("status") or {}).get("admission") or {}).get("podSetAssignments") or []:
        total += int((ps.get("resourceUsage") or {}).get("nvidia.com/gpu", 0) or 0)
    return total


def record(name: str, data: dict[str, Any], out: Path) -> None:
    """The timeline as JSON in the test's tmp dir and on stdout (``pytest -s``); never asserted
    on as timings."""
    text = json.dumps(data, indent=2, sort_keys=True)
    (out / f"{name}.json").write_text(text + "\n")
    print(f"kueue timeline {name}: {text}")
