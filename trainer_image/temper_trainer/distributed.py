"""How the processes of one stage attempt share the work: topology, strategy, rank rules.

``temper_trainer.launch`` starts one worker per GPU (one on CPU) on every node under torchrun;
each worker runs the stage, and HF/TRL's ``Trainer`` does DDP or FSDP itself from torchrun's
environment. A stage building its TRL config merges :func:`trainer_kwargs` into it.

Rules every stage keeps, with the helpers below:

- only :func:`is_main_process` (global rank 0) publishes, writes progress and uploads
  checkpoints; the runner (``__main__``) already does the publishing and progress parts;
- a stop (SIGTERM reaches the pods one by one) is agreed with :func:`any_rank`, so every rank
  stops after the same step and rank 0 checkpoints that step;
- every rank resumes from the checkpoint rank 0 chose (:func:`broadcast_object`).

Strategies (``resources.strategy``): ``single`` when one process runs; ``ddp`` replicates the
model; ``fsdp`` (FSDP2 through accelerate) shards parameters, gradients and optimizer state and
needs GPUs (accelerate shards on accelerators only; on CPU it would silently replicate, so an
explicit ``fsdp`` without a GPU is :class:`Unsupported`). ``auto``: ``fsdp`` for ``full`` and
for a model whose weights do not fit one device, else ``ddp``.

FSDP with LoRA: FSDP2 handles frozen and trainable parameters in one unit, so no
``use_orig_params``; the decoder layer class (``_no_split_modules``) is the wrap unit.
FSDP with QLoRA (CUDA only): the 4-bit weights are stored in the compute dtype
(``bnb_4bit_quant_storage=torch.bfloat16``, :func:`quant_storage_dtype`) so FSDP can flatten
them with the bf16 LoRA weights, and ``cpu_ram_efficient_loading`` loads the base on rank 0
only. Checkpoints use ``FULL_STATE_DICT`` so rank 0's folder alone is a complete checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from temper.api.contract import StageContract, Topology

if TYPE_CHECKING:
    import torch

Resolved = Literal["single", "ddp", "fsdp"]
ADAPTER_FIT_FRACTION = 0.6  # weights above this share of one device's memory leave too little for training
DDP_TIMEOUT_SECONDS = 600  # a lost peer fails the attempt in minutes, not torch's default 30
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


# -- ranks (torchrun's environment; one process without it) -----------------------------------


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def rank() -> int:
    return _env_int("RANK", 0)


def local_rank() -> int:
    return _env_int("LOCAL_RANK", 0)


def world_size() -> int:
    return _env_int("WORLD_SIZE", 1) if "TORCHELASTIC_RUN_ID" in os.environ else 1


def local_world_size() -> int:
    return _env_int("LOCAL_WORLD_SIZE", 1) if "TORCHELASTIC_RUN_ID" in os.environ else 1


def is_worker() -> bool:
    """True inside a worker that ``temper_trainer.launch`` (or any torchrun) started."""
    return "TORCHELASTIC_RUN_ID" in os.environ and "LOCAL_RANK" in os.environ


def is_main_process() -> bool:
    """Global rank 0: the one rank that publishes, reports progress and uploads checkpoints."""
    return rank() == 0


def device() -> str:
    """This rank's device: its own GPU under torchrun, else the CPU."""
    import torch

    if os.environ.get("TEMPER_DEVICE"):
        return os.environ["TEMPER_DEVICE"]
    return f"cuda:{local_rank()}" if torch.cuda.is_available() else "cpu"


def _group_ready() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _collective_device() -> torch.device:
    import torch
    import torch.distributed as dist

    return torch.device(device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on any rank (a collective: all ranks must call it)."""
    if not _group_ready():
        return flag
    import torch
    import torch.distributed as dist

    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (picklable; a collective)."""
    if not _group_ready():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_collective_device())
    return box[0]


def barrier() -> None:
    if _group_ready():
        import torch.distributed as dist

        dist.barrier()


# -- replica consistency ----------------------------------------------------------------------------

_RUN_METRICS: dict[str, float] = {}


def run_metrics() -> dict[str, float]:
    """Metrics the distribution layer measured in this process (merged into the manifest)."""
    return dict(_RUN_METRICS)


def check_replicas(model: Any) -> bool | None:
    """After DDP training: do all ranks hold bit-identical trainable weights? (None: not DDP.)

    Each rank hashes its trainable parameters in name order and the digests are compared; a
    mismatch means replicas silently diverged, so the published rank-0 weights are suspect.
    """
    if not _group_ready():
        return None
    import hashlib

    import torch
    import torch.distributed as dist

    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        if not param.requires_grad:
            continue
        if type(param.data).__name__ == "DTensor":  # FSDP shards differ by design
            return None
        digest.update(name.encode())
        digest.update(param.detach().cpu().contiguous().view(-1).view(dtype=torch.uint8).numpy().tobytes())
    digests: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest.hexdigest())
    identical = len(set(digests)) == 1
    _RUN_METRICS["dist/world_size"] = float(dist.get_world_size())
    _RUN_METRICS["dist/replicas_identical"] = 1.0 if identical else 0.0
    if not identical:
        import logging

        logging.getLogger(__name__).error("DDP replicas diverged: trainable weight digests %s", digests)
    return identical


# -- strategy ----------------------------------------------------------------------------------


def weights_bytes(model_dir: Path | str | None) -> int | None:
    """Bytes of the weight files in a model folder (None when unknown)."""
    if model_dir is None or not Path(model_dir).is_dir():
        return None
    return sum(p.stat().st_size for p in Path(model_dir).rglob("*") if p.suffix in WEIGHT_SUFFIXES) or None


def device_memory_bytes() -> int | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return int(torch.cuda.get_device_properties(local_rank()).total_memory)


def resolve_strategy(
    contract: StageContract,
    *,
    processes: int,
    on_gpu: bool,
    model_bytes: int | None = None,
    device_bytes: int | None = None,
) -> Resolved:
    """The strategy ``resources.strategy`` means for ``processes`` workers; raises Unsupported."""
    from temper_trainer.stage import Unsupported

    wanted = contract.resources.strategy
    if wanted == "fsdp" and not on_gpu:
        raise Unsupported(
            "resources.strategy: fsdp needs GPUs (accelerate shards only on accelerators); "
            "use ddp or auto on CPU"
        )
    if processes <= 1:
        return "single"
    if wanted != "auto":
        return wanted
    if not on_gpu:
        return "ddp"
    if contract.peft.method == "full":
        return "fsdp"
    if model_bytes and device_bytes:
        bits = (contract.peft.bits or 4) if contract.peft.method == "qlora" else 16
        stored = model_bytes * bits / 16
        if stored > ADAPTER_FIT_FRACTION * device_bytes:
            return "fsdp"
    return "ddp"


_MODEL_BYTES: list[int] = []  # the loaded base model's size in bf16-equivalent bytes


def note_model(model: Any, contract: StageContract) -> None:
    """Remember the loaded base model's size, for ``auto``'s does-it-fit-one-device rule."""
    stored = sum(p.numel() * p.element_size() for p in model.parameters())
    if contract.peft.method == "qlora":  # already quantized: back to 16-bit-equivalent bytes
        stored = stored * 16 // (contract.peft.bits or 4)
    _MODEL_BYTES[:] = [stored]


def stage_strategy(contract: StageContract, model_dir: Path | str | None = None) -> Resolved:
    """This worker's strategy, from torchrun's environment and the base model's size."""
    import torch

    return resolve_strategy(
        contract,
        processes=world_size(),
        on_gpu=torch.cuda.is_available(),
        model_bytes=weights_bytes(model_dir) or (_MODEL_BYTES[0] if _MODEL_BYTES else None),
        device_bytes=device_memory_bytes(),
    )


def placement(contract: StageContract, device: Any) -> Any:
    """Where the stage puts the model before training: the CPU under FSDP (accelerate shards it
    onto the GPUs, so a model larger than one GPU never lands whole on one), else ``device``."""
    if contract.peft.method == "qlora":  # bitsandbytes placed the quantized weights on the GPU
        return device
    return "cpu" if stage_strategy(contract) == "fsdp" else device


def fsdp_config(model: Any = None, *, gradient_checkpointing: bool = False) -> dict[str, Any]:
    """``TrainingArguments.fsdp_config`` for FSDP2 over the model's decoder layers."""
    config: dict[str, Any] = {
        "version": 2,
        "reshard_after_forward": True,
        "state_dict_type": "FULL_STATE_DICT",  # rank 0's checkpoint folder is complete on its own
        "cpu_ram_efficient_loading": True,
        # FSDP's own activation checkpointing; TrainingArguments' would add an all-gather per layer
        "activation_checkpointing": gradient_checkpointing,
    }
    # Without a model accelerate wraps the classes in the model's own _no_split_modules.
    config["auto_wrap_policy"] = "TRANSFORMER_BASED_WRAP"
    layers = sorted(set(getattr(_unwrap(model), "_no_split_modules", None) or []))
    if layers:
        config["transformer_layer_cls_to_wrap"] = layers
    return config


def _unwrap(model: Any) -> Any:
    """The transformers model under a PEFT wrapper (its base_model.model)."""
    inner = getattr(getattr(model, "base_model", None), "model", None)
    return inner if inner is not None and hasattr(inner, "_no_split_modules") else model


def trainer_kwargs(
    contract: StageContract,
    *,
    model: Any = None,
    model_dir: Path | str | None = None,
    gradient_checkpointing: bool = False,
) -> dict[str, Any]:
    """TrainingArguments fields for this worker's strategy: merge them into the stage's TRL config.

    With ``fsdp`` the stage must also drop TrainingArguments' own ``gradient_checkpointing``
    (FSDP checkpoints activations itself, see :func:`fsdp_config`) and leave the model on the CPU
    for accelerate to shard.
    """
    import torch

    strategy = stage_strategy(contract, model_dir)
    if strategy == "single":
        return {}
    kwargs: dict[str, Any] = {
        "ddp_backend": "nccl" if torch.cuda.is_available() else "gloo",
        "ddp_timeout": DDP_TIMEOUT_SECONDS,
        "ddp_find_unused_parameters": False,  # adapters: frozen base weights are never "unused" in DDP
        "save_on_each_node": False,
    }
    if strategy == "fsdp":
        kwargs["fsdp"] = True
        kwargs["fsdp_config"] = fsdp_config(model, gradient_checkpointing=gradient_checkpointing)
        kwargs["gradient_checkpointing"] = False
    return kwargs


def quant_storage_dtype(contract: StageContract, compute_dtype: Any = None) -> Any:
    """``bnb_4bit_quant_storage`` for QLoRA 4-bit under FSDP (the compute dtype), else None."""
    if contract.peft.method != "qlora" or contract.peft.bits == 8 or stage_strategy(contract) != "fsdp":
        return None
    import torch

    return compute_dtype or torch.bfloat16


def topology(contract: StageContract, strategy: Resolved | None = None) -> Topology:
    """What this attempt runs on, for ``StageResult.topology``."""
    import torch

    per_node = local_world_size()
    nodes = max(1, world_size() // per_node)
    if strategy is None:
        try:
            strategy = stage_strategy(contract)
        except Exception:  # the stage reports why; the topology still names the processes
            strategy = "single" if world_size() <= 1 else "ddp"
    return Topology(
        world_size=world_size(),
        nodes=nodes,
        procs_per_node=per_node,
        gpus_per_node=per_node if torch.cuda.is_available() else 0,
        strategy=strategy,
    )
