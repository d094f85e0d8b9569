"""The stage interface: what every stage module gets and must return.

A stage is a module ``temper_trainer.stages.<name>`` with one function registered for its type::

    from temper_trainer.stage import StageContext, StageOutcome
    from temper_trainer.stages import register_stage

    @register_stage("sft")
    def run(ctx: StageContext) -> StageOutcome: ...

The runner (``python -m temper_trainer run``) builds the :class:`StageContext`, calls the stage,
publishes ``outcome.artifact_dir`` atomically (``temper.storage.Storage.publish_atomic``), writes the
:class:`~temper.api.contract.StageResult` termination message and a final progress.json.

What a stage gets from :class:`StageContext`:

- ``contract`` (validated ``StageContract``), ``workdir`` (scratch), ``device`` (torch.device),
  ``storage`` (``temper.storage.Storage``: client + config), ``artifact_dir`` (put outputs here),
  ``seed`` (every RNG is already seeded from it).
- ``load_base_model()`` → ``(model, tokenizer)``: ``builtin://tiny`` (built deterministically and
  cached), a local directory, or an ``s3://`` prefix (downloaded once into the model cache).
- ``load_parent(model)`` → the model with ``contract.parent``'s adapter applied (downloaded and
  verified through its manifest); trainable when ``trainable=True``.
- ``fetch_adapter(ref)`` → local folder of any verified ``AdapterRef`` (merge sources, reward models).
- ``apply_peft(model, total_steps=)`` → model wrapped per ``contract.peft`` (``load_base_model``
  already raised :class:`Unsupported` for QLoRA without CUDA and loads QLoRA bases quantized).
- ``load_dataset("train"|"eval")`` → list of record dicts after replay mixing and curriculum
  ordering (records are described in ``temper_trainer.data``).
- ``report(step=, total=, loss=, tokens=, **metrics)`` → progress.json (rate limited to
  ``progressIntervalSeconds``) + the Prometheus gauges; ``set_phase(phase)``.
- ``checkpointer``: ``should_checkpoint(step)``, ``save(step, state, files=None)``, ``latest()``
  (newest complete checkpoint, or None) for resume.
- ``stop_requested``: True after SIGTERM. The loop then saves a checkpoint and raises
  :class:`Preempted`; the runner exits with ``EXIT_PREEMPTED`` (143).
- ``save_model(model, tokenizer=None)``: writes the PEFT layout (or a full model) to artifact_dir.

Errors: raise :class:`InvalidInput` (exit 11) for unusable data/models, :class:`Unsupported`
(exit 12) for impossible requests; anything else exits 1 (retryable).

What a stage returns: :class:`StageOutcome` (artifact folder, metrics, method, servable flags,
extra lineage). The manifest gets base model, method, stage type, metrics, lineage, servable.
"""

from __future__ import annotations

import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Literal

from temper.api.contract import (
    EXIT_INVALID_INPUT,
    EXIT_PREEMPTED,
    EXIT_UNSUPPORTED,
    AdapterRef,
    StageContract,
    SuiteResult,
)
from temper.storage import Storage

if TYPE_CHECKING:
    import torch

    from temper_trainer.checkpoint import Checkpointer
    from temper_trainer.metrics import TrainerMetrics
    from temper_trainer.progress import ProgressReporter


class StageError(Exception):
    exit_code = 1


class InvalidInput(StageError):
    """Data, base model or parent unusable: retrying cannot help."""

    exit_code = EXIT_INVALID_INPUT


class Unsupported(StageError):
    """The request cannot run here (e.g. QLoRA without CUDA)."""

    exit_code = EXIT_UNSUPPORTED


class Preempted(StageError):
    """SIGTERM handled and a checkpoint written: the next attempt resumes."""

    exit_code = EXIT_PREEMPTED


@dataclass
class StageOutcome:
    artifact_dir: Path
    metrics: dict[str, float]
    method: str  # a PeftMethod; "full" for full fine-tunes and non-adapter outputs
    servable: dict[str, bool] = field(default_factory=dict)  # e.g. {"vllm": True, "peft": True}
    lineage: dict[str, Any] = field(default_factory=dict)  # merged into the manifest's lineage
    evals: list[SuiteResult] = field(default_factory=list)  # eval stages: suites with their baselines


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


class StageContext:
    def __init__(
        self,
        contract: StageContract,
        workdir: Path,
        storage: Storage,
        *,
        device: str | None = None,
        progress: ProgressReporter | None = None,
        metrics: TrainerMetrics | None = None,
    ) -> None:
        import torch

        from temper_trainer.checkpoint import Checkpointer
        from temper_trainer.progress import ProgressReporter

        self.contract = contract
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.storage = storage
        self.device: torch.device = torch.device(
            device or os.environ.get("TEMPER_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
        )
        self.seed = contract.seed
        self.artifact_dir = workdir / "artifact"
        self.artifact_dir.mkdir(parents=True, exist_ok=True)
        self.progress = progress or ProgressReporter(contract, storage)
        self.metrics = metrics
        self.checkpointer: Checkpointer = Checkpointer(contract, storage, workdir / "checkpoints")
        self._stop = False
        self._tokenizer: Any = None
        seed_everything(self.seed)

    # -- signals ----------------------------------------------------------------------------
    @property
    def stop_requested(self) -> bool:
        return self._stop

    def request_stop(self, signum: int | None = None, frame: FrameType | None = None) -> None:
        self._stop = True

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)

    # -- models -----------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        """The base model's tokenizer (after ``load_base_model``)."""
        return self._tokenizer

    def load_base_model(self, *, dtype: Any = None) -> tuple[Any, Any]:
        from temper_trainer.distributed import note_model, placement, quant_storage_dtype
        from temper_trainer.models import load_model
        from temper_trainer.peft_setup import check_supported, quantization_config

        check_supported(self.contract.peft, self.device.type)  # QLoRA on CPU fails before any work
        try:
            model, tokenizer = load_model(
                self.contract.base_model,
                self.storage,
                dtype=dtype,
                quantization=quantization_config(
                    self.contract.peft, quant_storage=quant_storage_dtype(self.contract)
                ),
            )
        except (OSError, ValueError) as exc:
            raise InvalidInput(f"baseModel {self.contract.base_model!r}: {exc}") from exc
        self._tokenizer = tokenizer
        self.set_attention(model)
        note_model(model, self.contract)
        if self.contract.peft.method != "qlora":  # bitsandbytes places quantized weights itself
            model = model.to(placement(self.contract, self.device))
        return model, tokenizer

    def set_attention(self, model: Any) -> None:
        """Apply ``hyperparameters.attnImplementation`` (the model's default when unset)."""
        import importlib.util

        impl = self.contract.hyperparameters.attn_implementation
        if impl is None:
            return
        if impl == "flash_attention_2" and (
            self.device.type != "cuda" or importlib.util.find_spec("flash_attn") is None
        ):
            raise Unsupported(
                "hyperparameters.attnImplementation: flash_attention_2 needs a CUDA GPU and the flash-attn "
                "package; use sdpa"
            )
        model.set_attn_implementation(impl)

    def fetch_adapter(self, ref: AdapterRef) -> Path:
        """Download and verify a published adapter; returns its local folder."""
        from temper.storage import StorageError

        name = ref.name or ref.manifest_uri.rstrip("/").split("/")[-2]
        dest = self.workdir / "adapters" / f"{name}-{abs(hash(ref.manifest_uri)) % 10**8}"
        if not (dest / "manifest.json").exists():
            try:
                self.storage.download_verified(ref.manifest_uri, dest)
            except StorageError as exc:
                raise InvalidInput(f"adapter {ref.manifest_uri}: {exc}") from exc
        return dest

    def load_parent(self, model: Any, *, trainable: bool = True, ref: AdapterRef | None = None) -> Any:
        """Apply ``ref``'s adapter (default ``contract.parent``); ``model`` unchanged when there is none."""
        from temper_trainer.peft_setup import load_adapter

        ref = ref or self.contract.parent
        if ref is None:
            return model
        from temper_trainer.distributed import placement

        return load_adapter(model, self.fetch_adapter(ref), trainable=trainable).to(
            placement(self.contract, self.device)
        )

    def apply_peft(self, model: Any, *, total_steps: int | None = None) -> Any:
        """Wrap per ``contract.peft``; AdaLoRA's rank schedule needs ``total_steps``."""
        from temper_trainer.distributed import placement
        from temper_trainer.peft_setup import apply_peft

        return apply_peft(
            model, self.contract.peft, device=self.device, tokenizer=self._tokenizer, total_steps=total_steps
        ).to(placement(self.contract, self.device))

    def save_model(self, model: Any, tokenizer: Any = None) -> Path:
        from temper_trainer.peft_setup import save_artifact

        save_artifact(model, self.artifact_dir, tokenizer=tokenizer)
        return self.artifact_dir

    # -- data -------------------------------------------------------------------------------
    def load_dataset(self, split: Literal["train", "eval"]) -> list[dict[str, Any]]:
        from temper_trainer.data import DataError, load_stage_data

        try:
            return load_stage_data(self.contract.data, split, self.storage, seed=self.seed)
        except DataError as exc:
            raise InvalidInput(str(exc)) from exc

    # -- progress ---------------------------------------------------------------------------
    def set_phase(self, phase: Literal["starting", "training", "evaluating", "publishing", "done"]) -> None:
        self.progress.set_phase(phase)

    def report(
        self,
        *,
        step: int,
        total: int,
        loss: float | None = None,
        tokens: int | None = None,
        force: bool = False,
        **metrics: float,
    ) -> None:
        """Record progress; ``tokens`` is the count processed since the previous report."""
        self.progress.update(step=step, total=total, loss=loss, tokens=tokens, force=force)
        if self.metrics is not None:
            self.metrics.update(
                step=step,
                total=total,
                loss=loss,
                tokens_per_second=self.progress.tokens_per_second,
                **metrics,
            )

    def elapsed(self) -> float:
        return time.monotonic() - self.progress.started
