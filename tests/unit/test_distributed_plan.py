"""The launcher's and the strategy's pure parts: topology from the pod, root-cause results, FSDP args."""

from __future__ import annotations

import os
import pwd
from pathlib import Path
from typing import Any

import pytest
from temper.api.contract import EXIT_INVALID_INPUT, EXIT_OK, EXIT_PREEMPTED, StageContract, Topology
from temper.api.run import PostTrainingRun, StageResources
from temper_dev import oci
from temper_dev.execnode import NSS_WRAPPER_ENV, hosts_file_text, nss_wrapper_library, pod_dns_names
from temper_trainer import distributed
from temper_trainer.launch import LaunchError, compose_result, launch_config, math_threads, plan_launch
from temper_trainer.stage import Unsupported

pytestmark = pytest.mark.unit


def contract(**fields: Any) -> StageContract:
    body: dict[str, Any] = {
        "run": {"namespace": "ns", "name": "r", "uid": "u1"},
        "stage": {"name": "sft", "type": "sft"},
        "baseModel": "builtin://tiny",
        "output": {"prefix": "s3://b/r/sft/"},
        **fields,
    }
    return StageContract.model_validate(body)


def test_one_cpu_pod_is_one_process_and_gpus_set_the_workers_per_node() -> None:
    plan = plan_launch(contract(), {}, cuda_devices=0)
    assert (plan.world_size, plan.nproc_per_node, plan.node_rank) == (1, 1, 0)
    assert plan_launch(contract(), {}, cuda_devices=8).world_size == 8
    assert plan_launch(contract(), {"TEMPER_NPROC_PER_NODE": "2"}, cuda_devices=0).world_size == 2


def test_math_threads_share_the_pods_cpus_among_its_workers_unless_the_user_set_them() -> None:
    assert math_threads({"TEMPER_CPU_THREADS": "1"}, 1, cpu_count=64) == 1  # a 1-CPU pod on a big node
    assert math_threads({"TEMPER_CPU_THREADS": "16"}, 8, cpu_count=64) == 2  # 8 GPU workers
    assert math_threads({"TEMPER_CPU_THREADS": "4"}, 8, cpu_count=64) == 1
    assert math_threads({}, 2, cpu_count=8) == 4  # no CPU request: the machine's, as before
    assert math_threads({"TEMPER_CPU_THREADS": "x"}, 1, cpu_count=None) == 1
    assert math_threads({"OMP_NUM_THREADS": "6", "TEMPER_CPU_THREADS": "1"}, 1, cpu_count=64) is None


def test_multi_node_rank_is_the_completion_index_and_rendezvous_is_static_at_pod_0() -> None:
    two = contract(resources={"nodes": 2, "gpusPerNode": 4})
    env = {"JOB_COMPLETION_INDEX": "1", "NODE_RANK": "1", "MASTER_ADDR": "j-0.j", "MASTER_PORT": "29600"}
    plan = plan_launch(two, env, cuda_devices=4)
    assert (plan.nnodes, plan.node_rank, plan.world_size) == (2, 1, 8)
    config = launch_config(plan, "run-1")
    assert (config.rdzv_backend, config.rdzv_endpoint, config.rdzv_configs["rank"]) == (
        "static",
        "j-0.j:29600",
        1,
    )
    assert (config.min_nodes, config.max_nodes, config.max_restarts) == (2, 2, 0)
    single = launch_config(plan_launch(contract(), {"TEMPER_NPROC_PER_NODE": "2"}, cuda_devices=0), "x")
    assert (single.rdzv_backend, single.rdzv_endpoint) == ("c10d", "localhost:0")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"JOB_COMPLETION_INDEX": "2", "MASTER_ADDR": "a"}, "outside 0..1"),
        ({"JOB_COMPLETION_INDEX": "1"}, "MASTER_ADDR"),
        ({"MASTER_ADDR": "a", "MASTER_PORT": "x"}, "MASTER_PORT"),
    ],
)
def test_a_broken_topology_names_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(LaunchError, match=message):
        plan_launch(contract(resources={"nodes": 2}), env, cuda_devices=0)


TOPOLOGY = Topology(world_size=4, nodes=2, procs_per_node=2, strategy="ddp")


def record(rank: int, code: int, at: float, **result: Any) -> dict[str, Any]:
    return {"rank": rank, "exit": code, "at": at, "result": result}


def test_success_reports_rank_0_with_the_topology_and_other_nodes_report_no_manifest() -> None:
    records = {0: record(0, 0, 2.0, manifestUri="s3://b/m.json", sha256="ab"), 1: record(1, 0, 1.0)}
    result, code = compose_result(records, {}, TOPOLOGY)
    assert (code, result.manifest_uri, result.topology) == (EXIT_OK, "s3://b/m.json", TOPOLOGY)
    result, code = compose_result({2: record(2, 0, 1.0), 3: record(3, 0, 1.0)}, {}, TOPOLOGY)
    assert (code, result.manifest_uri, result.error) == (EXIT_OK, None, None)


def test_the_first_failing_rank_is_the_root_cause_with_its_exit_code() -> None:
    records = {
        0: record(0, 1, 9.0, error="RuntimeError: Connection closed by peer"),
        1: record(1, EXIT_INVALID_INPUT, 5.0, error="InvalidInput: data.train: no rows"),
    }
    result, code = compose_result(records, {0: (1, 9.0), 1: (EXIT_INVALID_INPUT, 5.0)}, TOPOLOGY)
    assert code == EXIT_INVALID_INPUT
    assert result.error == "rank 1 of 4: InvalidInput: data.train: no rows"


def test_a_rank_killed_without_a_result_is_named_with_its_signal_and_is_retryable() -> None:
    result, code = compose_result(
        {0: record(0, EXIT_PREEMPTED, 8.0, error="Preempted")}, {1: (-9, 3.0)}, TOPOLOGY
    )
    assert (code, result.error) == (1, "rank 1 of 4: killed by SIGKILL")


def test_auto_strategy_is_ddp_for_adapters_and_fsdp_for_full_or_a_model_too_big_for_one_device() -> None:
    lora, full = contract(), contract(peft={"method": "full"})
    qlora = contract(peft={"method": "qlora", "bits": 4})
    gib = 1 << 30
    assert distributed.resolve_strategy(lora, processes=1, on_gpu=True) == "single"
    assert (
        distributed.resolve_strategy(
            lora, processes=8, on_gpu=True, model_bytes=16 * gib, device_bytes=80 * gib
        )
        == "ddp"
    )
    assert (
        distributed.resolve_strategy(
            lora, processes=8, on_gpu=True, model_bytes=140 * gib, device_bytes=80 * gib
        )
        == "fsdp"
    )
    assert (
        distributed.resolve_strategy(
            qlora, processes=8, on_gpu=True, model_bytes=140 * gib, device_bytes=80 * gib
        )
        == "ddp"
    )
    assert distributed.resolve_strategy(full, processes=2, on_gpu=True) == "fsdp"
    assert distributed.resolve_strategy(full, processes=2, on_gpu=False) == "ddp"
    with pytest.raises(Unsupported, match=r"resources\.strategy: fsdp needs GPUs"):
        distributed.resolve_strategy(contract(resources={"strategy": "fsdp"}), processes=2, on_gpu=False)


def test_fsdp_maps_onto_training_arguments_fsdp2_full_state_dict_and_decoder_layer_wrapping(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = distributed.fsdp_config(None, gradient_checkpointing=True)
    assert config["version"] == 2
    assert config["state_dict_type"] == "FULL_STATE_DICT"
    assert config["activation_checkpointing"] is True
    assert config["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"

    class Layered:
        _no_split_modules = ["LlamaDecoderLayer"]

    assert distributed.fsdp_config(Layered())["transformer_layer_cls_to_wrap"] == ["LlamaDecoderLayer"]
    monkeypatch.setattr(distributed, "stage_strategy", lambda c, d=None: "fsdp")
    kwargs = distributed.trainer_kwargs(contract(), gradient_checkpointing=True)
    assert kwargs["fsdp"] is True
    assert kwargs["gradient_checkpointing"] is False  # FSDP checkpoints activations itself
    import torch

    assert distributed.quant_storage_dtype(contract(peft={"method": "qlora", "bits": 4})) == torch.bfloat16
    assert distributed.quant_storage_dtype(contract(peft={"method": "qlora", "bits": 8})) is None
    monkeypatch.setattr(distributed, "stage_strategy", lambda c, d=None: "single")
    assert distributed.trainer_kwargs(contract()) == {}


def test_api_strategy_travels_in_the_contract_and_fsdp_without_gpus_is_refused() -> None:
    assert StageResources.model_validate({"gpus": 8, "strategy": "fsdp"}).strategy == "fsdp"
    with pytest.raises(ValueError, match="strategy: fsdp shards"):
        StageResources.model_validate({"strategy": "fsdp"})


def test_exec_node_resolves_pod_dns_names_of_indexed_job_pods_to_loopback() -> None:
    pod = {"metadata": {"namespace": "ns", "uid": "u"}, "spec": {"hostname": "j-0", "subdomain": "j"}}
    names = pod_dns_names(pod)
    assert names == ["j-0.j", "j-0.j.ns", "j-0.j.ns.svc", "j-0.j.ns.svc.cluster.local"]
    assert pod_dns_names({"metadata": {}, "spec": {"hostname": "x"}}) == []
    text = hosts_file_text({"u": names})
    assert text.splitlines() == [f"127.0.0.1 {' '.join(names)}", f"::1 {' '.join(names)}"]


def test_exec_node_finds_nss_wrapper_in_the_build_cache_under_its_own_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The hermetic cluster gives the exec node its own HOME; hack/build-tools.sh extracts the
    # library into the account's cache. A fresh machine without the system package failed here.
    lib = tmp_path / "cache" / "nss-wrapper" / "usr" / "lib" / "x86_64-linux-gnu" / "libnss_wrapper.so"
    lib.parent.mkdir(parents=True)
    lib.write_bytes(b"")
    monkeypatch.setenv("HOME", str(tmp_path / "elsewhere"))
    monkeypatch.delenv(NSS_WRAPPER_ENV, raising=False)
    monkeypatch.setenv("TEMPER_CACHE", str(tmp_path / "cache"))
    system = sorted(Path("/usr/lib").glob("**/libnss_wrapper.so*"))
    assert nss_wrapper_library() == (system[0] if system else lib)
    monkeypatch.delenv("TEMPER_CACHE")
    assert oci.cache_root() == Path(pwd.getpwuid(os.getuid()).pw_dir) / ".cache" / "temper"


def test_strategy_and_nodes_travel_in_the_contract_and_world_size_counts_processes() -> None:
    from tests.unit.test_builders import _env, _job
    from tests.unit.test_planner import sample_run

    raw = sample_run()
    raw["spec"]["stages"][0]["resources"] = {"nodes": 2, "gpus": 4, "strategy": "fsdp"}
    job = _job(PostTrainingRun.model_validate(raw))
    env = _env(job)
    sent = StageContract.from_env(env["TEMPER_STAGE_CONTRACT"]["value"])
    assert (sent.resources.nodes, sent.resources.gpus_per_node, sent.resources.strategy) == (2, 4, "fsdp")
    assert env["WORLD_SIZE"]["value"] == "8"


def test_auto_sees_the_loaded_model_and_fsdp_leaves_it_on_the_cpu_for_accelerate_to_shard(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch

    model = torch.nn.Linear(1000, 1000)  # 4 MB of fp32 weights
    lora = contract()
    monkeypatch.setattr(distributed, "_MODEL_BYTES", [])
    distributed.note_model(model, lora)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(distributed, "device_memory_bytes", lambda: 5_000_000)  # 4 MB > 60% of 5 MB
    assert distributed.stage_strategy(lora) == "fsdp"
    assert distributed.placement(lora, "cuda:0") == "cpu"
    assert distributed.placement(contract(peft={"method": "qlora"}), "cuda:0") == "cuda:0"
    monkeypatch.setattr(distributed, "device_memory_bytes", lambda: 80_000_000)
    assert distributed.placement(lora, "cuda:0") == "cuda:0"
