"""The GPU check: temper's real SFT stage on a random-init Llama-3-8B-shaped model vs stock TRL.

    bash bench/gpu_check.sh            # one H100/H200, < 8 minutes, prints one JSON object
    bash bench/gpu_check.sh --cpu      # the same matrix on a tiny Llama-3-shaped model (CI)

Cases, each in its own child process (``bench/trainer_throughput.run_case``: clean peak memory),
all on the same saved model and the same synthetic prompt-completion data (lengths 256-2048):

- ``temper_bf16_sdpa``: LoRA r=16 all-linear, bf16, SDPA, padding-free packing, gradient
  checkpointing: the headline configuration;
- ``temper_bf16_fa2``: the same with FlashAttention-2 (when flash-attn is installed);
- ``temper_bf16_sdpa_liger``: the same with Liger kernels (when liger-kernel is installed);
- ``temper_qlora4`` / ``temper_qlora8``: QLoRA 4-bit (NF4, double quant) and 8-bit;
- ``trl_defaults``: stock TRL ``SFTConfig`` defaults + the same LoRA shape, steps, batch, lr.

Goals (headline vs ``trl_defaults``): tokens/s >= 1.8x, peak memory <= 0.5x, LoRA-MFU >= 45%
(``(4N + 6N_adapter)`` FLOPs per token over the GPU's dense bf16 peak), each ``pass``/``miss``.
With ``--cpu`` every case that can run on a CPU runs (fp32); the CUDA-only ones report why not
(QLoRA, Liger: the stage's own Unsupported error, exit 12; FA2: skipped), goals are ``null``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from trainer_throughput import (
    PEAK_FLOPS,
    SHAPES,
    build_model,
    lora_mfu,
    param_counts,
    run_case,
    start_storage,
    write_data,
)

GOALS = {"speedup": 1.8, "memory_ratio": 0.5, "lora_mfu": 0.45}
SHAPES["tiny-llama3"] = {  # Llama-3's layout (GQA 4:1, SwiGLU ratio 3.5) at toy size
    "hidden_size": 64,
    "intermediate_size": 224,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "max_position_embeddings": 2048,
    "rope_theta": 500000.0,
}


def cases(cpu: bool) -> list[dict[str, Any]]:
    precision = "fp32" if cpu else "bf16"
    headline = {"path": "temper", "precision": precision, "attn": "sdpa", "packing": True}
    headline["gradient_checkpointing"] = not cpu
    out = [
        {"name": "temper_bf16_sdpa", **headline},
        {"name": "temper_bf16_fa2", **headline, "attn": "flash_attention_2", "needs": "flash_attn"},
        {"name": "temper_bf16_sdpa_liger", **headline, "liger": True, "needs": "liger_kernel"},
        {"name": "temper_qlora4", **headline, "method": "qlora", "bits": 4, "precision": "bf16"},
        {"name": "temper_qlora8", **headline, "method": "qlora", "bits": 8, "precision": "bf16"},
        {"name": "trl_defaults", "path": "trl", "packing": False},
    ]
    for case in out:
        if cpu and case.get("needs") == "flash_attn":
            case["skip"] = "FlashAttention-2 needs a CUDA GPU"
        elif case.get("needs") and importlib.util.find_spec(case["needs"]) is None and not cpu:
            case["skip"] = f"{case['needs']} is not installed"
        if cpu and case["path"] == "temper" and (case.get("method") == "qlora" or case.get("liger")):
            case["expect_unsupported"] = True  # the stage must refuse it clearly (exit 12)
    return out


def peak_flops() -> tuple[float | None, str]:
    import torch

    if not torch.cuda.is_available():
        return None, "cpu"
    name = torch.cuda.get_device_name(0)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), PEAK_FLOPS["H100"]), name


def verdict(value: float | None, goal: float, *, higher: bool) -> str | None:
    if value is None:
        return None
    return "pass" if (value >= goal if higher else value <= goal) else "miss"


def check(cpu: bool, steps: int, timeout: float) -> dict[str, Any]:
    started = time.monotonic()
    cache = Path(os.environ.get("TEMPER_BENCH_CACHE", Path.home() / ".cache" / "temper" / "bench"))
    shape = "tiny-llama3" if cpu else "llama3-8b"
    model_dir = build_model(shape, cache / f"model-{shape}", vocab_size=None if cpu else 128256)
    data = write_data(cache / f"data-{shape}.jsonl", 128, 64 if cpu else 256, 256 if cpu else 2048)
    flops, device = peak_flops()
    params, adapter = param_counts(model_dir)
    server, bucket = start_storage()
    base = {"model_dir": str(model_dir), "data": str(data), "steps": steps, "batch_size": 8}
    base |= {"max_length": 256 if cpu else 2048, "endpoint": server.endpoint_url, "bucket": bucket}
    base["env"] = server.env
    report: dict[str, Any] = {"device": device, "model": shape, "params": params, "adapter_params": adapter}
    report |= {"steps": steps, "batch_size": 8, "cases": {}}
    try:
        for case in cases(cpu):
            name = case["name"]
            if "skip" in case:
                report["cases"][name] = {"skipped": case["skip"]}
                continue
            result = run_case({**base, **case}, timeout=timeout)
            if case.get("expect_unsupported"):
                result["unsupported_as_expected"] = result.get("exit_code") == 12
            if flops and result.get("tokens_per_second"):
                result["lora_mfu"] = round(lora_mfu(params, adapter, result["tokens_per_second"], flops), 4)
            report["cases"][name] = result
    finally:
        server.stop()
    head, stock = report["cases"]["temper_bf16_sdpa"], report["cases"]["trl_defaults"]
    speedup = memory = None
    if head.get("tokens_per_second") and stock.get("tokens_per_second"):
        speedup = round(head["tokens_per_second"] / stock["tokens_per_second"], 3)
        memory = round(head["peak_memory_bytes"] / stock["peak_memory_bytes"], 3)
    mfu = head.get("lora_mfu")
    gpu = not cpu
    report["goals"] = {
        "speedup_vs_trl_defaults": {"value": speedup, "goal": GOALS["speedup"]},
        "memory_ratio_vs_trl_defaults": {"value": memory, "goal": GOALS["memory_ratio"]},
        "lora_mfu": {"value": mfu, "goal": GOALS["lora_mfu"]},
    }
    report["goals"]["speedup_vs_trl_defaults"]["result"] = verdict(speedup if gpu else None, 1.8, higher=True)
    report["goals"]["memory_ratio_vs_trl_defaults"]["result"] = verdict(
        memory if gpu else None, 0.5, higher=False
    )
    report["goals"]["lora_mfu"]["result"] = verdict(mfu if gpu else None, 0.45, higher=True)
    report["seconds"] = round(time.monotonic() - started, 1)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cpu", action="store_true", help="tiny model, everything that runs on a CPU")
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args()
    if not args.cpu:
        import torch

        if not torch.cuda.is_available():
            sys.exit("gpu_check needs a CUDA GPU and none is available (use --cpu)")
    steps = args.steps or (3 if args.cpu else 6)
    print(json.dumps(check(args.cpu, steps, timeout=300 if args.cpu else 150), indent=2))


if __name__ == "__main__":
    main()
