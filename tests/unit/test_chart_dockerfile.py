"""operator/Dockerfile agrees with the chart, and its build step really packages the operator.

No image can be built here (no Docker), so this checks what can go wrong silently: a named
user breaks runAsNonRoot, ports drift from the probes, and COPY misses a package.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from tests.unit.test_chart_helm import CHART, ROOT

pytestmark = pytest.mark.unit

DOCKERFILE = ROOT / "operator" / "Dockerfile"
PIP_WHEEL = [sys.executable, "-m", "pip", "wheel", "--no-index", "--no-deps", "--no-build-isolation", "-q"]


def instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def final_stage() -> list[tuple[str, str]]:
    steps = instructions()
    last_from = max(i for i, (op, _) in enumerate(steps) if op == "FROM")
    return steps[last_from:]


def test_runs_as_the_numeric_user_the_chart_expects() -> None:
    users = [arg for op, arg in final_stage() if op == "USER"]
    assert users, "the final stage must drop root"
    # The kubelet can only verify runAsNonRoot for a numeric UID.
    uid, _, gid = users[-1].partition(":")
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert int(uid) == values["securityContext"]["runAsUser"] != 0
    assert int(gid) == values["securityContext"]["runAsGroup"]


def test_exposes_the_chart_ports_and_runs_the_operator_module() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    exposed = {int(p) for op, arg in final_stage() if op == "EXPOSE" for p in arg.split()}
    assert exposed == {values["operator"]["healthPort"], values["operator"]["metricsPort"]}
    (entrypoint,) = [arg for op, arg in final_stage() if op == "ENTRYPOINT"]
    assert entrypoint == '["python", "-m", "temper"]'
    assert (ROOT / "operator" / "temper" / "__main__.py").is_file(), (
        "python -m temper needs temper/__main__.py"
    )


def test_base_images_are_not_floating() -> None:
    for op, arg in instructions():
        if op == "FROM":
            assert ":latest" not in arg
    (default,) = re.findall(r"^ARG PYTHON_IMAGE=(\S+)$", DOCKERFILE.read_text(), re.M)
    assert re.fullmatch(r"python:3\.11(\.\d+)?-slim-\w+(@sha256:[0-9a-f]{64})?", default)


def test_copied_sources_build_the_operator_package(tmp_path: Path) -> None:
    # Rebuild exactly what the Dockerfile's COPY lines bring in, offline, as its pip step would.
    context = tmp_path / "context"
    for op, arg in instructions():
        if op != "COPY" or arg.startswith("--from"):
            continue
        *sources, _dest = arg.split()
        for source in sources:
            src = ROOT / source
            dest = context / source
            if src.is_dir():
                shutil.copytree(
                    src, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "Dockerfile")
                )
            else:
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(src, dest)
    wheels = tmp_path / "wheels"
    proc = subprocess.run(
        [*PIP_WHEEL, "-w", str(wheels), f"{context}/"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    (wheel,) = wheels.glob("temper-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"temper/__init__.py", "temper/api/contract.py"} <= names
    assert not [n for n in names if n.startswith(("temper_trainer/", "temper_dev/"))], (
        "trainer code leaked in"
    )
