"""temper's parts of a TRL/transformers training run, as ``TrainerCallback``s.

- :class:`TemperCallback`: the progress contract and Prometheus gauges after every optimizer
  step (``ctx.report``); checkpoints to storage every ``checkpoint.everySteps`` steps or
  ``everySeconds`` seconds (``control.should_save``; the Trainer writes its normal
  ``checkpoint-<n>`` folder and :meth:`on_save` mirrors it through ``ctx.checkpointer``); on
  SIGTERM one last checkpoint and ``should_training_stop``, after which :func:`train` raises
  :class:`~temper_trainer.stage.Preempted` (exit 143).
- :class:`AdaLoraCallback`: AdaLoRA's rank reallocation, which needs the gradients of the step.

Every decision that changes what the Trainer does (save, stop) is agreed across ranks, and only
the world's main process writes to storage (:func:`is_main_process`), so DDP/FSDP runs save one
checkpoint from the same step on every rank.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

if TYPE_CHECKING:
    from temper_trainer.stage import StageContext

log = logging.getLogger(__name__)

STAGE_STATE = "temper_state.json"  # a stage's own values (e.g. metrics measured before training)
LOSS_WINDOW = 10  # logged losses averaged into train/loss


def is_main_process(state: TrainerState | None = None) -> bool:
    """The one process that writes checkpoints, progress and the published artifact."""
    if state is not None:
        return bool(state.is_world_process_zero)
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def agree(*flags: bool) -> list[bool]:
    """Each flag OR-ed over all ranks (one tiny all-reduce; the flags as given when not distributed)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(flags)
    device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    tensor = torch.tensor([1 if f else 0 for f in flags], dtype=torch.int32, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return [bool(v) for v in tensor.tolist()]


class TemperCallback(TrainerCallback):
    """Progress, metrics, periodic and SIGTERM checkpoints for one stage attempt."""

    def __init__(
        self,
        ctx: StageContext,
        stage_state: Callable[[], dict[str, Any]] | None = None,
        gauges: dict[str, str] | None = None,
    ) -> None:
        self.ctx = ctx
        self.stage_state = stage_state
        self.gauges = gauges or {"reward": "reward", "kl": "kl"}  # gauge -> the TRL log key it shows
        self.preempted_at: int | None = None
        self.last_logs: dict[str, float] = {}
        self._tokens_seen = 0

    # -- progress ---------------------------------------------------------------------------
    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._tokens_seen = int(state.num_input_tokens_seen or 0)
        self.ctx.set_phase("training")

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        for key, value in (logs or {}).items():
            if isinstance(value, int | float) and math.isfinite(value):
                self.last_logs[key] = float(value)

    def _report(self, state: TrainerState) -> None:
        seen = int(state.num_input_tokens_seen or 0)
        tokens, self._tokens_seen = seen - self._tokens_seen, seen
        extra = {gauge: self.last_logs[key] for gauge, key in self.gauges.items() if key in self.last_logs}
        self.ctx.report(
            step=state.global_step,
            total=state.max_steps,
            loss=self.last_logs.get("loss"),
            tokens=tokens or None,
            force=state.global_step >= state.max_steps,
            **extra,
        )

    # -- checkpoints ------------------------------------------------------------------------
    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        step = state.global_step
        if is_main_process(state):
            self._report(state)
        due = step < state.max_steps and self.ctx.checkpointer.should_checkpoint(step)
        stop, due = agree(self.ctx.stop_requested, due)
        if stop:
            self.preempted_at = step
            control.should_save = True
            control.should_training_stop = True
        elif due:
            control.should_save = True

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        folder = Path(str(args.output_dir)) / f"checkpoint-{state.global_step}"
        if not is_main_process(state):
            return
        if self.stage_state is not None:
            (folder / STAGE_STATE).write_text(json.dumps(self.stage_state()))
        self.ctx.checkpointer.save_folder(state.global_step, folder)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        for stale in Path(str(args.output_dir)).glob("checkpoint-*"):  # mirrored already; free the disk
            shutil.rmtree(stale, ignore_errors=True)


class AdaLoraCallback(TrainerCallback):
    """AdaLoRA reallocates ranks from the step's gradients: after ``optimizer.step``, before zero_grad."""

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        model = kwargs.get("model")
        if model is not None:
            model.base_model.update_and_allocate(state.global_step)


def train_loss(state: TrainerState) -> float:
    """Mean of the last logged training losses (the Trainer's own, restored on resume)."""
    losses = [float(e["loss"]) for e in state.log_history if "loss" in e]
    tail = losses[-LOSS_WINDOW:]
    return sum(tail) / len(tail) if tail else float("nan")
