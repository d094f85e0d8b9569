"""Invalid manifests, table-driven, shared by the unit tests (pydantic) and the cluster tests
(the real apiserver): each must be rejected by both, each time with a message naming the field.

A case is a mutation of one of two valid base manifests (which exercise every stage type and the
continual block), so every case differs from a valid object in exactly the way it describes.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from pydantic import ValidationError
from temper.api import error_messages, parse_manifest

Manifest = dict[str, Any]

BASE_RUN: Manifest = {
    "apiVersion": "temper.dev/v1alpha1",
    "kind": "PostTrainingRun",
    "metadata": {"name": "case"},
    "spec": {
        "baseModel": {"uri": "builtin://tiny"},
        "storage": {"uri": "s3://temper/runs/case/", "secretRef": {"name": "temper-s3"}},
        "datasets": [
            {"name": "train", "uri": "builtin://arith?n=10", "format": "prompt-completion", "task": "arith"},
            {"name": "prefs", "uri": "builtin://arith?n=10", "format": "preference"},
            {"name": "prompts", "uri": "builtin://arith?n=10", "format": "prompt"},
            {"name": "heldout", "uri": "builtin://arith?n=10&split=eval", "format": "prompt-completion"},
        ],
        "stages": [
            {
                "name": "sft",
                "type": "sft",
                "peft": {"method": "lora", "r": 8},
                "data": {
                    "train": ["train"],
                    "eval": ["heldout"],
                    "replay": {"ratio": 0.1, "datasets": ["heldout"]},
                },
                "resources": {"cpu": "1", "memory": "2Gi"},
            },
            {"name": "dpo", "type": "dpo", "from": "sft", "data": {"train": ["prefs"]}},
            {"name": "rm", "type": "reward-model", "data": {"train": ["prefs"]}},
            {
                "name": "grpo",
                "type": "grpo",
                "from": "dpo",
                "data": {"train": ["prompts"]},
                "rewards": [{"type": "reward-model", "stage": "rm"}, {"type": "exact-match"}],
            },
            {
                "name": "regress",
                "type": "eval",
                "from": "grpo",
                "suites": [
                    {"name": "old", "dataset": "heldout", "metric": "exact_match", "maxRegression": 0.01},
                    {"name": "taste", "dataset": "prompts", "metric": "judge", "judge": {"stage": "rm"}},
                ],
            },
            {
                "name": "merged",
                "type": "merge",
                "merge": {"method": "ties", "density": 0.5, "sources": [{"stage": "sft"}, {"stage": "grpo"}]},
            },
        ],
        "continual": {
            "schedule": "0 3 * * 0",
            "newData": {"dataset": "train", "uriTemplate": "s3://temper/data/{cycle_date:%Y-%m}.jsonl"},
            "replay": {"ratio": 0.2, "buffer": {"uri": "s3://temper/replay/case/"}},
            "gates": [{"suite": "old", "metric": "exact_match", "maxRegression": 0.01}],
            "promote": {"alias": "stable"},
        },
    },
}

BASE_ADAPTER: Manifest = {
    "apiVersion": "temper.dev/v1alpha1",
    "kind": "Adapter",
    "metadata": {"name": "case"},
    "spec": {
        "baseModel": {"uri": "builtin://tiny"},
        "artifact": {"uri": "s3://temper/adapters/case/manifest.json", "secretRef": {"name": "temper-s3"}},
        "method": "lora",
        "task": "arith",
        "merge": {"method": "ties", "density": 0.5, "sources": [{"name": "a", "weight": 0.6}, {"name": "b"}]},
    },
}


@dataclass(frozen=True)
class Case:
    id: str
    kind: str
    mutate: Callable[[Manifest], None]
    mentions: tuple[str, ...]  # each must appear in the pydantic AND the apiserver message

    def manifest(self, name: str | None = None) -> Manifest:
        obj = copy.deepcopy(BASE_RUN if self.kind == "PostTrainingRun" else BASE_ADAPTER)
        self.mutate(obj["spec"])
        obj["metadata"]["name"] = name or self.id
        return obj


def _set(path: str, value: Any) -> Callable[[Manifest], None]:
    """Set a dotted path (integers index lists) in the spec; the value None deletes it."""

    def mutate(spec: Manifest) -> None:
        parts: list[Any] = [int(p) if p.isdigit() else p for p in path.split(".")]
        target: Any = spec
        for part in parts[:-1]:
            target = target[part]
        if value is None:
            del target[parts[-1]]
        else:
            target[parts[-1]] = copy.deepcopy(value)

    return mutate


def _run(id: str, path: str, value: Any, *mentions: str) -> Case:
    return Case(id, "PostTrainingRun", _set(path, value), mentions)


def _adapter(id: str, path: str, value: Any, *mentions: str) -> Case:
    return Case(id, "Adapter", _set(path, value), mentions)


def _synthetic_preferences_with(hyperparameters: Manifest) -> Callable[[Manifest], None]:
    """Stage 3 (grpo: prompts, rewards, from dpo) turned into a synthetic-preferences stage."""

    def mutate(spec: Manifest) -> None:
        spec["stages"][3]["type"] = "synthetic-preferences"
        spec["stages"][3]["hyperparameters"] = dict(hyperparameters)

    return mutate


def _append_dataset(spec: Manifest) -> None:
    spec["datasets"].append(copy.deepcopy(spec["datasets"][0]))


INVALID_CASES: list[Case] = [
    # PEFT
    _run("qlora-without-bits", "stages.0.peft", {"method": "qlora"}, "stages[0].peft", "bits"),
    _run("bits-without-qlora", "stages.0.peft", {"method": "lora", "bits": 4}, "stages[0].peft", "bits"),
    _run("qlora-bits-3", "stages.0.peft", {"method": "qlora", "bits": 3}, "stages[0].peft.bits"),
    _run(
        "init-r-without-adalora", "stages.0.peft", {"method": "lora", "initR": 12}, "stages[0].peft", "initR"
    ),
    _run("peft-unknown-method", "stages.0.peft.method", "loha", "stages[0].peft.method"),
    _run("peft-dropout-one", "stages.0.peft.dropout", 1.0, "stages[0].peft.dropout"),
    # stage graph
    _run("from-later-stage", "stages.0.from", "dpo", "stages", "from", "earlier stage"),
    _run("from-unknown-stage", "stages.1.from", "nope", "stages", "from", "earlier stage"),
    _run("from-itself", "stages.1.from", "dpo", "stages", "from", "earlier stage"),
    _run("duplicate-stage-name", "stages.1.name", "sft", "stages[1]"),
    _run("stage-name-uppercase", "stages.0.name", "SFT", "stages[0].name"),
    _run("stage-name-too-long", "stages.0.name", "s" * 33, "stages[0].name"),
    _run("unknown-stage-type", "stages.0.type", "ppo", "stages[0].type"),
    _run("no-stages", "stages", [], "spec.stages"),
    # data
    _run("sft-without-train-data", "stages.0.data", {"eval": ["heldout"]}, "stages[0]", "data.train"),
    _run("undeclared-train-dataset", "stages.0.data.train", ["nope"], "stages", "declared in spec.datasets"),
    _run("undeclared-eval-dataset", "stages.0.data.eval", ["nope"], "stages", "declared in spec.datasets"),
    _run(
        "undeclared-replay-dataset",
        "stages.0.data.replay.datasets",
        ["nope"],
        "stages",
        "declared in spec.datasets",
    ),
    _run("dpo-on-prompt-completion", "stages.1.data.train", ["train"], "stages", "preference"),
    _run("reward-model-on-prompts", "stages.2.data.train", ["prompts"], "stages", "preference"),
    _run("replay-ratio-above-one", "stages.0.data.replay.ratio", 1.5, "stages[0].data.replay.ratio"),
    _run("replay-ratio-negative", "stages.0.data.replay.ratio", -0.1, "stages[0].data.replay.ratio"),
    _run("replay-without-datasets", "stages.0.data.replay.datasets", [], "stages[0].data.replay", "datasets"),
    _run(
        "curriculum-score-without-field",
        "stages.0.data.curriculum",
        {"orderBy": "score"},
        "curriculum",
        "scoreField",
    ),
    Case("duplicate-dataset-name", "PostTrainingRun", _append_dataset, ("datasets[4]",)),
    _run("dataset-bad-format", "datasets.0.format", "jsonl", "datasets[0].format"),
    _run("dataset-bad-uri", "datasets.0.uri", "ftp://data/x.jsonl", "datasets[0].uri"),
    # rewards, suites, merge
    _run("grpo-without-rewards", "stages.3.rewards", [], "stages[3]", "rewards"),
    _run("rewards-on-sft", "stages.0.rewards", [{"type": "exact-match"}], "stages[0]", "rewards"),
    _run(
        "regex-reward-without-pattern",
        "stages.3.rewards.1",
        {"type": "regex"},
        "stages[3].rewards[1]",
        "pattern",
    ),
    _run(
        "length-reward-without-target",
        "stages.3.rewards.1",
        {"type": "length"},
        "stages[3].rewards[1]",
        "targetLength",
    ),
    _run(
        "reward-model-reward-unnamed",
        "stages.3.rewards.0",
        {"type": "reward-model"},
        "stages[3].rewards[0]",
        "stage",
    ),
    _run("reward-stage-not-reward-model", "stages.3.rewards.0.stage", "sft", "rewards", "reward-model stage"),
    _run("eval-without-suites", "stages.4.suites", [], "stages[4]", "suites"),
    _run(
        "suites-on-sft",
        "stages.0.suites",
        [{"name": "x", "dataset": "heldout", "metric": "loss"}],
        "stages[0]",
        "suites",
    ),
    _run("suite-undeclared-dataset", "stages.4.suites.0.dataset", "nope", "suites", "dataset"),
    _run("suite-bad-metric", "stages.4.suites.0.metric", "bleu", "stages[4].suites[0].metric"),
    _run("judge-suite-without-judge", "stages.4.suites.1.judge", None, "stages[4].suites[1]", "judge"),
    _run(
        "judge-on-exact-match",
        "stages.4.suites.0.judge",
        {"adapter": "rm-v1"},
        "stages[4].suites[0]",
        "judge",
    ),
    _run(
        "judge-both-stage-and-adapter",
        "stages.4.suites.1.judge",
        {"stage": "rm", "adapter": "rm-v1"},
        "stages[4].suites[1].judge",
        "stage",
    ),
    _run(
        "judge-neither-stage-nor-adapter", "stages.4.suites.1.judge", {}, "stages[4].suites[1].judge", "stage"
    ),
    _run(
        "judge-stage-not-reward-model",
        "stages.4.suites.1.judge.stage",
        "dpo",
        "judge.stage",
        "reward-model stage",
    ),
    _run(
        "judge-stage-later", "stages.4.suites.1.judge.stage", "merged", "judge.stage", "earlier reward-model"
    ),
    _run("merge-one-source", "stages.5.merge.sources", [{"stage": "sft"}], "stages[5].merge.sources"),
    _run("merge-stage-without-merge", "stages.5.merge", None, "stages[5]", "merge"),
    _run(
        "merge-on-sft", "stages.0.merge", {"sources": [{"stage": "a"}, {"stage": "b"}]}, "stages[0]", "merge"
    ),
    _run(
        "merge-source-later-stage",
        "stages.5.merge.sources.1.stage",
        "merged",
        "merge.sources",
        "earlier stage",
    ),
    _run(
        "merge-source-both",
        "stages.5.merge.sources.0",
        {"stage": "sft", "adapter": "x"},
        "merge.sources[0]",
        "stage",
    ),
    _run("merge-density-with-linear", "stages.5.merge.method", "linear", "stages[5].merge", "density"),
    # hyperparameters a stage type would ignore (STAGE_HYPERPARAMETERS), TRL's typed knobs
    Case(
        "synthetic-preferences-num-iterations-and-beta",
        "PostTrainingRun",
        _synthetic_preferences_with({"numIterations": 2, "beta": 0.1}),
        ("stages[3]", "hyperparameters.numIterations", "synthetic-preferences"),
    ),
    Case(
        "synthetic-preferences-packing",
        "PostTrainingRun",
        _synthetic_preferences_with({"maxSteps": 30, "packing": True}),
        ("stages[3]", "hyperparameters.packing", "only sft stages use it"),
    ),
    _run(
        "beta-on-reward-model", "stages.2.hyperparameters", {"beta": 0.1}, "stages[2]", "hyperparameters.beta"
    ),
    _run(
        "packing-on-dpo",
        "stages.1.hyperparameters",
        {"packing": True},
        "stages[1]",
        "hyperparameters.packing",
    ),
    _run(
        "max-steps-on-eval",
        "stages.4.hyperparameters",
        {"maxSteps": 5},
        "stages[4]",
        "hyperparameters.maxSteps",
    ),
    _run(
        "learning-rate-on-merge",
        "stages.5.hyperparameters",
        {"learningRate": 1e-3},
        "stages[5]",
        "hyperparameters.learningRate",
    ),
    _run(
        "num-iterations-on-sft",
        "stages.0.hyperparameters",
        {"numIterations": 2},
        "stages[0]",
        "hyperparameters.numIterations",
    ),
    _run("loss-type-on-sft", "stages.0.hyperparameters", {"lossType": "sigmoid"}, "stages[0]", "lossType"),
    _run("grpo-loss-type-on-dpo", "stages.1.hyperparameters", {"lossType": "dapo"}, "stages[1]", "lossType"),
    _run("dpo-loss-type-on-grpo", "stages.3.hyperparameters", {"lossType": "ipo"}, "stages[3]", "lossType"),
    _run("loss-type-unknown", "stages.1.hyperparameters", {"lossType": "kto"}, "hyperparameters.lossType"),
    _run("precision-unknown", "stages.0.hyperparameters", {"precision": "fp8"}, "hyperparameters.precision"),
    _run(
        "attn-implementation-unknown",
        "stages.0.hyperparameters",
        {"attnImplementation": "flash"},
        "hyperparameters.attnImplementation",
    ),
    _run(
        "num-iterations-zero",
        "stages.3.hyperparameters",
        {"numIterations": 0},
        "hyperparameters.numIterations",
    ),
    # resources and operations
    _run("memory-not-a-quantity", "stages.0.resources.memory", "lots", "stages[0].resources", "memory"),
    _run("gpus-negative", "stages.0.resources.gpus", -1, "stages[0].resources.gpus"),
    _run("max-retries-too-many", "stages.0.retries", {"maxRetries": 50}, "stages[0].retries.maxRetries"),
    _run(
        "learning-rate-zero", "stages.0.hyperparameters", {"learningRate": 0}, "hyperparameters.learningRate"
    ),
    _run("pull-policy-bad", "trainer", {"imagePullPolicy": "Sometimes"}, "trainer.imagePullPolicy"),
    _run("queue-name-invalid", "queueName", "Team A", "spec.queueName"),
    _run("unknown-spec-field", "stage", [], "spec.stage"),
    # storage and model
    _run("storage-not-s3", "storage.uri", "gs://bucket/x/", "spec.storage.uri"),
    _run("base-model-bad-scheme", "baseModel.uri", "ftp://models/x", "spec.baseModel.uri"),
    _run("base-model-hf-no-org", "baseModel.uri", "hf://gpt2", "spec.baseModel.uri"),
    _run("base-model-hf-dataset", "baseModel.uri", "hf://datasets/data", "spec.baseModel", "datasets"),
    _run("base-model-pvc-dotdot", "baseModel.uri", "pvc://weights/../x", "spec.baseModel", "'..'"),
    _run("dataset-hf-not-datasets", "datasets.0.uri", "hf://org/name", "spec.datasets[0].uri"),
    _run("model-cache-ephemeral-no-size", "trainer", {"modelCache": {"type": "ephemeral"}}, "size"),
    _run("model-cache-pvc-no-claim", "trainer", {"modelCache": {"type": "pvc"}}, "claimName"),
    _run("secret-name-invalid", "storage.secretRef.name", "Bad_Name", "spec.storage.secretRef.name"),
    _run("endpoint-without-scheme", "storage.endpointUrl", "minio:9000", "spec.storage.endpointUrl"),
    # continual
    _run("schedule-not-cron", "continual.schedule", "every sunday", "spec.continual.schedule"),
    _run(
        "concurrency-policy-bad", "continual.concurrencyPolicy", "Queue", "spec.continual.concurrencyPolicy"
    ),
    _run(
        "new-data-template-and-prefix",
        "continual.newData.prefix",
        "s3://temper/data/",
        "continual.newData",
        "uriTemplate",
    ),
    _run("new-data-undeclared-dataset", "continual.newData.dataset", "nope", "continual.newData.dataset"),
    _run("continual-replay-ratio-one", "continual.replay.ratio", 1.0, "spec.continual.replay.ratio"),
    _run("continual-replay-without-buffer", "continual.replay.buffer", None, "continual.replay", "buffer"),
    _run("gate-unknown-suite", "continual.gates.0.suite", "nope", "continual.gates", "suite"),
    _run("history-limit-zero", "continual.historyLimit", 0, "spec.continual.historyLimit"),
    # Adapter
    _adapter("adapter-merge-one-source", "merge.sources", [{"name": "a"}], "spec.merge.sources"),
    _adapter("adapter-merge-duplicate-source", "merge.sources.1.name", "a", "merge.sources[1]"),
    _adapter("adapter-density-with-cat", "merge.method", "cat", "spec.merge", "density"),
    _adapter("adapter-artifact-not-manifest", "artifact.uri", "s3://temper/adapters/x/", "spec.artifact.uri"),
    _adapter("adapter-bad-method", "method", "loha", "spec.method"),
    _adapter("adapter-bad-lifecycle", "lifecycle", "deprecated", "spec.lifecycle"),
    _adapter("adapter-bad-retention", "retention", {"onRetire": "archive"}, "spec.retention.onRetire"),
    _adapter("adapter-missing-artifact", "artifact", None, "spec.artifact"),
    _adapter("adapter-too-many-tags", "tags", [f"t{i}" for i in range(33)], "spec.tags"),
]

VALID_UPDATES: list[tuple[str, str, Callable[[Manifest], None]]] = [
    ("PostTrainingRun", "suspend", _set("suspend", True)),
    ("PostTrainingRun", "continual-schedule", _set("continual.schedule", "@daily")),
    ("PostTrainingRun", "queue-name", _set("queueName", "gpu-team-b")),
    ("Adapter", "retire", _set("lifecycle", "retired")),
    ("Adapter", "tags", _set("tags", ["en"])),
]

# (kind, id, mutation of the stored spec, message naming the field)
IMMUTABLE_UPDATES: list[tuple[str, str, Callable[[Manifest], None], str]] = [
    ("PostTrainingRun", "base-model", _set("baseModel.uri", "s3://temper/models/other/"), "spec.baseModel"),
    ("PostTrainingRun", "storage", _set("storage.uri", "s3://temper/runs/other/"), "spec.storage"),
    ("PostTrainingRun", "stages", _set("stages.0.hyperparameters", {"learningRate": 0.5}), "spec.stages"),
    (
        "Adapter",
        "artifact",
        _set("artifact.uri", "s3://temper/adapters/other/manifest.json"),
        "spec.artifact",
    ),
    ("Adapter", "method", _set("method", "adalora"), "spec.method"),
    ("Adapter", "merge-removed", _set("merge", None), "spec.merge"),
    ("Adapter", "base-model", _set("baseModel.uri", "builtin://other"), "spec.baseModel"),
]


def pydantic_errors(manifest: Manifest) -> list[str]:
    """The pydantic error lines for a manifest; empty when it is valid."""
    try:
        parse_manifest(manifest)
    except ValidationError as exc:
        return error_messages(exc)
    return []


# -- unit tests --------------------------------------------------------------------------------


@pytest.mark.unit
def test_base_manifests_are_valid() -> None:
    assert pydantic_errors(BASE_RUN) == []
    assert pydantic_errors(BASE_ADAPTER) == []


@pytest.mark.unit
def test_table_is_large_and_distinct() -> None:
    assert len(INVALID_CASES) >= 30
    assert len({c.id for c in INVALID_CASES}) == len(INVALID_CASES)
    manifests = [c.manifest("x") for c in INVALID_CASES]
    assert all(
        m["spec"] != (BASE_RUN if m["kind"] == "PostTrainingRun" else BASE_ADAPTER)["spec"] for m in manifests
    )


@pytest.mark.unit
@pytest.mark.parametrize("case", INVALID_CASES, ids=lambda c: c.id)
def test_pydantic_rejects_naming_the_field(case: Case) -> None:
    errors = pydantic_errors(case.manifest())
    assert errors, f"{case.id}: pydantic accepted it"
    text = "\n".join(errors)
    for mention in case.mentions:
        assert mention in text, f"{case.id}: {mention!r} not in {text!r}"
