"""The stage contract mapped onto TRL's trainer configs, and one way to run a TRL trainer.

Every TRL stage (sft, dpo, grpo, reward-model) builds its config from :func:`trainer_args` and
trains with :func:`fit`, which adds temper's callbacks (``temper_trainer.callbacks``) and resumes
from the newest complete checkpoint in storage: a normal ``checkpoint-<n>`` folder that
``trainer.train(resume_from_checkpoint=)`` reads, so optimizer, scheduler, RNG and data position
are TRL's/transformers' own.

Defaults keep tiny CPU runs fast: no eval loop, no Trainer-side saving (checkpoints happen only when
temper's policy asks), no reporting integrations, no progress bars, logging every ~1% of the steps.
"""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from temper.api.contract import Hyperparameters

from temper_trainer import distributed
from temper_trainer.callbacks import STAGE_STATE, AdaLoraCallback, TemperCallback, train_loss
from temper_trainer.peft_setup import is_adalora
from temper_trainer.stage import Preempted, StageContext, Unsupported

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch

LOG_POINTS = 100  # logged losses per run: enough for train/loss and the progress contract


@dataclass
class Resume:
    """The newest complete checkpoint, downloaded, or nothing to resume from."""

    folder: Path | None = None
    step: int | None = None
    stage_state: dict[str, Any] = field(default_factory=dict)


def find_resume(ctx: StageContext) -> Resume:
    checkpoint = ctx.checkpointer.latest()
    step = checkpoint.step if checkpoint is not None else None
    if distributed.broadcast_object(step) != step:  # every rank must resume from rank 0's choice
        raise RuntimeError(f"rank {distributed.rank()} found checkpoint step {step}, rank 0 another")
    if checkpoint is None:
        return Resume()
    marker = checkpoint.dir / STAGE_STATE
    state = json.loads(marker.read_text()) if marker.exists() else {}
    return Resume(checkpoint.dir, checkpoint.step, state)


def total_steps(hp: Hyperparameters, n_items: int, items_per_step: int) -> int:
    """Optimizer steps; ``items_per_step`` is per process: every DDP/FSDP rank takes its own share."""
    if hp.max_steps is not None:
        return hp.max_steps
    return max(1, math.ceil(hp.epochs * n_items / max(1, items_per_step * distributed.world_size())))


def precision_flags(hp: Hyperparameters, device: torch.device) -> dict[str, bool]:
    """``precision`` as TrainingArguments' bf16/fp16 (auto: bf16 where the GPU has it, else fp32)."""
    import torch

    precision = hp.precision
    cuda = device.type == "cuda" and torch.cuda.is_available()
    if precision == "auto":
        precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and not cuda:
        raise Unsupported(
            "hyperparameters.precision: fp16 mixed precision needs a CUDA GPU; use bf16 or fp32"
        )
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def check_liger(hp: Hyperparameters, device: torch.device) -> None:
    if not hp.liger:
        return
    if device.type != "cuda":
        raise Unsupported("hyperparameters.liger: Liger kernels need a CUDA GPU and none is available")
    if importlib.util.find_spec("liger_kernel") is None:
        raise Unsupported("hyperparameters.liger: the liger-kernel package is not installed in this image")


def trainer_args(
    ctx: StageContext, steps: int, *, per_device_batch: int | None = None, scheduler: str = "linear"
) -> dict[str, Any]:
    """The TrainingArguments fields every TRL config shares, from the contract.

    ``scheduler``: linear decay after warmup (sft), or constant after warmup (the preference and
    RL stages, whose noisy updates need the rate to stay up).
    """
    from datasets.utils.logging import disable_progress_bar

    hp = ctx.contract.hyperparameters
    check_liger(hp, ctx.device)
    disable_progress_bar()  # the progress contract reports; per-map bars only clutter the pod log
    return {
        "output_dir": str(ctx.workdir / "trainer"),
        "max_steps": steps,
        "per_device_train_batch_size": per_device_batch or hp.batch_size,
        "gradient_accumulation_steps": hp.gradient_accumulation_steps,
        "learning_rate": hp.learning_rate,
        "lr_scheduler_type": scheduler,
        "warmup_steps": int(hp.warmup_ratio * steps),
        "weight_decay": 0.0,
        "max_grad_norm": hp.max_grad_norm,
        "seed": ctx.seed,
        "data_seed": ctx.seed,
        "logging_steps": max(1, math.ceil(steps / LOG_POINTS)),
        "save_strategy": "no",  # temper's CheckpointPolicy decides, through the callback
        "eval_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "use_cpu": ctx.device.type == "cpu",
        "dataloader_num_workers": 0,
        "include_num_input_tokens_seen": "all",
        "gradient_checkpointing": hp.gradient_checkpointing,
        "use_liger_kernel": hp.liger,
        **precision_flags(hp, ctx.device),
        # DDP/FSDP over torchrun's workers (last: FSDP replaces gradient_checkpointing with its own)
        **distributed.trainer_kwargs(ctx.contract, gradient_checkpointing=hp.gradient_checkpointing),
    }


def ordered(trainer_cls: type, sequential: bool) -> type:
    """``trainer_cls``, presenting examples in dataset order when a curriculum is set."""
    if not sequential:
        return trainer_cls

    from torch.utils.data import SequentialSampler

    class Ordered(trainer_cls):  # type: ignore[misc]
        def _get_train_sampler(self, train_dataset: Any = None) -> Any:
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    Ordered.__name__ = Ordered.__qualname__ = f"Ordered{trainer_cls.__name__}"
    return Ordered


def quiet(trainer: Any) -> None:
    """Drop the Trainer's stdout log printer and progress bars: the progress contract replaces them."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)


def fit(
    ctx: StageContext,
    trainer: Any,
    resume: Resume,
    *,
    stage_state: Callable[[], dict[str, Any]] | None = None,
    gauges: dict[str, str] | None = None,
) -> TemperCallback:
    """Train with temper's callbacks, from ``resume``; raise Preempted after a SIGTERM checkpoint.

    Returns the callback: ``last_logs`` holds the newest value of every metric TRL logged.
    """
    callback = TemperCallback(ctx, stage_state, gauges)
    quiet(trainer)
    trainer.add_callback(callback)
    if is_adalora(trainer.model):
        trainer.add_callback(AdaLoraCallback())
    trainer.train(resume_from_checkpoint=str(resume.folder) if resume.folder else None)
    distributed.check_replicas(trainer.model)
    if callback.preempted_at is not None:
        raise Preempted(
            f"SIGTERM at step {callback.preempted_at}/{trainer.state.max_steps}; checkpoint saved"
        )
    return callback


def train_metrics(state: Any) -> dict[str, float]:
    return {"train/loss": train_loss(state), "train/steps": float(state.max_steps)}


def drop_reference_adapter(model: Any) -> Any:
    """Remove the frozen ``ref`` adapter TRL adds for the reference policy: not part of the artifact."""
    if "ref" in getattr(model, "peft_config", {}):
        model.set_adapter("default")
        model.delete_adapter("ref")
    return model


DRIFT_PROBES = 32  # eval records drift is measured on: enough for a stable mean, cheap at stage end


def stage_drift(
    ctx: StageContext, model: Any, tokenizer: Any, records: list[dict[str, Any]]
) -> dict[str, float]:
    """``drift/kl_to_base`` and (with a parent) ``drift/kl_to_parent``: mean per-token KL of the
    trained policy to each, teacher-forced on the stage's eval records (else its first training
    records), so value drift is tracked stage by stage and cycle by cycle."""
    from temper_trainer.evaluation import kl_to_reference

    probes = records[:DRIFT_PROBES]
    if not probes:
        return {}
    base = None
    if not hasattr(model, "disable_adapter"):  # a full fine-tune: the base is a fresh load
        base, _ = ctx.load_base_model()
    out = {"drift/kl_to_base": kl_to_reference(model, tokenizer, probes, reference=base)}
    if ctx.contract.parent is not None:
        parent, _ = ctx.load_base_model()
        parent = ctx.load_parent(parent, trainable=False).eval()
        out["drift/kl_to_parent"] = kl_to_reference(model, tokenizer, probes, reference=parent)
        del parent
    return out
