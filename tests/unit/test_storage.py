"""temper.storage against a real S3 server (moto in server mode on 127.0.0.1)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from temper.api.contract import ManifestFile, StorageConfig
from temper.storage import Credentials, S3Uri, Storage, StorageError, VerificationError, make_client
from temper_dev.s3server import FAKE_CREDENTIALS, S3Server

pytestmark = pytest.mark.unit

FIELDS = {"baseModel": "builtin://tiny", "method": "lora", "stageType": "sft", "trainerVersion": "test"}


@pytest.fixture
def storage(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Storage:
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    return Storage(StorageConfig(endpointUrl=s3_server.endpoint_url))


@pytest.fixture
def artifact(tmp_path: Path) -> Path:
    folder = tmp_path / "artifact"
    (folder / "sub").mkdir(parents=True)
    (folder / "adapter_config.json").write_text('{"r": 8}')
    (folder / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 40)
    (folder / "sub" / "notes.txt").write_text("nested")
    return folder


def test_s3_uri_parsing() -> None:
    uri = S3Uri.parse("s3://bucket/a/b/")
    assert (uri.bucket, uri.key, uri.prefix) == ("bucket", "a/b/", "a/b/")
    assert str(uri.join("attempts", "2", "x.json")) == "s3://bucket/a/b/attempts/2/x.json"
    assert str(S3Uri.parse("s3://bucket/a/b/manifest.json").parent) == "s3://bucket/a/b"
    for bad in ("http://x/y", "s3:///key", "bucket/key"):
        with pytest.raises(ValueError, match="s3"):
            S3Uri.parse(bad)


def test_publish_writes_files_then_manifest_last(storage: Storage, s3_bucket: str, artifact: Path) -> None:
    order: list[str] = []
    storage.client.meta.events.register(
        "before-parameter-build.s3.PutObject", lambda params, **_: order.append(params["Key"])
    )
    storage.client.meta.events.register(
        "before-parameter-build.s3.CreateMultipartUpload", lambda params, **_: order.append(params["Key"])
    )
    result = storage.publish_atomic(artifact, f"s3://{s3_bucket}/runs/r1/sft/", 1, FIELDS)
    assert result.won
    assert order[-1] == "runs/r1/sft/manifest.json"
    assert set(order[:-1]) == {
        "runs/r1/sft/attempts/1/adapter_config.json",
        "runs/r1/sft/attempts/1/adapter_model.safetensors",
        "runs/r1/sft/attempts/1/sub/notes.txt",
    }
    manifest, digest = storage.read_manifest(result.manifest_uri)
    assert digest == result.sha256
    assert {f.path for f in manifest.files} == {o.removeprefix("runs/r1/sft/") for o in order[:-1]}
    assert manifest.base_model == "builtin://tiny"
    assert manifest.created_at
    verified = storage.verify_manifest(result.manifest_uri)
    assert verified.ok, verified.problems
    assert verified.total_size == sum(p.stat().st_size for p in artifact.rglob("*") if p.is_file())


def test_second_publisher_loses_cleanly(
    storage: Storage, s3_bucket: str, artifact: Path, tmp_path: Path
) -> None:
    prefix = f"s3://{s3_bucket}/runs/r2/sft/"
    first = storage.publish_atomic(artifact, prefix, 1, {**FIELDS, "metrics": {"m": 1.0}})
    other = tmp_path / "other"
    other.mkdir()
    (other / "adapter_config.json").write_text('{"r": 16}')
    second = storage.publish_atomic(other, prefix, 2, {**FIELDS, "metrics": {"m": 2.0}})
    assert first.won
    assert not second.won
    assert second.manifest_uri == first.manifest_uri
    assert second.sha256 == first.sha256
    manifest, _ = storage.read_manifest(first.manifest_uri)
    assert manifest.metrics == {"m": 1.0}  # the first publisher's manifest stands
    # the loser's files stay in their own attempt folder, outside the manifest
    assert "attempts/2/adapter_config.json" in storage.list_keys(prefix)
    assert all(f.path.startswith("attempts/1/") for f in manifest.files)


def test_if_none_match_is_honoured_by_the_server(storage: Storage, s3_bucket: str) -> None:
    uri = f"s3://{s3_bucket}/x/manifest.json"
    assert storage.put_bytes(uri, b"one", if_none_match=True)
    assert not storage.put_bytes(uri, b"two", if_none_match=True)
    assert storage.get_bytes(uri) == b"one"


def test_verify_detects_corruption_and_missing_files(
    storage: Storage, s3_bucket: str, artifact: Path
) -> None:
    result = storage.publish_atomic(artifact, f"s3://{s3_bucket}/runs/r3/sft/", 1, FIELDS)
    weights = f"s3://{s3_bucket}/runs/r3/sft/attempts/1/adapter_model.safetensors"
    data = bytearray(storage.get_bytes(weights))
    data[100] ^= 0xFF  # same size, one flipped byte
    storage.put_bytes(weights, bytes(data))
    storage.client.delete_object(Bucket=s3_bucket, Key="runs/r3/sft/attempts/1/sub/notes.txt")
    verified = storage.verify_manifest(result.manifest_uri)
    assert not verified.ok
    assert any(
        p.startswith("attempts/1/adapter_model.safetensors: sha256 mismatch") for p in verified.problems
    )
    assert "attempts/1/sub/notes.txt: missing" in verified.problems
    with pytest.raises(VerificationError, match=r"adapter_model\.safetensors: sha256 mismatch"):
        storage.download_verified(result.manifest_uri, Path(artifact.parent / "dl"))


def test_verify_reports_missing_and_invalid_manifest(storage: Storage, s3_bucket: str) -> None:
    missing = storage.verify_manifest(f"s3://{s3_bucket}/nope/manifest.json")
    assert not missing.ok
    assert missing.problems[0].startswith("manifest.json:")
    storage.put_bytes(f"s3://{s3_bucket}/bad/manifest.json", b'{"files": "no"}')
    bad = storage.verify_manifest(f"s3://{s3_bucket}/bad/manifest.json")
    assert not bad.ok
    assert "not a valid manifest" in bad.problems[0]


def test_download_verified_strips_the_attempt_folder(
    storage: Storage, s3_bucket: str, artifact: Path, tmp_path: Path
) -> None:
    result = storage.publish_atomic(artifact, f"s3://{s3_bucket}/runs/r4/sft/", 3, FIELDS)
    dest = tmp_path / "dest"
    manifest = storage.download_verified(result.manifest_uri, dest)
    assert (dest / "adapter_model.safetensors").read_bytes() == (
        artifact / "adapter_model.safetensors"
    ).read_bytes()
    assert (dest / "sub" / "notes.txt").read_text() == "nested"
    assert json.loads((dest / "manifest.json").read_text())["method"] == manifest.method


def test_multipart_settings_are_used(s3_server: S3Server, s3_bucket: str, tmp_path: Path) -> None:
    config = StorageConfig(
        endpointUrl=s3_server.endpoint_url,
        multipartThresholdBytes=5 * 1024 * 1024,
        multipartChunkBytes=5 * 1024 * 1024,
    )
    storage = Storage(config, make_client(config, Credentials.from_env(s3_server.env)))
    big = tmp_path / "big.bin"
    big.write_bytes(b"\1" * (11 * 1024 * 1024))
    storage.upload_file(big, f"s3://{s3_bucket}/big.bin")
    head = storage.head(f"s3://{s3_bucket}/big.bin")
    assert head is not None
    assert head["ContentLength"] == big.stat().st_size
    assert head["ETag"].strip('"').endswith("-3")  # three 5 MiB parts: a multipart upload


def test_credentials_never_in_reprs_or_errors(s3_server: S3Server, tmp_path: Path) -> None:
    secret = FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"]
    creds = Credentials.from_env(s3_server.env)
    assert creds is not None
    assert secret not in repr(creds)
    storage = Storage(StorageConfig(endpointUrl=s3_server.endpoint_url), make_client(StorageConfig(), creds))
    assert secret not in repr(storage)
    bad = Storage(
        StorageConfig(endpointUrl=s3_server.endpoint_url),
        make_client(StorageConfig(endpointUrl=s3_server.endpoint_url), creds),
    )
    with pytest.raises(StorageError) as err:
        bad.get_bytes("s3://no-such-bucket-xyz/key")
    assert "no-such-bucket-xyz" in str(err.value)
    assert secret not in str(err.value)


class Transfers:
    """Counts the S3 calls and the object bytes a client reads (botocore's own event hooks)."""

    def __init__(self, storage: Storage) -> None:
        self.calls: list[str] = []
        self.got: list[str] = []
        storage.client.meta.events.register("before-call.s3", self._call)

    def _call(self, model: Any, params: dict[str, Any], **_: Any) -> None:
        self.calls.append(model.name)
        if model.name == "GetObject":
            self.got.append(params["url_path"].rsplit("/", 1)[-1])


@pytest.fixture
def multipart(s3_server: S3Server) -> Storage:
    config = StorageConfig(
        endpointUrl=s3_server.endpoint_url,
        multipartThresholdBytes=5 * 1024 * 1024,
        multipartChunkBytes=5 * 1024 * 1024,
    )
    return Storage(config, make_client(config, Credentials.from_env(s3_server.env)))


def _with_big_file(artifact: Path) -> Path:
    (artifact / "model.safetensors").write_bytes(os.urandom(11 * 1024 * 1024))  # three parts
    return artifact


def test_verification_reads_one_head_per_file_and_no_file_bytes(
    multipart: Storage, s3_bucket: str, artifact: Path
) -> None:
    result = multipart.publish_atomic(_with_big_file(artifact), f"s3://{s3_bucket}/o1/", 1, FIELDS)
    manifest, _ = multipart.read_manifest(result.manifest_uri)
    assert all(f.checksum_sha256 and f.etag for f in manifest.files)
    seen = Transfers(multipart)
    verified = multipart.verify_manifest(result.manifest_uri)
    assert verified.ok, verified.problems
    assert seen.got == ["manifest.json"]  # O(1) bytes per file: nothing but the manifest is read
    assert seen.calls.count("HeadObject") == len(manifest.files) == 4


@pytest.mark.parametrize(
    ("tamper", "problem"),
    [
        ("truncate", "size"),
        ("same-size-with-checksum", "sha256 mismatch"),
        ("same-size-without-checksum", "rewritten since publish"),
        ("multipart-rewrite", "sha256 mismatch"),
    ],
)
def test_a_rewritten_or_truncated_object_never_verifies(
    multipart: Storage, s3_bucket: str, artifact: Path, tamper: str, problem: str
) -> None:
    prefix = f"s3://{s3_bucket}/o-{tamper}/"
    result = multipart.publish_atomic(_with_big_file(artifact), prefix, 1, FIELDS)
    small = f"{prefix}attempts/1/adapter_model.safetensors"
    big = f"{prefix}attempts/1/model.safetensors"
    data = bytearray(multipart.get_bytes(small))
    data[7] ^= 0xFF
    if tamper == "truncate":
        multipart.put_bytes(small, bytes(data[:-1]))
    elif tamper == "same-size-with-checksum":
        multipart.put_bytes(small, bytes(data))
    elif tamper == "same-size-without-checksum":  # a writer that sends no checksum
        multipart.client.put_object(Bucket=s3_bucket, Key=S3Uri.parse(small).key, Body=bytes(data))
    else:
        replacement = artifact.parent / "replacement"
        replacement.write_bytes(os.urandom(11 * 1024 * 1024))
        multipart.upload_file(replacement, big)
    seen = Transfers(multipart)
    verified = multipart.verify_manifest(result.manifest_uri)
    assert not verified.ok
    assert len(verified.problems) == 1, verified.problems
    assert problem in verified.problems[0]
    assert seen.got == ["manifest.json"]


def test_a_manifest_without_stored_checksums_falls_back_to_hashing(
    storage: Storage, s3_bucket: str, artifact: Path
) -> None:
    """Manifests published before checksums were recorded: every file is read and hashed."""
    prefix = f"s3://{s3_bucket}/old/"
    result = storage.publish_atomic(artifact, prefix, 1, FIELDS)
    manifest, _ = storage.read_manifest(result.manifest_uri)
    for entry in manifest.files:  # as an older publisher wrote them: no checksum on the objects
        key = S3Uri.parse(f"{prefix}{entry.path}").key
        body = storage.get_bytes(f"{prefix}{entry.path}")
        storage.client.put_object(Bucket=s3_bucket, Key=key, Body=body)
    bare = [ManifestFile(path=f.path, sha256=f.sha256, size=f.size) for f in manifest.files]
    storage.client.put_object(
        Bucket=s3_bucket,
        Key=S3Uri.parse(result.manifest_uri).key,
        Body=manifest.model_copy(update={"files": bare}).model_dump_json(by_alias=True).encode(),
    )
    seen = Transfers(storage)
    assert storage.verify_manifest(result.manifest_uri).ok
    assert sorted(seen.got) == sorted(["manifest.json", *(f.path.rsplit("/", 1)[-1] for f in bare)])
    weights = f"{prefix}attempts/1/adapter_model.safetensors"
    data = bytearray(storage.get_bytes(weights))
    data[3] ^= 0xFF
    storage.client.put_object(Bucket=s3_bucket, Key=S3Uri.parse(weights).key, Body=bytes(data))
    verified = storage.verify_manifest(result.manifest_uri)
    assert not verified.ok
    assert "sha256 mismatch" in verified.problems[0]
