"""Adapter lifecycle: active -> retired, and what retention does with the stored objects.

``spec.lifecycle``: ``active`` (default) or ``retired``; retiring is one-way (a retired adapter is
never promoted nor merged). ``spec.retention.onRetire``: ``keep`` (default) leaves the objects;
``delete`` puts the finalizer ``temper.dev/artifact-retention`` on the Adapter and, on retire or
on deletion, removes *exactly* the files its manifest lists plus the manifest itself — never a
prefix listing, so nothing else sharing the folder (other attempts, checkpoints, other adapters)
can be removed. Files go first and the manifest last, so an interrupted cleanup can resume from
the manifest. Nothing is deleted while another live Adapter catalogues the same manifest.

Authority (docs/security.md, "Storage authority"): the objects are deleted only if temper
published that manifest for the Adapter's own namespace (its ``lineage.run.namespace``), or, for
a manifest temper did not publish, if this Adapter verified exactly those bytes (its
``status.artifact.sha256``). A manifest of another namespace is never deleted through an Adapter.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from temper.api.contract import Manifest

RETENTION_FINALIZER = "temper.dev/artifact-retention"
ARTIFACT_DELETED = "ArtifactDeleted"  # condition type recording that retention removed the files
RETENTION_REFUSED = "RetentionRefused"  # its reason when the namespace had no authority over them
Lifecycle = Literal["active", "retired"]


class LifecycleError(ValueError):
    """A lifecycle change or retention action that must not happen; names the field."""


class RetentionRefused(LifecycleError):
    """The Adapter's namespace has no authority over the objects its manifest lists."""


def lifecycle_of(adapter: Mapping[str, Any]) -> Lifecycle:
    value = (adapter.get("spec") or {}).get("lifecycle", "active")
    if value not in ("active", "retired"):
        raise LifecycleError(f"spec.lifecycle: {value!r} is not active or retired")
    return "retired" if value == "retired" else "active"


def retention_of(adapter: Mapping[str, Any]) -> Literal["keep", "delete"]:
    value = ((adapter.get("spec") or {}).get("retention") or {}).get("onRetire", "keep")
    if value not in ("keep", "delete"):
        raise LifecycleError(f"spec.retention.onRetire: {value!r} is not keep or delete")
    return "delete" if value == "delete" else "keep"


def check_transition(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> None:
    """Refuse retired -> active: the artifact may already be gone and promotions rely on it."""
    if old is not None and lifecycle_of(old) == "retired" and lifecycle_of(new) == "active":
        raise LifecycleError(
            "spec.lifecycle: a retired adapter cannot become active again; create a new Adapter"
        )


def wants_finalizer(adapter: Mapping[str, Any]) -> bool:
    return retention_of(adapter) == "delete"


def artifact_deleted(adapter: Mapping[str, Any]) -> bool:
    conditions = (adapter.get("status") or {}).get("conditions") or []
    return any(c.get("type") == ARTIFACT_DELETED and c.get("status") == "True" for c in conditions)


def retention_refused(adapter: Mapping[str, Any]) -> bool:
    conditions = (adapter.get("status") or {}).get("conditions") or []
    return any(c.get("type") == ARTIFACT_DELETED and c.get("reason") == RETENTION_REFUSED for c in conditions)


def should_delete_artifact(adapter: Mapping[str, Any], *, deleting: bool) -> bool:
    """Delete the objects now? On retire or deletion, with retention delete, not done (or refused) yet."""
    if retention_of(adapter) != "delete":
        return False
    if artifact_deleted(adapter) or retention_refused(adapter):
        return False
    return deleting or lifecycle_of(adapter) == "retired"


def artifact_sharers(adapter: Mapping[str, Any], others: Iterable[Mapping[str, Any]]) -> list[str]:
    """Other live Adapters of its namespace (``namespace/name``) cataloguing this Adapter's
    manifest: retention must keep the files for them (the operator's own Adapter of a stage and a
    hand-registered one may name the same manifest). A retired or deleting one no longer counts."""
    uri = ((adapter.get("spec") or {}).get("artifact") or {}).get("uri")
    me = _key(adapter)
    out = []
    for other in others:
        meta = other.get("metadata") or {}
        same = ((other.get("spec") or {}).get("artifact") or {}).get("uri") == uri
        # Another namespace's Adapter has no authority over these objects, so it cannot hold them.
        if not same or _key(other) == me or meta.get("deletionTimestamp") or _key(other)[0] != me[0]:
            continue
        if (other.get("spec") or {}).get("lifecycle") != "retired":  # anything else: still live
            out.append("/".join(_key(other)))
    return sorted(out)


def _key(adapter: Mapping[str, Any]) -> tuple[str, str]:
    meta = adapter.get("metadata") or {}
    return str(meta.get("namespace", "")), str(meta.get("name", ""))


def objects_to_delete(manifest_uri: str, manifest: Manifest) -> list[str]:
    """Exactly the listed files (relative to the manifest's folder) then the manifest."""
    if not manifest_uri.startswith("s3://") or not manifest_uri.endswith("/manifest.json"):
        raise LifecycleError(f"spec.artifact.uri: {manifest_uri!r} is not an s3://.../manifest.json URI")
    folder = manifest_uri[: -len("manifest.json")]
    keys: list[str] = []
    for entry in manifest.files:
        parts = entry.path.split("/")
        if entry.path.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise LifecycleError(
                f"manifest file {entry.path!r}: refusing a path outside the manifest's folder"
            )
        keys.append(folder + entry.path)
    keys.append(manifest_uri)
    return keys


def manifest_namespace(manifest: Manifest) -> str | None:
    """The namespace temper published ``manifest`` for (its run's), None for a hand-made one."""
    run = manifest.lineage.get("run")
    namespace = run.get("namespace") if isinstance(run, dict) else None
    return str(namespace) if namespace else None


def deletion_refusal(
    manifest: Manifest, manifest_sha256: str, namespace: str, verified_sha256: str | None
) -> str | None:
    """Why retention must not delete this manifest's objects for an Adapter of ``namespace``."""
    owner = manifest_namespace(manifest)
    if owner is not None and owner != namespace:
        return f"spec.artifact.uri: the manifest was published for namespace {owner!r}, not {namespace!r}"
    if owner is None and verified_sha256 != manifest_sha256:
        return (
            "spec.artifact.uri: temper did not publish this manifest and this Adapter never verified "
            "these bytes (status.artifact.sha256)"
        )
    return None


class ObjectStore(Protocol):
    def read_manifest(self, uri: str) -> tuple[Manifest, str]: ...

    def head(self, uri: str) -> dict[str, Any] | None: ...

    client: Any


@dataclass(frozen=True)
class DeletionResult:
    deleted: list[str]
    already_gone: bool  # the manifest was missing: nothing (left) to delete


def delete_artifact(
    store: ObjectStore, manifest_uri: str, namespace: str, verified_sha256: str | None
) -> DeletionResult:
    """Delete what the manifest lists, then the manifest, if ``namespace`` may; idempotent."""
    from temper.storage import S3Uri, VerificationError

    if store.head(manifest_uri) is None:
        return DeletionResult([], True)
    try:
        manifest, digest = store.read_manifest(manifest_uri)
    except VerificationError as exc:  # not a manifest (e.g. a file outside its folder): never retried
        raise RetentionRefused(f"spec.artifact.uri: {exc}") from None
    refusal = deletion_refusal(manifest, digest, namespace, verified_sha256)
    if refusal:
        raise RetentionRefused(refusal)
    keys = objects_to_delete(manifest_uri, manifest)
    files, manifest_key = keys[:-1], keys[-1]
    for group in (files, [manifest_key]):
        by_bucket: dict[str, list[str]] = {}
        for uri in group:
            loc = S3Uri.parse(uri)
            by_bucket.setdefault(loc.bucket, []).append(loc.key)
        for bucket, bucket_keys in by_bucket.items():
            for start in range(0, len(bucket_keys), 1000):
                batch = [{"Key": k} for k in bucket_keys[start : start + 1000]]
                response = store.client.delete_objects(
                    Bucket=bucket, Delete={"Objects": batch, "Quiet": True}
                )
                errors = response.get("Errors") or []
                if errors:
                    first = errors[0]
                    raise LifecycleError(
                        f"cannot delete s3://{bucket}/{first.get('Key')}: {first.get('Code')}"
                    )
    return DeletionResult(keys, False)
