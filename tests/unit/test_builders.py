"""Pure manifest builders: Job, headless Service, Adapter, stage contract, names, config."""

from __future__ import annotations

import json
from typing import Any

import pytest
from temper.api.contract import NON_RETRYABLE_EXIT_CODES, AdapterRef, StageContract
from temper.api.run import PostTrainingRun
from temper.builders import UnresolvedReference, build_adapter, build_job, build_service, stage_contract
from temper.builders.contract import PARENT_ADAPTER_ANNOTATION, continued_stage
from temper.builders.names import JOB_NAME_MAX, adapter_name, job_name, shorten
from temper.config import ConfigError, OperatorConfig

from tests.unit.test_planner import sample_run

pytestmark = pytest.mark.unit

CONFIG = OperatorConfig(trainer_image="trainer:test", gpu_resource="example.com/gpu")


def _run(**overrides: Any) -> PostTrainingRun:
    return PostTrainingRun.model_validate(sample_run(**overrides))


def _job(run: PostTrainingRun, stage_index: int = 0, **kw: Any) -> dict[str, Any]:
    stage = run.spec.stages[stage_index]
    config = kw.get("config", CONFIG)
    contract = stage_contract(run, stage, cycle=1, attempt=1, config=config)
    return build_job(
        run, stage, contract, cycle=1, attempt=1, suspend=kw.get("suspend", False), config=config
    )


def _env(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}


def test_job_is_owned_labelled_and_restricted() -> None:
    job = _job(_run())
    meta = job["metadata"]
    assert meta["name"] == "r1-sft-c1-a1"
    assert meta["ownerReferences"][0] | {} == {
        "apiVersion": "temper.dev/v1alpha1",
        "kind": "PostTrainingRun",
        "name": "r1",
        "uid": "uid-1",
        "controller": True,
        "blockOwnerDeletion": True,
    }
    for labels in (meta["labels"], job["spec"]["template"]["metadata"]["labels"]):
        assert labels["temper.dev/run"] == "r1"
        assert labels["temper.dev/stage"] == "sft"
        assert labels["temper.dev/attempt"] == "1"
        assert labels["temper.dev/cycle"] == "1"
    pod = job["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["restartPolicy"] == "Never"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    container = pod["containers"][0]
    assert container["command"] == ["python", "-m", "temper_trainer", "run"]
    assert container["image"] == "trainer:test"
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}


def test_job_failure_policy_ignores_disruption_and_fails_fast_on_bad_input() -> None:
    spec = _job(_run())["spec"]
    assert spec["backoffLimit"] == 0
    rules = spec["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}
    # A pod deleted mid-stage (Kueue eviction suspends the Job) checkpoints and exits 143.
    assert rules[1] == {
        "action": "Ignore",
        "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [143]},
    }
    assert rules[2]["action"] == "FailJob"
    assert rules[2]["onExitCodes"]["values"] == list(NON_RETRYABLE_EXIT_CODES)


def test_credentials_only_by_secret_reference() -> None:
    job = _job(_run())
    env = _env(job)
    assert env["AWS_ACCESS_KEY_ID"] == {
        "name": "AWS_ACCESS_KEY_ID",
        "valueFrom": {"secretKeyRef": {"name": "s3-creds", "key": "AWS_ACCESS_KEY_ID"}},
    }
    assert "value" not in env["AWS_SECRET_ACCESS_KEY"]
    assert env["AWS_SESSION_TOKEN"]["valueFrom"]["secretKeyRef"]["optional"] is True
    assert "secret" not in env["TEMPER_STAGE_CONTRACT"]["value"].lower().replace("secretref", "")


def test_default_storage_secret_applies_only_without_a_secret_ref() -> None:
    config = OperatorConfig(trainer_image="trainer:test", default_storage_secret="platform-s3")
    named = _run()
    unnamed = _run()
    unnamed.spec.storage.secret_ref = None
    for run, expected in ((named, "s3-creds"), (unnamed, "platform-s3")):
        contract = stage_contract(run, run.spec.stages[0], cycle=1, attempt=1, config=config)
        job = build_job(run, run.spec.stages[0], contract, cycle=1, attempt=1, suspend=False, config=config)
        assert _env(job)["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == expected


def test_contract_in_env_resolves_datasets_and_storage() -> None:
    run = _run()
    contract = StageContract.from_env(_env(_job(run))["TEMPER_STAGE_CONTRACT"]["value"])
    assert contract.run.name == "r1"
    assert contract.run.uid == "uid-1"
    assert contract.stage.name == "sft"
    assert contract.stage.attempt == 1
    assert [d.uri for d in contract.data.train] == ["builtin://arith?n=16"]
    assert contract.output.prefix == "s3://bucket/runs/r1/g1/sft/"
    assert contract.base_model == "builtin://tiny"


def test_contract_default_storage_endpoint_from_config() -> None:
    config = OperatorConfig(default_storage_endpoint="http://127.0.0.1:7000")
    run = _run()
    contract = stage_contract(run, run.spec.stages[0], cycle=1, attempt=1, config=config)
    assert contract.storage.endpoint_url == "http://127.0.0.1:7000"


def test_contract_refuses_unpublished_parent() -> None:
    run = _run()
    with pytest.raises(UnresolvedReference, match=r"spec\.stages\[1\]\.from"):
        stage_contract(run, run.spec.stages[1], cycle=1, attempt=1, config=CONFIG)


def test_continual_cycle_continues_from_the_promoted_adapter() -> None:
    run = _run()
    run.metadata.setdefault("annotations", {})[PARENT_ADAPTER_ANNOTATION] = "bot-g1-sft"
    promoted = AdapterRef(name="bot-g1-sft", manifestUri="s3://bucket/runs/r1/g1/sft/manifest.json")
    first = stage_contract(
        run, run.spec.stages[0], cycle=2, attempt=1, config=CONFIG, adapters={"bot-g1-sft": promoted}
    )
    assert first.parent == promoted
    # Later stages keep their own `from`; a missing promoted adapter is named, not ignored.
    assert continued_stage(run) == "sft"
    with pytest.raises(UnresolvedReference, match="parent-adapter"):
        stage_contract(run, run.spec.stages[0], cycle=2, attempt=1, config=CONFIG)


def test_gpu_resources_scheduling_and_deadline() -> None:
    run = _run()
    raw = sample_run()
    raw["spec"]["stages"][0].update(
        resources={
            "gpus": 2,
            "memory": "16Gi",
            "nodeSelector": {"pool": "a100"},
            "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "affinity": {"nodeAffinity": {}},
        },
        activeDeadlineSeconds=600,
    )
    run = PostTrainingRun.model_validate(raw)
    job = _job(run)
    pod = job["spec"]["template"]["spec"]
    res = pod["containers"][0]["resources"]
    assert res["limits"] == {"example.com/gpu": 2, "memory": "16Gi"}
    assert res["requests"] == {"memory": "16Gi"}
    assert pod["nodeSelector"] == {"pool": "a100"}
    assert pod["tolerations"] == [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["affinity"] == {"nodeAffinity": {}}
    assert job["spec"]["activeDeadlineSeconds"] == 600


def test_multi_node_is_indexed_with_rendezvous_env_and_headless_service() -> None:
    raw = sample_run()
    raw["spec"]["stages"][0]["resources"] = {"nodes": 3}
    run = PostTrainingRun.model_validate(raw)
    job = _job(run)
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 3, 3)
    assert spec["template"]["spec"]["subdomain"] == "r1-sft-c1-a1"
    env = _env(job)
    assert env["MASTER_ADDR"]["value"] == "r1-sft-c1-a1-0.r1-sft-c1-a1"
    assert env["WORLD_SIZE"]["value"] == "3"
    assert env["NNODES"]["value"] == "3"
    assert "job-completion-index" in env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"]
    svc = build_service(run, job, CONFIG)
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["selector"] == {"batch.kubernetes.io/job-name": "r1-sft-c1-a1"}
    assert svc["metadata"]["ownerReferences"][0]["uid"] == "uid-1"


def test_single_node_has_no_rendezvous() -> None:
    job = _job(_run())
    assert "MASTER_ADDR" not in _env(job)
    assert "completionMode" not in job["spec"]


def test_user_env_cannot_override_the_contract() -> None:
    run = _run(
        trainer={
            "env": [{"name": "TEMPER_STAGE_CONTRACT", "value": "x"}, {"name": "HF_HUB_OFFLINE", "value": "1"}]
        }
    )
    env = _env(_job(run))
    assert env["TEMPER_STAGE_CONTRACT"]["value"] != "x"
    assert env["HF_HUB_OFFLINE"]["value"] == "1"


def test_adapter_from_manifest_has_lineage_and_no_owner() -> None:
    run = _run()
    adapter = build_adapter(
        run, run.spec.stages[0], cycle=2, manifest_uri="s3://bucket/runs/r1/g2/sft/manifest.json"
    )
    assert adapter["metadata"]["name"] == "r1-sft-g2"
    assert "ownerReferences" not in adapter["metadata"]
    assert adapter["metadata"]["labels"] == {
        "temper.dev/run": "r1",
        "temper.dev/stage": "sft",
        "temper.dev/cycle": "2",
        "temper.dev/run-uid": "uid-1",
    }
    assert adapter["spec"]["artifact"]["secretRef"] == {"name": "s3-creds"}
    assert adapter["spec"]["task"] == "arith"
    assert adapter["spec"]["method"] == "lora"


def test_names_are_deterministic_bounded_and_distinct() -> None:
    long_run = "x" * 70
    a = job_name(long_run, "stage-one", 1, 1)
    b = job_name(long_run, "stage-one", 1, 2)
    assert a == job_name(long_run, "stage-one", 1, 1)
    assert len(a) <= JOB_NAME_MAX
    assert len(b) <= JOB_NAME_MAX
    assert a != b
    assert len(adapter_name(long_run, "s", 1)) <= 63
    assert shorten("short") == "short"


def test_job_manifest_is_json_serialisable() -> None:
    json.dumps(_job(_run(queueName="q")))


@pytest.mark.parametrize(
    ("env", "field"),
    [
        ({"TEMPER_METRICS_PORT": "abc"}, "TEMPER_METRICS_PORT"),
        ({"TEMPER_PROGRESS_INTERVAL_SECONDS": "-1"}, "TEMPER_PROGRESS_INTERVAL_SECONDS"),
        ({"TEMPER_LEADER_ELECTION": "maybe"}, "TEMPER_LEADER_ELECTION"),
        (
            {"TEMPER_LEASE_DURATION_SECONDS": "3", "TEMPER_LEASE_RENEW_SECONDS": "5"},
            "TEMPER_LEASE_RENEW_SECONDS",
        ),
    ],
)
def test_config_errors_name_the_variable(env: dict[str, str], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        OperatorConfig.from_env(env)


def test_config_defaults_and_namespaces() -> None:
    config = OperatorConfig.from_env({"TEMPER_NAMESPACES": "a, b", "TEMPER_GPU_RESOURCE": "amd.com/gpu"})
    assert config.namespaces == ("a", "b")
    assert config.gpu_resource == "amd.com/gpu"
    assert config.progress_interval_seconds == 30.0


def test_contract_maps_stage_settings_field_for_field() -> None:
    raw = sample_run()
    hp = {
        "maxSteps": 7,
        "learningRate": 0.001,
        "warmupRatio": 0.2,
        "batchSize": 2,
        "packing": True,
        "precision": "bf16",
        "gradientCheckpointing": True,
        "attnImplementation": "eager",
    }
    peft = {"method": "qlora", "r": 4, "alpha": 8, "bits": 4, "targetModules": ["q_proj"]}
    raw["spec"]["stages"][0].update(hyperparameters=hp, peft=peft, checkpoint={"everySteps": 3}, seed=7)
    raw["spec"]["stages"][0]["data"].update(
        eval=["heldout"], curriculum={"orderBy": "length"}, replay={"ratio": 0.25, "datasets": ["heldout"]}
    )
    run = PostTrainingRun.model_validate(raw)
    contract = stage_contract(run, run.spec.stages[0], cycle=1, attempt=2, config=CONFIG)
    dumped = contract.model_dump(by_alias=True)
    for key, value in hp.items():
        assert dumped["hyperparameters"][key] == value
    assert dumped["hyperparameters"]["beta"] == 0.1  # unset in the run: the contract's default
    for key, value in peft.items():
        assert dumped["peft"][key] == value
    assert contract.checkpoint.every_steps == 3
    assert contract.seed == 7
    assert contract.stage.attempt == 2
    assert contract.data.curriculum.order_by == "length"
    assert contract.data.replay.ratio == 0.25
    assert [d.name for d in contract.data.replay.datasets] == ["heldout"]
    assert [d.name for d in contract.data.eval] == ["heldout"]


def test_failpoints_reach_pods_only_from_an_operator_in_test_mode() -> None:
    import dataclasses

    from temper.builders.job import FAILPOINTS_ANNOTATION

    run = _run(trainer={"env": [{"name": "TEMPER_FAILPOINT", "value": "publish-before-manifest"}]})
    run.metadata["annotations"] = {FAILPOINTS_ANNOTATION: '{"TEMPER_FAILPOINT_MATCH": "/sft/"}'}
    assert not {k for k in _env(_job(run)) if k.startswith("TEMPER_FAILPOINT")}  # a user's env never
    test_mode = dataclasses.replace(CONFIG, test_failpoints=True)
    env = _env(_job(run, config=test_mode))
    assert {k: v["value"] for k, v in env.items() if k.startswith("TEMPER_FAILPOINT")} == {
        "TEMPER_FAILPOINT_MATCH": "/sft/"
    }


def test_platform_default_resources_under_the_stage_values() -> None:
    import dataclasses

    defaults = {
        "requests": {"cpu": "1", "memory": "4Gi"},
        "limits": {"memory": "64Gi", "ephemeral-storage": "50Gi"},
    }
    config = dataclasses.replace(CONFIG, trainer_resources=defaults)
    pod = _job(_run(), config=config)["spec"]["template"]["spec"]
    res = pod["containers"][0]["resources"]
    assert res["requests"]["cpu"] == "1"
    assert res["limits"]["ephemeral-storage"] == "50Gi"
    raw = sample_run()
    raw["spec"]["stages"][0]["resources"] = {"memory": "8Gi"}
    own = _job(PostTrainingRun.model_validate(raw), config=config)["spec"]["template"]["spec"]
    assert own["containers"][0]["resources"]["requests"]["memory"] == "8Gi"
    assert own["containers"][0]["resources"]["limits"]["memory"] == "8Gi"


def test_math_threads_follow_the_containers_cpus() -> None:
    import dataclasses

    from temper.api.contract import CPU_THREADS_ENV
    from temper.builders.job import cpu_threads

    assert cpu_threads({"requests": {"cpu": "1"}}) == 1
    assert cpu_threads({"requests": {"cpu": "300m"}}) == 1  # at least one
    assert cpu_threads({"requests": {"cpu": "2500m"}, "limits": {"cpu": 4}}) == 4  # the limit first
    assert cpu_threads({"requests": {"cpu": "7.9"}}) == 7  # whole CPUs: never more threads than CPUs
    assert cpu_threads({"limits": {"memory": "1Gi"}}) is None  # no CPU: the trainer takes the node's
    config = dataclasses.replace(CONFIG, trainer_resources={"requests": {"cpu": "3"}})
    assert _env(_job(_run(), config=config))[CPU_THREADS_ENV]["value"] == "3"
    raw = sample_run()
    raw["spec"]["stages"][0]["resources"] = {"cpu": "8"}
    assert _env(_job(PostTrainingRun.model_validate(raw), config=config))[CPU_THREADS_ENV]["value"] == "8"
    assert CPU_THREADS_ENV not in _env(_job(_run()))  # the operator's own default sets no CPU
