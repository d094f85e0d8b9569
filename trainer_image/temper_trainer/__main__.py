"""``python -m temper_trainer run`` — run the stage in ``$TEMPER_STAGE_CONTRACT``.

It launches one worker per GPU on every node (``temper_trainer.launch``, torchrun's agent) or,
with one process in all, runs the stage in-process.

Exit codes (``temper.api.contract``): 0 ok; 1 retryable; 10 invalid contract; 11 invalid input;
12 unsupported; 143 preempted (SIGTERM, checkpoint written). The result (``StageResult`` JSON,
≤ 4 KiB) goes to ``$TEMPER_TERMINATION_LOG`` (default ``/dev/termination-log``).

``python -m temper_trainer build-tiny-model [--out DIR]`` builds (or finds) ``builtin://tiny``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from temper.api.contract import (
    CONTRACT_ENV,
    EXIT_INVALID_CONTRACT,
    EXIT_OK,
    EXIT_RETRYABLE,
    StageContract,
    StageResult,
)

import temper_trainer

if TYPE_CHECKING:
    from temper_trainer.stage import StageContext

log = logging.getLogger("temper_trainer")
TERMINATION_LIMIT = 4096
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "HF_TOKEN")


def redact(text: str) -> str:
    """Remove any credential value that might have slipped into a message."""
    for name in _SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


def termination_message(result: StageResult) -> str:
    """The result as JSON under 4 KiB: per-task and suite metrics are dropped first if needed."""
    metrics = dict(result.metrics)
    error = redact(result.error)[:1500] if result.error else None
    while True:
        body = StageResult(
            manifest_uri=result.manifest_uri,
            sha256=result.sha256,
            metrics=metrics,
            evals=result.evals,
            error=error,
            topology=result.topology,
        ).model_dump_json(by_alias=True, exclude_none=True)
        if len(body.encode()) <= TERMINATION_LIMIT - 96 or not metrics:
            return body
        victim = max(metrics, key=lambda k: (k.count("/"), len(k)))
        metrics.pop(victim)


def write_termination(result: StageResult) -> None:
    path = Path(os.environ.get("TEMPER_TERMINATION_LOG", "/dev/termination-log"))
    try:
        path.write_text(termination_message(result))
    except OSError as exc:
        log.warning("cannot write the termination message to %s: %s", path, exc)


def _contract_error(exc: Exception) -> str:
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        parts = []
        for err in exc.errors()[:5]:
            where = ".".join(str(p) for p in err["loc"]) or "(root)"
            parts.append(f"{where}: {err['msg']}")
        return f"invalid {CONTRACT_ENV}: " + "; ".join(parts)
    return f"invalid {CONTRACT_ENV}: {exc}"


def manifest_fields(contract: StageContract, outcome: Any, storage: Any = None) -> dict[str, Any]:
    from temper_trainer.lineage import stage_lineage

    lineage: dict[str, Any] = {
        "run": {"namespace": contract.run.namespace, "name": contract.run.name, "uid": contract.run.uid},
        "cycle": contract.run.cycle,
        "stage": contract.stage.name,
        "attempt": contract.stage.attempt,
        "seed": contract.seed,
    }
    lineage.update(outcome.lineage)
    lineage.update(stage_lineage(contract, storage))  # the structured inputs win over a stage's own
    return {
        "baseModel": contract.base_model,
        "method": outcome.method,
        "stageType": contract.stage.type,
        "metrics": outcome.metrics,
        "evals": [e.model_dump(by_alias=True, exclude_none=True) for e in outcome.evals],
        "lineage": lineage,
        "trainerVersion": temper_trainer.__version__,
        "createdAt": datetime.now(UTC).isoformat(timespec="seconds"),
        "servable": outcome.servable,
    }


def run_stage(raw: str | None, workdir: Path | None = None) -> int:
    """Everything ``run`` does in one process; returns the exit code.

    A torchrun worker (``temper_trainer.launch``) leaves its result for the launcher in
    ``$TEMPER_RANK_RESULTS``; a lone process writes the termination message itself.
    """
    from temper_trainer import distributed
    from temper_trainer.launch import RANK_RESULTS_ENV, write_rank_result

    code, result = _execute(raw, workdir)
    results_dir = os.environ.get(RANK_RESULTS_ENV)
    if results_dir and distributed.is_worker():
        write_rank_result(Path(results_dir), distributed.rank(), code, result)
    else:
        write_termination(result)
    return code


def _failure(message: str, topology: Any = None) -> StageResult:
    message = redact(message)
    log.error("%s", message)
    return StageResult(error=message, topology=topology)


def _execute(raw: str | None, workdir: Path | None) -> tuple[int, StageResult]:
    from temper.storage import Storage, StorageError

    from temper_trainer import distributed
    from temper_trainer.stage import StageError

    if not raw:
        return EXIT_INVALID_CONTRACT, StageResult(error=f"{CONTRACT_ENV} is not set")
    try:
        contract = StageContract.from_env(raw)
    except ValueError as exc:  # pydantic's ValidationError and json's JSONDecodeError
        return EXIT_INVALID_CONTRACT, _failure(_contract_error(exc))
    topology = distributed.topology(contract)
    try:
        return _run_contract(contract, Storage(contract.storage), workdir, topology)
    except StageError as exc:
        return exc.exit_code, _failure(f"{type(exc).__name__}: {exc}", topology)
    except StorageError as exc:
        return EXIT_RETRYABLE, _failure(f"storage: {exc}", topology)
    except Exception as exc:
        log.error("%s", redact(traceback.format_exc()))
        return EXIT_RETRYABLE, _failure(f"{type(exc).__name__}: {exc}", topology)


def _scratch(workdir: Path | None) -> Path:
    from temper_trainer import distributed

    if workdir is None and os.environ.get("TEMPER_WORKDIR"):
        workdir = Path(os.environ["TEMPER_WORKDIR"])
    if workdir is None:
        return Path(tempfile.mkdtemp(prefix="temper-stage-"))
    # Ranks of one pod share TEMPER_WORKDIR: each gets its own folder under it.
    return workdir / f"rank-{distributed.local_rank()}" if distributed.is_worker() else workdir


def _run_contract(
    contract: StageContract, storage: Any, workdir: Path | None, topology: Any
) -> tuple[int, StageResult]:
    from temper_trainer import distributed
    from temper_trainer.progress import ProgressReporter
    from temper_trainer.stage import StageContext

    main = distributed.is_main_process()
    metrics = None
    if contract.metrics_port and distributed.local_rank() == 0:  # one metrics port per pod
        from temper_trainer.metrics import TrainerMetrics

        metrics = TrainerMetrics()
        metrics.serve(contract.metrics_port)
    ctx = StageContext(
        contract,
        _scratch(workdir),
        storage,
        device=distributed.device(),
        progress=ProgressReporter(contract, storage if main else None),  # rank 0 reports for all
        metrics=metrics,
    )
    ctx.install_signal_handlers()
    try:
        return _run_stage_in(ctx, storage, topology)
    finally:  # a pod that exits before Prometheus scraped it loses its final values
        if metrics is not None:
            metrics.await_final_scrape(
                contract.metrics_final_scrape_seconds or 0, stopping=lambda: ctx.stop_requested
            )


def _run_stage_in(ctx: StageContext, storage: Any, topology: Any) -> tuple[int, StageResult]:
    from temper.storage import S3Uri

    from temper_trainer import distributed
    from temper_trainer.models import inherit_parent_revision
    from temper_trainer.stages import get_stage

    contract = ctx.contract
    main = distributed.is_main_process()
    log.info(
        "stage %s (%s) attempt %d of %s/%s, rank %d of %d",
        contract.stage.name,
        contract.stage.type,
        contract.stage.attempt,
        contract.run.namespace,
        contract.run.name,
        distributed.rank(),
        topology.world_size,
    )
    ctx.set_phase("starting")
    existing = str(S3Uri.parse(contract.output.prefix).join("manifest.json"))
    if storage.exists(existing):  # an earlier attempt published and died before exiting
        verified = storage.verify_manifest(existing)
        if verified.ok and verified.manifest is not None and verified.manifest_sha256:
            log.info("output already published and verified: %s", existing)
            ctx.set_phase("done")
            return EXIT_OK, StageResult(
                manifest_uri=existing,
                sha256=verified.manifest_sha256,
                metrics=verified.manifest.metrics,
                evals=verified.manifest.evals,
                topology=topology,
            )
    inherit_parent_revision(contract, storage)  # the parent's base commit, not main's newest
    outcome = get_stage(contract.stage.type)(ctx)
    outcome.metrics.update(distributed.run_metrics())  # e.g. whether DDP replicas stayed identical
    if not main:  # exactly one rank publishes
        return EXIT_OK, StageResult(metrics=outcome.metrics, topology=topology)
    ctx.set_phase("publishing")
    published = storage.publish_atomic(
        outcome.artifact_dir,
        contract.output.prefix,
        contract.stage.attempt,
        manifest_fields(contract, outcome, storage),
    )
    metrics_out, evals_out = outcome.metrics, outcome.evals
    if not published.won:
        log.info("another attempt published first; its manifest verified")
        winner = storage.read_manifest(published.manifest_uri)[0]
        metrics_out, evals_out = winner.metrics, winner.evals
    ctx.set_phase("done")
    log.info("published %s", published.manifest_uri)
    return EXIT_OK, StageResult(
        manifest_uri=published.manifest_uri,
        sha256=published.sha256,
        metrics=metrics_out,
        evals=evals_out,
        topology=topology,
    )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=os.environ.get("TEMPER_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    parser = argparse.ArgumentParser(prog="temper_trainer")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help=f"run the stage described by ${CONTRACT_ENV}")
    build = sub.add_parser("build-tiny-model", help="build (or find) the builtin://tiny model")
    build.add_argument("--out", type=Path, help="build into this folder instead of the cache")
    args = parser.parse_args(argv)
    if args.command == "run":
        from temper_trainer import distributed
        from temper_trainer.launch import launch

        raw = os.environ.get(CONTRACT_ENV)
        return run_stage(raw) if distributed.is_worker() else launch(raw)
    from temper_trainer.tinymodel import build_tiny_model, ensure_tiny_model

    if args.out:
        stats = build_tiny_model(args.out)
        print(json.dumps({"path": str(args.out), **stats}))
    else:
        path = ensure_tiny_model()
        print(json.dumps({"path": str(path), **json.loads((path / "build.json").read_text())}))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
