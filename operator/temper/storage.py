"""The S3 layer shared by the trainer (publishing) and the operator (verifying, reading progress).

Any S3-compatible endpoint works (AWS, MinIO, Ceph RGW, moto): the endpoint URL, the addressing
style and the multipart thresholds come from :class:`temper.api.contract.StorageConfig`.
Credentials come from the environment (``AWS_ACCESS_KEY_ID`` ...) or explicitly; they are never
logged, never put in exception messages and never written to any object.

Atomic publish (see ``temper.api.contract`` for the layout)::

    <prefix>/attempts/<attempt>/<files...>   uploaded first, one immutable folder per attempt
    <prefix>/manifest.json                   written LAST with If-None-Match: *

The first attempt to write the manifest wins; a later one finds it, verifies it and returns it,
so publishing is idempotent. Readers trust only a manifest whose files all verify.

Verification costs one HEAD per file, never a download: files are uploaded with S3's stored
SHA-256 checksum (``ChecksumAlgorithm=SHA256``), which a ``HEAD`` with ``ChecksumMode=ENABLED``
returns. A single-part object's checksum is the file's SHA-256 itself and is compared with the
manifest's ``sha256``; a multipart object's is a checksum of its parts' checksums (``...-N``), so
the manifest records the value the store reported at publish (``checksumSha256``). An object
without a checksum (a store that keeps none, or a rewrite without one) is held to the ETag
recorded at publish: any rewrite gives a new ETag, except one with identical bytes (harmless).
Only a file with neither recorded (an older manifest) falls back to downloading and hashing it.

boto3 is imported on first use: a process that never touches storage never loads it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from botocore.exceptions import ClientError

from temper.api.contract import Manifest, ManifestFile, StorageConfig

if TYPE_CHECKING:
    from boto3.s3.transfer import TransferConfig

MANIFEST_NAME = "manifest.json"
# Bounded network waits: a partitioned S3 must fail a call in seconds, not hang a reconcile
# worker (or a shutdown) for botocore's 60 s read timeout times its retries.
CONNECT_TIMEOUT_SECONDS = 5.0
READ_TIMEOUT_SECONDS = 20.0
MAX_ATTEMPTS = 3
# Test-only fault injection (the chaos campaign): with TEMPER_FAILPOINT=publish-before-manifest
# the process dies (exit 137, like a SIGKILL) after uploading an attempt's files and before
# writing its manifest; TEMPER_FAILPOINT_ATTEMPTS=1,2 limits it to those attempt numbers (a later
# attempt publishes normally) and TEMPER_FAILPOINT_MATCH=<text> to output prefixes containing it
# (e.g. "/sft/": one stage). Never set in production.
FAILPOINT_ENV = "TEMPER_FAILPOINT"
FAILPOINT_ATTEMPTS_ENV = "TEMPER_FAILPOINT_ATTEMPTS"
FAILPOINT_MATCH_ENV = "TEMPER_FAILPOINT_MATCH"
_CHUNK = 1024 * 1024
_ATTEMPT_DIR = re.compile(r"^attempts/[^/]+/")


class StorageError(RuntimeError):
    """A storage operation failed; the message names the object, never a credential."""


class VerificationError(StorageError):
    """A manifest or one of its files failed verification."""


@dataclass(frozen=True)
class S3Uri:
    bucket: str
    key: str = ""

    @classmethod
    def parse(cls, uri: str) -> S3Uri:
        if not uri.startswith("s3://"):
            raise ValueError(f"not an s3:// URI: {uri!r}")
        rest = uri[len("s3://") :]
        bucket, _, key = rest.partition("/")
        if not bucket:
            raise ValueError(f"s3 URI has no bucket: {uri!r}")
        return cls(bucket, key)

    def join(self, *parts: str) -> S3Uri:
        key = self.key
        for raw in parts:
            part = raw.strip("/")
            if not part:
                continue
            key = f"{key.rstrip('/')}/{part}" if key else part
        return S3Uri(self.bucket, key)

    @property
    def prefix(self) -> str:
        """The key as a folder prefix ('' or ending in '/')."""
        return self.key if not self.key or self.key.endswith("/") else self.key + "/"

    @property
    def parent(self) -> S3Uri:
        return S3Uri(self.bucket, self.key.rstrip("/").rpartition("/")[0])

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


@dataclass(frozen=True)
class Credentials:
    access_key_id: str
    secret_access_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Credentials | None:
        env = os.environ if env is None else env
        key, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
        if not key or not secret:
            return None
        return cls(key, secret, env.get("AWS_SESSION_TOKEN") or None)

    def __repr__(self) -> str:  # never leak the secret through logs or tracebacks
        return "Credentials(<redacted>)"


@dataclass(frozen=True)
class PublishResult:
    manifest_uri: str
    sha256: str  # of manifest.json's bytes
    won: bool  # False: another attempt had already published; its manifest verified


@dataclass
class VerifyResult:
    ok: bool
    problems: list[str]  # each names the file and the reason
    total_size: int = 0
    manifest_sha256: str | None = None
    manifest: Manifest | None = None


_SESSION: list[Any] = []  # one boto3 Session: its loader parses the S3 model once for every client
_SESSION_LOCK = threading.Lock()  # Session.client() is not thread-safe


def make_client(config: StorageConfig, credentials: Credentials | None = None) -> Any:
    """A boto3 S3 client for ``config``; credentials default to the environment's."""
    import boto3
    from botocore.config import Config as BotoConfig

    creds = credentials if credentials is not None else Credentials.from_env()
    kwargs: dict[str, Any] = {
        "region_name": config.region,
        "config": BotoConfig(
            s3={"addressing_style": config.addressing_style},
            retries={"max_attempts": MAX_ATTEMPTS, "mode": "standard"},
            connect_timeout=CONNECT_TIMEOUT_SECONDS,
            read_timeout=READ_TIMEOUT_SECONDS,
            # Checksums on every request break some S3-compatible stores; only when required.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    }
    if config.endpoint_url:
        kwargs["endpoint_url"] = config.endpoint_url
    if creds is not None:
        kwargs["aws_access_key_id"] = creds.access_key_id
        kwargs["aws_secret_access_key"] = creds.secret_access_key
        if creds.session_token:
            kwargs["aws_session_token"] = creds.session_token
    with _SESSION_LOCK:
        if not _SESSION:
            _SESSION.append(boto3.session.Session())
        return _SESSION[0].client("s3", **kwargs)


def transfer_config(config: StorageConfig) -> TransferConfig:
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(
        multipart_threshold=config.multipart_threshold_bytes,
        multipart_chunksize=config.multipart_chunk_bytes,
        use_threads=True,
        max_concurrency=4,
    )


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class Storage:
    """A client plus its config: the handful of operations temper needs."""

    def __init__(self, config: StorageConfig, client: Any | None = None) -> None:
        self.config = config
        self.client: Any = client if client is not None else make_client(config)
        self.transfer = transfer_config(config)

    def __repr__(self) -> str:
        return f"Storage(endpoint={self.config.endpoint_url!r})"

    # -- single objects ---------------------------------------------------------------------
    def put_bytes(self, uri: str | S3Uri, data: bytes, *, if_none_match: bool = False) -> bool:
        """Write one object. With ``if_none_match`` returns False when it already exists."""
        loc = _loc(uri)
        extra: dict[str, Any] = {"IfNoneMatch": "*"} if if_none_match else {}
        try:
            self.client.put_object(
                Bucket=loc.bucket, Key=loc.key, Body=data, ChecksumAlgorithm="SHA256", **extra
            )
        except ClientError as exc:
            if if_none_match and (_status(exc) in (409, 412) or _error_code(exc) == "PreconditionFailed"):
                return False
            raise StorageError(f"cannot write {loc}: {_error_code(exc) or exc}") from None
        return True

    def get_bytes(self, uri: str | S3Uri) -> bytes:
        loc = _loc(uri)
        try:
            body = self.client.get_object(Bucket=loc.bucket, Key=loc.key)["Body"]
            return cast(bytes, body.read())
        except ClientError as exc:
            raise StorageError(f"cannot read {loc}: {_error_code(exc) or exc}") from None

    def head(self, uri: str | S3Uri, *, checksum: bool = False) -> dict[str, Any] | None:
        """The object's metadata, None if absent; ``checksum`` adds its stored checksums."""
        loc = _loc(uri)
        extra: dict[str, Any] = {"ChecksumMode": "ENABLED"} if checksum else {}
        try:
            return cast(dict[str, Any], self.client.head_object(Bucket=loc.bucket, Key=loc.key, **extra))
        except ClientError as exc:
            if _status(exc) == 404 or _error_code(exc) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise StorageError(f"cannot stat {loc}: {_error_code(exc) or exc}") from None

    def exists(self, uri: str | S3Uri) -> bool:
        return self.head(uri) is not None

    def upload_file(self, path: Path, uri: str | S3Uri) -> None:
        loc = _loc(uri)
        from boto3.exceptions import S3UploadFailedError

        try:
            self.client.upload_file(
                str(path),
                loc.bucket,
                loc.key,
                ExtraArgs={"ChecksumAlgorithm": "SHA256"},
                Config=self.transfer,
            )
        except (ClientError, S3UploadFailedError) as exc:
            raise StorageError(f"cannot upload {path.name} to {loc}: {type(exc).__name__}") from None

    def download_file(self, uri: str | S3Uri, path: Path) -> None:
        loc = _loc(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.client.download_file(loc.bucket, loc.key, str(path), Config=self.transfer)
        except ClientError as exc:
            raise StorageError(f"cannot download {loc}: {_error_code(exc) or exc}") from None

    def iter_chunks(self, uri: str | S3Uri) -> Iterator[bytes]:
        loc = _loc(uri)
        try:
            body = self.client.get_object(Bucket=loc.bucket, Key=loc.key)["Body"]
        except ClientError as exc:
            raise StorageError(f"cannot read {loc}: {_error_code(exc) or exc}") from None
        while chunk := body.read(_CHUNK):
            yield cast(bytes, chunk)

    # -- prefixes ---------------------------------------------------------------------------
    def list_keys(self, prefix: str | S3Uri) -> list[str]:
        """Keys under ``prefix`` (treated as a folder), relative to it, sorted."""
        loc = _loc(prefix)
        keys: list[str] = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=loc.bucket, Prefix=loc.prefix):
            keys.extend(obj["Key"][len(loc.prefix) :] for obj in page.get("Contents", []))
        return sorted(keys)

    def delete_prefix(self, prefix: str | S3Uri) -> int:
        loc = _loc(prefix)
        keys = [loc.prefix + k for k in self.list_keys(loc)]
        for start in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[start : start + 1000]]
            self.client.delete_objects(Bucket=loc.bucket, Delete={"Objects": batch, "Quiet": True})
        return len(keys)

    def upload_dir(self, local_dir: Path, prefix: str | S3Uri) -> list[ManifestFile]:
        """Upload every file under ``local_dir``; entries are relative to ``local_dir``."""
        loc = _loc(prefix)
        entries: list[ManifestFile] = []
        for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
            rel = path.relative_to(local_dir).as_posix()
            digest, size = sha256_file(path), path.stat().st_size
            self.upload_file(path, loc.join(rel))
            entries.append(self._published_entry(loc.join(rel), rel, digest, size))
        return entries

    def _published_entry(self, loc: S3Uri, rel: str, digest: str, size: int) -> ManifestFile:
        """The manifest entry of an uploaded file, with what the store reports for later HEADs."""
        head = self.head(loc, checksum=True)
        if head is None:
            raise StorageError(f"cannot stat {loc} right after uploading it")
        if (
            head.get("ChecksumType") == "FULL_OBJECT"
            and _b64_to_hex(str(head.get("ChecksumSHA256"))) != digest
        ):
            raise VerificationError(f"{loc}: the store's sha256 differs from the uploaded file's")
        return ManifestFile(
            path=rel,
            sha256=digest,
            size=size,
            checksum_sha256=head.get("ChecksumSHA256") or None,
            etag=str(head.get("ETag") or "").strip('"') or None,
        )

    # -- manifests ----------------------------------------------------------------------------
    def publish_atomic(
        self, local_dir: Path, prefix: str, attempt: int | str, manifest_fields: Mapping[str, Any]
    ) -> PublishResult:
        """Upload ``local_dir`` under ``<prefix>/attempts/<attempt>/``, then the manifest, last.

        ``manifest_fields`` are the :class:`Manifest` fields other than ``files`` (by alias or name;
        ``createdAt`` defaults to now). If another attempt already published, its manifest is
        verified and returned (``won=False``); if it does not verify, raises VerificationError.
        """
        root = S3Uri.parse(prefix)
        attempt_rel = f"attempts/{attempt}"
        uploaded = self.upload_dir(local_dir, root.join(attempt_rel))
        files = [entry.model_copy(update={"path": f"{attempt_rel}/{entry.path}"}) for entry in uploaded]
        _failpoint("publish-before-manifest", attempt, prefix)
        fields = dict(manifest_fields)
        fields.setdefault("createdAt", datetime.now(UTC).isoformat(timespec="seconds"))
        manifest = Manifest.model_validate({**fields, "files": [f.model_dump() for f in files]})
        body = manifest.model_dump_json(by_alias=True, indent=2).encode()
        manifest_uri = root.join(MANIFEST_NAME)
        if self.put_bytes(manifest_uri, body, if_none_match=True):
            return PublishResult(str(manifest_uri), hashlib.sha256(body).hexdigest(), won=True)
        existing = self.verify_manifest(str(manifest_uri))
        if not existing.ok or existing.manifest_sha256 is None:
            raise VerificationError(
                f"{manifest_uri} was published by another attempt but does not verify: "
                + "; ".join(existing.problems)
            )
        return PublishResult(str(manifest_uri), existing.manifest_sha256, won=False)

    def read_manifest(self, uri: str) -> tuple[Manifest, str]:
        """The manifest and the sha256 of its bytes."""
        raw = self.get_bytes(uri)
        try:
            manifest = Manifest.model_validate(json.loads(raw))
        except ValueError as exc:
            raise VerificationError(f"{uri}: not a valid manifest: {exc}") from None
        return manifest, hashlib.sha256(raw).hexdigest()

    def verify_manifest(self, uri: str) -> VerifyResult:
        """Check every listed file's size and sha256 in storage; never raises for bad content."""
        try:
            manifest, digest = self.read_manifest(uri)
        except StorageError as exc:
            return VerifyResult(False, [f"{MANIFEST_NAME}: {exc}"])
        folder = S3Uri.parse(uri).parent
        problems: list[str] = []
        total = 0
        for entry in manifest.files:
            problem = self._check_file(folder.join(entry.path), entry)
            if problem:
                problems.append(f"{entry.path}: {problem}")
            total += entry.size
        return VerifyResult(not problems, problems, total, digest, manifest)

    def _check_file(self, loc: S3Uri, entry: ManifestFile) -> str | None:
        """One HEAD: the size, then the store's SHA-256 (else its ETag) against the manifest."""
        head = self.head(loc, checksum=True)
        if head is None:
            return "missing"
        if int(head.get("ContentLength", -1)) != entry.size:
            return f"size {head.get('ContentLength')} != {entry.size}"
        stored = str(head.get("ChecksumSHA256") or "")
        if stored:  # the file's own sha256 (single part) or the parts' checksum seen at publish
            if _b64_to_hex(stored.partition("-")[0]) == entry.sha256 or stored == entry.checksum_sha256:
                return None
            if entry.checksum_sha256:
                return "sha256 mismatch (the store's checksum differs from the manifest's)"
        elif entry.etag:  # no checksum now: any rewrite since publish changed the ETag
            etag = str(head.get("ETag") or "").strip('"')
            return None if etag == entry.etag else "sha256 unverified: object rewritten since publish (ETag)"
        return self._hash_remote(loc, entry)

    def _hash_remote(self, loc: S3Uri, entry: ManifestFile) -> str | None:
        """The fallback for files published without a stored checksum or ETag: read and hash."""
        digest = hashlib.sha256()
        for chunk in self.iter_chunks(loc):
            digest.update(chunk)
        got = digest.hexdigest()
        return None if got == entry.sha256 else _sha_mismatch(entry.sha256, got)

    def download_verified(self, manifest_uri: str, dest: Path) -> Manifest:
        """Download a manifest's files into ``dest`` (attempt folder stripped) and verify each."""
        manifest, _ = self.read_manifest(manifest_uri)
        folder = S3Uri.parse(manifest_uri).parent
        dest.mkdir(parents=True, exist_ok=True)
        for entry in manifest.files:
            rel = _ATTEMPT_DIR.sub("", entry.path)
            target = (dest / rel).resolve()
            if dest.resolve() not in target.parents:
                raise VerificationError(f"{entry.path}: path escapes the destination")
            self.download_file(folder.join(entry.path), target)
            if target.stat().st_size != entry.size:
                raise VerificationError(f"{entry.path}: size {target.stat().st_size} != {entry.size}")
            if sha256_file(target) != entry.sha256:
                raise VerificationError(f"{entry.path}: sha256 mismatch")
        (dest / MANIFEST_NAME).write_text(manifest.model_dump_json(by_alias=True, indent=2))
        return manifest


def _failpoint(name: str, attempt: int | str, where: str) -> None:
    if os.environ.get(FAILPOINT_ENV) != name:
        return
    if os.environ.get(FAILPOINT_MATCH_ENV, "") not in where:
        return
    attempts = os.environ.get(FAILPOINT_ATTEMPTS_ENV)
    if attempts and str(attempt) not in {a.strip() for a in attempts.split(",")}:
        return
    logging.getLogger(__name__).error("failpoint %s: exiting at attempt %s (test only)", name, attempt)
    os._exit(137)


def _b64_to_hex(value: str) -> str:
    try:
        return base64.b64decode(value).hex()
    except ValueError:
        return ""


def _sha_mismatch(expected: str, got: str) -> str:
    return f"sha256 mismatch (expected {expected[:12]}…, got {got[:12]}…)"


def _loc(uri: str | S3Uri) -> S3Uri:
    return uri if isinstance(uri, S3Uri) else S3Uri.parse(uri)


# Module-level conveniences mirroring the Storage methods, for one-off callers.
def publish_atomic(
    storage: Storage, local_dir: Path, prefix: str, attempt: int | str, manifest_fields: Mapping[str, Any]
) -> PublishResult:
    return storage.publish_atomic(local_dir, prefix, attempt, manifest_fields)


def read_manifest(storage: Storage, uri: str) -> Manifest:
    return storage.read_manifest(uri)[0]


def verify_manifest(storage: Storage, uri: str) -> VerifyResult:
    return storage.verify_manifest(uri)


def download_verified(storage: Storage, manifest_uri: str, dest: Path) -> Manifest:
    return storage.download_verified(manifest_uri, dest)
