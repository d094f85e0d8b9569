"""What a stage's manifest records about its inputs: datasets, base model, parent and contract.

Each dataset is ``{name, uri, version, etag, sha256}`` as far as its source can pin it:

- ``builtin://``: version is the trainer version (the generator is deterministic), sha256 that
  of the generated records;
- ``hf://``: version is the commit the dataset was pinned to when the stage read it;
- ``s3://``: the object's ETag and version id, and the store's full-object sha256 when the object
  was uploaded with one (no second download just to hash it);
- a local path: the file's sha256.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

from temper.api.contract import DatasetSpec, StageContract
from temper.storage import Storage, StorageError

import temper_trainer


def stage_datasets(contract: StageContract) -> list[DatasetSpec]:
    """Every dataset the stage reads (training, eval, replay, suites), each once."""
    data = contract.data
    seen: dict[tuple[str, str], DatasetSpec] = {}
    for spec in [*data.train, *data.eval, *data.replay.datasets, *(s.dataset for s in contract.suites)]:
        seen.setdefault((spec.name, spec.uri), spec)
    return list(seen.values())


def _s3_entry(uri: str, storage: Storage | None) -> dict[str, Any]:
    if storage is None:
        return {}
    try:
        head = storage.head(uri, checksum=True) or {}
    except StorageError:
        return {}
    out: dict[str, Any] = {}
    if head.get("ETag"):
        out["etag"] = str(head["ETag"]).strip('"')
    if head.get("VersionId") and head["VersionId"] != "null":
        out["version"] = str(head["VersionId"])
    checksum = str(head.get("ChecksumSHA256") or "")
    if checksum and "-" not in checksum:  # "<parts' checksum>-<N>" is no hash of the content
        out["sha256"] = base64.b64decode(checksum).hex()
    return out


def dataset_entry(spec: DatasetSpec, storage: Storage | None) -> dict[str, Any]:
    from temper_trainer.data import HF_DATA_REVISIONS, builtin_records

    entry: dict[str, Any] = {"name": spec.name, "uri": spec.uri}
    if spec.uri.startswith("builtin://"):
        records = builtin_records(spec.uri, spec.format, spec.task)
        entry["version"] = f"temper-trainer {temper_trainer.__version__}"
        entry["sha256"] = hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()
    elif spec.uri.startswith("hf://"):
        if spec.uri in HF_DATA_REVISIONS:
            entry["version"] = HF_DATA_REVISIONS[spec.uri]
    elif spec.uri.startswith("s3://"):
        entry.update(_s3_entry(spec.uri, storage))
    else:
        path = Path(spec.uri.removeprefix("file://"))
        if path.is_file():
            entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return entry


def stage_lineage(contract: StageContract, storage: Storage | None) -> dict[str, Any]:
    """The manifest's lineage fields about the stage's inputs."""
    from temper_trainer.models import base_model_lineage

    parent = contract.parent
    out: dict[str, Any] = {
        "baseModel": contract.base_model,
        **base_model_lineage(contract.base_model),
        "parent": {"name": parent.name, "manifestUri": parent.manifest_uri} if parent else None,
        "datasets": [dataset_entry(d, storage) for d in stage_datasets(contract)],
        "contractHash": contract.contract_hash(),
    }
    return out
