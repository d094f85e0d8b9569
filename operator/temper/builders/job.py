"""Pure manifest builders for a stage attempt: the batch/v1 Job and, for multi-node, its headless Service."""

from __future__ import annotations

import json
import math
from typing import Any

from temper.api.common import ModelCache
from temper.api.contract import (
    CONTRACT_ENV,
    CPU_THREADS_ENV,
    EXIT_PREEMPTED,
    NON_RETRYABLE_EXIT_CODES,
    StageContract,
)
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
FAILPOINTS_ANNOTATION = "temper.dev/test-failpoints"
FAILPOINT_PREFIX = "TEMPER_FAILPOINT"
SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
OPTIONAL_SECRET_KEYS = ("AWS_SESSION_TOKEN",)
# Every path the trainer writes is one of these volumes; the root filesystem stays read-only.
# trainer_image/Dockerfile points HOME, TEMPER_WORKDIR and TEMPER_MODEL_CACHE at them
# (tests/unit/test_chart_dockerfile.py fails if the two drift).
TMP_DIR = "/tmp"
WORK_DIR = "/var/lib/temper/work"
MODEL_CACHE_DIR = "/var/cache/temper/models"
SHM_DIR = "/dev/shm"


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
    # The platform's defaults (chart: trainer.resources) first; the stage's own values win.
    requests: dict[str, Any] = dict(config.trainer_resources.get("requests", {}))
    limits: dict[str, Any] = dict(config.trainer_resources.get("limits", {}))
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


# Decimal suffixes of a CPU quantity. Not ``kubernetes.utils.parse_quantity``: the operator process
# keeps the generated client out of its imports on purpose (``temper.__main__``: 50 MB of RSS).
_SI = {"n": 1e-9, "u": 1e-6, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18}


def cpu_threads(resources: dict[str, Any]) -> int | None:
    """Whole CPUs of the container, its limit else its request, at least 1; None if it sets neither.

    The trainer sizes its math threads by it (``CPU_THREADS_ENV``): torch alone takes every core
    of the node, and pods sharing a node would spin their threads against each other.
    """
    for kind in ("limits", "requests"):
        value = (resources.get(kind) or {}).get("cpu")
        if value is None:
            continue
        text = str(value)
        try:
            cores = float(text[:-1]) * _SI[text[-1]] if text[-1:] in _SI else float(text)
        except ValueError:
            return None  # a binary suffix on a CPU quantity: leave the threads to the trainer
        return max(1, math.floor(cores))
    return None


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
    env += _failpoint_env(run, config)
    env += source_env(run, config)
    trainer = run.spec.trainer
    reserved = {e["name"] for e in env}
    if trainer is not None:
        # Failpoints come only from an operator started with TEMPER_TEST_FAILPOINTS, never from users.
        env += [
            {"name": e.name, "value": e.value}
            for e in trainer.env
            if e.name not in reserved and not e.name.startswith(FAILPOINT_PREFIX)
        ]
    return env


def _failpoint_env(run: PostTrainingRun, config: OperatorConfig) -> list[dict[str, Any]]:
    """The chaos campaign's fault injection: honoured only by an operator in test mode."""
    raw = (run.metadata.get("annotations") or {}).get(FAILPOINTS_ANNOTATION)
    if not (config.test_failpoints and raw):
        return []
    try:
        points = json.loads(raw)
    except ValueError:
        raise InvalidPodAnnotations(
            f"metadata.annotations[{FAILPOINTS_ANNOTATION}]: not a JSON object"
        ) from None
    if not isinstance(points, dict) or not all(
        isinstance(k, str) and k.startswith(FAILPOINT_PREFIX) and isinstance(v, str)
        for k, v in points.items()
    ):
        raise InvalidPodAnnotations(
            f"metadata.annotations[{FAILPOINTS_ANNOTATION}]: must map {FAILPOINT_PREFIX}* names to strings"
        )
    return [{"name": k, "value": v} for k, v in sorted(points.items())]


# -- where models and data come from: the Hub, PVCs and the model cache ------------------------------
MODEL_CACHE_VOLUME = "model-cache"
MODEL_CACHE_ENV = "TEMPER_MODEL_CACHE"
PVC_MOUNTS_ENV = "TEMPER_PVC_MOUNTS"
PVC_MOUNT_ROOT = "/mnt/temper/pvc"
BASE_MODEL_VOLUME = "base-model"
HF_TOKEN_KEY = "HF_TOKEN"  # noqa: S105 - the Secret key name, not a value


def _user_env(run: PostTrainingRun) -> dict[str, str]:
    trainer = run.spec.trainer
    return {e.name: e.value for e in trainer.env} if trainer is not None else {}


def model_cache_choice(run: PostTrainingRun, config: OperatorConfig) -> ModelCache | None:
    """The run's model cache (or the operator's); None when spec.trainer.env sets TEMPER_MODEL_CACHE
    itself: the user then points it at a place of their own and the operator mounts nothing there."""
    if MODEL_CACHE_ENV in _user_env(run):
        return None
    trainer = run.spec.trainer
    return (trainer.model_cache if trainer is not None else None) or config.model_cache


def _pvc_claim(run: PostTrainingRun) -> str | None:
    uri = run.spec.base_model.uri
    return uri.removeprefix("pvc://").split("/", 1)[0] if uri.startswith("pvc://") else None


def source_env(run: PostTrainingRun, config: OperatorConfig) -> list[dict[str, Any]]:
    """HF_ENDPOINT, HF_TOKEN (by secretKeyRef), the model cache's path and the PVC mount map."""
    env: list[dict[str, Any]] = []
    if config.hf_endpoint:
        env.append({"name": "HF_ENDPOINT", "value": config.hf_endpoint})
    base = run.spec.base_model
    uses_hub = base.uri.startswith("hf://") or any(d.uri.startswith("hf://") for d in run.spec.datasets)
    if uses_hub:  # no phoning home, and no progress bars in the pod log
        env.append({"name": "HF_HUB_DISABLE_TELEMETRY", "value": "1"})
        env.append({"name": "HF_HUB_DISABLE_PROGRESS_BARS", "value": "1"})
    if base.uri.startswith("hf://") and base.secret_ref is not None:
        ref = {"name": base.secret_ref.name, "key": HF_TOKEN_KEY}
        env.append({"name": HF_TOKEN_KEY, "valueFrom": {"secretKeyRef": ref}})
    if model_cache_choice(run, config) is not None:
        env.append({"name": MODEL_CACHE_ENV, "value": config.model_cache_path})
    claim = _pvc_claim(run)
    if claim is not None:
        env.append({"name": PVC_MOUNTS_ENV, "value": json.dumps({claim: f"{PVC_MOUNT_ROOT}/{claim}"})})
    return env


def _model_cache_volume(cache: ModelCache) -> dict[str, Any]:
    if cache.type == "pvc":
        return {"name": MODEL_CACHE_VOLUME, "persistentVolumeClaim": {"claimName": cache.claim_name}}
    if cache.type == "ephemeral":
        claim: dict[str, Any] = {
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": cache.size}},
        }
        if cache.storage_class_name:
            claim["storageClassName"] = cache.storage_class_name
        template = {"metadata": {"labels": {LABEL_COMPONENT: "model-cache"}}, "spec": claim}
        return {"name": MODEL_CACHE_VOLUME, "ephemeral": {"volumeClaimTemplate": template}}
    return {"name": MODEL_CACHE_VOLUME, "emptyDir": {"sizeLimit": cache.size} if cache.size else {}}


def source_volume_specs(
    run: PostTrainingRun, config: OperatorConfig
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(volumes, volumeMounts): the model cache, and a pvc:// base model's claim, read-only."""
    volumes: list[dict[str, Any]] = []
    mounts: list[dict[str, Any]] = []
    cache = model_cache_choice(run, config)
    if cache is not None:
        volumes.append(_model_cache_volume(cache))
        mounts.append({"name": MODEL_CACHE_VOLUME, "mountPath": config.model_cache_path})
    claim = _pvc_claim(run)
    if claim is not None:
        volumes.append(
            {"name": BASE_MODEL_VOLUME, "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
        )
        mounts.append({"name": BASE_MODEL_VOLUME, "mountPath": f"{PVC_MOUNT_ROOT}/{claim}", "readOnly": True})
    return volumes, mounts


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
        # The trainer writes its StageResult there; a container that dies before (a wrong image,
        # an import error) still says why through its log tail.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pod_security, container["securityContext"] = _security_contexts(config)
    volumes, container["volumeMounts"], path_env = _volumes(config)
    names = {e["name"] for e in container["env"]}
    container["env"] += [e for e in path_env if e["name"] not in names]
    if nodes > 1:
        container["ports"].append({"name": "rendezvous", "containerPort": config.master_port})
    source_volumes, source_mounts = source_volume_specs(run, config)
    container["volumeMounts"] += source_mounts
    resources = _resources(stage, run, config)
    if resources:
        container["resources"] = resources
    threads = cpu_threads(resources)
    if threads is not None and CPU_THREADS_ENV not in {e["name"] for e in container["env"]}:
        container["env"].append({"name": CPU_THREADS_ENV, "value": str(threads)})
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",  # podFailurePolicy requires it; retries are new pods or new Jobs
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": pod_security,
        "containers": [container],
        "volumes": [*volumes, *source_volumes],
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
                # Exit 143: the trainer checkpointed on SIGTERM (its pod deleted, e.g. when Kueue
                # evicts the Job by suspending it); the resumed Job replaces it, same attempt.
                {
                    "action": "Ignore",
                    "onExitCodes": {
                        "containerName": TRAINER_CONTAINER,
                        "operator": "In",
                        "values": [EXIT_PREEMPTED],
                    },
                },
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


def _security_contexts(config: OperatorConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Pod Security "restricted": non-root is required, the UID is the image's (numeric USER) or
    the platform's, unless the operator is configured with one."""
    pod: dict[str, Any] = {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    if config.trainer_run_as_user is not None:
        pod["runAsUser"] = config.trainer_run_as_user
    container = {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "runAsNonRoot": True,
        "readOnlyRootFilesystem": True,
    }
    return pod, container


def _volumes(
    config: OperatorConfig,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Volumes, their mounts and the env that points the trainer at them (defaults a run's
    spec.trainer.env may override, e.g. TEMPER_MODEL_CACHE to a shared cache)."""
    volumes = [
        {"name": "tmp", "emptyDir": {"sizeLimit": config.trainer_tmp_size}},
        {"name": "work", "emptyDir": {}},
        # PyTorch DataLoader workers and NCCL use /dev/shm; the runtime's default is 64 MiB.
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": config.trainer_shm_size}},
    ]
    # The model cache is source_volume_specs' (emptyDir, ephemeral or a shared PVC).
    paths = {"tmp": TMP_DIR, "work": WORK_DIR, "dshm": SHM_DIR}
    mounts = [{"name": name, "mountPath": path} for name, path in paths.items()]
    env = [
        {"name": "TEMPER_WORKDIR", "value": WORK_DIR},
    ]
    return volumes, mounts, env


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
