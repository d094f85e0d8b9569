"""Base models and datasets from where users keep them: the Hub (through olah, a real
Hub-compatible mirror on loopback), PVC mounts and S3 prefixes whose keys must stay in the cache."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pytest
from temper.api.contract import DatasetSpec
from temper_dev.hub import OlahHub
from temper_dev.s3server import S3Server
from temper_trainer import models
from temper_trainer.models import HubUnavailable, ModelSourceError

from tests.fixtures.hub import HubModel
from tests.unit.trainer_helpers import storage_for

pytestmark = pytest.mark.unit


def _digests(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and ".git" not in p.parts
    }


def test_hf_model_is_pinned_to_a_commit_and_every_file_matches(
    hub_env: OlahHub, arch_models: dict[str, HubModel], tmp_path: Path
) -> None:
    model = arch_models["llama"]
    resolved = models.resolve_model(model.uri, None)
    assert resolved.revision == model.sha  # main, pinned to its commit
    assert _digests(resolved.path) == _digests(model.folder)
    assert str(resolved.path).startswith(str(tmp_path / "model-cache" / "hf"))
    assert models.base_model_lineage(model.uri) == {"baseModelRevision": model.sha}

    # main moves on: an explicit sha keeps the old files, @main follows the branch
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"):
        (moved / name).write_bytes((model.folder / name).read_bytes())
    (moved / "NOTICE").write_text("second commit\n")
    (moved / "original").mkdir()  # a Llama-style original checkpoint and .bin twins are never fetched
    (moved / "original" / "consolidated.00.pth").write_bytes(b"x" * 1000)
    (moved / "pytorch_model.bin").write_bytes(b"x" * 1000)
    new_sha = hub_env.add_repo("zoo/moving", moved)
    old = models.resolve_model(f"hf://{model.repo_id}@{model.sha}", None)
    assert old.revision == model.sha
    assert "NOTICE" not in _digests(old.path)
    now = models.resolve_model("hf://zoo/moving@main", None)
    assert now.revision == new_sha
    fetched = _digests(now.path)
    assert fetched["NOTICE"] == hashlib.sha256(b"second commit\n").hexdigest()
    assert "model.safetensors" in fetched
    assert not {"pytorch_model.bin", "original/consolidated.00.pth"} & set(fetched)


def test_hf_model_in_the_cache_needs_no_hub(hub_env: OlahHub, arch_models: dict[str, HubModel]) -> None:
    model = arch_models["qwen2"]
    first = models.resolve_model(f"{model.uri}@{model.sha}", None)
    hub_env.stop()  # a restarted stage on a node that already holds the commit
    try:
        again = models.resolve_model(f"{model.uri}@{model.sha}", None)
        assert again.path == first.path
        with pytest.raises(HubUnavailable, match="the Hub is unavailable"):  # a branch needs the Hub
            models.resolve_model(f"{model.uri}@main", None)
    finally:
        hub_env.start()


def test_hf_errors_are_clear(hub_env: OlahHub, arch_models: dict[str, HubModel]) -> None:
    with pytest.raises(ModelSourceError, match="not found, or HF_TOKEN lacks access"):
        models.resolve_model("hf://zoo/no-such-model", None)
    with pytest.raises(ModelSourceError, match="not found"):
        models.resolve_model(f"{arch_models['llama'].uri}@no-such-branch", None)
    with pytest.raises(ModelSourceError, match="not a dataset or space"):
        models.resolve_model("hf://datasets/zoo/data", None)
    with pytest.raises(ModelSourceError, match="whole repository"):
        models.resolve_model("hf://zoo/tiny-llama/config.json", None)
    with pytest.raises(ModelSourceError, match="org/name"):
        models.parse_hf_uri("hf://gpt2")


def test_hf_uri_parsing() -> None:
    assert models.parse_hf_uri("hf://org/name") == ("org/name", None, "", None)
    assert models.parse_hf_uri("hf://org/name@v1.0") == ("org/name", "v1.0", "", None)
    assert models.parse_hf_uri("hf://org/name@refs%2Fpr%2F1") == ("org/name", "refs/pr/1", "", None)
    assert models.parse_hf_uri("hf://datasets/o/d@abc/data/x.jsonl", datasets=True) == (
        "o/d",
        "abc",
        "data/x.jsonl",
        None,
    )
    assert models.parse_hf_uri("hf://datasets/o/d?split=test", datasets=True) == ("o/d", None, "", "test")
    with pytest.raises(ModelSourceError, match="inside the repository"):
        models.parse_hf_uri("hf://datasets/o/d/../../x", datasets=True)
    with pytest.raises(ModelSourceError, match="only query parameter"):
        models.parse_hf_uri("hf://datasets/o/d?rows=3", datasets=True)


def _parquet(rows: list[dict[str, str]]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


def test_hf_datasets_by_split_and_by_path(hub_env: OlahHub, tmp_path: Path) -> None:
    from temper_trainer.data import HF_DATA_REVISIONS, DataError, load_records

    src = tmp_path / "ds"
    (src / "data").mkdir(parents=True)
    train = [{"prompt": f"{i}+1=", "completion": str(i + 1)} for i in range(6)]
    (src / "data" / "train-00000-of-00001.parquet").write_bytes(_parquet(train))
    (src / "data" / "validation-00000-of-00001.parquet").write_bytes(_parquet(train[:2]))
    (src / "extra.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train[:3]))
    (src / "README.md").write_text("---\nlicense: mit\n---\n")
    sha = hub_env.add_repo("acme/sums", src, repo_type="dataset")

    def load(uri: str) -> list[dict[str, object]]:
        return load_records(DatasetSpec(name="sums", uri=uri, format="prompt-completion"))

    assert [r["prompt"] for r in load("hf://datasets/acme/sums")] == [r["prompt"] for r in train]
    assert HF_DATA_REVISIONS["hf://datasets/acme/sums"] == sha
    assert len(load("hf://datasets/acme/sums?split=validation")) == 2
    assert len(load(f"hf://datasets/acme/sums@{sha}/extra.jsonl")) == 3
    with pytest.raises(DataError, match="no split 'test'"):
        load("hf://datasets/acme/sums?split=test")
    with pytest.raises(DataError, match="not found"):
        load("hf://datasets/acme/none")


def test_s3_keys_that_escape_the_cache_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    root.mkdir()
    assert models.safe_cache_path(root, "sub/model.safetensors") == (root / "sub/model.safetensors").resolve()
    for key in ("../evil", "a/../../evil", "/etc/passwd", "..", "a\\..\\b", ""):
        with pytest.raises(ModelSourceError, match="escapes the model cache folder"):
            models.safe_cache_path(root, key)


def test_s3_base_model_with_an_escaping_key_writes_nothing(
    s3_server: S3Server, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = storage_for(s3_server, monkeypatch)
    monkeypatch.setenv("TEMPER_MODEL_CACHE", str(tmp_path / "cache"))
    client = s3_server.client()
    client.put_object(Bucket=s3_bucket, Key="base/config.json", Body=b"{}")
    client.put_object(Bucket=s3_bucket, Key="base/../outside.txt", Body=b"x")
    with pytest.raises(ModelSourceError, match=r"'\.\./outside\.txt' escapes the model cache folder"):
        models.resolve_model(f"s3://{s3_bucket}/base/", storage)
    assert not list((tmp_path / "cache").rglob("outside.txt"))
    assert not list((tmp_path / "cache").rglob("config.json"))  # refused before any download


def test_pvc_models_resolve_inside_their_mount(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "claim" / "llama").mkdir(parents=True)
    (tmp_path / "claim" / "llama" / "config.json").write_text("{}")
    monkeypatch.setenv(models.PVC_MOUNTS_ENV, json.dumps({"weights": str(tmp_path / "claim")}))
    assert models.resolve_model_dir("pvc://weights/llama", None) == tmp_path / "claim" / "llama"
    with pytest.raises(ModelSourceError, match="claim 'other' is not mounted"):
        models.resolve_model_dir("pvc://other/llama", None)
    with pytest.raises(ModelSourceError, match="inside the claim"):
        models.resolve_model_dir("pvc://weights/../x", None)
    with pytest.raises(ModelSourceError, match=r"no config\.json"):
        models.resolve_model_dir("pvc://weights", None)


def test_a_stage_loads_the_base_commit_its_parent_was_trained_on(
    hub_env: OlahHub,
    arch_models: dict[str, HubModel],
    s3_server: S3Server,
    s3_bucket: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from temper.api.contract import StageContract

    storage = storage_for(s3_server, monkeypatch)
    first = hub_env.add_repo("zoo/drifting", arch_models["mistral"].folder)
    parent = {
        "schemaVersion": 1,
        "files": [],
        "baseModel": "hf://zoo/drifting",
        "method": "lora",
        "stageType": "sft",
        "lineage": {"baseModelRevision": first},
        "trainerVersion": "test",
        "createdAt": "2026-01-01T00:00:00+00:00",
    }
    s3_server.client().put_object(Bucket=s3_bucket, Key="sft/manifest.json", Body=json.dumps(parent).encode())
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "config.json").write_bytes((arch_models["mistral"].folder / "config.json").read_bytes())
    assert hub_env.add_repo("zoo/drifting", moved) != first  # main moved on after the parent stage

    contract = StageContract.model_validate(
        {
            "run": {"namespace": "ns", "name": "r"},
            "stage": {"name": "dpo", "type": "dpo"},
            "baseModel": "hf://zoo/drifting",
            "output": {"prefix": f"s3://{s3_bucket}/dpo/"},
            "parent": {"manifestUri": f"s3://{s3_bucket}/sft/manifest.json"},
        }
    )
    assert models.inherit_parent_revision(contract, storage) == first
    resolved = models.resolve_model("hf://zoo/drifting", None)
    assert resolved.revision == first
    assert (resolved.path / "model.safetensors").exists()  # the parent's files, not main's


def test_published_artifacts_name_their_pinned_base() -> None:
    sha = "a" * 40
    pinned = {"baseModel": "hf://org/m@main", "lineage": {"baseModelRevision": sha}}
    assert models.manifest_base_uri(pinned) == f"hf://org/m@{sha}"
    assert models.manifest_base_uri({"baseModel": "builtin://tiny", "lineage": {}}) == "builtin://tiny"
    assert models.manifest_base_uri({"baseModel": "hf://org/m"}) == "hf://org/m"


def test_the_hub_token_is_redacted_from_messages(monkeypatch: pytest.MonkeyPatch) -> None:
    from temper_trainer.__main__ import redact

    monkeypatch.setenv("HF_TOKEN", "hf_secret-token-value")
    assert redact("401 for token hf_secret-token-value") == "401 for token ***"
