"""The platform policy: what a namespace's users may ask the operator to do on their behalf.

The operator's ServiceAccount creates the trainer pods and makes the S3 calls, so admission
policies keyed on the requesting user never see them. The platform team sets these rules in the
chart's ``policy`` values; the chart enforces them at admission with a ValidatingAdmissionPolicy
(``templates/admissionpolicy.yaml``) and the operator re-checks the same rules here before it
creates anything (defence in depth). Both sides name the offending field the same way.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from temper.api.adapter import AdapterSpec
    from temper.api.run import PostTrainingRunSpec

POLICY_ENV = "TEMPER_POLICY"
NETWORK_ENV = "TEMPER_TRAINER_NETWORK_POLICY"
POD_ANNOTATIONS = "temper.dev/pod-annotations"
NAMESPACE_PLACEHOLDER = "{namespace}"

# Set by the operator or the trainer runtime: a user value would change what runs or where it
# writes (TEMPER_FAILPOINT, the stage contract, credentials, torchrun's topology, the loader).
RESERVED_ENV_PREFIXES = ("TEMPER_", "AWS_", "TORCHELASTIC_", "PET_")
RESERVED_ENV_NAMES = (
    "HF_TOKEN",
    "HF_ENDPOINT",
    "HOME",
    "JOB_COMPLETION_INDEX",
    "LD_LIBRARY_PATH",
    "LD_PRELOAD",
    "LOCAL_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "NNODES",
    "NODE_RANK",
    "PYTHONPATH",
    "PYTHONSTARTUP",
    "RANK",
    "WORLD_SIZE",
)


def dot_segments(uri: str) -> bool:
    """A "." or ".." path segment: some stores and proxies resolve it, escaping the prefix check."""
    return any(part in (".", "..") for part in uri.removeprefix("s3://").split("/")[1:])


class PlatformPolicy(BaseModel):
    """The chart's ``policy`` values, as the operator reads them from ``TEMPER_POLICY``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    default_trainer_image: str = Field("", alias="defaultTrainerImage")
    # Empty: only the operator's default trainer image may run.
    allowed_image_prefixes: tuple[str, ...] = Field((), alias="allowedImagePrefixes")
    # Empty: no run may set a PriorityClass.
    allowed_priority_classes: tuple[str, ...] = Field((), alias="allowedPriorityClasses")
    max_gpus_per_stage: int | None = Field(None, alias="maxGpusPerStage", ge=0)
    max_nodes_per_stage: int | None = Field(None, alias="maxNodesPerStage", ge=1)
    max_gpus_per_run: int | None = Field(None, alias="maxGpusPerRun", ge=0)
    allow_affinity: bool = Field(False, alias="allowAffinity")
    allow_pod_annotations: bool = Field(False, alias="allowPodAnnotations")
    reserved_env_prefixes: tuple[str, ...] = Field(RESERVED_ENV_PREFIXES, alias="reservedEnvPrefixes")
    reserved_env_names: tuple[str, ...] = Field(RESERVED_ENV_NAMES, alias="reservedEnvNames")
    # s3:// prefixes, "{namespace}" replaced by the object's namespace. Empty: any location.
    allowed_storage: tuple[str, ...] = Field((), alias="allowedStorage")
    # Endpoints spec.storage.endpointUrl may name. Empty: only the operator's default endpoint.
    allowed_storage_endpoints: tuple[str, ...] = Field((), alias="allowedStorageEndpoints")
    default_storage_endpoint: str = Field("", alias="defaultStorageEndpoint")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> PlatformPolicy:
        raw = (os.environ if env is None else env).get(POLICY_ENV, "")
        return cls.model_validate(json.loads(raw)) if raw.strip() else cls()

    def storage_allowed(self, uri: str, namespace: str) -> bool:
        if dot_segments(uri):
            return False
        if not self.allowed_storage:
            return True
        return any(uri.startswith(p.replace(NAMESPACE_PLACEHOLDER, namespace)) for p in self.allowed_storage)

    def endpoint_allowed(self, endpoint: str | None) -> bool:
        if not endpoint:
            return True
        allowed = set(self.allowed_storage_endpoints)
        if self.default_storage_endpoint:
            allowed.add(self.default_storage_endpoint)
        return endpoint in {e.rstrip("/") for e in allowed}

    def env_reserved(self, name: str) -> bool:
        return name in self.reserved_env_names or name.startswith(tuple(self.reserved_env_prefixes))


class Endpoints(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    cidrs: tuple[str, ...] = ()
    ports: tuple[int, ...] = (443,)


class TrainerNetwork(BaseModel):
    """The chart's ``networkPolicy`` values as the operator reads them (``TEMPER_TRAINER_NETWORK_POLICY``)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    enabled: bool = False
    metrics_from: tuple[dict[str, Any], ...] = Field((), alias="metricsFrom")
    storage: Endpoints = Endpoints(ports=(443, 9000))
    hub: Endpoints = Endpoints()
    dns_namespace_labels: dict[str, str] = Field(
        default_factory=lambda: {"kubernetes.io/metadata.name": "kube-system"}, alias="dnsNamespaceLabels"
    )
    dns_pod_labels: dict[str, str] = Field(
        default_factory=lambda: {"k8s-app": "kube-dns"}, alias="dnsPodLabels"
    )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> TrainerNetwork:
        raw = (os.environ if env is None else env).get(NETWORK_ENV, "")
        return cls.model_validate(json.loads(raw)) if raw.strip() else cls()


def _image_violations(spec: PostTrainingRunSpec, policy: PlatformPolicy) -> Iterable[str]:
    image = spec.trainer.image if spec.trainer else None
    if (
        image
        and image != policy.default_trainer_image
        and not image.startswith(policy.allowed_image_prefixes)
    ):
        yield f"spec.trainer.image: {image!r} is not an allowed trainer image"


def _env_violations(spec: PostTrainingRunSpec, policy: PlatformPolicy) -> Iterable[str]:
    for env in spec.trainer.env if spec.trainer else []:
        if policy.env_reserved(env.name):
            yield f"spec.trainer.env[name={env.name}]: {env.name} is reserved for the operator and trainer"


def _resource_violations(spec: PostTrainingRunSpec, policy: PlatformPolicy) -> Iterable[str]:
    total = 0
    for stage in spec.stages:
        res = stage.resources
        gpus, nodes = (res.gpus, res.nodes) if res else (0, 1)
        total += gpus * nodes
        where = f"spec.stages[name={stage.name}].resources"
        limit = policy.max_gpus_per_stage
        if limit is not None and gpus * nodes > limit:
            yield f"{where}: {gpus * nodes} GPUs exceed the platform maxGpusPerStage {limit}"
        if policy.max_nodes_per_stage is not None and nodes > policy.max_nodes_per_stage:
            yield f"{where}.nodes: {nodes} exceeds the platform maxNodesPerStage {policy.max_nodes_per_stage}"
        if res and res.affinity and not policy.allow_affinity:
            yield f"{where}.affinity: raw affinity is not allowed on this platform"
    if policy.max_gpus_per_run is not None and total > policy.max_gpus_per_run:
        yield f"spec.stages: {total} GPUs in all exceed the platform maxGpusPerRun {policy.max_gpus_per_run}"


def _run_locations(spec: PostTrainingRunSpec) -> list[tuple[str, str]]:
    """Every s3:// location a run makes the operator or its pods read or write, by field."""
    located = [("spec.storage.uri", spec.storage.uri), ("spec.baseModel.uri", spec.base_model.uri)]
    located += [(f"spec.datasets[name={d.name}].uri", d.uri) for d in spec.datasets]
    continual = spec.continual
    if continual and continual.new_data and continual.new_data.prefix:
        located.append(("spec.continual.newData.prefix", continual.new_data.prefix))
    if continual and continual.new_data and continual.new_data.uri_template:
        located.append(("spec.continual.newData.uriTemplate", continual.new_data.uri_template))
    if continual and continual.replay and continual.replay.buffer:
        located.append(("spec.continual.replay.buffer.uri", continual.replay.buffer.uri))
    return [(where, uri) for where, uri in located if uri.startswith("s3://")]


def location_violations(
    located: Iterable[tuple[str, str]],
    namespace: str,
    policy: PlatformPolicy,
    *,
    credentials: bool,
    credentials_field: str,
) -> list[str]:
    """The storage authority rule: every location is one the namespace may use, and the
    operator's own (ambient) identity serves only locations the platform listed for it."""
    located = list(located)
    found = [
        f"{where}: {uri!r} is outside the storage this namespace may use"
        for where, uri in located
        if not policy.storage_allowed(uri, namespace)
    ]
    if located and not credentials and not policy.allowed_storage:
        found.append(
            f"{credentials_field}: no Secret names this namespace's storage credentials, and the operator's "
            "own identity serves only the locations in the platform's policy.allowedStorage"
        )
    return found


def _storage_violations(
    spec: PostTrainingRunSpec, namespace: str, policy: PlatformPolicy, credentials: bool
) -> Iterable[str]:
    if not policy.endpoint_allowed(spec.storage.endpoint_url):
        yield f"spec.storage.endpointUrl: {spec.storage.endpoint_url!r} is not an allowed storage endpoint"
    yield from location_violations(
        _run_locations(spec),
        namespace,
        policy,
        credentials=credentials,
        credentials_field="spec.storage.secretRef",
    )


def run_violations(
    spec: PostTrainingRunSpec,
    namespace: str,
    annotations: Mapping[str, str] | None,
    policy: PlatformPolicy,
    *,
    credentials: bool = True,
) -> list[str]:
    """Every rule of ``policy`` the run breaks, each message starting with the field's path.

    ``credentials``: the run's S3 calls use a Secret of its namespace (its secretRef or the
    chart's credentialsSecret), not the operator's ambient identity.
    """
    found = [
        *_image_violations(spec, policy),
        *_env_violations(spec, policy),
        *_resource_violations(spec, policy),
        *_storage_violations(spec, namespace, policy, credentials),
    ]
    pc = spec.priority_class_name
    if pc and pc not in policy.allowed_priority_classes:
        found.append(f"spec.priorityClassName: {pc!r} is not an allowed PriorityClass")
    if POD_ANNOTATIONS in (annotations or {}) and not policy.allow_pod_annotations:
        found.append(
            f"metadata.annotations[{POD_ANNOTATIONS}]: pod annotations are not allowed on this platform"
        )
    return found


def adapter_violations(
    spec: AdapterSpec, namespace: str, policy: PlatformPolicy, *, credentials: bool = True
) -> list[str]:
    """The same storage rules for an Adapter's artifact (a hand-registered or merged adapter)."""
    artifact = spec.artifact
    found = []
    if not policy.endpoint_allowed(artifact.endpoint_url):
        found.append(
            f"spec.artifact.endpointUrl: {artifact.endpoint_url!r} is not an allowed storage endpoint"
        )
    found += location_violations(
        [("spec.artifact.uri", artifact.uri)],
        namespace,
        policy,
        credentials=credentials,
        credentials_field="spec.artifact.secretRef",
    )
    return found


def raw_adapter_violations(
    adapter: Mapping[str, Any], policy: PlatformPolicy | None, default_secret: str | None
) -> list[str]:
    """The operator's re-check of a cached Adapter: its artifact and its s3:// base model (a
    merge Job reads it) are locations of the Adapter's namespace."""
    if policy is None:
        return []
    namespace = str((adapter.get("metadata") or {}).get("namespace", ""))
    spec = adapter.get("spec") or {}
    artifact = spec.get("artifact") or {}
    found = []
    endpoint = artifact.get("endpointUrl")
    if not policy.endpoint_allowed(endpoint):
        found.append(f"spec.artifact.endpointUrl: {endpoint!r} is not an allowed storage endpoint")
    located = [("spec.artifact.uri", str(artifact.get("uri") or ""))]
    located.append(("spec.baseModel.uri", str((spec.get("baseModel") or {}).get("uri") or "")))
    credentials = bool((artifact.get("secretRef") or {}).get("name") or default_secret)
    found += location_violations(
        [(where, uri) for where, uri in located if uri.startswith("s3://")],
        namespace,
        policy,
        credentials=credentials,
        credentials_field="spec.artifact.secretRef",
    )
    return found


def policy_values(policy: PlatformPolicy) -> dict[str, Any]:
    """The policy as the chart writes it (camelCase JSON), for tests and docs."""
    return policy.model_dump(by_alias=True, mode="json")
