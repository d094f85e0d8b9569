"""merge: PEFT weighted merges (linear, TIES, DARE-TIES, cat) of two or more LoRA adapters.

Every source (``mergeSources``: manifest URI + weight) is downloaded and verified through its
manifest, must be a LoRA adapter (``lora``/``qlora``) and must have been trained on this stage's
``baseModel``; otherwise the stage fails with ``InvalidInput`` (exit 11, not retried). The merge is
``PeftModel.add_weighted_adapter``; linear, ties and dare_ties need equal ranks, cat concatenates
ranks (exact: the merged delta is the weighted sum of the sources' deltas). ``merge.density``
(default 0.5) is the share of each task vector ties/dare_ties keep; DARE's random drop is seeded.

The output is a single adapter in the PEFT layout, loadable with ``PeftModel.from_pretrained``.
Metrics: the eval stage's metrics for ``data.eval``/``suites`` (if any) plus ``merge/sources``
and ``merge/rank``.
"""

from __future__ import annotations

import json
from pathlib import Path

from temper.api.contract import MergeSpec

from temper_trainer.peft_setup import adapter_method, servable_flags
from temper_trainer.stage import InvalidInput, StageContext, StageOutcome
from temper_trainer.stages import register_stage

DEFAULT_DENSITY = 0.5
MERGEABLE = ("lora", "qlora")
EQUAL_RANK_METHODS = ("linear", "ties", "dare_ties")
MERGED = "default"  # saved at the artifact root, where PeftModel.from_pretrained looks


def _source_rank(folder: Path) -> int:
    config = json.loads((folder / "adapter_config.json").read_text())
    ranks = [int(config["r"]), *(int(r) for r in (config.get("rank_pattern") or {}).values())]
    return max(ranks)


def check_sources(ctx: StageContext, folders: list[Path], method: str) -> list[int]:
    """Validate the downloaded sources; returns their ranks."""
    contract = ctx.contract
    ranks = []
    for i, (ref, folder) in enumerate(zip(contract.merge_sources, folders, strict=True)):
        where = f"mergeSources[{i}] ({ref.name or ref.manifest_uri})"
        manifest = json.loads((folder / "manifest.json").read_text())
        if manifest.get("baseModel") != contract.base_model:
            raise InvalidInput(
                f"{where}: trained on baseModel {manifest.get('baseModel')!r}, not {contract.base_model!r}; "
                "all merge sources must share the stage's base model"
            )
        kind = adapter_method(folder)
        if kind not in MERGEABLE:
            raise InvalidInput(
                f"{where}: a {kind!r} artifact cannot be merged; weighted merges need LoRA adapters"
            )
        ranks.append(_source_rank(folder))
    if method in EQUAL_RANK_METHODS and len(set(ranks)) > 1:
        raise InvalidInput(
            f"merge.method {method!r} needs equal LoRA ranks, got r={ranks}; use method 'cat' or retrain"
        )
    return ranks


@register_stage("merge")
def run(ctx: StageContext) -> StageOutcome:
    import torch
    from peft import PeftModel

    contract = ctx.contract
    spec = contract.merge or MergeSpec()
    sources = contract.merge_sources
    if len(sources) < 2:
        raise InvalidInput(f"mergeSources: a merge needs at least two source adapters, got {len(sources)}")
    folders = [ctx.fetch_adapter(ref) for ref in sources]
    ranks = check_sources(ctx, folders, spec.method)
    density = spec.density if spec.density is not None else DEFAULT_DENSITY

    model, tokenizer = ctx.load_base_model()
    names = [f"source-{i}" for i in range(len(sources))]
    model = PeftModel.from_pretrained(model, str(folders[0]), adapter_name=names[0])
    for name, folder in zip(names[1:], folders[1:], strict=True):
        model.load_adapter(str(folder), adapter_name=name)
    torch.manual_seed(ctx.seed)  # DARE drops at random: the same seed gives the same merge
    try:
        model.add_weighted_adapter(
            adapters=names,
            weights=[ref.weight for ref in sources],
            adapter_name=MERGED,
            combination_type=spec.method,
            density=density if spec.method in ("ties", "dare_ties") else None,
        )
    except ValueError as exc:  # PEFT's own compatibility checks (target modules, modules_to_save)
        raise InvalidInput(f"mergeSources: PEFT cannot merge these adapters: {exc}") from exc
    model.set_adapter(MERGED)
    for name in names:
        model.delete_adapter(name)
    model.eval()

    from temper_trainer.stages.eval import evaluate_model

    metrics: dict[str, float] = {}
    if contract.data.eval or contract.suites:
        ctx.set_phase("evaluating")
        metrics = evaluate_model(ctx, model, tokenizer)
    merged_rank = int(getattr(model.peft_config[MERGED], "r", 0))
    metrics.update({"merge/sources": float(len(sources)), "merge/rank": float(merged_rank)})
    ctx.save_model(model, tokenizer)
    return StageOutcome(
        artifact_dir=ctx.artifact_dir,
        metrics=metrics,
        method="lora",
        servable=servable_flags("lora"),
        lineage={
            "merge": {
                "method": spec.method,
                "density": density if spec.method in ("ties", "dare_ties") else None,
                "sources": [
                    {"name": ref.name, "manifestUri": ref.manifest_uri, "weight": ref.weight, "rank": rank}
                    for ref, rank in zip(sources, ranks, strict=True)
                ],
            }
        },
    )
