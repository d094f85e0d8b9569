"""Base-model resolution: ``builtin://tiny``, ``hf://``, ``pvc://``, ``s3://`` or a local folder.

- ``hf://org/name[@revision]``: a Hugging Face Hub repository (or any Hub-compatible mirror named
  by ``HF_ENDPOINT``), fetched with ``huggingface_hub.snapshot_download`` into the shared model
  cache. The revision (a branch, tag or commit; default ``main``) is pinned to its commit sha
  before downloading, so every file comes from one commit, and the sha is recorded in the
  manifest's lineage. The token comes from ``HF_TOKEN`` (the operator sets it by secretKeyRef).
- ``pvc://claim/path``: a folder on a PersistentVolumeClaim the operator mounts read-only; the
  mount point of each claim arrives in ``TEMPER_PVC_MOUNTS`` (a JSON object claim → path).
- ``s3://bucket/prefix/``: every object under the prefix, downloaded once into the cache.

Every remote source lands under ``$TEMPER_MODEL_CACHE`` (``temper_trainer.tinymodel``), which the
operator can back with a volume shared by the stages of a run and the runs on a node.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from temper.api.contract import StageContract
from temper.storage import MANIFEST_NAME, S3Uri, Storage

from temper_trainer.tinymodel import ensure_tiny_model, model_cache_dir

BUILTIN_MODELS = {"builtin://tiny"}
PVC_MOUNTS_ENV = "TEMPER_PVC_MOUNTS"
# Hub repository ids: ``org/name`` of letters, digits, ``-``, ``_`` and ``.``.
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[A-Za-z0-9][\w.\-]*$")
_COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")


class ModelSourceError(ValueError):
    """A base model (or dataset) source that cannot be used; the message says why."""


@dataclass(frozen=True)
class ResolvedModel:
    """A base model as a local folder, plus what lineage records about its origin."""

    path: Path
    uri: str
    revision: str | None = None  # the pinned commit sha of an hf:// source


# Sources resolved by this process, by URI: the runner records their pinned revisions.
_RESOLVED: dict[str, ResolvedModel] = {}
# hf:// base models this stage must load at a given commit (its parent adapter's), by URI.
_INHERITED: dict[str, str] = {}


def parse_hf_uri(uri: str, *, datasets: bool = False) -> tuple[str, str | None, str, str | None]:
    """``hf://[datasets/]org/name[@revision][/path][?split=name]`` → (repo id, revision or None,
    path in the repository, split or None).

    A revision containing ``/`` is written URL-encoded (``refs%2Fpr%2F1``)."""
    rest, _, query = uri.removeprefix("hf://").partition("?")
    if datasets:
        if not rest.startswith("datasets/"):
            raise ModelSourceError(f"{uri}: a dataset on the Hub is hf://datasets/org/name[@revision]")
        rest = rest.removeprefix("datasets/")
    elif rest.startswith(("datasets/", "spaces/")):
        raise ModelSourceError(f"{uri}: a base model is hf://org/name[@revision], not a dataset or space")
    split = None
    if query:
        key, _, value = query.partition("=")
        if key != "split" or not re.match(r"^[\w.-]+$", value) or not datasets:
            raise ModelSourceError(f"{uri}: the only query parameter is ?split=<name>, for datasets")
        split = value
    parts = rest.split("/")
    if len(parts) < 2:
        raise ModelSourceError(f"{uri}: expected org/name")
    org, name_rev, sub = parts[0], parts[1], "/".join(parts[2:])
    name, _, revision = name_rev.partition("@")
    repo_id = f"{org}/{name}"
    if not _REPO_ID.match(repo_id) or ".." in repo_id:
        raise ModelSourceError(f"{uri}: {repo_id!r} is not a Hub repository id (org/name)")
    if "@" in name_rev and not revision:
        raise ModelSourceError(f"{uri}: empty revision after '@'")
    if ".." in PurePosixPath(sub).parts:
        raise ModelSourceError(f"{uri}: the path must stay inside the repository")
    return repo_id, (revision.replace("%2F", "/") if revision else None), sub.strip("/"), split


def _hf_cache_dir() -> Path:
    return model_cache_dir() / "hf"


def _hub_kwargs() -> dict[str, Any]:
    """Endpoint and token read at call time: huggingface_hub reads its env only at import."""
    return {"endpoint": os.environ.get("HF_ENDPOINT") or None, "token": os.environ.get("HF_TOKEN") or None}


class HubUnavailable(Exception):  # neither ValueError nor OSError: the stage retries it
    """The Hub (or mirror) did not answer usefully (5xx, timeout, refused): a retry may succeed."""


def _hub_error(exc: Exception, where: str) -> Exception:
    """A Hub client error as a permanent :class:`ModelSourceError` (4xx) or :class:`HubUnavailable`."""
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    if isinstance(exc, RevisionNotFoundError):
        return ModelSourceError(f"{where}: revision not found")
    if isinstance(exc, RepositoryNotFoundError):
        return ModelSourceError(f"{where}: repository or revision not found, or HF_TOKEN lacks access")
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(status, int) and 400 <= status < 500 and status not in (408, 429):
        return ModelSourceError(f"{where}: the Hub refused the request (HTTP {status})")
    return HubUnavailable(f"{where}: the Hub is unavailable: {type(exc).__name__}: {str(exc)[:300]}")


# Files a transformers model folder never needs: original checkpoints (Llama's ``original/``),
# other frameworks' and runtimes' weights. Downloading them would double an 8B model's bytes.
IGNORED_MODEL_FILES = [
    "original/*",
    "*.pth",
    "*.pt",
    "*.gguf",
    "*.onnx",
    "onnx/*",
    "*.msgpack",
    "*.h5",
    "*.ot",
]


def repo_revision(repo_id: str, revision: str | None, *, repo_type: str = "model") -> tuple[str, list[str]]:
    """(commit sha ``revision`` (default ``main``) points to now, the files of that commit)."""
    from huggingface_hub import HfApi

    wanted = revision or "main"
    where = f"hf://{'datasets/' if repo_type == 'dataset' else ''}{repo_id}@{wanted}"
    try:
        kwargs = _hub_kwargs()
        api = HfApi(endpoint=kwargs["endpoint"], token=kwargs["token"])
        info = api.repo_info(repo_id, revision=wanted, repo_type=repo_type)
    except Exception as exc:  # HfHubHTTPError and the HTTP client's transport errors
        raise _hub_error(exc, where) from exc
    sha = getattr(info, "sha", None)
    if not sha or not _COMMIT_SHA.match(sha):
        raise ModelSourceError(f"{where}: the Hub returned no commit sha")
    return str(sha), [str(f.rfilename) for f in getattr(info, "siblings", None) or []]


def pin_revision(repo_id: str, revision: str | None, *, repo_type: str = "model") -> str:
    """The commit sha ``revision`` (default ``main``) points to now."""
    return repo_revision(repo_id, revision, repo_type=repo_type)[0]


def model_ignore_patterns(files: list[str]) -> list[str]:
    """What not to download of a model repository: :data:`IGNORED_MODEL_FILES`, and the
    PyTorch ``.bin`` weights where safetensors weights exist too."""
    ignored = list(IGNORED_MODEL_FILES)
    if any(f.endswith(".safetensors") for f in files):
        ignored.append("*.bin")
    return ignored


def hf_snapshot(
    repo_id: str, revision: str | None, *, repo_type: str = "model", allow_patterns: list[str] | None = None
) -> tuple[Path, str]:
    """(local folder, pinned commit sha) of a Hub repository, downloaded into the shared cache.

    A commit already completely downloaded (a marker is written after the last file) is used
    without asking the Hub again: restarted stages and offline nodes."""
    from huggingface_hub import snapshot_download

    cache = _hf_cache_dir()

    def marker(sha: str) -> Path:
        key = json.dumps([repo_type, repo_id, sha, allow_patterns])
        return cache / ".temper-complete" / hashlib.sha256(key.encode()).hexdigest()[:24]

    pinned = revision if revision and _COMMIT_SHA.match(revision) else None
    files: list[str] = []
    if pinned and marker(pinned).exists():
        sha, local = pinned, True
    else:
        (sha, files), local = repo_revision(repo_id, revision, repo_type=repo_type), False
    try:
        folder = snapshot_download(
            repo_id,
            revision=sha,
            repo_type=repo_type,
            cache_dir=cache,
            allow_patterns=allow_patterns,
            ignore_patterns=model_ignore_patterns(files) if repo_type == "model" else None,
            local_files_only=local,
            **_hub_kwargs(),
        )
    except Exception as exc:  # HfHubHTTPError and the HTTP client's transport errors
        raise _hub_error(exc, f"hf://{repo_id}@{sha}") from exc
    marker(sha).parent.mkdir(parents=True, exist_ok=True)
    marker(sha).write_text(f"{repo_type} {repo_id} {sha}\n")
    return Path(folder), sha


def safe_cache_path(root: Path, key: str) -> Path:
    """``root/key`` for an object key below a prefix, refusing keys that escape ``root``.

    S3 keys are free-form: ``../../etc/x`` or ``/abs`` under a prefix must never write outside
    the cache folder."""
    pure = PurePosixPath(key)
    if not key or pure.is_absolute() or key.startswith("\\") or ".." in pure.parts or "\\" in key:
        raise ModelSourceError(f"object key {key!r} escapes the model cache folder; refusing to download it")
    target = (root / pure).resolve()
    if not target.is_relative_to(root.resolve()):
        raise ModelSourceError(f"object key {key!r} escapes the model cache folder; refusing to download it")
    return target


def _resolve_s3(uri: str, storage: Storage | None) -> Path:
    if storage is None:
        raise ModelSourceError("an s3:// base model needs storage")
    from filelock import FileLock

    root = model_cache_dir() / "s3" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    done = root / ".complete"
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root) + ".lock"):
        if not done.exists():
            loc = S3Uri.parse(uri)
            keys = storage.list_keys(loc)
            if not keys:
                raise ModelSourceError("no objects under this prefix")
            targets = {key: safe_cache_path(root, key) for key in keys}  # refuse before any write
            if MANIFEST_NAME in keys:  # a temper artifact (e.g. a full fine-tune): verify it
                storage.download_verified(str(loc.join(MANIFEST_NAME)), root)
            else:
                for key, target in targets.items():
                    storage.download_file(loc.join(key), target)
            done.write_text(uri)
    return root


def pvc_mounts() -> dict[str, str]:
    raw = os.environ.get(PVC_MOUNTS_ENV, "")
    if not raw:
        return {}
    try:
        mounts = json.loads(raw)
    except ValueError as exc:
        raise ModelSourceError(f"{PVC_MOUNTS_ENV}: not a JSON object") from exc
    return {str(k): str(v) for k, v in mounts.items()} if isinstance(mounts, dict) else {}


def resolve_pvc(uri: str) -> Path:
    claim, _, sub = uri.removeprefix("pvc://").partition("/")
    mounts = pvc_mounts()
    if claim not in mounts:
        raise ModelSourceError(f"{uri}: claim {claim!r} is not mounted in this pod ({PVC_MOUNTS_ENV})")
    pure = PurePosixPath(sub)
    if pure.is_absolute() or ".." in pure.parts:
        raise ModelSourceError(f"{uri}: the path must stay inside the claim")
    return Path(mounts[claim]) / pure


def resolve_model(uri: str, storage: Storage | None) -> ResolvedModel:
    """The base model as a local folder (downloading remote sources once into the cache)."""
    if uri in BUILTIN_MODELS:
        return ResolvedModel(ensure_tiny_model(), uri)
    if uri.startswith("builtin://"):
        raise ModelSourceError(f"unknown builtin model; known: {sorted(BUILTIN_MODELS)}")
    revision = None
    if uri.startswith("hf://"):
        repo_id, wanted, sub, _ = parse_hf_uri(uri)
        wanted = _INHERITED.get(uri, wanted)
        if sub:
            raise ModelSourceError(f"{uri}: a base model is a whole repository, hf://org/name[@revision]")
        path, revision = hf_snapshot(repo_id, wanted)
    elif uri.startswith("s3://"):
        path = _resolve_s3(uri, storage)
    elif uri.startswith("pvc://"):
        path = resolve_pvc(uri)
    else:
        path = Path(uri.removeprefix("file://"))
    if not (path / "config.json").is_file():
        raise ModelSourceError(f"{uri}: not a model folder (no config.json)")
    resolved = ResolvedModel(path, uri, revision)
    _RESOLVED[uri] = resolved
    return resolved


def resolve_model_dir(uri: str, storage: Storage | None) -> Path:
    """A local folder holding the model; see :func:`resolve_model`."""
    return resolve_model(uri, storage).path


def inherit_parent_revision(contract: StageContract, storage: Storage) -> str | None:
    """Pin an hf:// base model to the commit the stage's parent adapter was trained on.

    A stage continuing from an earlier stage's adapter must load the same base weights: a
    branch that moved between the two stages would otherwise give it other ones. Returns the
    inherited commit, if any."""
    uri = contract.base_model
    if contract.parent is None or not uri.startswith("hf://"):
        return None
    revision = parse_hf_uri(uri)[1]
    if revision and _COMMIT_SHA.match(revision):
        return None  # already a commit
    manifest, _ = storage.read_manifest(contract.parent.manifest_uri)
    sha = manifest.lineage.get("baseModelRevision")
    if manifest.base_model != uri or not isinstance(sha, str) or not _COMMIT_SHA.match(sha):
        return None
    _INHERITED[uri] = sha
    return sha


def manifest_base_uri(manifest: dict[str, Any]) -> str:
    """The base model a published artifact was trained on, pinned to the commit its lineage
    records (an hf:// branch may have moved since)."""
    uri = str(manifest["baseModel"])
    sha = (manifest.get("lineage") or {}).get("baseModelRevision")
    if not uri.startswith("hf://") or not isinstance(sha, str) or not _COMMIT_SHA.match(sha):
        return uri
    repo_id = parse_hf_uri(uri)[0]
    return f"hf://{repo_id}@{sha}"


def base_model_lineage(uri: str) -> dict[str, Any]:
    """What the manifest's lineage records about the base model this process loaded."""
    resolved = _RESOLVED.get(uri)
    if resolved is None or resolved.revision is None:
        return {}
    return {"baseModelRevision": resolved.revision}


def load_model(
    uri: str, storage: Storage | None, *, dtype: Any = None, quantization: Any = None
) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_model_dir(uri, storage)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    kwargs: dict[str, Any] = {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    return model, tokenizer
