"""The planner under Kueue: queued and evicted stages say so, suspend releases the quota by
deleting the attempt's Job, and resuming recreates the same attempt (never a charged retry)."""

from __future__ import annotations

import dataclasses

import pytest
from temper.planner import Observed, plan
from temper.planner.observed import KUEUE_QUEUED_REASON, ObservedJob

from tests.unit.test_planner import CONFIG, NOW, conds, job, sample_run, with_status

pytestmark = pytest.mark.unit
QUEUED = {"queueName": "gpu-team-a"}


def test_queued_stage_reason_names_kueue() -> None:
    p = plan(sample_run(**QUEUED), Observed(jobs=[job("sft", suspended=True)]), NOW, CONFIG)
    assert conds(p)["Reconciling"] == ("True", KUEUE_QUEUED_REASON)
    assert p.status["stages"][0]["message"] == "waiting for Kueue admission"
    assert p.phase == "Pending"


def test_evicted_job_says_kueue_took_it_back_and_keeps_the_attempt() -> None:
    evicted = dataclasses.replace(job("sft", suspended=True), evicted=True)
    p = plan(sample_run(**QUEUED), Observed(jobs=[evicted]), NOW, CONFIG)
    assert conds(p)["Reconciling"] == ("True", KUEUE_QUEUED_REASON)
    assert "evicted by Kueue" in p.status["stages"][0]["message"]
    assert p.status["stages"][0]["attempts"] == 1
    assert not p.create
    assert not p.job_patches
    assert not p.job_deletes
    assert not p.retries


def test_a_stage_seen_running_then_suspended_by_kueue_was_evicted_and_stays_so() -> None:
    run = sample_run(**QUEUED)
    running = plan(run, Observed(jobs=[job("sft")]), NOW, CONFIG)
    assert running.status["stages"][0]["state"] == "Running"
    evicted = plan(with_status(run, running), Observed(jobs=[job("sft", suspended=True)]), NOW, CONFIG)
    message = evicted.status["stages"][0]["message"]
    assert message.startswith("evicted by Kueue"), message
    again = plan(with_status(run, evicted), Observed(jobs=[job("sft", suspended=True)]), NOW, CONFIG)
    assert again.status["stages"][0]["message"] == message  # no flapping back to "waiting"
    assert conds(again)["Reconciling"] == ("True", KUEUE_QUEUED_REASON)


def test_observed_job_is_evicted_only_if_suspended_after_its_pods_ran() -> None:
    raw = {"metadata": {"name": "r1-sft-c1-a1"}, "spec": {"suspend": True}, "status": {}}
    pod = {"metadata": {"name": "p"}, "status": {"phase": "Failed"}}
    assert not ObservedJob.from_k8s(raw, []).evicted
    assert ObservedJob.from_k8s(raw, [pod]).evicted
    assert not ObservedJob.from_k8s({**raw, "spec": {"suspend": False}}, [pod]).evicted


@pytest.mark.parametrize("suspended", [True, False], ids=["queued", "admitted"])
def test_suspending_a_kueue_run_deletes_its_job_and_resume_recreates_the_same_attempt(
    suspended: bool,
) -> None:
    running = sample_run(**QUEUED)
    before = plan(running, Observed(jobs=[job("sft", suspended=suspended)]), NOW, CONFIG)
    run = with_status(sample_run(**QUEUED, suspend=True), before)
    p = plan(run, Observed(jobs=[job("sft", suspended=suspended)]), NOW, CONFIG)
    assert p.job_deletes == ["r1-sft-c1-a1"]  # Kueue would unsuspend a merely suspended Job
    assert p.job_patches == []
    assert p.phase == "Suspended"
    gone = plan(with_status(run, p), Observed(), NOW, CONFIG)
    assert not gone.create
    assert not gone.job_deletes
    assert gone.status["stages"][0]["state"] == "Suspended"
    assert gone.status["stages"][0]["attempts"] == 1
    resumed = plan(with_status(sample_run(**QUEUED), gone), Observed(), NOW, CONFIG)
    assert [o["metadata"]["name"] for o in resumed.create] == ["r1-sft-c1-a1"]
    assert resumed.create[0]["spec"]["suspend"] is True  # queued again
    assert not resumed.retries
    assert not resumed.failed_attempts
    assert conds(resumed)["Reconciling"] == ("True", KUEUE_QUEUED_REASON)


def test_resuming_a_retry_attempt_does_not_count_it_twice() -> None:
    failed = job("sft", outcome="Failed", reason="BackoffLimitExceeded")
    first = plan(sample_run(**QUEUED), Observed(jobs=[failed]), NOW, CONFIG)
    assert first.retries == ["sft"]  # attempt 2 is a retry, counted once
    suspended = with_status(sample_run(**QUEUED, suspend=True), first)
    p = plan(suspended, Observed(jobs=[failed, job("sft", 2, suspended=True)]), NOW, CONFIG)
    assert p.job_deletes == ["r1-sft-c1-a2"]
    gone = plan(with_status(suspended, p), Observed(jobs=[failed]), NOW, CONFIG)
    resumed = plan(with_status(sample_run(**QUEUED), gone), Observed(jobs=[failed]), NOW, CONFIG)
    assert [o["metadata"]["name"] for o in resumed.create] == ["r1-sft-c1-a2"]
    assert resumed.retries == []
