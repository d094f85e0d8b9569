"""Pure decisions around one continual pass: what the apply layer must read, write and mirror.

``temper.continual.cycle.plan`` decides *which* cycle starts or finishes; this module turns that
plan (and what storage returned) into concrete writes: the child's storage prefix, which data
source to consult, the replay segments to append, the run status after a rollback, and the
``Adapter.status.aliases`` mirror. No Kubernetes or S3 access here: the apply layer
(``temper.handlers.continual_apply``) does the I/O and passes results in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import parse_qs, urlparse

from temper.continual import cycle as cyc
from temper.continual.data_selection import Selection, Watermark, select_by_template
from temper.continual.replay import Segment
from temper.continual.spec import ContinualSpec

Key = tuple[str, str]  # (namespace, name)
BUILTIN_DEFAULT_EXAMPLES = 64  # the trainer's builtin:// generator default when n= is absent


def invalid_spec_status(
    status: Mapping[str, Any], message: str, now: datetime, reason: str = "InvalidSpec"
) -> dict[str, Any]:
    condition = {"type": "Stalled", "status": "True", "reason": reason, "message": message}
    return {"conditions": cyc.upsert_condition(status.get("conditions") or [], condition, now)}


@dataclass(frozen=True)
class Promotion:
    alias: str
    adapter: str


@dataclass(frozen=True)
class ReplayAppend:
    cycle: int
    datasets: tuple[dict[str, Any], ...]


def finish_actions(plan: cyc.Plan, cspec: ContinualSpec) -> list[Promotion | ReplayAppend]:
    """Per finished cycle, in order: move the alias if its adapter passed the gates, then add its
    new data to the replay buffer if it succeeded and a buffer is configured."""
    out: list[Promotion | ReplayAppend] = []
    for done in plan.finished:
        if done.promote and cspec.promote is not None and done.adapter:
            out.append(Promotion(cspec.promote.alias, done.adapter))
        if done.succeeded and cspec.replay.uri and done.new_data:
            out.append(ReplayAppend(done.cycle, done.new_data))
    return out


def child_storage(storage: Mapping[str, Any], cycle: int) -> dict[str, Any]:
    """Each cycle writes under its own storage prefix: children all run as cycle 1."""
    return {**storage, "uri": f"{str(storage.get('uri', '')).rstrip('/')}/cycles/{cycle}/"}


# -- data selection: which source to read ----------------------------------------------------------
@dataclass(frozen=True)
class TemplateSource:
    """Read one object's ETag (s3:// only), then ``finish`` builds the selection."""

    uri: str
    cycle_date: datetime
    cycle: int
    run: str

    def finish(self, cspec: ContinualSpec, etag: str | None) -> Selection:
        assert cspec.new_data is not None
        return select_by_template(
            cspec.new_data, cycle_date=self.cycle_date, cycle=self.cycle, run=self.run, etag=etag
        )


@dataclass(frozen=True)
class PrefixSource:
    """List the prefix; objects past ``since`` are new."""

    prefix: str
    since: Watermark


UNCHANGED = Selection((), ("(unchanged datasets)",))
NOT_THERE_YET = Selection((), ())


def selection_source(
    run: Mapping[str, Any], cspec: ContinualSpec, start: cyc.StartCycle
) -> Selection | TemplateSource | PrefixSource:
    new_data = cspec.new_data
    if new_data is None:
        return UNCHANGED
    name = str((run.get("metadata") or {}).get("name"))
    if new_data.uri_template is not None:
        tz_date = start.scheduled_time.astimezone(cspec.schedule.tz)
        probe = select_by_template(new_data, cycle_date=tz_date, cycle=start.cycle, run=name, etag=None)
        return TemplateSource(probe.datasets[0].uri, tz_date, start.cycle, name)
    assert new_data.prefix is not None
    since = Watermark.from_status(((run.get("status") or {}).get("watermark") or {}).get("prefix"))
    return PrefixSource(new_data.prefix, since)


def advances_prefix_watermark(cspec: ContinualSpec) -> bool:
    return cspec.new_data is not None and cspec.new_data.prefix is not None


# -- replay buffer ---------------------------------------------------------------------------------
def builtin_examples(uri: str) -> int | None:
    """Example count of a ``builtin://`` dataset (from its n=), None for stored data."""
    if not uri.startswith("builtin://"):
        return None
    return int(parse_qs(urlparse(uri).query).get("n", [str(BUILTIN_DEFAULT_EXAMPLES)])[0])


def replay_segments(
    cycle: int, datasets: Iterable[Mapping[str, Any]], count: Callable[[str], int]
) -> list[Segment]:
    """``count(uri)`` reads the example count (the apply layer's storage read)."""
    return [
        Segment(
            cycle=cycle,
            name=str(d["name"]),
            uri=str(d["uri"]),
            examples=count(str(d["uri"])),
            format=d.get("format", "prompt-completion"),
            task=d.get("task"),
        )
        for d in datasets
    ]


# -- rollback --------------------------------------------------------------------------------------
def rolled_back_status(status: Mapping[str, Any], alias: str, adapter: str, now: datetime) -> dict[str, Any]:
    """The run's status once ``alias`` was rolled back to ``adapter`` by a user."""
    cycle = next((c.get("cycle") for c in status.get("cycles") or [] if c.get("adapter") == adapter), None)
    aliases = [a for a in status.get("aliases") or [] if a.get("name") != alias]
    aliases.append({"name": alias, "adapter": adapter, "cycle": cycle, "promotedAt": cyc.rfc3339(now)})
    book = dict(status.get("watermark") or {})
    book.pop("baseline", None)  # the gates' baseline now comes from the rolled-back cycle's results
    return {"aliases": aliases, "watermark": book}


# -- Adapter.status.aliases mirror -----------------------------------------------------------------
def alias_mirror(runs: Iterable[Mapping[str, Any]]) -> dict[Key, list[str]]:
    """Adapter (namespace, name) → sorted names of the aliases pointing at it, from runs' status."""
    mirror: dict[Key, set[str]] = {}
    for run in runs:
        namespace = str((run.get("metadata") or {}).get("namespace", ""))
        for entry in (run.get("status") or {}).get("aliases") or []:
            if entry.get("adapter") and entry.get("name"):
                mirror.setdefault((namespace, str(entry["adapter"])), set()).add(str(entry["name"]))
    return {key: sorted(names) for key, names in mirror.items()}


def alias_mirror_patches(
    adapters: Sequence[Mapping[str, Any]], mirror: Mapping[Key, list[str]]
) -> list[tuple[Key, list[str]]]:
    """Adapters whose ``status.aliases`` differs from the mirror, with the list to write: an alias
    that moved away disappears from the old Adapter (``[]``), and nothing is written when in sync."""
    out: list[tuple[Key, list[str]]] = []
    for adapter in adapters:
        meta = adapter.get("metadata") or {}
        key = (str(meta.get("namespace", "")), str(meta.get("name")))
        current = list((adapter.get("status") or {}).get("aliases") or [])
        wanted = mirror.get(key, [])
        if current != wanted:
            out.append((key, wanted))
    return out
