"""PEFT methods: full, lora, qlora, adalora, prompt-tuning, prefix-tuning, p-tuning.

QLoRA needs bitsandbytes kernels on CUDA: without a GPU it fails at once (``Unsupported``, exit
code 12) rather than crawling or silently training something else.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from temper.api.contract import PeftSpec

PROMPT_LEARNING = {"prompt-tuning", "prefix-tuning", "p-tuning"}


def servable_flags(method: str) -> dict[str, bool]:
    """Which serving stacks can load this artifact (vLLM serves LoRA-family adapters only)."""
    return {
        "peft": True,
        "vllm": method in ("lora", "qlora", "adalora", "full"),
        "merge": method in ("lora", "qlora", "adalora"),
    }


def check_supported(spec: PeftSpec, device_type: str) -> None:
    from temper_trainer.stage import Unsupported

    if spec.method == "qlora":
        import torch

        if device_type != "cuda" or not torch.cuda.is_available():
            raise Unsupported(
                "peft.method 'qlora' needs a CUDA GPU (bitsandbytes 4/8-bit kernels) and none is "
                "available; use method 'lora' on CPU"
            )
        if spec.bits not in (4, 8):
            raise Unsupported("peft.bits must be 4 or 8 for qlora")


def quantization_config(spec: PeftSpec, *, quant_storage: Any = None) -> Any:
    """The BitsAndBytesConfig a QLoRA base model must be loaded with (None otherwise).

    ``quant_storage``: the dtype 4-bit weights are packed in; FSDP needs the compute dtype
    (``temper_trainer.distributed.quant_storage_dtype``)."""
    if spec.method != "qlora":
        return None
    import torch
    from transformers import BitsAndBytesConfig

    if spec.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)  # type: ignore[no-untyped-call]
    return BitsAndBytesConfig(  # type: ignore[no-untyped-call]
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        **({"bnb_4bit_quant_storage": quant_storage} if quant_storage is not None else {}),
    )


def _targets(spec: PeftSpec) -> Any:
    return "all-linear" if spec.target_modules == ["all-linear"] else list(spec.target_modules)


def apply_peft(
    model: Any, spec: PeftSpec, *, device: Any = None, tokenizer: Any = None, total_steps: int | None = None
) -> Any:
    import peft

    check_supported(spec, getattr(device, "type", "cpu"))
    if spec.method == "full":
        for param in model.parameters():
            param.requires_grad_(True)
        return model
    task = peft.TaskType.CAUSAL_LM
    config: Any
    if spec.method in ("lora", "qlora"):
        if spec.method == "qlora":
            model = peft.prepare_model_for_kbit_training(model)  # type: ignore[no-untyped-call]
        config = peft.LoraConfig(
            r=spec.r,
            lora_alpha=spec.alpha,
            lora_dropout=spec.dropout,
            target_modules=_targets(spec),
            task_type=task,
        )
    elif spec.method == "adalora":
        steps = max(int(total_steps or 100), 10)
        config = peft.AdaLoraConfig(
            init_r=spec.init_r or spec.r + max(spec.r // 2, 1),
            target_r=spec.r,
            lora_alpha=spec.alpha,
            lora_dropout=spec.dropout,
            target_modules=_targets(spec),
            total_step=steps,
            tinit=max(steps // 10, 1),
            tfinal=max(steps // 5, 1),
            deltaT=max(steps // 20, 1),
            task_type=task,
        )
    elif spec.method == "prompt-tuning":
        config = peft.PromptTuningConfig(num_virtual_tokens=spec.num_virtual_tokens, task_type=task)
    elif spec.method == "prefix-tuning":
        config = peft.PrefixTuningConfig(num_virtual_tokens=spec.num_virtual_tokens, task_type=task)
    elif spec.method == "p-tuning":
        config = peft.PromptEncoderConfig(
            num_virtual_tokens=spec.num_virtual_tokens,
            encoder_hidden_size=model.config.hidden_size,
            task_type=task,
        )
    else:  # pragma: no cover - the contract's Literal rules this out
        raise ValueError(f"peft.method {spec.method!r} is not supported")
    return peft.get_peft_model(model, config)


def adapter_method(folder: Path) -> str:
    """The temper method name of a saved artifact folder."""
    config_path = folder / "adapter_config.json"
    if not config_path.exists():
        return "full"
    peft_type = json.loads(config_path.read_text()).get("peft_type", "")
    return {
        "LORA": "lora",
        "ADALORA": "adalora",
        "PROMPT_TUNING": "prompt-tuning",
        "PREFIX_TUNING": "prefix-tuning",
        "P_TUNING": "p-tuning",
    }.get(peft_type, "lora")


def load_adapter(model: Any, folder: Path, *, trainable: bool = False) -> Any:
    """Apply a saved artifact: a PEFT adapter, or a full fine-tune's weights."""
    from peft import PeftModel

    if (folder / "adapter_config.json").exists():
        return PeftModel.from_pretrained(model, str(folder), is_trainable=trainable)
    from safetensors.torch import load_file

    weights = folder / "model.safetensors"
    if not weights.exists():
        raise ValueError(f"{folder.name}: neither adapter_config.json nor model.safetensors")
    _, unexpected = model.load_state_dict(load_file(str(weights)), strict=False)
    if unexpected:
        raise ValueError(f"{folder.name}: weights do not match the base model ({unexpected[:3]})")
    for param in model.parameters():
        param.requires_grad_(trainable)
    return model


def is_adalora(model: Any) -> bool:
    return getattr(getattr(model, "peft_config", {}).get("default"), "peft_type", None) == "ADALORA"


def save_artifact(model: Any, out_dir: Path, *, tokenizer: Any = None) -> None:
    """PEFT layout for adapters; a complete model (weights + tokenizer) for full fine-tunes."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    if tokenizer is not None and not (out_dir / "adapter_config.json").exists():
        tokenizer.save_pretrained(str(out_dir))
