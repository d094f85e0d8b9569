"""The manifest's structured lineage and the eval results in the termination message (no training)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from temper.api.contract import StageContract, StageResult, SuiteResult
from temper_trainer.__main__ import termination_message
from temper_trainer.lineage import stage_lineage

pytestmark = pytest.mark.unit


def contract(tmp_path: Path) -> StageContract:
    local = tmp_path / "extra.jsonl"
    local.write_text('{"prompt": "1+1=", "completion": "2"}\n')
    return StageContract.model_validate(
        {
            "run": {"namespace": "ml", "name": "r1"},
            "stage": {"name": "align", "type": "dpo", "attempt": 3},
            "baseModel": "builtin://tiny",
            "output": {"prefix": "s3://b/runs/r1/g1/align/"},
            "parent": {"name": "r1-sft-g1", "manifestUri": "s3://b/runs/r1/g1/sft/manifest.json"},
            "data": {
                "train": [{"name": "prefs", "uri": "builtin://arith?n=8&seed=3", "format": "preference"}],
                "eval": [{"name": "extra", "uri": str(local)}],
            },
        }
    )


def test_lineage_pins_every_dataset_the_parent_and_the_contract(tmp_path: Path) -> None:
    c = contract(tmp_path)
    lineage = stage_lineage(c, None)
    prefs, extra = lineage["datasets"]
    assert prefs["name"] == "prefs"
    assert prefs["version"].startswith("temper-trainer ")
    assert len(prefs["sha256"]) == 64
    assert stage_lineage(c, None)["datasets"][0]["sha256"] == prefs["sha256"]  # deterministic
    assert extra == {
        "name": "extra",
        "uri": str(tmp_path / "extra.jsonl"),
        "sha256": hashlib.sha256((tmp_path / "extra.jsonl").read_bytes()).hexdigest(),
    }
    assert lineage["parent"] == {"name": "r1-sft-g1", "manifestUri": "s3://b/runs/r1/g1/sft/manifest.json"}
    assert lineage["baseModel"] == "builtin://tiny"
    # The same for every attempt, different for a different contract.
    again = c.model_copy(update={"stage": c.stage.model_copy(update={"attempt": 1})})
    assert lineage["contractHash"] == again.contract_hash()
    assert lineage["contractHash"] != c.model_copy(update={"seed": 7}).contract_hash()
    json.dumps(lineage)


def test_termination_message_keeps_every_suite_result_when_metrics_are_dropped() -> None:
    metrics = {f"eval/exact_match/task-{i:04d}/x": 0.5 for i in range(400)}
    evals = [
        SuiteResult(suite=f"s{i}", metric="loss", value=1.0, baseline=0.9, max_regression=0.1)
        for i in range(8)
    ]
    body = termination_message(StageResult(metrics=metrics, evals=evals))
    assert len(body.encode()) < 4096
    assert StageResult.model_validate_json(body).evals == evals
