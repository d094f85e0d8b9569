"""``bench/gpu_check.sh --cpu``: the GPU check's whole matrix on a tiny Llama-3-shaped model, so the
script a GPU machine runs stays working (temper's real SFT stage and stock TRL, in child processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.unit, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_cpu_mode_runs_every_cpu_case_and_refuses_cuda_only_ones_clearly(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "TEMPER_VENV": str(Path(sys.executable).parent.parent),
        "TEMPER_BENCH_CACHE": str(tmp_path),
    }
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), "--cpu", "--steps", "2"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    cases = report["cases"]
    assert report["model"] == "tiny-llama3"
    for name in ("temper_bf16_sdpa", "trl_defaults"):
        assert cases[name]["tokens_per_second"] > 0, cases[name]
        assert cases[name]["peak_memory_bytes"] > 0
    for name in ("temper_qlora4", "temper_qlora8", "temper_bf16_sdpa_liger"):
        assert cases[name]["unsupported_as_expected"], cases[name]  # the stage's Unsupported, exit 12
        assert "CUDA" in cases[name]["error"]
    assert "skipped" in cases["temper_bf16_fa2"]
    goals = report["goals"]
    assert goals["speedup_vs_trl_defaults"]["value"] > 0
    assert {g["result"] for g in goals.values()} == {None}  # pass/miss is judged on a GPU only
