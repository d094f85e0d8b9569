"""Runs the Argo CD health checks (gitops/argocd/...) for real, in Lua 5.1 like Argo's gopher-lua.

Every case in each ``health_test.yaml`` (Argo's own test format) is executed; the script sees only
the libraries Argo CD opens, so a check that leans on ``os``/``io``/``require`` fails here too.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import yaml
from lupa import lua51

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
CUSTOMIZATIONS = ROOT / "gitops" / "argocd" / "resource_customizations" / "temper.dev"
KINDS = ("PostTrainingRun", "Adapter")
ARGO_STATUSES = {"Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown"}
CONDITION_TYPES = ("Ready", "Succeeded", "Failed", "Suspended", "Reconciling", "Stalled")

# Runs the script in an environment holding only what Argo CD's VM provides (Lua 5.1 base,
# table, string, math), with `obj` as its one global, like argo-cd's health check runner.
_RUNNER = """
local src, obj = ...
local env = {
  obj = obj, ipairs = ipairs, pairs = pairs, next = next, type = type, tostring = tostring,
  tonumber = tonumber, select = select, error = error, pcall = pcall, unpack = unpack,
  table = table, string = string, math = math,
}
local chunk, err = loadstring(src, "health.lua")
if chunk == nil then error(err) end
setfenv(chunk, env)
local hs = chunk()
return hs.status, hs.message
"""


class HealthCheck:
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.source = (CUSTOMIZATIONS / kind / "health.lua").read_text()
        self.lua = lua51.LuaRuntime(unpack_returned_tuples=True)
        self.runner = self.lua.execute(f"return function(...) {_RUNNER} end")

    def __call__(self, obj: dict[str, Any]) -> tuple[str, str]:
        table = self.lua.table_from(obj, recursive=True)
        status, message = self.runner(self.source, table)
        return str(status), str(message)


def _cases(kind: str) -> list[tuple[str, str, str]]:
    spec = yaml.safe_load((CUSTOMIZATIONS / kind / "health_test.yaml").read_text())
    return [
        (t["inputPath"], t["healthStatus"]["status"], t["healthStatus"]["message"]) for t in spec["tests"]
    ]


def _load(kind: str, input_path: str) -> dict[str, Any]:
    obj = yaml.safe_load((CUSTOMIZATIONS / kind / input_path).read_text())
    assert isinstance(obj, dict)
    return obj


@pytest.fixture(scope="module", params=KINDS)
def check(request: pytest.FixtureRequest) -> HealthCheck:
    return HealthCheck(request.param)


@pytest.mark.parametrize(
    ("kind", "input_path", "status", "message"),
    [(kind, *case) for kind in KINDS for case in _cases(kind)],
    ids=[f"{kind}:{case[0]}" for kind in KINDS for case in _cases(kind)],
)
def test_health_test_yaml_case(kind: str, input_path: str, status: str, message: str) -> None:
    obj = _load(kind, input_path)
    assert obj["kind"] == kind
    assert obj["apiVersion"] == "temper.dev/v1alpha1"
    assert HealthCheck(kind)(obj) == (status, message)


@pytest.mark.parametrize(
    ("kind", "required"),
    [
        ("PostTrainingRun", {"Healthy", "Progressing", "Degraded", "Suspended"}),
        # Adapters have no suspend: Argo's Suspended state has no meaning for them.
        ("Adapter", {"Healthy", "Progressing", "Degraded"}),
    ],
)
def test_every_state_and_every_testdata_file_is_covered(kind: str, required: set[str]) -> None:
    cases = _cases(kind)
    assert {status for _, status, _ in cases} >= required
    assert all(status in ARGO_STATUSES for _, status, _ in cases)
    referenced = {Path(path).name for path, _, _ in cases}
    on_disk = {p.name for p in (CUSTOMIZATIONS / kind / "testdata").glob("*.yaml")}
    assert referenced == on_disk, "every testdata file is a health_test.yaml case and vice versa"


def _with_conditions(kind: str, states: dict[str, str], generation: int = 4) -> dict[str, Any]:
    conditions = [
        {
            "type": t,
            "status": s,
            "reason": f"{t}Reason",
            "message": f"{t} is {s}",
            "observedGeneration": generation,
        }
        for t, s in states.items()
    ]
    return {
        "apiVersion": "temper.dev/v1alpha1",
        "kind": kind,
        "metadata": {"name": "x", "namespace": "ml", "generation": generation},
        "spec": {},
        "status": {"observedGeneration": generation, "conditions": conditions},
    }


def test_every_condition_combination_yields_a_valid_status(check: HealthCheck) -> None:
    # 3^6 combinations: True, False or absent for each condition type. None may crash the
    # script, and the kstatus-shared rules must hold in all of them.
    for combo in itertools.product(("True", "False", None), repeat=len(CONDITION_TYPES)):
        states = {t: s for t, s in zip(CONDITION_TYPES, combo, strict=True) if s is not None}
        status, message = check(_with_conditions(check.kind, states))
        assert status in ARGO_STATUSES, states
        assert message, states
        if states.get("Failed") == "True" or states.get("Stalled") == "True":
            assert status == "Degraded", states
        elif check.kind == "PostTrainingRun" and states.get("Suspended") == "True":
            assert status == "Suspended", states
        elif (
            states.get("Reconciling") == "True" and check.kind == "Adapter" and states.get("Ready") != "True"
        ):
            assert status == "Progressing", states


def test_stale_observed_generation_is_never_healthy(check: HealthCheck) -> None:
    obj = _with_conditions(check.kind, {"Ready": "True", "Succeeded": "True"}, generation=4)
    assert check(obj)[0] == "Healthy"
    obj["metadata"]["generation"] = 5
    assert check(obj) == ("Progressing", "Waiting for the operator to observe generation 5")


def test_script_cannot_reach_libraries_argo_does_not_open() -> None:
    # Guards the sandbox itself: if it leaked `os`, the checks above would prove nothing.
    lua = lua51.LuaRuntime(unpack_returned_tuples=True)
    runner = lua.execute(f"return function(...) {_RUNNER} end")
    probe = "local hs = {}; hs.status = type(os) .. type(io) .. type(require); hs.message = 'x'; return hs"
    assert runner(probe, lua.table_from({})) == ("nilnilnil", "x")
