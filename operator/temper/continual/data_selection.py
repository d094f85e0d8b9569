"""Each cycle's new data, and the versions recorded for lineage.

Two ways to select it (``spec.continual.newData``):

- ``uriTemplate``: rendered with the cycle's scheduled time in the schedule's time zone and the
  cycle number: ``s3://data/tickets/{cycle_date:%Y-%m}.jsonl``, ``.../part-{cycle}.jsonl``.
  Only the names ``cycle_date``, ``cycle`` and ``run`` exist; attribute or index access is refused.
- ``prefix``: every data object (``.jsonl``, ``.json``, ``.parquet``) under the prefix that no
  earlier cycle consumed. "Since the last cycle" is a watermark on the objects' LastModified plus
  the keys consumed at exactly that instant (S3 timestamps have one-second resolution), so a
  re-run never picks an object twice and a file written later is never lost to clock rounding.

Either way each selected object is recorded as ``name@etag`` for the Adapter's lineage.
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from temper.api.contract import DatasetFormat, DatasetSpec

DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
_FORMATS = ("chat", "prompt-completion", "preference", "prompt")


class SelectionError(ValueError):
    """Unusable newData settings; the message names the field."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str  # full s3:// URI
    etag: str
    last_modified: datetime
    size: int


class ObjectLister(Protocol):
    def list_objects(self, prefix: str) -> list[ObjectInfo]:
        """Every object under an ``s3://bucket/prefix/``."""
        ...


@dataclass(frozen=True)
class NewDataSpec:
    dataset: str
    format: DatasetFormat = "prompt-completion"
    task: str | None = None
    uri_template: str | None = None
    prefix: str | None = None

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], where: str = "spec.continual.newData") -> NewDataSpec:
        dataset = raw.get("dataset")
        if not isinstance(dataset, str) or not dataset:
            raise SelectionError(f"{where}.dataset: required (the name the stages' data.train refers to)")
        template, prefix = raw.get("uriTemplate"), raw.get("prefix")
        if (template is None) == (prefix is None):
            raise SelectionError(f"{where}: set exactly one of uriTemplate or prefix")
        fmt = raw.get("format", "prompt-completion")
        if fmt not in _FORMATS:
            raise SelectionError(f"{where}.format: {fmt!r} is not one of {list(_FORMATS)}")
        if prefix is not None and (not isinstance(prefix, str) or not prefix.startswith("s3://")):
            raise SelectionError(f"{where}.prefix: must be an s3:// URI, got {prefix!r}")
        if template is not None:
            if not isinstance(template, str):
                raise SelectionError(f"{where}.uriTemplate: must be a string")
            _check_template(template, f"{where}.uriTemplate")
        task = raw.get("task")
        return cls(dataset, fmt, task if isinstance(task, str) else None, template, prefix)


@dataclass(frozen=True)
class Watermark:
    """What the prefix mode has consumed so far."""

    last_modified: datetime | None = None
    keys_at: frozenset[str] = frozenset()

    def to_status(self) -> dict[str, Any]:
        if self.last_modified is None:
            return {}
        return {"lastModified": self.last_modified.isoformat(), "keys": sorted(self.keys_at)}

    @classmethod
    def from_status(cls, raw: Mapping[str, Any] | None) -> Watermark:
        if not raw or not raw.get("lastModified"):
            return cls()
        return cls(datetime.fromisoformat(str(raw["lastModified"])), frozenset(raw.get("keys", [])))


@dataclass(frozen=True)
class Selection:
    datasets: tuple[DatasetSpec, ...]
    versions: tuple[str, ...]  # "uri@etag" (or just the uri when it has no version), for lineage
    watermark: Watermark = field(default_factory=Watermark)

    @property
    def empty(self) -> bool:
        return not self.datasets


class _TemplateFormatter(string.Formatter):
    def get_field(self, field_name: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
        if "." in field_name or "[" in field_name:
            raise SelectionError(f"uriTemplate: {{{field_name}}}: attribute and index access are not allowed")
        if field_name not in kwargs:
            raise SelectionError(
                f"uriTemplate: unknown variable {{{field_name}}}; known: cycle_date, cycle, run"
            )
        return kwargs[field_name], field_name


def _check_template(template: str, where: str) -> None:
    try:
        render_template(template, cycle_date=datetime(2000, 1, 1), cycle=1, run="r")
    except SelectionError as exc:
        raise SelectionError(f"{where}: {exc}") from None
    except (ValueError, IndexError) as exc:
        raise SelectionError(f"{where}: {exc}") from None


def render_template(template: str, *, cycle_date: datetime, cycle: int, run: str) -> str:
    try:
        return _TemplateFormatter().format(template, cycle_date=cycle_date, cycle=cycle, run=run)
    except (ValueError, IndexError, KeyError) as exc:
        if isinstance(exc, SelectionError):
            raise
        raise SelectionError(f"uriTemplate: {template!r}: {exc}") from None


def select_by_template(
    spec: NewDataSpec, *, cycle_date: datetime, cycle: int, run: str, etag: str | None
) -> Selection:
    """The templated URI for this cycle; ``etag`` (from a HEAD, if the caller did one) versions it."""
    assert spec.uri_template is not None
    uri = render_template(spec.uri_template, cycle_date=cycle_date, cycle=cycle, run=run)
    dataset = DatasetSpec(name=spec.dataset, uri=uri, format=spec.format, task=spec.task)
    return Selection((dataset,), (f"{uri}@{etag}" if etag else uri,))


def select_new_objects(spec: NewDataSpec, objects: Sequence[ObjectInfo], since: Watermark) -> Selection:
    """Objects under the prefix not consumed yet, oldest first; the watermark moves past them."""
    fresh = [
        obj
        for obj in objects
        if obj.key.endswith(DATA_SUFFIXES)
        and (
            since.last_modified is None
            or obj.last_modified > since.last_modified
            or (obj.last_modified == since.last_modified and obj.key not in since.keys_at)
        )
    ]
    fresh.sort(key=lambda o: (o.last_modified, o.key))
    if not fresh:
        return Selection((), (), since)
    datasets = tuple(
        # Each object is its own dataset so the trainer reads it directly; names stay unique.
        DatasetSpec(
            name=spec.dataset if len(fresh) == 1 else f"{spec.dataset}-{i}",
            uri=obj.key,
            format=spec.format,
            task=spec.task,
        )
        for i, obj in enumerate(fresh)
    )
    newest = fresh[-1].last_modified
    keys_at = {o.key for o in fresh if o.last_modified == newest}
    if since.last_modified == newest:
        keys_at |= since.keys_at
    return Selection(
        datasets, tuple(f"{o.key}@{o.etag}" for o in fresh), Watermark(newest, frozenset(keys_at))
    )


class StorageLister:
    """:class:`ObjectLister` over a :class:`temper.storage.Storage`."""

    def __init__(self, storage: Any) -> None:
        self.storage = storage

    def list_objects(self, prefix: str) -> list[ObjectInfo]:
        from temper.storage import S3Uri

        loc = S3Uri.parse(prefix)
        out: list[ObjectInfo] = []
        paginator = self.storage.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=loc.bucket, Prefix=loc.prefix):
            for obj in page.get("Contents", []):
                out.append(
                    ObjectInfo(
                        key=f"s3://{loc.bucket}/{obj['Key']}",
                        etag=str(obj.get("ETag", "")).strip('"'),
                        last_modified=obj["LastModified"],
                        size=int(obj.get("Size", 0)),
                    )
                )
        return out
