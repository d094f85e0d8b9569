"""The replay buffer: which earlier cycles' data later cycles rehearse.

The buffer is an index of dataset *references* (one segment per dataset a cycle trained on),
kept at ``<buffer.uri>/buffer.json``; the data stays where it is. After a cycle succeeds its new
data is appended. The operator puts the buffer's segments into the contract's ``data.replay``;
the trainer samples and mixes them (``temper_trainer.data.sample_replay``) with a seed derived
from the run's name and the cycle, so a retried attempt (or a re-run) sees exactly the same mix.

Eviction keeps ``maxExamples`` at segment granularity and is deterministic:

- ``uniform``: the oldest segment goes first (cycle, then name);
- ``per-task-balanced``: the oldest segment of the task holding the most examples goes first,
  so no task is squeezed out by a prolific one.

The segment just appended is never evicted (a cycle larger than the cap is kept whole; the
contract's ``replay.maxExamples`` still caps how many examples a stage samples).
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from temper.api.contract import DatasetFormat, DatasetSpec, ReplaySpec

Sampling = Literal["uniform", "per-task-balanced"]
BUFFER_INDEX = "buffer.json"


class ReplayError(ValueError):
    """Unusable replay settings; the message names the field."""


@dataclass(frozen=True)
class ReplaySettings:
    ratio: float = 0.0
    uri: str | None = None
    max_examples: int | None = None
    sampling: Sampling = "uniform"

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None, where: str = "spec.continual.replay") -> ReplaySettings:
        if not raw:
            return cls()
        ratio = raw.get("ratio", 0.0)
        if not isinstance(ratio, int | float) or isinstance(ratio, bool) or not 0.0 <= ratio < 1.0:
            raise ReplayError(f"{where}.ratio: must be a number in [0, 1), got {ratio!r}")
        buffer = raw.get("buffer") or {}
        uri = buffer.get("uri")
        if ratio > 0 and not uri:
            raise ReplayError(f"{where}.buffer.uri: required when ratio > 0")
        if uri is not None and (not isinstance(uri, str) or not uri.startswith("s3://")):
            raise ReplayError(f"{where}.buffer.uri: must be an s3:// URI, got {uri!r}")
        max_examples = buffer.get("maxExamples")
        if max_examples is not None and (not isinstance(max_examples, int) or max_examples < 1):
            raise ReplayError(f"{where}.buffer.maxExamples: must be an integer >= 1, got {max_examples!r}")
        sampling = buffer.get("sampling", "uniform")
        if sampling not in ("uniform", "per-task-balanced"):
            raise ReplayError(f"{where}.buffer.sampling: {sampling!r} is not uniform or per-task-balanced")
        return cls(float(ratio), uri, max_examples, sampling)

    @property
    def index_uri(self) -> str | None:
        return None if self.uri is None else self.uri.rstrip("/") + "/" + BUFFER_INDEX


@dataclass(frozen=True)
class Segment:
    cycle: int
    name: str
    uri: str
    examples: int
    format: DatasetFormat = "prompt-completion"
    task: str | None = None
    version: str | None = None  # etag, for lineage

    @property
    def task_key(self) -> str:
        return self.task or self.name


@dataclass
class ReplayBuffer:
    segments: list[Segment] = field(default_factory=list)
    evicted: int = 0  # segments evicted over the buffer's life, for status

    @property
    def examples(self) -> int:
        return sum(s.examples for s in self.segments)

    def append(self, new: Sequence[Segment], max_examples: int | None, sampling: Sampling) -> list[Segment]:
        """Add one cycle's segments (idempotent per cycle+name); returns the evicted segments."""
        present = {(s.cycle, s.name) for s in self.segments}
        added = [s for s in new if (s.cycle, s.name) not in present]
        self.segments.extend(added)
        self.segments.sort(key=lambda s: (s.cycle, s.name))
        protected = {(s.cycle, s.name) for s in new}
        gone: list[Segment] = []
        while max_examples is not None and self.examples > max_examples:
            victim = self._victim(protected, sampling)
            if victim is None:
                break
            self.segments.remove(victim)
            gone.append(victim)
        self.evicted += len(gone)
        return gone

    def _victim(self, protected: set[tuple[int, str]], sampling: Sampling) -> Segment | None:
        candidates = [s for s in self.segments if (s.cycle, s.name) not in protected]
        if not candidates:
            return None
        if sampling == "per-task-balanced":
            totals: dict[str, int] = defaultdict(int)
            for s in self.segments:
                totals[s.task_key] += s.examples
            largest = max(sorted({s.task_key for s in candidates}), key=lambda t: totals[t])
            candidates = [s for s in candidates if s.task_key == largest]
        return candidates[0]  # segments are sorted oldest first

    def to_json(self) -> str:
        return json.dumps(
            {"segments": [asdict(s) for s in self.segments], "evicted": self.evicted},
            indent=2,
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, raw: str | bytes) -> ReplayBuffer:
        try:
            data = json.loads(raw)
            segments = [Segment(**s) for s in data.get("segments", [])]
        except (ValueError, TypeError) as exc:
            raise ReplayError(f"{BUFFER_INDEX}: not a valid replay buffer index: {exc}") from None
        return cls(segments, int(data.get("evicted", 0)))


def replay_seed(run: str, cycle: int) -> int:
    """A stable per-cycle seed: the same cycle always replays the same examples."""
    digest = hashlib.sha256(f"{run}/{cycle}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def contract_replay(buffer: ReplayBuffer, settings: ReplaySettings, *, run: str, cycle: int) -> ReplaySpec:
    """The contract's ``data.replay`` for a cycle: the buffer's segments plus ratio/sampling/seed."""
    if settings.ratio <= 0 or not buffer.segments:
        return ReplaySpec(ratio=0.0)
    datasets = [
        DatasetSpec(name=f"replay-c{s.cycle}-{s.name}", uri=s.uri, format=s.format, task=s.task_key)
        for s in buffer.segments
    ]
    return ReplaySpec.model_validate(
        {
            "ratio": settings.ratio,
            "datasets": [d.model_dump(by_alias=True, exclude_none=True) for d in datasets],
            "sampling": settings.sampling,
            "maxExamples": settings.max_examples,
            "seed": replay_seed(run, cycle),
        }
    )


def count_jsonl_examples(chunks: Sequence[bytes]) -> int:
    """Non-empty lines of a JSONL object, streamed in chunks."""
    count, last = 0, b"\n"
    for chunk in chunks:
        if not chunk:
            continue
        count += chunk.count(b"\n")
        last = chunk[-1:]
    return count + (0 if last == b"\n" else 1)
