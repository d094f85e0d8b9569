"""Render a stage's :class:`StageContract` from its run: field-for-field, names resolved."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from temper.api import contract as c
from temper.api.run import PostTrainingRun, Stage
from temper.builders.names import output_prefix
from temper.config import OperatorConfig

# A continual cycle's child run names the currently promoted adapter here; its first training
# stage continues from it rather than from the bare base model.
PARENT_ADAPTER_ANNOTATION = "temper.dev/parent-adapter"
CONTINUABLE_STAGE_TYPES = ("sft", "dpo", "grpo")


def continued_stage(run: PostTrainingRun) -> str | None:
    """The stage that inherits the parent-adapter annotation, if the run carries one."""
    if not (run.metadata.get("annotations") or {}).get(PARENT_ADAPTER_ANNOTATION):
        return None
    first = next((s for s in run.spec.stages if s.type in CONTINUABLE_STAGE_TYPES), None)
    return first.name if first is not None and first.from_ is None else None


class UnresolvedReference(ValueError):
    """A stage names an adapter that is not (yet) available; the message names the field."""


def storage_config(run: PostTrainingRun, config: OperatorConfig) -> c.StorageConfig:
    storage = run.spec.storage.to_config()
    if storage.endpoint_url is None and config.default_storage_endpoint:
        storage = storage.model_copy(update={"endpoint_url": config.default_storage_endpoint})
    return storage


def stage_contract(
    run: PostTrainingRun,
    stage: Stage,
    *,
    cycle: int,
    attempt: int,
    config: OperatorConfig,
    stage_outputs: Mapping[str, c.AdapterRef] | None = None,
    adapters: Mapping[str, c.AdapterRef] | None = None,
) -> c.StageContract:
    """``stage_outputs``: earlier stages' published adapters by stage name; ``adapters``: Adapter
    objects named by the stage (reward models, judges, merge sources). A missing one raises
    :class:`UnresolvedReference` naming the field."""
    spec = run.spec
    index = next(i for i, s in enumerate(spec.stages) if s.name == stage.name)
    where = f"spec.stages[{index}]"
    outputs = stage_outputs or {}
    named = adapters or {}

    def resolve(field: str, stage_ref: str | None, adapter_ref: str | None) -> c.AdapterRef:
        if stage_ref is not None:
            if stage_ref not in outputs:
                raise UnresolvedReference(f"{where}.{field}: stage {stage_ref!r} has no published adapter")
            return outputs[stage_ref]
        if adapter_ref is None or adapter_ref not in named:
            raise UnresolvedReference(f"{where}.{field}: Adapter {adapter_ref!r} not found or not Ready")
        return named[adapter_ref]

    parent = resolve("from", stage.from_, None) if stage.from_ else None
    if parent is None and stage.name == continued_stage(run):
        annotation = (run.metadata.get("annotations") or {}).get(PARENT_ADAPTER_ANNOTATION)
        parent = resolve(f"metadata.annotations[{PARENT_ADAPTER_ANNOTATION}]", None, annotation)
    baseline = _eval_baseline(run, stage, resolve) if stage.type == "eval" and parent is not None else None
    rewards = []
    for i, r in enumerate(stage.rewards):
        model = resolve(f"rewards[{i}]", r.stage, r.adapter) if r.type == "reward-model" else None
        rewards.append(
            c.RewardSpec(
                type=r.type, weight=r.weight, pattern=r.pattern, target_length=r.target_length, model=model
            )
        )
    merge_sources = [
        resolve(f"merge.sources[{i}]", m.stage, m.adapter).model_copy(update={"weight": m.weight})
        for i, m in enumerate(stage.merge.sources if stage.merge else [])
    ]
    meta = run.metadata
    data = stage.data
    replay = data.replay if data else None
    stage_data = c.StageData(
        train=[spec.dataset(n) for n in (data.train if data else [])],
        eval=[spec.dataset(n) for n in (data.eval if data else [])],
        curriculum=c.CurriculumSpec.model_validate(data.curriculum.model_dump())
        if data and data.curriculum
        else c.CurriculumSpec(),
        replay=c.ReplaySpec(
            ratio=replay.ratio,
            datasets=[spec.dataset(n) for n in replay.datasets],
            sampling=replay.sampling,
            max_examples=replay.max_examples,
            seed=replay.seed,
        )
        if replay
        else c.ReplaySpec(),
    )
    return c.StageContract(
        run=c.RunRef(
            namespace=meta.get("namespace", ""), name=meta["name"], uid=meta.get("uid", ""), cycle=cycle
        ),
        stage=c.StageRef(name=stage.name, type=stage.type, attempt=attempt),
        base_model=spec.base_model.uri,
        storage=storage_config(run, config),
        output=c.OutputSpec(prefix=output_prefix(spec.storage.uri, stage.name, cycle)),
        parent=parent,
        baseline=baseline,
        peft=c.PeftSpec.model_validate(stage.peft.model_dump()) if stage.peft else c.PeftSpec(),
        data=stage_data,
        hyperparameters=c.Hyperparameters.model_validate(stage.hyperparameters.model_dump(exclude_none=True))
        if stage.hyperparameters
        else c.Hyperparameters(),
        rewards=rewards,
        suites=[
            c.EvalSuite(
                name=s.name,
                dataset=spec.dataset(s.dataset),
                metric=s.metric,
                max_regression=s.max_regression,
                judge=resolve(f"suites[{j}].judge", s.judge.stage, s.judge.adapter) if s.judge else None,
            )
            for j, s in enumerate(stage.suites)
        ],
        merge=c.MergeSpec(method=stage.merge.method, density=stage.merge.density) if stage.merge else None,
        merge_sources=merge_sources,
        checkpoint=c.CheckpointPolicy.model_validate(stage.checkpoint.model_dump())
        if stage.checkpoint
        else c.CheckpointPolicy(),
        resources=c.ResourcesSpec(gpus_per_node=res.gpus, nodes=res.nodes, strategy=res.strategy)
        if (res := stage.resources)
        else c.ResourcesSpec(),
        seed=stage.seed,
        progress_interval_seconds=config.trainer_progress_interval_seconds,
        metrics_port=config.trainer_metrics_port,
        metrics_final_scrape_seconds=config.trainer_metrics_final_scrape_seconds or None,
    )


def _eval_baseline(
    run: PostTrainingRun, stage: Stage, resolve: Callable[[str, str | None, str | None], c.AdapterRef]
) -> c.AdapterRef | None:
    """The evaluated stage's own parent: what an eval stage's regression gates compare against.

    None means the base model (the evaluated stage started from it, or is a merge)."""
    evaluated = next((s for s in run.spec.stages if s.name == stage.from_), None)
    if evaluated is None:
        return None
    if evaluated.from_:
        return resolve("from", evaluated.from_, None)
    if evaluated.name == continued_stage(run):
        annotation = (run.metadata.get("annotations") or {}).get(PARENT_ADAPTER_ANNOTATION)
        return resolve(f"metadata.annotations[{PARENT_ADAPTER_ANNOTATION}]", None, annotation)
    return None


def spec_hash(contract: c.StageContract) -> str:
    """Hash of what an attempt runs, attempt number excluded: detects spec drift under a running Job."""
    return contract.contract_hash()[:16]
