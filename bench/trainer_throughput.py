"""Throughput: temper's real SFT stage vs stock TRL ``SFTTrainer``, same model, data and device.

    python bench/trainer_throughput.py                 # CPU, random-init ~26M-parameter Llama
    python bench/trainer_throughput.py --model tiny    # CPU, builtin://tiny (seconds; CI smoke)

The temper side is the production path: ``python -m temper_trainer run``'s ``run_stage`` with a
stage contract, against a loopback S3 (progress, checkpoints policy, publish, eval included in
the process; tokens/s is the stage's own ``train/tokens_per_second``, timed around
``trainer.train()``). The TRL side is stock ``SFTConfig`` defaults plus what must match (steps,
batch, learning rate, max length, LoRA shape), timed the same way (``trainer.train()`` wall time,
non-padding tokens). Packing is fair both ways: temper packed vs TRL ``padding_free=True`` and
temper padded vs TRL defaults (padded), all four reported.

Every case runs in its own child process so peak memory is clean (CPU: max RSS; CUDA:
``torch.cuda.max_memory_allocated``). Prints one JSON object. ``bench/gpu_check.py`` runs the
GPU matrix with the same engine. Offline: random-init weights and synthetic data only.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}  # dense bf16
LLAMA3_8B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
}
SHAPES: dict[str, dict[str, Any]] = {
    "small": {  # ~26M parameters: compute-bound on a CPU
        "hidden_size": 512,
        "intermediate_size": 1408,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "max_position_embeddings": 2048,
    },
    "llama3-8b": LLAMA3_8B,
}


# -- setup (parent process) ----------------------------------------------------------------------


def build_model(shape: str, out: Path, *, vocab_size: int | None = None) -> Path:
    """A random-init Llama of ``shape`` with temper's tokenizer, saved in Hugging Face format."""
    import torch
    from temper_trainer.tinymodel import build_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    if (out / "config.json").exists():
        return out
    tokenizer = build_tokenizer()
    config = LlamaConfig(vocab_size=vocab_size or len(tokenizer), **SHAPES[shape])
    torch.manual_seed(0)
    big = shape == "llama3-8b"  # initialised on the GPU in bf16: minutes faster than fp32 on CPU
    device = "cuda" if big and torch.cuda.is_available() else "cpu"
    torch.set_default_dtype(torch.bfloat16 if big else torch.float32)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    del model
    tokenizer.save_pretrained(out)
    return out


def write_data(out: Path, n: int, min_len: int, max_len: int) -> Path:
    """Prompt-completion records with a realistic length spread (where padding-free pays off)."""
    from temper_trainer.tinymodel import CHARS

    rng = random.Random(0)
    alphabet = CHARS.replace("\n", "")
    with out.open("w") as handle:
        for _ in range(n):
            length = rng.randint(min_len, max_len)
            text = "".join(rng.choice(alphabet) for _ in range(length))
            cut = length // 3
            handle.write(json.dumps({"prompt": text[:cut], "completion": text[cut:]}) + "\n")
    return out


# -- the two paths (child processes) -------------------------------------------------------------


def stage_contract(case: dict[str, Any], endpoint: str, bucket: str) -> str:
    from temper.api.contract import StageContract

    hp = {
        "maxSteps": case["steps"],
        "batchSize": case["batch_size"],
        "maxLength": case["max_length"],
        "learningRate": 1e-4,
        "packing": case.get("packing", True),
        "gradientCheckpointing": case.get("gradient_checkpointing", False),
        "liger": case.get("liger", False),
        **({"precision": case["precision"]} if case.get("precision") else {}),
        **({"attnImplementation": case["attn"]} if case.get("attn") else {}),
    }
    peft: dict[str, Any] = {"method": case.get("method", "lora"), "r": 16, "alpha": 32}
    if case.get("bits"):
        peft["bits"] = case["bits"]
    name = case["name"].replace("_", "-")
    return StageContract.model_validate(
        {
            "run": {"namespace": "bench", "name": "bench"},
            "stage": {"name": name, "type": "sft"},
            "baseModel": case["model_dir"],
            "storage": {"endpointUrl": endpoint},
            "output": {"prefix": f"s3://{bucket}/bench/{name}/"},
            "peft": peft,
            "data": {"train": [{"name": "synthetic", "uri": case["data"], "format": "prompt-completion"}]},
            "hyperparameters": hp,
            "checkpoint": {"everySteps": 100_000, "everySeconds": 86_400},
        }
    ).to_env()


def run_temper(case: dict[str, Any]) -> dict[str, Any]:
    from temper.api.contract import StageResult
    from temper_trainer.__main__ import run_stage

    work = Path(tempfile.mkdtemp(prefix="bench-temper-"))
    os.environ["TEMPER_TERMINATION_LOG"] = str(work / "term")
    code = run_stage(stage_contract(case, case["endpoint"], case["bucket"]), work / "w")
    result = StageResult.model_validate_json((work / "term").read_text())
    if code != 0:
        return {"error": result.error, "exit_code": code}
    return {"tokens_per_second": round(result.metrics["train/tokens_per_second"], 1), **_memory(case)}


def run_trl(case: dict[str, Any]) -> dict[str, Any]:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    cuda = torch.cuda.is_available()
    tokenizer = AutoTokenizer.from_pretrained(case["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(case["model_dir"], dtype=torch.bfloat16 if cuda else None)
    config = SFTConfig(  # stock defaults apart from what must match the temper side
        output_dir=tempfile.mkdtemp(prefix="bench-trl-"),
        max_steps=case["steps"],
        per_device_train_batch_size=case["batch_size"],
        # padding-free without packing does not truncate: the data is within max_length already
        max_length=None if case.get("packing") else case["max_length"],
        learning_rate=1e-4,
        padding_free=case.get("packing", False),
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=not cuda,
        include_num_input_tokens_seen="non_padding",
    )
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    dataset = load_dataset("json", data_files=case["data"], split="train")
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=lora
    )
    if cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    trainer.train()
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    return {
        "tokens_per_second": round(int(trainer.state.num_input_tokens_seen) / elapsed, 1),
        "gradient_checkpointing": bool(config.gradient_checkpointing),
        **_memory(case),
    }


def _memory(case: dict[str, Any]) -> dict[str, Any]:
    import torch

    if torch.cuda.is_available():
        return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated())}
    return {"peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def run_case(case: dict[str, Any], timeout: float = 1800) -> dict[str, Any]:
    """One case in a fresh child process; its JSON result (or the error it died with)."""
    env = {**os.environ, **case.get("env", {})}
    try:
        proc = subprocess.run(
            [sys.executable, __file__, "--case", json.dumps(case)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f}s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-1500:]}"}
    return dict(json.loads(lines[-1][len("RESULT ") :]))


def lora_mfu(params: int, adapter_params: int, tokens_per_second: float, peak_flops: float) -> float:
    """(4·N + 6·N_adapter) FLOPs per token: frozen weights forward + activation gradients only."""
    return (4 * params + 6 * adapter_params) * tokens_per_second / peak_flops


def param_counts(model_dir: Path, r: int = 16) -> tuple[int, int]:
    """Base parameters (from the config, so quantization does not hide them) and LoRA parameters."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    adapter = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "lm_head" not in name:
            adapter += r * (module.in_features + module.out_features)
    return total, adapter


def start_storage() -> tuple[Any, str]:
    from temper_dev.s3server import S3Server

    server = S3Server(process=True).start()  # its own process: the stage's RSS stays the stage's
    return server, server.create_bucket()


def throughput(model: str, steps: int, threads: int | None) -> dict[str, Any]:
    from temper_trainer.tinymodel import ensure_tiny_model

    cache = Path(os.environ.get("TEMPER_BENCH_CACHE", Path.home() / ".cache" / "temper" / "bench"))
    cache.mkdir(parents=True, exist_ok=True)
    model_dir = ensure_tiny_model() if model == "tiny" else build_model(model, cache / f"model-{model}")
    data = write_data(cache / "data-cpu.jsonl", 256, 32, 255)
    server, bucket = start_storage()
    env = {**server.env, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    base = {
        "model_dir": str(model_dir),
        "data": str(data),
        "steps": steps,
        "batch_size": 8,
        "max_length": 256,
    }
    base |= {"endpoint": server.endpoint_url, "bucket": bucket, "env": env}
    out: dict[str, Any] = {"model": model, "steps": steps, "batch_size": 8, "max_length": 256}
    out["params"], out["adapter_params"] = param_counts(model_dir)
    out["load_average"] = [round(x, 2) for x in os.getloadavg()]
    try:
        for name, path, packing in (
            ("temper_packed", "temper", True),
            ("trl_padding_free", "trl", True),
            ("temper_padded", "temper", False),
            ("trl_defaults", "trl", False),
        ):
            out[name] = run_case({**base, "name": name, "path": path, "packing": packing})
    finally:
        server.stop()
    out["load_average_after"] = [round(x, 2) for x in os.getloadavg()]

    def ratio(a: str, b: str, key: str) -> float | None:
        x, y = out[a].get(key), out[b].get(key)
        return round(x / y, 3) if x and y else None

    out["speedup_same_packing"] = ratio("temper_packed", "trl_padding_free", "tokens_per_second")
    out["speedup_padded"] = ratio("temper_padded", "trl_defaults", "tokens_per_second")
    out["speedup_vs_trl_defaults"] = ratio("temper_packed", "trl_defaults", "tokens_per_second")
    out["memory_ratio_vs_trl_defaults"] = ratio("temper_packed", "trl_defaults", "peak_memory_bytes")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=["tiny", "small"], default="small")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS for each case")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # child process: one case as JSON
    args = parser.parse_args()
    if args.case:
        case = json.loads(args.case)
        result = run_temper(case) if case["path"] == "temper" else run_trl(case)
        print("RESULT " + json.dumps(result), flush=True)
        return
    print(json.dumps(throughput(args.model, args.steps, args.threads), indent=2))


if __name__ == "__main__":
    main()
