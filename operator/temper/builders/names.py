"""Deterministic names and labels: the basis of idempotent creates.

Every child object's name is a pure function of (run, stage, cycle, attempt), so a restarted
operator recomputes the same name and a create that already happened answers AlreadyExists.
"""

from __future__ import annotations

import hashlib

GROUP = "temper.dev"
LABEL_RUN = f"{GROUP}/run"
LABEL_RUN_UID = f"{GROUP}/run-uid"
LABEL_STAGE = f"{GROUP}/stage"
LABEL_ATTEMPT = f"{GROUP}/attempt"
LABEL_CYCLE = f"{GROUP}/cycle"
LABEL_COMPONENT = f"{GROUP}/component"
ANNOTATION_SPEC_HASH = f"{GROUP}/spec-hash"
ANNOTATION_RUN_NAME = f"{GROUP}/run-name"  # the untruncated name, when the label had to be shortened
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
TRAINER_CONTAINER = "trainer"

# An Indexed Job's pod hostname is "<job>-<index>" and must stay a DNS label (63), so Job names
# leave room for a two-digit index and the dash.
JOB_NAME_MAX = 60
NAME_MAX = 63


def shorten(name: str, limit: int = NAME_MAX) -> str:
    """``name`` if it fits, else a prefix plus a hash of the whole, so distinct names stay distinct."""
    if len(name) <= limit:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[: limit - 9].rstrip('-.')}-{digest}"


def label_value(value: str) -> str:
    return shorten(value, NAME_MAX)


def job_name(run: str, stage: str, cycle: int, attempt: int) -> str:
    return shorten(f"{run}-{stage}-c{cycle}-a{attempt}", JOB_NAME_MAX)


def service_name(job: str) -> str:
    # One headless Service per multi-node Job, same name: the rendezvous host is "<job>-0.<job>".
    return job


def adapter_name(run: str, stage: str, cycle: int) -> str:
    return shorten(f"{run}-{stage}-g{cycle}", NAME_MAX)


def output_prefix(storage_uri: str, stage: str, cycle: int) -> str:
    """``<storage>/g<cycle>/<stage>/``: every attempt of a stage shares it, so checkpoints resume."""
    return f"{storage_uri.rstrip('/')}/g{cycle}/{stage}/"


def manifest_uri(prefix: str) -> str:
    return f"{prefix}manifest.json"


def progress_uri(prefix: str, attempt: int) -> str:
    return f"{prefix}attempts/{attempt}/progress.json"
