"""Every ``helm --set`` a reader can copy from the docs names a real chart value.

The schema rejects unknown keys, so a stale key in README or docs/ is an install that fails for
the very first user who follows it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
FENCE = re.compile(r"^```[a-z]*\n(.*?)^```", re.S | re.M)
SET_KEY = re.compile(r"--set(?:-string|-file|-json)?[ =]'?([A-Za-z0-9_.-]+)=")


def documented_set_keys() -> list[tuple[str, str]]:
    """(file, key) for each ``--set`` inside a fenced code block (prose may show typos on purpose)."""
    found = []
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for block in FENCE.findall(path.read_text()):
            found += [(path.name, key) for key in SET_KEY.findall(block)]
    return found


def resolves(values: Any, dotted: str) -> bool:
    node = values
    for part in dotted.split("."):
        if not isinstance(node, dict):
            return False
        if not node:
            return True  # a free-form map such as podAnnotations: {}
        if part not in node:
            return False
        node = node[part]
    return True


def test_every_documented_set_key_exists_in_the_chart_values() -> None:
    values = yaml.safe_load((REPO / "charts" / "temper" / "values.yaml").read_text())
    keys = documented_set_keys()
    assert len(keys) >= 5, keys  # the scan itself works: README and install.md set several values
    unknown = [f"{name}: --set {key}" for name, key in keys if not resolves(values, key)]
    assert not unknown, unknown


def test_the_scan_catches_a_misspelt_key() -> None:
    values = yaml.safe_load((REPO / "charts" / "temper" / "values.yaml").read_text())
    assert resolves(values, "storage.credentialsSecret")
    assert not resolves(values, "storage.secretName")
    assert SET_KEY.findall("helm install x --set storage.endpointUrl=https://s3") == ["storage.endpointUrl"]
