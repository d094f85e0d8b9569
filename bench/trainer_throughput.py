"""Throughput: temper's SFT path vs stock TRL ``SFTTrainer`` defaults, same model, data and device.

    python bench/trainer_throughput.py --mode cpu     # tiny model, a few seconds per path
    python bench/trainer_throughput.py --mode gpu     # 8B-shaped random-init Llama, bf16, LoRA r=16

Each path runs in its own child process so peak memory is measured cleanly (CPU: max RSS; GPU:
``torch.cuda.max_memory_allocated``). Prints one JSON object. GPU mode needs CUDA and fails
with a clear message without it. Offline: random-init weights and synthetic data only.

LoRA-MFU = (4·N + 6·N_adapter) · tokens/s / 989e12 (H100 dense bf16 peak): frozen base weights
cost forward + activation-gradient FLOPs; adapter weights also their weight gradients.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

H100_BF16_PEAK = 989e12


def cpu_setup(steps: int) -> dict[str, Any]:
    from temper_trainer.data import builtin_records
    from temper_trainer.tinymodel import ensure_tiny_model

    return {
        "model_dir": str(ensure_tiny_model()),
        "records": builtin_records("builtin://arith?n=512&turns=4", "chat"),
        "batch_size": 16,
        "steps": steps,
        "max_length": 256,
    }


def gpu_model() -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(  # Llama-3.1-8B's shapes, random init: nothing is downloaded
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500000.0,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        return LlamaForCausalLM(config).to(torch.bfloat16)


def gpu_examples(n: int, seq: int) -> list[tuple[list[int], list[int]]]:
    import random

    rng = random.Random(0)
    out = []
    for _ in range(n):
        length = rng.randint(seq // 4, seq)  # realistic length spread: where padding-free pays off
        ids = [rng.randrange(1000, 120000) for _ in range(length)]
        prompt = length // 3
        out.append((ids, [-100] * prompt + ids[prompt:]))
    return out


def run_temper(mode: str, steps: int) -> dict[str, Any]:
    import torch
    from temper.api.contract import PeftSpec
    from temper_trainer.peft_setup import apply_peft
    from temper_trainer.stages.sft import encode_examples, packed_batch

    if mode == "cpu":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        setup = cpu_setup(steps)
        tok = AutoTokenizer.from_pretrained(setup["model_dir"])
        model = AutoModelForCausalLM.from_pretrained(setup["model_dir"])
        examples = encode_examples(setup["records"], tok, setup["max_length"])
        batch_size, device = setup["batch_size"], "cpu"
        spec = PeftSpec(method="lora", r=16, alpha=32)
    else:
        model = gpu_model()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        examples = gpu_examples(64, 2048)
        batch_size, device = 8, "cuda"
        spec = PeftSpec(method="lora", r=16, alpha=32, targetModules=["all-linear"])
    model = apply_peft(model, spec)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    tokens, started = 0, 0.0
    for step in range(steps + 1):  # step 0 is warm-up, not timed
        if step == 1:
            if device == "cuda":
                torch.cuda.synchronize()
            started, tokens = time.perf_counter(), 0
        chosen = [examples[(step * batch_size + i) % len(examples)] for i in range(batch_size)]
        batch = {k: v.to(device) for k, v in packed_batch(chosen).items()}
        model(**batch, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += sum(len(ids) for ids, _ in chosen)
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    return _result(model, tokens, elapsed, device)


def run_trl(mode: str, steps: int) -> dict[str, Any]:
    import tempfile

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    if mode == "cpu":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        setup = cpu_setup(steps)
        tok = AutoTokenizer.from_pretrained(setup["model_dir"])
        model = AutoModelForCausalLM.from_pretrained(setup["model_dir"])
        dataset = Dataset.from_list([{"messages": r["messages"]} for r in setup["records"]])
        batch_size, max_length, device = setup["batch_size"], setup["max_length"], "cpu"
        from temper_trainer.stages.sft import encode_examples

        lengths = [len(ids) for ids, _ in encode_examples(setup["records"], tok, max_length)]
    else:
        from temper_trainer.tinymodel import build_tokenizer

        model = gpu_model()
        tok = build_tokenizer()  # only for padding/eos ids: the data is pre-tokenized
        examples = gpu_examples(64, 2048)
        dataset = Dataset.from_list([{"input_ids": ids} for ids, _ in examples])
        lengths = [len(ids) for ids, _ in examples]
        batch_size, max_length, device = 8, 2048, "cuda"
    config = SFTConfig(  # stock defaults apart from what must match the temper path
        output_dir=tempfile.mkdtemp(),
        max_steps=steps + 1,
        per_device_train_batch_size=batch_size,
        max_length=max_length,
        learning_rate=1e-4,
        report_to=[],
        logging_steps=10_000,
        save_strategy="no",
        bf16=device == "cuda",
        use_cpu=device == "cpu",
        dataloader_num_workers=0,
    )
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=tok, peft_config=lora
    )
    from transformers import TrainerCallback

    marks: dict[str, float] = {}

    class Clock(TrainerCallback):  # time steps 2..N+1 like the temper path (step 1 warms up)
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if device == "cuda":
                torch.cuda.synchronize()
            if state.global_step == 1:
                marks["start"] = time.perf_counter()
            marks["end"] = time.perf_counter()

    trainer.add_callback(Clock())
    trainer.train()
    elapsed = marks["end"] - marks["start"]
    mean_len = sum(lengths) / len(lengths)
    return _result(trainer.model, int(mean_len * batch_size * steps), elapsed, device)


def _result(model: Any, tokens: int, elapsed: float, device: str) -> dict[str, Any]:
    import torch

    n_total = sum(p.numel() for p in model.parameters())
    n_adapter = sum(p.numel() for p in model.parameters() if p.requires_grad)
    tps = tokens / elapsed
    out: dict[str, Any] = {
        "tokens_per_second": round(tps, 1),
        "tokens": tokens,
        "seconds": round(elapsed, 3),
        "params": n_total,
        "adapter_params": n_adapter,
    }
    if device == "cuda":
        out["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated())
        out["lora_mfu"] = round((4 * (n_total - n_adapter) + 6 * n_adapter) * tps / H100_BF16_PEAK, 4)
    else:
        out["peak_memory_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mode", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--path", choices=["temper", "trl"], help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()
    steps = args.steps or (20 if args.mode == "cpu" else 10)
    if args.mode == "gpu":
        import torch

        if not torch.cuda.is_available():
            sys.exit("gpu mode needs a CUDA GPU and none is available (use --mode cpu)")
    if args.path:
        torch_threads = os.environ.get("BENCH_THREADS")
        if torch_threads:
            import torch

            torch.set_num_threads(int(torch_threads))
        result = run_temper(args.mode, steps) if args.path == "temper" else run_trl(args.mode, steps)
        print("RESULT " + json.dumps(result))
        return
    results: dict[str, Any] = {"mode": args.mode, "steps": steps}
    for path in ("temper", "trl"):
        proc = subprocess.run(
            [sys.executable, __file__, "--mode", args.mode, "--steps", str(steps), "--path", path],
            capture_output=True,
            text=True,
            check=False,
        )
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            sys.exit(f"{path} path failed:\n{proc.stderr[-3000:]}")
        results[path] = json.loads(lines[-1][len("RESULT ") :])
    results["speedup"] = round(
        results["temper"]["tokens_per_second"] / results["trl"]["tokens_per_second"], 3
    )
    results["memory_ratio"] = round(
        results["temper"]["peak_memory_bytes"] / results["trl"]["peak_memory_bytes"], 3
    )
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
