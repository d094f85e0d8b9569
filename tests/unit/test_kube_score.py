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
    ("Job", "container-image-pull-policy", "ImagePullPolicy is not set to Always"),
    ("Job", "container-resources", "CPU limit is not set"),
    ("Job", "container-security-context-user-group-id", "The container is running with a low user ID"),
    ("Job", "container-security-context-user-group-id", "The container running with a low group ID"),
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
    found = critical_findings(render(), tmp_path) | critical_findings(example_jobs(), tmp_path)
    assert found >= WAIVERS, f"a waiver no longer matches a finding: drop it: {WAIVERS - found}"


def test_kube_score_catches_a_missing_network_policy(tmp_path: Path) -> None:
    # Proves the check can fail: without the NetworkPolicy kube-score flags the Deployment.
    found = critical_findings(render({"networkPolicy": {"enabled": False}}), tmp_path)
    assert any(check == "pod-networkpolicy" for _, check, _ in found), found


def example_jobs() -> list[dict[str, Any]]:
    """Every Job temper builds for the examples' first cycle, with the chart's default settings,
    plus each run's NetworkPolicy (kube-score matches policies to pods by their selectors)."""
    import dataclasses

    from temper.api import parse_manifest
    from temper.api.run import PostTrainingRun
    from temper.builders import (
        UnresolvedReference,
        build_job,
        owner_reference,
        stage_contract,
        trainer_network_policy,
    )
    from temper.config import OperatorConfig

    env = {e["name"]: e.get("value", "") for e in _chart_operator_env()}
    config = dataclasses.replace(OperatorConfig.from_env(env), default_storage_endpoint="http://s3:9000")
    objects: list[dict[str, Any]] = []
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            parsed = parse_manifest(doc)
            if not isinstance(parsed, PostTrainingRun):
                continue
            parsed.metadata.update(namespace="team-a", uid=f"uid-{path.stem}")
            network = trainer_network_policy(parsed, config.trainer_network, 9400, owner_reference(parsed))
            objects += [network] if network else []
            for stage in parsed.spec.stages:
                try:
                    contract = stage_contract(parsed, stage, cycle=1, attempt=1, config=config)
                    job = build_job(parsed, stage, contract, cycle=1, attempt=1, suspend=False, config=config)
                except UnresolvedReference:
                    continue  # a later stage needs its parents' published outputs to build
                objects.append(job)
    return objects


def _chart_operator_env() -> list[dict[str, Any]]:
    deployment = next(o for o in render() if o["kind"] == "Deployment")
    return list(deployment["spec"]["template"]["spec"]["containers"][0]["env"])


def test_trainer_jobs_have_no_unwaived_critical(tmp_path: Path) -> None:
    jobs = example_jobs()
    assert sum(o["kind"] == "Job" for o in jobs) >= 10
    assert critical_findings(jobs, tmp_path) - WAIVERS == set()
