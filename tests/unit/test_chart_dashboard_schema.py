"""The shipped Grafana dashboard against Grafana's own dashboard schema.

The Grafana Foundation SDK (PyPI ``grafana-foundation-sdk``) is generated from Grafana's schema
(the v1 dashboard kind and each panel plugin's options/fieldConfig). Loading the JSON into its
models and encoding it again must give back exactly the same document: any key the schema does
not know would be dropped, and a misspelt option would silently do nothing in Grafana.
(grafana/dashboard-linter, a Go module, cannot be fetched here: its only release tried was refused.)
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import pytest
from grafana_foundation_sdk.cog import encoder
from grafana_foundation_sdk.models import dashboard

pytestmark = pytest.mark.unit

DASHBOARD = Path(__file__).resolve().parents[2] / "charts" / "temper" / "files" / "dashboards" / "temper.json"
PANEL_TYPES = {"row", "stat", "timeseries", "bargauge"}


def differences(want: Any, got: Any, path: str = "") -> list[str]:
    if isinstance(want, dict):
        if not isinstance(got, dict):
            return [f"{path}: not an object after the round trip"]
        out = [f"{path}/{k}: not in Grafana's schema" for k in want if k not in got]
        return out + [d for k in want if k in got for d in differences(want[k], got[k], f"{path}/{k}")]
    if isinstance(want, list):
        if not isinstance(got, list) or len(want) != len(got):
            return [f"{path}: list changed"]
        return [
            d
            for i, (a, b) in enumerate(zip(want, got, strict=True))
            for d in differences(a, b, f"{path}[{i}]")
        ]
    return [] if want == got else [f"{path}: {want!r} became {got!r}"]


def test_dashboard_round_trips_through_grafanas_schema_models() -> None:
    source = json.loads(DASHBOARD.read_text())
    model = dashboard.Dashboard.from_json(source)
    encoded = json.loads(encoder.JSONEncoder(sort_keys=True).encode(model))
    assert differences(source, encoded) == []


def test_panel_options_round_trip_through_their_plugins_schema() -> None:
    """The dashboard model keeps panel options opaque; each plugin's own models check them."""
    enc = encoder.JSONEncoder(sort_keys=True)
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        if panel["type"] == "row":
            continue
        plugin = importlib.import_module(f"grafana_foundation_sdk.models.{panel['type']}")
        options = panel.get("options") or {}
        got = json.loads(enc.encode(plugin.Options.from_json(options)))
        assert differences(options, got, panel["title"]) == []
        custom = (panel.get("fieldConfig") or {}).get("defaults", {}).get("custom")
        if custom is not None:
            got = json.loads(enc.encode(plugin.FieldConfig.from_json(custom)))
            assert differences(custom, got, panel["title"] + "/custom") == []


def test_panels_are_well_formed() -> None:
    board = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    variables = {v["name"] for v in board["templating"]["list"]}
    for panel in board["panels"]:
        assert panel["type"] in PANEL_TYPES, panel["title"]
        grid = panel["gridPos"]
        assert 0 <= grid["x"] <= grid["x"] + grid["w"] <= 24, panel["title"]  # Grafana's 24 columns
        targets = panel.get("targets") or []
        assert (panel["type"] == "row") == (not targets), panel["title"]
        refs = [t["refId"] for t in targets]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in targets:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
        if targets:
            assert panel["datasource"]["uid"].strip("${}") in variables, panel["title"]
