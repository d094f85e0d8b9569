"""The real helm binary against charts/temper: lint, plus the helpers the other chart tests share.

helm comes from hack/build-tools.sh (``$TEMPER_BIN`` or ``~/.cache/temper/k8s-v1.36.3/bin``).
If it is missing the tests fail, never skip: CI always builds it first.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "temper"
# The hermetic cluster's version. Pinned because a helm built without release ldflags
# defaults to Kubernetes v1.20, which the chart's kubeVersion rejects.
KUBE_VERSION = "1.36.3"
MONITORING_APIS = (
    "monitoring.coreos.com/v1/ServiceMonitor",
    "monitoring.coreos.com/v1/PodMonitor",
    "monitoring.coreos.com/v1/PrometheusRule",
)

Manifest = dict[str, Any]


def tool_binary(name: str) -> Path:
    """A binary hack/build-tools.sh builds; a missing one fails the test (CI always builds it)."""
    bin_dir = Path(os.environ.get("TEMPER_BIN", Path.home() / ".cache" / "temper" / "k8s-v1.36.3" / "bin"))
    binary = bin_dir / name
    if not os.access(binary, os.X_OK):
        pytest.fail(f"{name} not found at {binary}: build it with `make tools` (hack/build-tools.sh)")
    return binary


def helm_binary() -> Path:
    return tool_binary("helm")


@functools.cache
def _helm_home() -> str:
    return tempfile.mkdtemp(prefix="temper-helm-home-")


def run_helm(
    *args: str, values: dict[str, Any] | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Runs helm with its config/cache in a private folder; ``values`` go in as a values file."""
    home = _helm_home()
    env = {
        **os.environ,
        "HELM_CACHE_HOME": f"{home}/cache",
        "HELM_CONFIG_HOME": f"{home}/config",
        "HELM_DATA_HOME": f"{home}/data",
    }
    cmd = [str(helm_binary()), *args]
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", dir=home) as values_file:
        if values is not None:
            yaml.safe_dump(values, values_file)
            values_file.flush()
            cmd += ["--values", values_file.name]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60, check=False)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


@functools.cache
def _render_cached(values_json: str, api_versions: tuple[str, ...], namespace: str) -> str:
    args = ["template", "rel", str(CHART), "--namespace", namespace, "--kube-version", KUBE_VERSION]
    for api in api_versions:
        args += ["--api-versions", api]
    values = json.loads(values_json)
    return run_helm(*args, values=values or None).stdout


def render(
    values: dict[str, Any] | None = None,
    *,
    api_versions: tuple[str, ...] = (),
    namespace: str = "temper-system",
) -> list[Manifest]:
    """``helm template`` as parsed objects (cached per distinct input; callers must not mutate)."""
    out = _render_cached(json.dumps(values or {}, sort_keys=True), api_versions, namespace)
    return [doc for doc in yaml.safe_load_all(out) if doc]


def render_error(values: dict[str, Any]) -> str:
    """Renders values that must be rejected; returns helm's error text."""
    args = ["template", "rel", str(CHART), "--kube-version", KUBE_VERSION]
    proc = run_helm(*args, values=values, check=False)
    assert proc.returncode != 0, f"helm accepted invalid values {values}"
    return proc.stderr


@functools.cache
def _chart_with_renderable_notes() -> Path:
    """A copy of the chart whose NOTES.txt is also a template, so ``helm template`` renders it.

    ``helm install --dry-run`` would print NOTES, but it takes neither --kube-version nor
    --api-versions, and NOTES depend on both.
    """
    copy = Path(_helm_home()) / "notes-chart" / "temper"
    shutil.copytree(CHART, copy)
    body = (CHART / "templates" / "NOTES.txt").read_text()
    (copy / "templates" / "_notes_under_test.tpl").write_text(
        '{{- define "notes.under.test" -}}\n' + body + "{{- end }}\n"
    )
    (copy / "templates" / "notes-under-test.yaml").write_text(
        'kind: NotesUnderTest\nnotes: |\n{{ include "notes.under.test" . | indent 2 }}\n'
    )
    return copy


def notes(values: dict[str, Any] | None = None, *, api_versions: tuple[str, ...] = ()) -> str:
    args = ["template", "rel", str(_chart_with_renderable_notes()), "--namespace", "temper-system"]
    args += ["--kube-version", KUBE_VERSION, "--show-only", "templates/notes-under-test.yaml"]
    for api in api_versions:
        args += ["--api-versions", api]
    doc = yaml.safe_load(run_helm(*args, values=values).stdout)
    return str(doc["notes"])


def by_kind(objs: list[Manifest], kind: str) -> list[Manifest]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: list[Manifest], kind: str, name: str | None = None) -> Manifest:
    found = [o for o in by_kind(objs, kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


# Values that switch on every optional part, so lint sees every template.
EVERYTHING_ON: dict[str, Any] = {
    "watchNamespaces": ["team-a", "team-b"],
    "replicaCount": 2,
    "podDisruptionBudget": {"enabled": True},
    "metrics": {
        "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
        "podMonitor": {"enabled": True},
        "prometheusRule": {"enabled": True},
    },
}


@pytest.mark.parametrize("values", [None, EVERYTHING_ON], ids=["defaults", "everything-on"])
def test_helm_lint_strict(values: dict[str, Any] | None) -> None:
    args = ["lint", "--strict", str(CHART), "--kube-version", KUBE_VERSION]
    proc = run_helm(*args, values=values, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in proc.stdout


def test_lint_strict_fails_on_a_broken_template(tmp_path: Path) -> None:
    # Proves the lint test can fail: a copy of the chart with an undefined helper is rejected.
    broken = tmp_path / "temper"
    shutil.copytree(CHART, broken)
    (broken / "templates" / "broken.yaml").write_text('{{ include "temper.doesNotExist" . }}\n')
    proc = run_helm("lint", "--strict", str(broken), "--kube-version", KUBE_VERSION, check=False)
    assert proc.returncode != 0
    assert "temper.doesNotExist" in proc.stdout + proc.stderr
