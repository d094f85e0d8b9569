"""Reliability: the small chaos campaign (``bench/chaos.py --small``) against the session cluster.

The operator is the chart's Deployment pod (``helm install``) and trainer pods run from the trainer
image. Operator SIGKILLs in its pod, a deletion of its pod (the Deployment replaces it), an
apiserver restart, an S3 outage, a preempted trainer pod and a crash in the middle of an adapter
publish: nothing may be lost, duplicated or Ready-but-corrupt. (The fault
hooks themselves are tested in tests/cluster/test_smoke.py.)
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
from temper_dev.cluster import Cluster

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def _chaos() -> ModuleType:
    spec = importlib.util.spec_from_file_location("temper_chaos_bench", REPO / "bench" / "chaos.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_small_chaos_campaign_loses_nothing(cluster: Cluster, tiny_model: Path, tmp_path: Path) -> None:
    chaos = _chaos()
    report = chaos.run_campaign(cluster, tmp_path, tiny_model.parent, runs=6, seed=11, small=True)
    print(json.dumps(report, indent=2))
    assert report["runs_lost"] == 0, report
    assert report["runs_terminal"] == report["runs"] == 6, report
    assert report["runs_succeeded"] == 6, report
    assert report["duplicate_jobs"] == 0, report
    assert report["jobs_with_wrong_owner"] == 0, report
    assert report["ready_adapters"] >= 2 * 5 + 1, report  # sft+align of each kwok run, the exec sft
    assert report["ready_adapters_corrupt"] == 0, report
    assert report["preemption_steps_redone"], report  # measured, not assumed
    assert report["preemption_steps_redone_max"] <= report["checkpoint_interval_steps"], report
    assert all(n <= report["checkpoint_interval_steps"] for n in report["crash_steps_redone"]), report
    assert all(count > 0 for count in report["faults"].values()), report["faults"]
    assert report["s3_outage_seconds"] >= 2.5, report  # the outage really lasted
