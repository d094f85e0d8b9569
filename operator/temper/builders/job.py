"""Pure manifest builders for a stage attempt: the batch/v1 Job and, for multi-node, its headless Service."""

from __future__ import annotations

import json
from typing import Any

from temper.api.contract import CONTRACT_ENV, NON_RETRYABLE_EXIT_CODES, StageContract
from temper.api.run import PostTrainingRun, Stage
from temper.builders.contract import UnresolvedReference, spec_hash
from temper.builders.names import (
    ANNOTATION_RUN_NAME,
    ANNOTATION_SPEC_HASH,
    COMPLETION_INDEX_ANNOTATION,
    JOB_NAME_LABEL,
    KUEUE_QUEUE_LABEL,
    LABEL_ATTEMPT,
    LABEL_COMPONENT,
    LABEL_CYCLE,
    LABEL_RUN,
    LABEL_RUN_UID,
    LABEL_STAGE,
    TRAINER_CONTAINER,
    job_name,
    label_value,
    service_name,
)
from temper.config import OperatorConfig

POD_ANNOTATIONS = "temper.dev/pod-annotations"
SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
OPTIONAL_SECRET_KEYS = ("AWS_SESSION_TOKEN",)
RUN_AS_USER = 1000


class InvalidPodAnnotations(UnresolvedReference):
    """The run's pod-annotations passthrough is malformed; the message names the annotation."""


def owner_reference(run: PostTrainingRun) -> dict[str, Any]:
    return {
        "apiVersion": run.api_version,
        "kind": run.kind,
        "name": run.metadata["name"],
        "uid": run.metadata.get("uid", ""),
        "controller": True,
        "blockOwnerDeletion": True,
    }


def stage_labels(run: PostTrainingRun, stage: str, cycle: int, attempt: int | None = None) -> dict[str, str]:
    labels = {
        LABEL_RUN: label_value(run.metadata["name"]),
        LABEL_STAGE: stage,
        LABEL_CYCLE: str(cycle),
        LABEL_COMPONENT: "trainer",
    }
    if run.metadata.get("uid"):
        labels[LABEL_RUN_UID] = run.metadata["uid"]
    if attempt is not None:
        labels[LABEL_ATTEMPT] = str(attempt)
    return labels


def _resources(stage: Stage, run: PostTrainingRun, config: OperatorConfig) -> dict[str, Any]:
    requests: dict[str, Any] = {}
    limits: dict[str, Any] = {}
    res = stage.resources
    if res is not None:
        if res.gpus:
            limits[config.gpu_resource] = res.gpus  # extended resources: request = limit
        for name in ("cpu", "memory"):
            value = getattr(res, name)
            if value is not None:
                requests[name] = value
                limits[name] = value
    trainer = run.spec.trainer
    if trainer is not None and trainer.resources is not None:
        requests.update(trainer.resources.requests)
        limits.update(trainer.resources.limits)
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def _rendezvous_env(job: str, nodes: int, gpus: int, config: OperatorConfig) -> list[dict[str, Any]]:
    """torchrun's static rendezvous: pod 0's DNS name under the headless Service, node rank = index."""
    return [
        {"name": "MASTER_ADDR", "value": f"{job}-0.{service_name(job)}"},
        {"name": "MASTER_PORT", "value": str(config.master_port)},
        {"name": "WORLD_SIZE", "value": str(nodes * max(1, gpus))},  # one process per GPU, one on CPU
        {"name": "NNODES", "value": str(nodes)},
        {
            "name": "NODE_RANK",
            "valueFrom": {
                "fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"}
            },
        },
    ]


def _env(
    run: PostTrainingRun,
    contract: StageContract,
    job: str,
    nodes: int,
    config: OperatorConfig,
    *,
    run_gpus: int = 0,
) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": CONTRACT_ENV, "value": contract.to_env()},
        {"name": "HOME", "value": "/tmp"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    ref = run.spec.storage.secret_ref
    secret = ref.name if ref is not None else config.default_storage_secret
    if secret:
        # Credentials reach the pod only by reference; their values never pass through the operator.
        env += [
            {"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}} for key in SECRET_KEYS
        ]
        env += [
            {"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key, "optional": True}}}
            for key in OPTIONAL_SECRET_KEYS
        ]
    if nodes > 1:
        env += _rendezvous_env(job, nodes, run_gpus, config)
    trainer = run.spec.trainer
    reserved = {e["name"] for e in env}
    if trainer is not None:
        env += [{"name": e.name, "value": e.value} for e in trainer.env if e.name not in reserved]
    return env


def build_job(
    run: PostTrainingRun,
    stage: Stage,
    contract: StageContract,
    *,
    cycle: int,
    attempt: int,
    suspend: bool,
    config: OperatorConfig,
) -> dict[str, Any]:
    name = job_name(run.metadata["name"], stage.name, cycle, attempt)
    res = stage.resources
    nodes = res.nodes if res is not None else 1
    labels = stage_labels(run, stage.name, cycle, attempt)
    job_labels = dict(labels)
    queue = run.spec.queue_name
    if queue:
        job_labels[KUEUE_QUEUE_LABEL] = queue
    trainer = run.spec.trainer
    image = (trainer.image if trainer else None) or config.trainer_image
    pull = (trainer.image_pull_policy if trainer else None) or config.image_pull_policy
    container: dict[str, Any] = {
        "name": TRAINER_CONTAINER,
        "image": image,
        "imagePullPolicy": pull,
        "command": ["python", "-m", "temper_trainer", "run"],
        "env": _env(run, contract, name, nodes, config, run_gpus=res.gpus if res is not None else 0),
        "ports": [{"name": "metrics", "containerPort": config.trainer_metrics_port}],
        "terminationMessagePolicy": "File",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "runAsNonRoot": True,
            "readOnlyRootFilesystem": True,
        },
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    if nodes > 1:
        container["ports"].append({"name": "rendezvous", "containerPort": config.master_port})
    resources = _resources(stage, run, config)
    if resources:
        container["resources"] = resources
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",  # podFailurePolicy requires it; retries are new pods or new Jobs
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "runAsGroup": RUN_AS_USER,
            "fsGroup": RUN_AS_USER,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [{"name": "tmp", "emptyDir": {}}],
    }
    if res is not None:
        if res.node_selector:
            pod_spec["nodeSelector"] = dict(res.node_selector)
        if res.tolerations:
            pod_spec["tolerations"] = [
                t.model_dump(by_alias=True, exclude_none=True) for t in res.tolerations
            ]
        if res.affinity:
            pod_spec["affinity"] = res.affinity
    if run.spec.priority_class_name:
        pod_spec["priorityClassName"] = run.spec.priority_class_name
    if nodes > 1:
        pod_spec["subdomain"] = service_name(name)
    spec: dict[str, Any] = {
        # One Job = one attempt: any counted pod failure ends it, and the operator decides on a
        # retry (with backoff and the stage's maximum) as a new Job.
        "backoffLimit": 0,
        "podFailurePolicy": {
            "rules": [
                # A preempted/evicted pod is replaced by the Job without using up the attempt.
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
                {
                    "action": "FailJob",
                    "onExitCodes": {
                        "containerName": TRAINER_CONTAINER,
                        "operator": "In",
                        "values": list(NON_RETRYABLE_EXIT_CODES),
                    },
                },
            ]
        },
        "suspend": suspend,
        "template": {"metadata": {"labels": labels}, "spec": pod_spec},
    }
    if stage.active_deadline_seconds:
        spec["activeDeadlineSeconds"] = stage.active_deadline_seconds
    if nodes > 1:
        spec.update(completionMode="Indexed", completions=nodes, parallelism=nodes)
    annotations = {ANNOTATION_SPEC_HASH: spec_hash(contract)}
    if label_value(run.metadata["name"]) != run.metadata["name"]:
        annotations[ANNOTATION_RUN_NAME] = run.metadata["name"]
    pod_annotations = _pod_annotations(run)
    if pod_annotations:
        spec["template"]["metadata"]["annotations"] = pod_annotations
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": run.metadata.get("namespace"),
            "labels": job_labels,
            "annotations": annotations,
            "ownerReferences": [owner_reference(run)],
        },
        "spec": spec,
    }


def _pod_annotations(run: PostTrainingRun) -> dict[str, str]:
    """Annotations for the trainer pods, from the run's ``temper.dev/pod-annotations`` (a JSON
    object): for sidecar opt-outs, autoscaler hints and the hermetic cluster's fake-pod knobs."""
    raw = (run.metadata.get("annotations") or {}).get(POD_ANNOTATIONS)
    if not raw:
        return {}
    try:
        parsed = json.loads(raw)
    except ValueError:
        raise InvalidPodAnnotations(f"metadata.annotations[{POD_ANNOTATIONS}]: not a JSON object") from None
    if not isinstance(parsed, dict) or not all(isinstance(v, str) for v in parsed.values()):
        raise InvalidPodAnnotations(f"metadata.annotations[{POD_ANNOTATIONS}]: must map names to strings")
    return {str(k): v for k, v in parsed.items()}


def build_service(run: PostTrainingRun, job: dict[str, Any], config: OperatorConfig) -> dict[str, Any]:
    """Headless Service giving each pod of an Indexed Job a stable DNS name for rendezvous."""
    name = job["metadata"]["name"]
    labels = {k: v for k, v in job["metadata"]["labels"].items() if k != KUEUE_QUEUE_LABEL}
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": service_name(name),
            "namespace": run.metadata.get("namespace"),
            "labels": labels,
            "ownerReferences": [owner_reference(run)],
        },
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,  # rendezvous happens before readiness
            "selector": {JOB_NAME_LABEL: name},
            "ports": [{"name": "rendezvous", "port": config.master_port, "targetPort": config.master_port}],
        },
    }
