"""Exec node: kubelet-like pod status, phases and termination messages."""

from __future__ import annotations

import pytest
from temper_dev.execnode import (
    MAX_TERMINATION_MESSAGE,
    ContainerState,
    build_status,
    pod_phase,
    termination_message,
)

pytestmark = pytest.mark.unit


def done(code: int) -> ContainerState:
    return ContainerState(
        "c", "img", state="terminated", exit_code=code, reason="Error" if code else "Completed"
    )


def test_phase_follows_exit_codes_and_restart_policy() -> None:
    running = ContainerState("c", "img", state="running")
    assert pod_phase([running, done(0)], "Never") == "Running"
    assert pod_phase([done(0), done(0)], "Never") == "Succeeded"
    assert pod_phase([done(0), done(2)], "Never") == "Failed"
    assert pod_phase([done(2)], "OnFailure") == "Running"  # it will be restarted
    assert pod_phase([ContainerState("c", "img")], "Never") == "Pending"


def test_terminal_status_has_terminated_container_and_unready_conditions() -> None:
    failed = done(3)
    failed.message = "loss=nan"
    status = build_status("Failed", [failed], [], "2026-01-01T00:00:00Z")
    assert status["phase"] == "Failed"
    terminated = status["containerStatuses"][0]["state"]["terminated"]
    assert (terminated["exitCode"], terminated["reason"], terminated["message"]) == (3, "Error", "loss=nan")
    ready = {c["type"]: c for c in status["conditions"]}["Ready"]
    assert (ready["status"], ready["reason"]) == ("False", "PodFailed")


def test_running_status_is_ready() -> None:
    status = build_status("Running", [ContainerState("c", "img", state="running", started_at="t")], [], "t")
    conditions = {c["type"]: c["status"] for c in status["conditions"]}
    assert conditions["Ready"] == conditions["ContainersReady"] == "True"
    assert status["containerStatuses"][0]["state"] == {"running": {"startedAt": "t"}}
    assert status["podIP"] == "127.0.0.1"


def test_rejection_carries_reason_and_message() -> None:
    status = build_status("Failed", [], [], "t", reason="UnsupportedPodSpec", message="spec.volumes[0]")
    assert (status["reason"], status["message"]) == ("UnsupportedPodSpec", "spec.volumes[0]")


def test_termination_message_prefers_file_then_logs_on_error() -> None:
    logs = "\n".join(f"line {i}" for i in range(200))
    assert termination_message("from file", logs, 1, "FallbackToLogsOnError") == "from file"
    fallback = termination_message("", logs, 1, "FallbackToLogsOnError")
    assert fallback.splitlines()[-1] == "line 199"
    assert len(fallback.splitlines()) == 80
    assert termination_message("", logs, 0, "FallbackToLogsOnError") == ""  # only on error
    assert termination_message("", logs, 1, "File") == ""
    assert len(termination_message("x" * 10_000, "", 0, None)) == MAX_TERMINATION_MESSAGE
