"""SFT quality with real CPU training on the tiny model, and stock-PEFT reloading of what it wrote."""

from __future__ import annotations

from pathlib import Path

import pytest
from temper.api.contract import EXIT_OK, EXIT_UNSUPPORTED
from temper_dev.s3server import S3Server
from temper_trainer.data import builtin_records
from temper_trainer.evaluation import completion_loss, exact_match_by_task

from .trainer_helpers import make_contract, manifest_of, run_in_process, storage_for

pytestmark = [pytest.mark.unit, pytest.mark.slow]

EVAL_URI = "builtin://arith?n=20&split=eval"


def reload_and_evaluate(storage, manifest_uri: str, base: Path, dest: Path) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Load the published artifact with stock transformers/peft only and recompute its eval metrics."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    storage.download_verified(manifest_uri, dest)
    tokenizer = AutoTokenizer.from_pretrained(base)
    if (dest / "adapter_config.json").exists():
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(dest))
    else:  # full fine-tune: a complete model
        model = AutoModelForCausalLM.from_pretrained(dest)
    records = builtin_records(EVAL_URI, "chat")
    em = exact_match_by_task(model.eval(), tokenizer, records, max_new_tokens=16)["all"]
    return {"eval/exact_match": em, "eval/loss": completion_loss(model, tokenizer, records)}


def test_sft_raises_heldout_exact_match_and_reloads_with_stock_peft(
    s3_server: S3Server, s3_bucket: str, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    held_out = builtin_records(EVAL_URI, "chat")
    base_em = exact_match_by_task(base, tokenizer, held_out, max_new_tokens=16)["all"]
    base_loss = completion_loss(base, tokenizer, held_out)

    code, result = run_in_process(
        make_contract(s3_server, s3_bucket, "sft"), monkeypatch, s3_server, tmp_path
    )
    assert code == EXIT_OK, result.error
    storage = storage_for(s3_server, monkeypatch)
    manifest = manifest_of(storage, result)
    after = manifest.metrics["eval/exact_match"]
    metrics = manifest.metrics
    print(f"held-out exact match: base {base_em:.2f} -> sft {after:.2f}; {metrics}")
    assert metrics["eval/exact_match_before"] == base_em  # the stage's own baseline, same format
    # Held-out problems are truly unseen (issue 16). The base knows the sums in its pretraining form
    # (measured 1.00 on these 20) and none in the SFT format; 100 steps on 80 sums carry part of the
    # skill into the new format: measured 0.00 -> 0.20 exact (the bench's 200 steps on 400: +79
    # points). The held-out loss must at least halve; exact match must rise.
    assert metrics["eval/loss"] < 0.5 * base_loss, (base_loss, metrics)
    assert after >= base_em + 0.05, metrics
    # the base's score in its pretraining form is reported beside it: format vs skill
    assert metrics["eval/exact_match_pretrain_format_before"] >= 0.8, metrics
    assert metrics["drift/kl_to_base"] > 0.0
    assert "drift/kl_to_parent" not in metrics  # trained from the base: no parent
    assert manifest.method == "lora"
    assert manifest.servable["vllm"]
    assert {f.path.rsplit("/", 1)[-1] for f in manifest.files} >= {
        "adapter_config.json",
        "adapter_model.safetensors",
    }
    assert result.metrics["eval/exact_match"] == after

    reloaded = reload_and_evaluate(storage, result.manifest_uri or "", tiny_model, tmp_path / "reload")
    assert reloaded["eval/exact_match"] == manifest.metrics["eval/exact_match"]
    assert reloaded["eval/loss"] == pytest.approx(manifest.metrics["eval/loss"], rel=1e-4)


@pytest.mark.parametrize("method", ["full", "lora", "adalora", "prompt-tuning", "prefix-tuning", "p-tuning"])
def test_each_peft_method_trains_publishes_and_reloads(
    method: str,
    s3_server: S3Server,
    s3_bucket: str,
    tiny_model: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    contract = make_contract(
        s3_server,
        s3_bucket,
        f"m-{method}",
        peft={"method": method, "r": 4, "alpha": 8, "numVirtualTokens": 4},
        hyperparameters={"maxSteps": 12, "learningRate": 1e-3 if method == "full" else 3e-3},
    )
    code, result = run_in_process(contract, monkeypatch, s3_server, tmp_path)
    assert code == EXIT_OK, result.error
    storage = storage_for(s3_server, monkeypatch)
    manifest = manifest_of(storage, result)
    assert manifest.method == method
    assert manifest.servable["vllm"] is (method in ("full", "lora", "adalora"))
    assert manifest.metrics["train/steps"] == 12
    reloaded = reload_and_evaluate(storage, result.manifest_uri or "", tiny_model, tmp_path / "reload")
    assert reloaded["eval/exact_match"] == manifest.metrics["eval/exact_match"]
    assert reloaded["eval/loss"] == pytest.approx(manifest.metrics["eval/loss"], rel=1e-4)


def test_qlora_without_gpu_fails_at_once(
    s3_server: S3Server, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    contract = make_contract(s3_server, s3_bucket, "q", peft={"method": "qlora", "bits": 4})
    code, result = run_in_process(contract, monkeypatch, s3_server, tmp_path)
    assert code == EXIT_UNSUPPORTED
    assert result.error is not None
    assert "qlora" in result.error
    assert "CUDA" in result.error
    assert result.manifest_uri is None
    keys = storage_for(s3_server, monkeypatch).list_keys(f"s3://{s3_bucket}/runs/run/q/")
    assert "manifest.json" not in keys
    assert not any(k.startswith("checkpoints/") for k in keys)


def test_progress_is_written_at_every_tenth_of_the_run(
    s3_server: S3Server, s3_bucket: str, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The progress contract on SFTTrainer: a write at each 10% mark even with a long interval
    (the demo's SFT used to show 0.0% for its whole run)."""
    from temper.api.contract import StageProgress
    from temper_trainer.progress import progress_uri
    from temper_trainer.stage import StageContext
    from temper_trainer.stages import get_stage

    contract = make_contract(
        s3_server, s3_bucket, "progress", hyperparameters={"maxSteps": 20}, progressIntervalSeconds=3600
    )
    storage = storage_for(s3_server, monkeypatch)
    ctx = StageContext(contract, tmp_path / "work", storage)
    seen: list[tuple[str, float]] = []
    flush = ctx.progress.flush

    def recording_flush() -> None:
        flush()
        written = StageProgress.model_validate_json(storage.get_bytes(progress_uri(contract)))
        seen.append((written.phase, written.percent))

    ctx.progress.flush = recording_flush  # type: ignore[method-assign]
    get_stage("sft")(ctx)
    training = [percent for phase, percent in seen if phase == "training" and percent > 0]
    assert [p for p in training if p % 10 == 0] == [10.0 * k for k in range(1, 11)], seen
