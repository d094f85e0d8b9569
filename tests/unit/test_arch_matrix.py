"""The architecture matrix: SFT (LoRA), DPO and GRPO on small random-initialised Llama, Qwen2,
Mistral, Gemma 2 and Phi-3 models, each with a byte-level BPE tokenizer trained here and its
family's chat template, served from olah (a real Hub-compatible mirror) as hf://zoo/tiny-<arch>.

Each stage runs through the trainer's real entry point (``run_stage``, as in a pod), publishes to
moto S3, and its adapter must reload with stock ``PeftModel.from_pretrained``. ``all-linear``
must resolve to the architecture's own projection layers (Phi-3 fuses qkv and gate/up).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from temper.api.contract import EXIT_OK, PeftSpec, StageContract
from temper_dev.archzoo import ARCHS
from temper_dev.hub import OlahHub
from temper_dev.s3server import S3Server

from tests.fixtures.hub import HubModel
from tests.unit.trainer_helpers import storage_for

pytestmark = [pytest.mark.unit, pytest.mark.slow]

HP = {"maxSteps": 2, "batchSize": 4, "maxLength": 64, "learningRate": 1e-3}
STAGES: dict[str, dict[str, Any]] = {
    "sft": {
        "data": {"train": [{"name": "chat", "uri": "builtin://arith?n=8&turns=2", "format": "chat"}]},
        "hyperparameters": HP,
    },
    "dpo": {
        "data": {"train": [{"name": "prefs", "uri": "builtin://arith?n=8", "format": "preference"}]},
        "hyperparameters": HP,
    },
    "grpo": {
        "data": {"train": [{"name": "sums", "uri": "builtin://arith?n=8", "format": "prompt"}]},
        "rewards": [{"type": "length", "targetLength": 2}],
        "hyperparameters": {**HP, "numGenerations": 2, "maxNewTokens": 4},
    },
}


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: more threads only spin on a shared 2-core box
    yield
    torch.set_num_threads(threads)


def _targets(model: Any) -> set[str]:
    """The leaf names of the modules PEFT wrapped with LoRA."""
    return {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if hasattr(module, "lora_A")}


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("method", ["lora", "adalora"])
def test_default_target_modules_resolve_per_architecture(
    arch: str, method: str, hub_env: OlahHub, arch_models: dict[str, HubModel]
) -> None:
    from temper_trainer.models import load_model
    from temper_trainer.peft_setup import apply_peft

    model, _ = load_model(arch_models[arch].uri, None)
    spec = PeftSpec(method=method)  # the contract's default targetModules: all-linear
    assert spec.target_modules == ["all-linear"]
    wrapped = apply_peft(model, spec, total_steps=10)
    assert _targets(wrapped) == set(ARCHS[arch].linear_modules)  # never lm_head


@pytest.mark.parametrize("stage", list(STAGES))
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_stage_runs_and_its_adapter_reloads_with_stock_peft(
    arch: str,
    stage: str,
    hub_env: OlahHub,
    arch_models: dict[str, HubModel],
    s3_server: S3Server,
    s3_bucket: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch
    from peft import PeftModel
    from temper_trainer.__main__ import run_stage
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = arch_models[arch]
    storage = storage_for(s3_server, monkeypatch)
    doc = {
        "run": {"namespace": "matrix", "name": arch},
        "stage": {"name": stage, "type": stage},
        "baseModel": model.uri,
        "storage": {"endpointUrl": s3_server.endpoint_url},
        "output": {"prefix": f"s3://{s3_bucket}/matrix/{arch}/{stage}/"},
        "peft": {"method": "lora", "r": 4, "alpha": 8},
        "checkpoint": {"everySteps": 1000, "everySeconds": 3600},
        **STAGES[stage],
    }
    log = tmp_path / "termination"
    monkeypatch.setenv("TEMPER_TERMINATION_LOG", str(log))
    started = time.monotonic()
    code = run_stage(StageContract.model_validate(doc).to_env(), tmp_path / "work")
    seconds = time.monotonic() - started
    result = json.loads(log.read_text())
    assert code == EXIT_OK, result
    verified = storage.verify_manifest(result["manifestUri"])
    assert verified.ok, verified.problems
    assert verified.manifest is not None
    assert verified.manifest.lineage["baseModelRevision"] == model.sha  # main, pinned

    folder = tmp_path / "adapter"
    storage.download_verified(result["manifestUri"], folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    targets = {t.rsplit(".", 1)[-1] for t in config["target_modules"]}  # all-linear, resolved and saved
    assert targets == set(ARCHS[arch].linear_modules)
    base = AutoModelForCausalLM.from_pretrained(model.folder)
    tokenizer = AutoTokenizer.from_pretrained(model.folder)
    reloaded = PeftModel.from_pretrained(base, str(folder))
    assert _targets(reloaded) == set(ARCHS[arch].linear_modules)
    trained_b = [p for n, p in reloaded.named_parameters() if "lora_B" in n]
    assert any(float(p.abs().sum()) > 0 for p in trained_b)  # B starts at zero: training moved it
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "2+3="}], add_generation_prompt=True, return_tensors="pt"
    )
    ids = ids["input_ids"] if not isinstance(ids, torch.Tensor) else ids
    with torch.no_grad():
        assert torch.isfinite(reloaded(input_ids=ids).logits).all()
    print(f"MATRIX {arch} {stage} pass {seconds:.1f}s targets={sorted(targets)}")
