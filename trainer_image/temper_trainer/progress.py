"""Live progress: ``<output prefix>/attempts/<attempt>/progress.json`` (a ``StageProgress``).

Trainer pods have no Kubernetes API access, so progress travels through the run's own storage:
the trainer rewrites this object every ``progressIntervalSeconds`` (at most 30 s apart), whenever
the percentage crosses a 10% mark, and on every phase change; the operator reads it with the
run's credentials. A failed write never stops training.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Literal

from temper.api.contract import StageContract, StageProgress
from temper.storage import S3Uri, Storage, StorageError

log = logging.getLogger(__name__)

MAX_INTERVAL_SECONDS = 30.0  # the progress contract: a write at least every 30 s and every 10%
Phase = Literal["starting", "training", "evaluating", "publishing", "done"]


def progress_uri(contract: StageContract) -> str:
    return str(
        S3Uri.parse(contract.output.prefix).join("attempts", str(contract.stage.attempt), "progress.json")
    )


class ProgressReporter:
    def __init__(self, contract: StageContract, storage: Storage | None) -> None:
        self.uri = progress_uri(contract)
        self.storage = storage
        self.interval = min(float(contract.progress_interval_seconds), MAX_INTERVAL_SECONDS)
        self._decile = 0
        self.started = time.monotonic()
        self.state = StageProgress()
        self._last_write = 0.0
        self._tokens = 0
        self._token_window_start = self.started
        self.tokens_per_second: float | None = None
        self.writes = 0
        self._first_step: int | None = None  # a resumed run starts mid-way: rate from here on

    def set_phase(self, phase: Phase) -> None:
        self.state.phase = phase
        if phase == "done":
            self.state.percent = 100.0
            self.state.eta_seconds = 0.0
        self.flush()

    def update(
        self,
        *,
        step: int,
        total: int,
        loss: float | None = None,
        tokens: int | None = None,
        force: bool = False,
    ) -> None:
        now = time.monotonic()
        if tokens:
            self._tokens += tokens
            elapsed = now - self._token_window_start
            if elapsed > 0:
                self.tokens_per_second = self._tokens / elapsed
        state = self.state
        state.step, state.total_steps = step, total
        state.percent = round(100.0 * step / total, 2) if total else 0.0
        if loss is not None:
            state.loss = float(loss)
        if self._first_step is None:
            self._first_step, self._first_step_time = step - 1, self.started
        done_here = step - self._first_step
        if done_here > 0 and total >= step:
            state.eta_seconds = round((now - self._first_step_time) / done_here * (total - step), 1)
        state.tokens_per_second = None if self.tokens_per_second is None else round(self.tokens_per_second, 1)
        if state.phase == "starting":
            state.phase = "training"
        decile = int(state.percent // 10)
        if force or decile > self._decile or now - self._last_write >= self.interval:
            self._decile = decile
            self.flush()

    def flush(self) -> None:
        self.state.updated_at = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        self._last_write = time.monotonic()
        if self.storage is None:
            return
        try:
            self.storage.put_bytes(self.uri, self.state.model_dump_json(by_alias=True).encode())
            self.writes += 1
        except StorageError as exc:
            log.warning("progress write failed (training continues): %s", exc)
