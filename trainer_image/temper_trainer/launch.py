"""The pod's launcher: torchrun's elastic agent, in-process, over one worker per GPU.

``python -m temper_trainer run`` (the container command) comes here first. One process in all
(one CPU pod, or one GPU) runs the stage in-process. Otherwise this process becomes torchrun's
agent (``torch.distributed.launcher.api.elastic_launch``) and starts ``nproc_per_node`` workers,
each ``python -m temper_trainer run`` again, which see torchrun's ``RANK``/``WORLD_SIZE``/...:

- ``nproc_per_node``: the pod's GPUs (``torch.cuda.device_count()``), 1 on CPU;
  ``TEMPER_NPROC_PER_NODE`` overrides it (tests run 2 CPU workers over gloo);
- ``nnodes`` = ``contract.resources.nodes``; ``node_rank`` = the Indexed Job's completion index
  (``JOB_COMPLETION_INDEX``, which the operator also passes as ``NODE_RANK``);
- rendezvous: static, at ``MASTER_ADDR:MASTER_PORT`` = pod 0's DNS name under the Job's headless
  Service (``<job>-0.<service>``); one node alone uses a private local store (torchrun
  ``--standalone``).

Each worker leaves its result in ``$TEMPER_RANK_RESULTS/rank-<r>.json``; the agent writes the
pod's termination message from them: rank 0's result when every rank succeeded, else the
first failing rank's message and exit code (a later rank's error is usually a consequence:
its peer vanished mid-collective).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from temper.api.contract import (
    CPU_THREADS_ENV,
    EXIT_INVALID_CONTRACT,
    EXIT_OK,
    EXIT_PREEMPTED,
    EXIT_RETRYABLE,
    StageContract,
    StageResult,
    Topology,
)

log = logging.getLogger("temper_trainer.launch")

RANK_RESULTS_ENV = "TEMPER_RANK_RESULTS"
NPROC_ENV = "TEMPER_NPROC_PER_NODE"
DEFAULT_MASTER_PORT = 29500
RENDEZVOUS_TIMEOUT_SECONDS = 600
# Workers get this long after SIGTERM to checkpoint; the pod's grace period bounds it anyway.
SHUTDOWN_TIMEOUT_SECONDS = 3600


class LaunchError(ValueError):
    """The pod's environment cannot describe a valid topology; the message names the variable."""


@dataclass(frozen=True)
class LaunchPlan:
    nnodes: int
    nproc_per_node: int
    node_rank: int
    master_addr: str
    master_port: int

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node


def _int_env(env: Mapping[str, str], name: str) -> int | None:
    raw = env.get(name)
    if raw in (None, ""):
        return None
    try:
        return int(raw)
    except ValueError:
        raise LaunchError(f"{name}={raw!r} is not an integer") from None


def plan_launch(contract: StageContract, env: Mapping[str, str], *, cuda_devices: int) -> LaunchPlan:
    """Pure: the torchrun topology for this pod from its contract and environment."""
    nproc = _int_env(env, NPROC_ENV) or cuda_devices or 1
    if nproc < 1:
        raise LaunchError(f"{NPROC_ENV} must be at least 1")
    nnodes = contract.resources.nodes
    index = _int_env(env, "JOB_COMPLETION_INDEX")
    node_rank = index if index is not None else (_int_env(env, "NODE_RANK") or 0)
    if not 0 <= node_rank < nnodes:
        raise LaunchError(f"node rank {node_rank} (JOB_COMPLETION_INDEX) is outside 0..{nnodes - 1}")
    addr = env.get("MASTER_ADDR", "")
    if nnodes > 1 and not addr:
        raise LaunchError("MASTER_ADDR is not set: a multi-node stage rendezvouses at pod 0's DNS name")
    port = _int_env(env, "MASTER_PORT") or DEFAULT_MASTER_PORT
    return LaunchPlan(nnodes, nproc, node_rank, addr or "localhost", port)


def launch_config(plan: LaunchPlan, run_id: str) -> Any:
    from torch.distributed.launcher.api import LaunchConfig

    if plan.nnodes > 1:  # node ranks are the Indexed Job's indices, so the static rendezvous fits
        backend, endpoint = "static", f"{plan.master_addr}:{plan.master_port}"
        configs: dict[str, Any] = {"rank": plan.node_rank, "timeout": RENDEZVOUS_TIMEOUT_SECONDS}
    else:  # torchrun --standalone: a private store on a free local port
        backend, endpoint = "c10d", "localhost:0"
        configs = {"timeout": RENDEZVOUS_TIMEOUT_SECONDS}
    return LaunchConfig(
        min_nodes=plan.nnodes,
        max_nodes=plan.nnodes,
        nproc_per_node=plan.nproc_per_node,
        run_id=run_id,
        rdzv_backend=backend,
        rdzv_endpoint=endpoint,
        rdzv_configs=configs,
        max_restarts=0,  # a failed rank fails the attempt; the operator retries with a new Job
        monitor_interval=0.5,
        shutdown_timeout=SHUTDOWN_TIMEOUT_SECONDS,
    )


# -- per-rank results ----------------------------------------------------------------------------


def write_rank_result(directory: Path, rank: int, exit_code: int, result: StageResult) -> None:
    record = {
        "rank": rank,
        "exit": exit_code,
        "at": time.time(),
        "result": json.loads(result.model_dump_json(by_alias=True, exclude_none=True)),
    }
    tmp = directory / f".rank-{rank}.json.tmp"
    tmp.write_text(json.dumps(record))
    tmp.replace(directory / f"rank-{rank}.json")


def read_rank_results(directory: Path) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for path in directory.glob("rank-*.json"):
        try:
            record = json.loads(path.read_text())
            out[int(record["rank"])] = record
        except (OSError, ValueError, KeyError):
            continue
    return out


def compose_result(
    records: Mapping[int, Mapping[str, Any]],
    failures: Mapping[int, tuple[int, float]],
    topology: Topology,
) -> tuple[StageResult, int]:
    """Pure: the pod's result and exit code from its ranks' records and torchrun's failures.

    ``failures``: rank -> (exit code, time) of workers torchrun saw fail (negative code: signal),
    for ranks that died without leaving a record.
    """
    failed = [(float(r["at"]), rank, int(r["exit"]), r["result"].get("error")) for rank, r in records.items()]
    failed = [f for f in failed if f[2] != EXIT_OK]
    for rank, (code, at) in failures.items():
        if rank not in records or int(records[rank]["exit"]) == EXIT_OK:
            what = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}, no result"
            failed.append((at, rank, code, what))
    if failed:
        _, rank, code, error = min(failed)
        message = f"rank {rank} of {topology.world_size}: {error or f'exit code {code}'}"
        exit_code = code if code > 0 else EXIT_RETRYABLE
        return StageResult(error=message, topology=topology), exit_code
    main = records.get(0)
    if main is not None:
        result = StageResult.model_validate(main["result"])
        return result.model_copy(update={"topology": topology}), EXIT_OK
    return StageResult(topology=topology), EXIT_OK


def _run_id(contract: StageContract) -> str:
    return f"{contract.run.uid or contract.run.name}-{contract.stage.name}-{contract.stage.attempt}"


def _cuda_devices() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def math_threads(env: Mapping[str, str], nproc_per_node: int, cpu_count: int | None) -> int | None:
    """Math (OpenMP) threads per process: the pod's CPUs shared by its workers, at least 1.

    The pod's CPUs are ``TEMPER_CPU_THREADS`` (the operator sets it from the container's CPU limit,
    else its request), else the machine's. torch alone would take every core of the node, and on a
    node shared with other pods its threads then spin against each other. None when the user set
    ``OMP_NUM_THREADS`` (``spec.trainer.env``): theirs wins.
    """
    if env.get("OMP_NUM_THREADS"):
        return None
    raw = env.get(CPU_THREADS_ENV, "")
    cpus = int(raw) if raw.isdigit() and int(raw) > 0 else (cpu_count or 1)
    return max(1, cpus // max(1, nproc_per_node))


def launch(raw: str | None) -> int:
    """The container's ``run``: in-process for one worker, else torchrun's agent over workers."""
    from temper_trainer.__main__ import run_stage, write_termination

    try:
        contract = StageContract.from_env(raw) if raw else None
    except ValueError:
        contract = None
    if contract is None:  # run_stage writes the contract error
        return run_stage(raw)
    try:
        plan = plan_launch(contract, os.environ, cuda_devices=_cuda_devices())
    except LaunchError as exc:
        log.error("%s", exc)
        write_termination(StageResult(error=f"launch: {exc}"))
        return EXIT_INVALID_CONTRACT
    threads = math_threads(os.environ, plan.nproc_per_node, os.cpu_count())
    if threads is not None:  # the workers inherit it; this process may have imported torch already
        import torch

        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)
    if plan.world_size == 1:
        return run_stage(raw)
    return _launch_workers(contract, plan)


def _launch_workers(contract: StageContract, plan: LaunchPlan) -> int:
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    from temper_trainer.__main__ import write_termination
    from temper_trainer.distributed import resolve_strategy

    results = Path(tempfile.mkdtemp(prefix="temper-ranks-"))
    os.environ[RANK_RESULTS_ENV] = str(results)
    try:
        strategy = resolve_strategy(contract, processes=plan.world_size, on_gpu=_cuda_devices() > 0)
    except Exception:  # the workers raise it again, with its exit code
        strategy = "ddp"
    topology = Topology(
        world_size=plan.world_size,
        nodes=plan.nnodes,
        procs_per_node=plan.nproc_per_node,
        gpus_per_node=plan.nproc_per_node if _cuda_devices() else 0,
        strategy=strategy,
    )
    log.info(
        "launching %d workers on node %d of %d (world size %d, rendezvous %s:%d)",
        plan.nproc_per_node,
        plan.node_rank,
        plan.nnodes,
        plan.world_size,
        plan.master_addr,
        plan.master_port,
    )
    failures: dict[int, tuple[int, float]] = {}
    signalled = False
    try:
        elastic_launch(launch_config(plan, _run_id(contract)), sys.executable)("-m", "temper_trainer", "run")
    except ChildFailedError as exc:
        failures = {rank: (f.exitcode, f.timestamp) for rank, f in exc.failures.items()}
    except SignalException as exc:
        signalled = True
        log.warning("%s: workers were asked to checkpoint and stop", exc)
    except Exception as exc:  # rendezvous timeout, store errors: nothing ran
        message = f"launch: {type(exc).__name__}: {exc}"
        log.error("%s", message)
        write_termination(StageResult(error=message, topology=topology))
        return EXIT_RETRYABLE
    records = read_rank_results(results)
    result, code = compose_result(records, failures, topology)
    if signalled and not records:
        code = EXIT_PREEMPTED  # SIGTERM before any worker reported
        result = StageResult(error="Preempted: SIGTERM before the workers reported", topology=topology)
    write_termination(result)
    return code
