"""An outside linter agrees: kube-score (built by hack/build-tools.sh) finds no CRITICAL in the
rendered chart beyond the waivers documented in docs/security.md."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.unit.test_chart_helm import EVERYTHING_ON, ROOT, render, tool_binary

pytestmark = pytest.mark.unit

CRITICAL = 1
# (kind, check id, comment summary): each waiver has its reason in docs/security.md.
WAIVERS = {
    ("Deployment", "container-image-pull-policy", "ImagePullPolicy is not set to Always"),
    ("Deployment", "container-resources", "CPU limit is not set"),
}


def critical_findings(objects: list[dict[str, Any]], tmp_path: Path) -> set[tuple[str, str, str]]:
    manifest = tmp_path / "objects.yaml"
    manifest.write_text(yaml.safe_dump_all(objects))
    proc = subprocess.run(
        [str(tool_binary("kube-score")), "score", "--output-format", "json", str(manifest)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.stdout, proc.stderr
    found = set()
    for obj in json.loads(proc.stdout):
        for check in obj["checks"]:
            if check["grade"] == CRITICAL and not check["skipped"]:
                for comment in check.get("comments") or [{"summary": ""}]:
                    found.add((obj["type_meta"]["kind"], check["check"]["id"], comment.get("summary", "")))
    return found


@pytest.mark.parametrize("values", [None, EVERYTHING_ON], ids=["defaults", "everything-on"])
def test_chart_has_no_unwaived_critical(values: dict[str, Any] | None, tmp_path: Path) -> None:
    assert critical_findings(render(values), tmp_path) - WAIVERS == set()


def test_waivers_are_documented_and_needed(tmp_path: Path) -> None:
    doc = (ROOT / "docs" / "security.md").read_text()
    for _, check, _ in WAIVERS:
        assert f"`{check}`" in doc, f"waiver {check} has no reason in docs/security.md"
    assert critical_findings(render(), tmp_path) >= WAIVERS, "a waiver no longer matches a finding: drop it"


def test_kube_score_catches_a_missing_network_policy(tmp_path: Path) -> None:
    # Proves the check can fail: without the NetworkPolicy kube-score flags the Deployment.
    found = critical_findings(render({"networkPolicy": {"enabled": False}}), tmp_path)
    assert any(check == "pod-networkpolicy" for _, check, _ in found), found
