"""The API models, their generated artifacts, and the examples, without a cluster."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from temper.api import (
    Adapter,
    PostTrainingRun,
    PostTrainingRunSpec,
    Stage,
    check_update,
    contract,
    crdgen,
    parse_manifest,
)

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))


def _load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(path.read_text())
    return data


@pytest.mark.unit
def test_generated_files_are_fresh() -> None:
    stale = crdgen.stale(REPO)
    assert stale == [], f"stale generated files {stale}: run python -m temper.api.crdgen"


@pytest.mark.unit
def test_stale_detection_notices_an_edit(tmp_path: Path) -> None:
    assert sorted(crdgen.stale(tmp_path)) == sorted(crdgen.outputs())  # nothing generated there yet
    assert crdgen.main(["--root", str(tmp_path)]) == 0
    assert crdgen.main(["--root", str(tmp_path), "--check"]) == 0
    chart_copy = tmp_path / "charts/temper/crds/temper.dev_adapters.yaml"
    chart_copy.write_text(chart_copy.read_text().replace("adp", "ad"))
    assert crdgen.stale(tmp_path) == ["charts/temper/crds/temper.dev_adapters.yaml"]
    assert crdgen.main(["--root", str(tmp_path), "--check"]) == 1


def _walk(schema: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found = [(path, schema)]
    for name, sub in schema.get("properties", {}).items():
        found += _walk(sub, f"{path}.{name}")
    if "items" in schema:
        found += _walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        found += _walk(schema["additionalProperties"], f"{path}{{}}")
    return found


@pytest.mark.unit
@pytest.mark.parametrize("name", sorted(crdgen.crds()))
def test_crd_schema_is_structural_and_bounded(name: str) -> None:
    crd = crdgen.crds()[name]
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    assert crd["spec"]["names"]["categories"] == ["temper"]
    root = version["schema"]["openAPIV3Schema"]
    assert "$ref" not in yaml.safe_dump(root)
    assert "$defs" not in yaml.safe_dump(root)
    for path, node in _walk(root):
        if not path.startswith((".spec", ".status")):
            continue  # apiVersion, kind, metadata: the apiserver's own
        free_form = node.get("x-kubernetes-preserve-unknown-fields") or node.get("x-kubernetes-int-or-string")
        assert "type" in node or free_form, f"{path}: untyped"
        if node.get("type") == "array":
            assert "maxItems" in node, f"{path}: unbounded list"
        if node.get("type") == "string" and "enum" not in node:
            assert "maxLength" in node, f"{path}: unbounded string"
        if path.startswith(".spec") and node.get("type") == "object" and not free_form:
            assert "properties" in node or "additionalProperties" in node, f"{path}: untyped object"
        if node.get("x-kubernetes-list-type") == "map":
            keys = node["x-kubernetes-list-map-keys"]
            assert set(keys) <= set(node["items"].get("required", [])), f"{path}: map keys must be required"
        assert path.count(".") < 2 or "description" in node or path.endswith("[]") or path.endswith("}"), (
            f"{path}: no description"
        )


@pytest.mark.unit
def test_cel_rules_are_attached_where_documented() -> None:
    run = crdgen.crds()["temper.dev_posttrainingruns.yaml"]["spec"]["versions"][0]["schema"][
        "openAPIV3Schema"
    ]
    spec = run["properties"]["spec"]
    rules = {r["rule"] for r in spec["properties"]["stages"]["x-kubernetes-validations"]}
    assert "self == oldSelf" in rules
    peft = spec["properties"]["stages"]["items"]["properties"]["peft"]
    assert any("qlora" in r["rule"] for r in peft["x-kubernetes-validations"])
    assert "self == oldSelf" in {
        r["rule"] for r in spec["properties"]["baseModel"]["x-kubernetes-validations"]
    }
    assert "x-kubernetes-validations" not in spec["properties"]["suspend"]  # mutable
    adapter = crdgen.crds()["temper.dev_adapters.yaml"]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    lifecycle = adapter["properties"]["spec"]["properties"]["lifecycle"]
    assert "oldSelf" in lifecycle["x-kubernetes-validations"][0]["rule"]


@pytest.mark.unit
def test_docs_reference_every_spec_field() -> None:
    docs = crdgen.render_docs()
    for path, node in _walk(crdgen.model_schema(PostTrainingRunSpec)):
        if path and "properties" in node:
            assert f"`PostTrainingRun.spec{path}`" in docs, path
    assert "status.aliases" in docs  # the documented promotion decision


@pytest.mark.unit
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_parses(path: Path) -> None:
    obj = parse_manifest(_load(path))
    assert obj.metadata["name"] == path.stem or obj.kind == "Adapter" or path.stem == "continual-replay-gates"


@pytest.mark.unit
def test_examples_cover_every_technique() -> None:
    runs = [o for o in map(parse_manifest, map(_load, EXAMPLES)) if isinstance(o, PostTrainingRun)]
    adapters = [o for o in map(parse_manifest, map(_load, EXAMPLES)) if isinstance(o, Adapter)]
    stages = [s for r in runs for s in r.spec.stages]
    assert {s.type for s in stages} == {
        "sft",
        "dpo",
        "grpo",
        "reward-model",
        "synthetic-preferences",
        "eval",
        "merge",
    }
    assert {s.peft.method for s in stages if s.peft} >= {
        "lora",
        "qlora",
        "adalora",
        "prompt-tuning",
        "prefix-tuning",
        "p-tuning",
    }
    formats = {d.format for r in runs for d in r.spec.datasets}
    assert formats == {"chat", "prompt-completion", "preference", "prompt"}
    assert any(s.data and s.data.curriculum for s in stages)
    assert any(r.type == "reward-model" for s in stages for r in s.rewards)
    assert any(r.type in ("exact-match", "regex", "length") for s in stages for r in s.rewards)
    assert any(x.max_regression is not None for s in stages for x in s.suites)
    continual = [r.spec.continual for r in runs if r.spec.continual]
    assert continual
    assert continual[0].replay
    assert continual[0].gates
    assert continual[0].promote
    assert any(a.spec.merge for a in adapters)
    assert any(a.spec.lifecycle == "retired" for a in adapters)
    quickstart = parse_manifest(_load(REPO / "examples/quickstart.yaml"))
    assert isinstance(quickstart, PostTrainingRun)
    assert [s.type for s in quickstart.spec.stages] == ["sft", "dpo", "eval"]
    assert quickstart.spec.base_model.uri == "builtin://tiny"
    assert all(d.uri.startswith("builtin://") for d in quickstart.spec.datasets)


@pytest.mark.unit
def test_stage_maps_onto_the_contract() -> None:
    run = parse_manifest(_load(REPO / "examples/quickstart.yaml"))
    assert isinstance(run, PostTrainingRun)
    sft = run.spec.stage("sft")
    assert sft.peft is not None
    assert sft.hyperparameters is not None
    assert sft.data is not None
    stage_contract = contract.StageContract(
        run=contract.RunRef(namespace="ns", name="quickstart"),
        stage=contract.StageRef(name=sft.name, type=sft.type),
        base_model=run.spec.base_model.uri,
        storage=run.spec.storage.to_config(),
        output=contract.OutputSpec(prefix=run.spec.storage.uri + "sft/"),
        peft=sft.peft,
        # the run leaves unset hyperparameters out (stage types differ); the contract fills defaults
        hyperparameters=contract.Hyperparameters.model_validate(
            sft.hyperparameters.model_dump(exclude_none=True)
        ),
        data=contract.StageData(
            train=[run.spec.dataset(n) for n in sft.data.train],
            eval=[run.spec.dataset(n) for n in sft.data.eval],
        ),
        seed=sft.seed,
    )
    # The trainer revalidates the JSON with the contract model alone: nothing API-only leaks in.
    again = contract.StageContract.from_env(stage_contract.to_env())
    assert again.peft.r == 16
    assert again.hyperparameters.learning_rate == pytest.approx(sft.hyperparameters.learning_rate)
    assert again.hyperparameters.packing is sft.hyperparameters.packing
    assert again.data.train[0].uri.startswith("builtin://arith")
    assert "secretRef" not in stage_contract.to_env()


@pytest.mark.unit
def test_snake_case_attributes_and_camel_case_wire() -> None:
    stage = Stage(name="a", type="sft", data={"train": ["x"]}, active_deadline_seconds=60, **{"from": None})
    wire = stage.model_dump(by_alias=True, exclude_none=True)
    assert wire["activeDeadlineSeconds"] == 60
    assert "active_deadline_seconds" not in wire
    assert (
        Stage.model_validate(
            {"name": "b", "type": "eval", "from": "a", "suites": []}
            | {"suites": [{"name": "s", "dataset": "d", "metric": "loss"}]}
        ).from_
        == "a"
    )


@pytest.mark.unit
def test_check_update_ignores_defaults_and_flags_changes() -> None:
    run = _load(REPO / "examples/quickstart.yaml")["spec"]
    defaulted = PostTrainingRun.model_validate({"spec": run}).spec.model_dump(
        by_alias=True, exclude_none=True
    )
    assert check_update("PostTrainingRun", run, defaulted) == []
    changed = {**run, "storage": {**run["storage"], "uri": "s3://temper/elsewhere/"}, "suspend": True}
    assert check_update("PostTrainingRun", run, changed) == ["spec.storage is immutable"]
    with pytest.raises(ValueError, match="kind"):
        check_update("Job", run, run)


@pytest.mark.unit
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_on_the_hermetic_cluster_keeps_what_it_exercises(path: Path) -> None:
    """``for_hermetic_cluster`` (tests/e2e/test_examples.py runs every example through it) changes
    where and how long an example runs, never what it exercises; the result is still valid."""
    from temper_dev.demo import HERMETIC_STEPS, for_hermetic_cluster

    raw = _load(path)
    out = for_hermetic_cluster(raw, namespace="ns", bucket="bucket-1")
    assert raw == _load(path), "the example itself is not modified"
    obj, orig = parse_manifest(out), parse_manifest(raw)
    assert obj.metadata["namespace"] == "ns"
    assert "s3://temper/" not in yaml.safe_dump(out)
    if not isinstance(obj, PostTrainingRun):
        assert isinstance(orig, Adapter)
        assert obj.spec.merge == orig.spec.merge
        assert obj.spec.lifecycle == orig.spec.lifecycle
        return
    assert isinstance(orig, PostTrainingRun)
    assert obj.spec.queue_name is None
    assert obj.spec.priority_class_name == orig.spec.priority_class_name
    assert obj.spec.continual == orig.spec.continual or "s3://temper/" in yaml.safe_dump(raw)
    assert [d.format for d in obj.spec.datasets] == [d.format for d in orig.spec.datasets]
    for stage, before in zip(obj.spec.stages, orig.spec.stages, strict=True):
        keep = {"name", "type", "peft", "rewards", "suites", "merge", "from_"}
        assert stage.model_dump(include=keep) == before.model_dump(include=keep), stage.name
        assert stage.data == before.data
        assert stage.resources.gpus == 0
        assert stage.resources.node_selector == {"temper.dev/node-pool": "exec"}
        assert not stage.resources.tolerations
    for stage in out["spec"]["stages"]:
        if "hyperparameters" in stage:
            assert stage["hyperparameters"]["maxSteps"] <= HERMETIC_STEPS
            assert "epochs" not in stage["hyperparameters"]
