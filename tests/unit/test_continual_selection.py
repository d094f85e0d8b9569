"""Each cycle's new data: URI templates by cycle date, new objects under a prefix, lineage."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from temper.continual.data_selection import (
    NewDataSpec,
    ObjectInfo,
    SelectionError,
    Watermark,
    render_template,
    select_by_template,
    select_new_objects,
)

pytestmark = pytest.mark.unit


def obj(name: str, second: int, etag: str = "e") -> ObjectInfo:
    return ObjectInfo(
        f"s3://data/in/{name}", f"{etag}-{name}", datetime(2026, 1, 1, 0, 0, second, tzinfo=UTC), 10
    )


def test_template_renders_cycle_date_and_number() -> None:
    spec = NewDataSpec.from_dict(
        {"dataset": "tickets", "uriTemplate": "s3://d/{run}/{cycle_date:%Y-%m}/part-{cycle}.jsonl"}
    )
    sel = select_by_template(
        spec, cycle_date=datetime(2026, 11, 29, 3, tzinfo=UTC), cycle=7, run="bot", etag="abc"
    )
    assert [d.uri for d in sel.datasets] == ["s3://d/bot/2026-11/part-7.jsonl"]
    assert sel.datasets[0].name == "tickets"
    assert sel.versions == ("s3://d/bot/2026-11/part-7.jsonl@abc",)


@pytest.mark.parametrize(
    ("template", "match"),
    [
        ("s3://d/{cycle_date.__class__}.jsonl", "attribute and index access"),
        ("s3://d/{secret}.jsonl", r"unknown variable \{secret\}"),
        ("s3://d/{cycle_date:%Y", "uriTemplate"),
    ],
)
def test_template_refuses_anything_but_the_known_names(template: str, match: str) -> None:
    with pytest.raises(SelectionError, match=match):
        NewDataSpec.from_dict({"dataset": "x", "uriTemplate": template})
    with pytest.raises(SelectionError):
        render_template(template, cycle_date=datetime(2026, 1, 1), cycle=1, run="r")


def test_spec_validation_names_the_field() -> None:
    with pytest.raises(SelectionError, match=r"newData\.dataset: required"):
        NewDataSpec.from_dict({"prefix": "s3://b/"})
    with pytest.raises(SelectionError, match="exactly one of uriTemplate or prefix"):
        NewDataSpec.from_dict({"dataset": "x"})
    with pytest.raises(SelectionError, match=r"newData\.prefix: must be an s3://"):
        NewDataSpec.from_dict({"dataset": "x", "prefix": "/data"})
    with pytest.raises(SelectionError, match=r"newData\.format"):
        NewDataSpec.from_dict({"dataset": "x", "prefix": "s3://b/", "format": "csv"})


def test_prefix_picks_only_objects_not_consumed_and_moves_the_watermark() -> None:
    spec = NewDataSpec.from_dict({"dataset": "d", "prefix": "s3://data/in/", "task": "arith"})
    listing = [obj("a.jsonl", 1), obj("readme.txt", 1), obj("b.jsonl", 2)]
    first = select_new_objects(spec, listing, Watermark())
    assert [d.uri for d in first.datasets] == ["s3://data/in/a.jsonl", "s3://data/in/b.jsonl"]
    assert [d.name for d in first.datasets] == ["d-0", "d-1"]
    assert all(d.task == "arith" for d in first.datasets)
    assert first.versions == ("s3://data/in/a.jsonl@e-a.jsonl", "s3://data/in/b.jsonl@e-b.jsonl")
    # Same listing again: nothing new.
    assert select_new_objects(spec, listing, first.watermark).empty
    # A file landing in the same second as the watermark is still picked up, once.
    later = [*listing, obj("c.jsonl", 2), obj("d.parquet", 3)]
    second = select_new_objects(spec, later, first.watermark)
    assert [d.uri for d in second.datasets] == ["s3://data/in/c.jsonl", "s3://data/in/d.parquet"]
    assert select_new_objects(spec, later, second.watermark).empty


def test_watermark_round_trips_through_status() -> None:
    mark = Watermark(datetime(2026, 1, 1, tzinfo=UTC), frozenset({"s3://a/b"}))
    assert Watermark.from_status(mark.to_status()) == mark
    assert Watermark.from_status(None) == Watermark()
