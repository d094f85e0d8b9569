"""Shared API building blocks: the base model, CEL rule plumbing, references and conditions.

Every API model is the single source of truth for three things at once: Python validation
(pydantic), the CRD's structural OpenAPI schema with its CEL rules (``temper.api.crdgen``) and
the field reference in ``docs/api.md``. So each rule is written twice, side by side: a CEL rule
attached with :func:`cel` and a pydantic validator raising :class:`FieldError` with the same
message, and a test holds them to agreement against the real apiserver.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

GROUP = "temper.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

# Default bounds the CRD puts on every string and list without explicit ones. The apiserver's
# CEL cost estimator needs them (an unbounded list makes `self == oldSelf` too costly), and
# ApiModel enforces the same numbers so pydantic and the apiserver agree.
DEFAULT_MAX_LENGTH = 1024
DEFAULT_MAX_ITEMS = 64

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_LABEL_MAX = 63
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
DNS_SUBDOMAIN_MAX = 253
# Kubernetes resource quantities ("16Gi", "500m", "2"): the apiserver's own pattern.
QUANTITY_PATTERN = r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"  # noqa: E501


class FieldError(ValueError):
    """A validation failure whose message starts with the offending field's path."""


def cel(*rules: dict[str, str]) -> dict[str, Any]:
    """``json_schema_extra`` carrying CEL rules (``x-kubernetes-validations``) for the CRD."""
    return {"x-kubernetes-validations": list(rules)}


def rule(expr: str, message: str, field_path: str | None = None, reason: str | None = None) -> dict[str, str]:
    out = {"rule": expr, "message": message}
    if field_path:
        out["fieldPath"] = field_path
    if reason:
        out["reason"] = reason
    return out


def immutable(path: str) -> dict[str, Any]:
    """``json_schema_extra`` for a field that can never change once the object exists."""
    return cel(rule("self == oldSelf", f"{path} is immutable"))


class ApiMixin(BaseModel):
    """camelCase on the wire, snake_case in Python, unknown fields rejected, default bounds enforced.

    ``field_docs`` documents inherited fields (from ``temper.api.contract``) without redeclaring
    them; ``field_schema`` adds CRD-only schema keywords to a field. Explicit ``max_length`` /
    ``max_items`` constraints on a field win over the defaults.
    """

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    field_docs: ClassVar[dict[str, str]] = {}
    field_schema: ClassVar[dict[str, dict[str, Any]]] = {}

    @model_validator(mode="after")
    def _default_bounds(self) -> ApiMixin:
        cls = type(self)
        for name, info in cls.model_fields.items():
            explicit = next((m.max_length for m in info.metadata if getattr(m, "max_length", None)), None)
            extra = cls.field_schema.get(name, {})
            max_length = extra.get("maxLength", explicit or DEFAULT_MAX_LENGTH)
            max_items = extra.get("maxItems", explicit or DEFAULT_MAX_ITEMS)
            item_max_length = extra.get("itemMaxLength", DEFAULT_MAX_LENGTH)
            value = getattr(self, name)
            where = info.alias or name
            if isinstance(value, str) and len(value) > max_length:
                raise FieldError(f"{where}: must be at most {max_length} characters")
            if isinstance(value, list):
                if len(value) > max_items:
                    raise FieldError(f"{where}: must have at most {max_items} items")
                for i, item in enumerate(value):
                    if isinstance(item, str) and len(item) > item_max_length:
                        raise FieldError(f"{where}[{i}]: must be at most {item_max_length} characters")
            if isinstance(value, dict):
                if len(value) > max_items:
                    raise FieldError(f"{where}: must have at most {max_items} entries")
                for key, item in value.items():
                    if isinstance(item, str) and len(item) > item_max_length:
                        raise FieldError(f"{where}.{key}: must be at most {item_max_length} characters")
        return self


class ApiModel(ApiMixin):
    """Base of API models that are not extensions of a stage-contract model."""


def doc(text: str, **kwargs: Any) -> Any:
    """A ``Field`` with a description; keyword arguments pass through."""
    return Field(description=text, **kwargs)


# -- references --------------------------------------------------------------------------------


class SecretRef(ApiModel):
    """A Secret in the object's own namespace holding S3-style credentials.

    Keys: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` and optionally ``AWS_SESSION_TOKEN``.
    The values reach trainer pods only as environment variables from the Secret; they never
    appear in a spec, status, event or log."""

    name: str = doc("Name of the Secret.", max_length=DNS_SUBDOMAIN_MAX, pattern=DNS_SUBDOMAIN)


AddressingStyle = Literal["path", "virtual", "auto"]


class S3Options(ApiModel):
    """Connection options for an S3-compatible store (AWS, MinIO, Ceph RGW, versitygw...)."""

    secret_ref: SecretRef | None = doc(
        "Credentials; without it the pod's ambient credentials are used.", default=None
    )
    endpoint_url: str | None = doc(
        "Endpoint of a non-AWS store, e.g. http://minio.minio:9000. Empty means AWS.",
        default=None,
        max_length=512,
        pattern=r"^https?://",
    )
    region: str = doc("Region of the bucket.", default="us-east-1", max_length=64)
    addressing_style: AddressingStyle = doc(
        "How the bucket is addressed: path (bucket in the path; MinIO, moto), virtual (bucket in the host "
        "name) or auto.",
        default="path",
    )


# Source URIs. hf:// repository ids are org/name of [A-Za-z0-9._-]; a revision follows '@' (a
# branch, tag or commit; '/' in it written %2F). pvc:// names a claim and a folder on it.
_HF_REPO = r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(@[A-Za-z0-9._%-]+)?"
MODEL_URI = rf"^(builtin://.+|s3://.+|hf://{_HF_REPO}|pvc://[a-z0-9]([-a-z0-9.]*[a-z0-9])?(/.*)?|/.*)$"
DATA_URI = rf"^((s3|builtin)://.+|hf://datasets/{_HF_REPO}(/[^?]*)?(\?split=[A-Za-z0-9._-]+)?|/.*)$"
_NO_DOTDOT = "must not contain '..' path segments"
_HF_NOT_DATASET = "uri: a base model is hf://org/name[@revision], not hf://datasets/..."


def no_dotdot_rule(path: str = "uri") -> dict[str, str]:
    return rule(f"!self.{path}.matches('(^|/)[.][.](/|$)')", f"{path}: {_NO_DOTDOT}", f".{path}")


def has_dotdot(value: str) -> bool:
    return ".." in value.split("?", maxsplit=1)[0].split("/")


class ModelSource(ApiModel):
    """Where the frozen base weights come from."""

    model_config = {
        "json_schema_extra": cel(
            no_dotdot_rule(),
            rule("!self.uri.startsWith('hf://datasets/')", _HF_NOT_DATASET, ".uri"),
        )
    }

    uri: str = doc(
        "builtin://tiny; hf://org/name[@revision] (a Hugging Face Hub repository, or the operator's "
        "HF_ENDPOINT mirror; a branch or tag is pinned to its commit when the stage starts); "
        "pvc://claim/path (a PersistentVolumeClaim in the run's namespace, mounted read-only); "
        "s3://bucket/prefix/; or an absolute path in the trainer image.",
        max_length=DEFAULT_MAX_LENGTH,
        pattern=MODEL_URI,
    )
    secret_ref: SecretRef | None = doc(
        "Credentials: for hf://, a Secret whose key HF_TOKEN holds a Hub token (it also reads hf:// "
        "datasets); for s3://, AWS keys.",
        default=None,
    )

    @model_validator(mode="after")
    def _uri_rules(self) -> ModelSource:
        if has_dotdot(self.uri):
            raise FieldError(f"uri: {_NO_DOTDOT}")
        if self.uri.startswith("hf://datasets/"):
            raise FieldError(_HF_NOT_DATASET)
        return self


ModelCacheType = Literal["emptyDir", "ephemeral", "pvc"]
_CACHE_SIZE = "size: required for an ephemeral model cache"
_CACHE_CLAIM = "claimName: required for, and only for, a pvc model cache"
_CACHE_CLASS = "storageClassName: only an ephemeral model cache takes a storage class"


class ModelCache(ApiModel):
    """The ``model-cache`` volume where trainer pods keep downloaded base models and datasets.

    emptyDir: per pod, on the node's disk (or memory), gone with the pod; ephemeral: a generic
    ephemeral volume (a claim per pod from a storage class, e.g. node-local NVMe); pvc: an existing
    claim in the run's namespace, shared by every stage of every run that mounts it (ReadWriteMany
    for runs on several nodes), so a base model is downloaded once."""

    model_config = {
        "json_schema_extra": cel(
            rule("self.type != 'ephemeral' || has(self.size)", _CACHE_SIZE, ".size"),
            rule("(self.type == 'pvc') == has(self.claimName)", _CACHE_CLAIM, ".claimName"),
            rule(
                "self.type == 'ephemeral' || !has(self.storageClassName)", _CACHE_CLASS, ".storageClassName"
            ),
        )
    }

    type: ModelCacheType = doc("emptyDir, ephemeral or pvc.", default="emptyDir")
    size: str | None = doc(
        "emptyDir: its sizeLimit; ephemeral: the storage each pod's claim requests (e.g. 200Gi).",
        default=None,
        max_length=64,
        pattern=QUANTITY_PATTERN,
    )
    claim_name: str | None = doc(
        "pvc: the claim's name.", default=None, max_length=DNS_SUBDOMAIN_MAX, pattern=DNS_SUBDOMAIN
    )
    storage_class_name: str | None = doc(
        "ephemeral: the storage class; the cluster default when absent.",
        default=None,
        max_length=DNS_SUBDOMAIN_MAX,
        pattern=DNS_SUBDOMAIN,
    )

    @model_validator(mode="after")
    def _by_type(self) -> ModelCache:
        if self.type == "ephemeral" and self.size is None:
            raise FieldError(_CACHE_SIZE)
        if (self.type == "pvc") != (self.claim_name is not None):
            raise FieldError(_CACHE_CLAIM)
        if self.type != "ephemeral" and self.storage_class_name is not None:
            raise FieldError(_CACHE_CLASS)
        return self


# -- conditions --------------------------------------------------------------------------------

ConditionStatus = Literal["True", "False", "Unknown"]

# Condition types. Ready/Succeeded/Failed/Suspended are temper's; Reconciling and Stalled are
# kstatus's abnormal-true conditions, so Argo CD, Flux and `kubectl wait` read progress.
READY = "Ready"
SUCCEEDED = "Succeeded"
FAILED = "Failed"
SUSPENDED = "Suspended"
RECONCILING = "Reconciling"
STALLED = "Stalled"
CONDITION_TYPES = (READY, SUCCEEDED, FAILED, SUSPENDED, RECONCILING, STALLED)


class Condition(ApiModel):
    """One observation of the object's state, following the Kubernetes API conventions."""

    type: str = doc(
        "Ready, Succeeded, Failed, Suspended, Reconciling or Stalled.",
        max_length=316,
        pattern=r"^[A-Za-z][A-Za-z0-9]*$",
    )
    status: ConditionStatus = doc("True, False or Unknown.")
    reason: str = doc(
        "CamelCase machine-readable reason for the last transition.",
        default="",
        max_length=1024,
        pattern=r"^([A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?)?$",
    )
    message: str = doc("Human-readable detail. Never contains credentials.", default="", max_length=32768)
    observed_generation: int | None = doc(
        "metadata.generation this condition was computed from.", default=None, ge=0
    )
    last_transition_time: str | None = doc(
        "When status last changed (RFC 3339).", default=None, json_schema_extra={"format": "date-time"}
    )

    field_schema: ClassVar[dict[str, dict[str, Any]]] = {"message": {"maxLength": 32768}}


def conditions_field() -> Any:
    return Field(
        default_factory=list,
        description="Current conditions. Each type appears at most once.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )


def unique_names(items: list[Any], path: str, key: str = "name") -> None:
    """Mirror of ``x-kubernetes-list-type: map``: keys are unique."""
    seen: set[str] = set()
    for i, item in enumerate(items):
        value = getattr(item, key)
        if value in seen:
            raise FieldError(f"{path}[{i}].{key}: duplicate value {value!r}")
        seen.add(value)
