"""merge: linear / ties / dare_ties / cat of real LoRA adapters published to a real moto S3."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from temper.api.contract import EXIT_INVALID_INPUT, EXIT_OK

from tests.unit.trainer_helpers import RlStages, rl_fixture  # noqa: F401  (the rl fixture)

pytestmark = pytest.mark.unit


def publish_lora(rl: RlStages, name: str, *, r: int, seed: int, base: str = "builtin://tiny") -> str:
    """A LoRA adapter with non-zero random weights on the tiny model, published with a manifest."""
    import tempfile

    import peft
    import torch
    from temper_trainer.models import load_model

    torch.manual_seed(seed)
    model, _ = load_model("builtin://tiny", None)
    config = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", init_lora_weights=False)
    adapter = peft.get_peft_model(model, config)
    with tempfile.TemporaryDirectory() as folder:
        adapter.save_pretrained(folder)
        result = rl.storage.publish_atomic(
            Path(folder),
            f"s3://{rl.bucket}/adapters/{name}/",
            1,
            {"baseModel": base, "method": "lora", "stageType": "sft", "trainerVersion": "test"},
        )
    return result.manifest_uri


def merge_doc(rl: RlStages, name: str, sources: list[tuple[str, float]], **merge: Any) -> dict[str, Any]:
    return rl.doc(
        name,
        "merge",
        mergeSources=[
            {"name": f"src{i}", "manifestUri": uri, "weight": w} for i, (uri, w) in enumerate(sources)
        ],
        merge=merge,
    )


def lora_delta(model: Any, module_suffix: str) -> Any:
    """The merged adapter's weight delta (B @ A * scaling) for one target module."""
    layer = dict(model.named_modules())[module_suffix]
    return layer.get_delta_weight("default")


@pytest.fixture
def sources(rl: RlStages) -> list[str]:
    return [publish_lora(rl, f"task{i}", r=4, seed=i) for i in range(2)]


@pytest.mark.parametrize("method", ["linear", "ties", "dare_ties", "cat"])
def test_each_merge_method_loads_with_stock_peft(
    method: str,
    sources: list[str],
    rl: RlStages,
) -> None:
    import torch
    from peft import PeftModel
    from temper_trainer.models import load_model

    weights = [0.7, 0.3]
    doc = merge_doc(
        rl,
        f"m-{method.replace('_', '-')}",
        list(zip(sources, weights, strict=True)),
        method=method,
        density=0.5,
    )
    code, result = rl.run(doc)
    assert code == EXIT_OK, result
    manifest = rl.published(result)
    assert manifest["stageType"] == "merge"
    assert manifest["method"] == "lora"
    assert manifest["lineage"]["merge"]["method"] == method
    assert result["metrics"]["merge/rank"] == (8 if method == "cat" else 4)

    merged = PeftModel.from_pretrained(
        load_model("builtin://tiny", None)[0],
        str(rl.download(result["manifestUri"], "merged")),
    )
    src = [
        PeftModel.from_pretrained(load_model("builtin://tiny", None)[0], str(rl.download(uri, f"s{i}")))
        for i, uri in enumerate(sources)
    ]
    module = "base_model.model.model.layers.0.self_attn.q_proj"
    delta = lora_delta(merged, module)
    source_deltas = [lora_delta(s, module) for s in src]
    combined = weights[0] * source_deltas[0] + weights[1] * source_deltas[1]
    assert torch.isfinite(delta).all()
    assert delta.abs().sum() > 0
    if method == "cat":  # exact: concatenating ranks keeps every source's delta
        assert torch.allclose(delta, combined, atol=1e-5)
    else:
        a = dict(merged.named_modules())[module].lora_A["default"].weight
        zeros = float((a == 0).float().mean())
        if method == "linear":
            assert zeros == 0.0
        else:  # ties and dare keep only part of each task vector (density 0.5)
            assert zeros > 0.1, zeros
    # the merged adapter changes the model's outputs like the sources do
    ids = torch.tensor([[1, 20, 21, 22]])
    with torch.no_grad(), merged.disable_adapter():
        base_logits = merged(input_ids=ids).logits
    assert not torch.allclose(merged(input_ids=ids).logits, base_logits)


def test_dare_ties_is_deterministic_for_a_seed(
    sources: list[str],
    rl: RlStages,
) -> None:
    digests = []
    for name in ("dare-a", "dare-b"):
        doc = merge_doc(
            rl,
            name,
            [(sources[0], 0.5), (sources[1], 0.5)],
            method="dare_ties",
            density=0.3,
        )
        code, result = rl.run(doc)
        assert code == EXIT_OK, result
        files = rl.published(result)["files"]
        digests.append(next(f["sha256"] for f in files if f["path"].endswith("adapter_model.safetensors")))
    assert digests[0] == digests[1]


def test_merge_rejects_bad_sources_with_a_non_retryable_exit(
    sources: list[str],
    rl: RlStages,
) -> None:
    other_base = publish_lora(rl, "other-base", r=4, seed=5, base="s3://models/other-llm/")
    code, result = rl.run(merge_doc(rl, "m-base", [(sources[0], 0.5), (other_base, 0.5)]))
    assert code == EXIT_INVALID_INPUT
    assert "mergeSources[1]" in result["error"]
    assert "s3://models/other-llm/" in result["error"]

    code, result = rl.run(merge_doc(rl, "m-one", [(sources[0], 1.0)]))
    assert code == EXIT_INVALID_INPUT
    assert "at least two" in result["error"]

    wider = publish_lora(rl, "wider", r=8, seed=6)
    mixed = [(sources[0], 0.5), (wider, 0.5)]
    code, result = rl.run(merge_doc(rl, "m-ties", mixed, method="ties"))
    assert code == EXIT_INVALID_INPUT
    assert "merge.method 'ties'" in result["error"]
    assert "[4, 8]" in result["error"]
    code, result = rl.run(merge_doc(rl, "m-cat", mixed, method="cat"))
    assert code == EXIT_OK
    assert result["metrics"]["merge/rank"] == 12

    tampered = publish_lora(rl, "tampered", r=4, seed=7)
    folder = tampered.rsplit("/", 1)[0]
    rl.storage.put_bytes(f"{folder}/attempts/1/adapter_model.safetensors", b"not the published bytes")
    code, result = rl.run(merge_doc(rl, "m-tampered", [(sources[0], 0.5), (tampered, 0.5)]))
    assert code == EXIT_INVALID_INPUT
    assert "adapter_model.safetensors" in result["error"]
