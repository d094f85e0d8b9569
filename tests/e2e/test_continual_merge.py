"""Merge: two LoRA adapters in storage -> the merge contract the operator renders -> the trainer's
merge stage -> a published adapter that stock PEFT loads and that differs from both sources."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from temper.api.contract import StorageConfig
from temper.continual.merge import MergePlan, merge_contract, plan_merge
from temper.storage import Storage
from temper_dev.s3server import S3Server

pytestmark = pytest.mark.e2e


def _lora(tiny_model: Path, out: Path, seed: int) -> None:
    """A LoRA adapter with non-zero B matrices (a fresh one is a no-op and would merge to nothing)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    model.save_pretrained(str(out))


def _ready_adapter(name: str, manifest_uri: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name},
        "spec": {"baseModel": {"uri": "builtin://tiny"}, "artifact": {"uri": manifest_uri}, "method": "lora"},
        "status": {"conditions": [{"type": "Ready", "status": "True"}]},
    }


def test_merged_adapter_loads_in_stock_peft(
    s3_server: S3Server, s3_bucket: str, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch
    from peft import PeftModel
    from temper_trainer.experiments import run_contract
    from transformers import AutoModelForCausalLM

    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    config = StorageConfig.model_validate({"endpointUrl": s3_server.endpoint_url})
    storage = Storage(config)
    fields = {"baseModel": "builtin://tiny", "method": "lora", "stageType": "sft", "trainerVersion": "test"}
    sources = {}
    for name, seed in (("a", 1), ("b", 2)):
        local = tmp_path / name
        _lora(tiny_model, local, seed)
        published = storage.publish_atomic(local, f"s3://{s3_bucket}/adapters/{name}/", 1, fields)
        sources[name] = _ready_adapter(name, published.manifest_uri)
    merged_uri = f"s3://{s3_bucket}/adapters/mix/manifest.json"
    request = {
        "metadata": {"name": "mix"},
        "spec": {
            "baseModel": {"uri": "builtin://tiny"},
            "artifact": {"uri": merged_uri},
            "method": "lora",
            "merge": {
                "sources": [{"name": "a", "weight": 0.6}, {"name": "b", "weight": 0.4}],
                "method": "linear",
            },
        },
    }
    plan = plan_merge(request, sources)
    assert isinstance(plan, MergePlan)
    contract = merge_contract(plan, namespace="ml", name="mix", uid="u", storage=config)

    run_contract(contract)

    assert storage.verify_manifest(merged_uri).ok
    merged_dir = tmp_path / "merged"
    manifest = storage.download_verified(merged_uri, merged_dir)
    assert manifest.stage_type == "merge"
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    model = PeftModel.from_pretrained(base, merged_dir)  # stock PEFT, no temper code
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        merged_logits = model(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_model)(ids).logits
    assert torch.isfinite(merged_logits).all()
    assert not torch.allclose(merged_logits, plain), "the merged adapter changes nothing"
    assert os.path.exists(merged_dir / "adapter_config.json")
