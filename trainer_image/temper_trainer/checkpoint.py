"""Resumable checkpoints in storage, shared by all attempts of a stage.

Layout: ``<output prefix>/checkpoints/step-<n>/<files>``, then ``COMPLETE`` written LAST, listing
every file's sha256. The files are a Hugging Face Trainer ``checkpoint-<n>`` folder
(:meth:`Checkpointer.save_folder`: what the TRL stages write and
``trainer.train(resume_from_checkpoint=)`` reads) or ``state.pt`` plus extra files
(:meth:`Checkpointer.save`: the hand-written stages). A checkpoint without its marker (a pod
killed mid-upload) is ignored, so resume always starts from the newest *complete* one. Older ones
beyond ``keep`` are pruned marker-first, so a half-deleted checkpoint never looks complete.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from temper.api.contract import StageContract
from temper.storage import S3Uri, Storage, StorageError, sha256_file

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
STATE_FILE = "state.pt"
_STEP_DIR = re.compile(r"^step-(\d+)/")


@dataclass
class Checkpoint:
    step: int
    dir: Path  # local copy of every file
    state: dict[str, Any]


class Checkpointer:
    def __init__(self, contract: StageContract, storage: Storage, local_root: Path) -> None:
        self.policy = contract.checkpoint
        self.root = S3Uri.parse(contract.output.prefix).join("checkpoints")
        self.storage = storage
        self.local_root = local_root
        self._last_save = time.monotonic()
        self.saved_steps: list[int] = []

    def should_checkpoint(self, step: int) -> bool:
        if step <= 0:
            return False
        every_steps, every_seconds = self.policy.every_steps, self.policy.every_seconds
        if every_steps is not None and step % every_steps == 0:
            return True
        return every_seconds is not None and time.monotonic() - self._last_save >= every_seconds

    def save(self, step: int, state: dict[str, Any], files: dict[str, Path] | None = None) -> None:
        """Upload ``state`` (torch-saveable: tensors, numbers, lists, dicts) plus extra files."""
        import torch

        local = self.local_root / f"step-{step}"
        local.mkdir(parents=True, exist_ok=True)
        torch.save(state, local / STATE_FILE)
        for name, path in (files or {}).items():
            if path.resolve() != (local / name).resolve():
                shutil.copyfile(path, local / name)
        self.save_folder(step, local)

    def save_folder(self, step: int, local: Path) -> None:
        """Upload every file under ``local`` (e.g. a Trainer ``checkpoint-<n>`` folder), then delete it."""
        uri = self.root.join(f"step-{step}")
        digests = {}
        for path in sorted(p for p in local.rglob("*") if p.is_file()):
            name = path.relative_to(local).as_posix()
            digests[name] = sha256_file(path)
            self.storage.upload_file(path, uri.join(name))
        marker = json.dumps({"step": step, "files": digests}).encode()
        self.storage.put_bytes(uri.join(MARKER), marker)
        self._last_save = time.monotonic()
        self.saved_steps.append(step)
        # Also the record the chaos campaign reads to measure work redone after a preemption.
        log.info("checkpoint saved at step %d", step)
        shutil.rmtree(local, ignore_errors=True)
        self._prune()

    def complete_steps(self) -> list[int]:
        steps = set()
        for key in self.storage.list_keys(self.root):
            match = _STEP_DIR.match(key)
            if match and key == f"step-{match.group(1)}/{MARKER}":
                steps.add(int(match.group(1)))
        return sorted(steps)

    def latest(self) -> Checkpoint | None:
        """Download the newest complete checkpoint whose files verify; None when there is none."""
        import torch

        for step in reversed(self.complete_steps()):
            uri = self.root.join(f"step-{step}")
            local = self.local_root / f"resume-{step}"
            try:
                marker = json.loads(self.storage.get_bytes(uri.join(MARKER)))
                for name, digest in marker["files"].items():
                    self.storage.download_file(uri.join(name), local / name)
                    if sha256_file(local / name) != digest:
                        raise StorageError(f"{uri.join(name)}: sha256 mismatch")
            except (StorageError, KeyError, ValueError) as exc:
                log.warning("skipping checkpoint step %d: %s", step, exc)
                continue
            state = {}
            if (local / STATE_FILE).exists():
                state = torch.load(local / STATE_FILE, map_location="cpu", weights_only=True)
            log.info("resuming from checkpoint step %d", step)
            return Checkpoint(step, local, state)
        return None

    def _prune(self) -> None:
        steps = self.complete_steps()
        for step in steps[: max(0, len(steps) - self.policy.keep)]:
            uri = self.root.join(f"step-{step}")
            try:
                self.storage.client.delete_object(Bucket=uri.bucket, Key=uri.join(MARKER).key)
                self.storage.delete_prefix(uri)
            except Exception as exc:  # pruning is best effort; the marker is already gone or kept
                log.warning("could not prune checkpoint step %d: %s", step, type(exc).__name__)
