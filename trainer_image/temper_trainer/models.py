"""Base-model resolution: ``builtin://tiny``, a local folder, or an ``s3://`` prefix."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from temper.storage import MANIFEST_NAME, S3Uri, Storage

from temper_trainer.tinymodel import ensure_tiny_model, model_cache_dir

BUILTIN_MODELS = {"builtin://tiny"}


def resolve_model_dir(uri: str, storage: Storage | None) -> Path:
    """A local folder holding the model (downloading an s3:// prefix once into the cache)."""
    if uri in BUILTIN_MODELS:
        return ensure_tiny_model()
    if uri.startswith("builtin://"):
        raise ValueError(f"unknown builtin model; known: {sorted(BUILTIN_MODELS)}")
    if uri.startswith("s3://"):
        if storage is None:
            raise ValueError("an s3:// base model needs storage")
        from filelock import FileLock

        root = model_cache_dir() / "s3" / hashlib.sha256(uri.encode()).hexdigest()[:16]
        done = root / ".complete"
        root.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(root) + ".lock"):
            if not done.exists():
                loc = S3Uri.parse(uri)
                keys = storage.list_keys(loc)
                if not keys:
                    raise ValueError("no objects under this prefix")
                if MANIFEST_NAME in keys:  # a temper artifact (e.g. a full fine-tune): verify it
                    storage.download_verified(str(loc.join(MANIFEST_NAME)), root)
                else:
                    for key in keys:
                        storage.download_file(loc.join(key), root / key)
                done.write_text(uri)
        return root
    path = Path(uri.removeprefix("file://"))
    if not (path / "config.json").is_file():
        raise ValueError("not a model folder (no config.json)")
    return path


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
