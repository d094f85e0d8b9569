"""Continual cycles with real training and the regression gates: forgetting with and without replay.

Cycle 1 trains task A (arith); cycle 2 continues from cycle 1's adapter on task B (subtract),
once with replay of A and once without. An eval stage scores suite A on each adapter and
``temper.continual.gates`` computes forgetting vs cycle 1 (the promoted adapter). Prints JSON.

    python bench/continual_gates.py [--steps 60] [--replay 0.3] [--n 96]

Needs no cluster: a moto S3 server on 127.0.0.1 and the builtin tiny model.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from temper.api.contract import StageContract
from temper.continual.gates import Gate, evaluate
from temper_dev.s3server import S3Server
from temper_trainer.experiments import run_contract

SUITES = [
    {"name": "arith", "metric": "loss", "uri": "builtin://arith?n=20&split=eval"},
    {"name": "arith-em", "metric": "exact_match", "uri": "builtin://arith?n=20&split=eval"},
]


def contract(endpoint: str, prefix: str, name: str, stage_type: str, **body: Any) -> StageContract:
    base: dict[str, Any] = {
        "run": {"namespace": "bench", "name": "continual"},
        "stage": {"name": name, "type": stage_type},
        "baseModel": "builtin://tiny",
        "storage": {"endpointUrl": endpoint},
        "output": {"prefix": f"{prefix}{name}/"},
        "peft": {"method": "lora", "r": 8, "alpha": 16},
        "checkpoint": {"everySteps": 1000},
        "progressIntervalSeconds": 60,
        **body,
    }
    return StageContract.model_validate(base)


def evaluate_suites(endpoint: str, prefix: str, name: str, adapter: str) -> dict[str, float]:
    suites = [
        {
            "name": s["name"],
            "metric": s["metric"],
            "dataset": {"name": s["name"], "uri": s["uri"], "format": "chat"},
        }
        for s in SUITES
    ]
    return run_contract(
        contract(
            endpoint,
            prefix,
            name,
            "eval",
            parent={"manifestUri": adapter},
            suites=suites,
            hyperparameters={"maxNewTokens": 4},
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--replay", type=float, default=0.3)
    parser.add_argument("--n", type=int, default=96)
    parser.add_argument(
        "--fresh", action="store_true", help="cycle 2 starts from the base model instead of cycle 1's adapter"
    )
    args = parser.parse_args()
    gates = [Gate("arith", "loss", 0.0), Gate("arith-em", "exact_match", 0.0)]
    out: dict[str, Any] = {
        "steps": args.steps,
        "replay_ratio": args.replay,
        "examples": args.n,
        "fresh": args.fresh,
    }
    started = time.monotonic()
    with S3Server() as server:
        bucket = server.create_bucket()
        prefix = f"s3://{bucket}/bench/"
        env = server.env
        import os

        os.environ.update(env)
        a = {"name": "arith", "uri": f"builtin://arith?n={args.n}", "format": "chat", "task": "arith"}
        b = {
            "name": "subtract",
            "uri": f"builtin://subtract?n={args.n}",
            "format": "chat",
            "task": "subtract",
        }
        hp = {"maxSteps": args.steps, "learningRate": 3e-3, "batchSize": 16, "packing": True}
        run_contract(
            contract(server.endpoint_url, prefix, "g1", "sft", data={"train": [a]}, hyperparameters=hp)
        )
        g1 = f"{prefix}g1/manifest.json"
        baseline = evaluate_suites(server.endpoint_url, prefix, "g1-eval", g1)
        out["cycle1"] = {k: round(v, 4) for k, v in baseline.items() if k.startswith("suite/")}
        for label, ratio in (("with_replay", args.replay), ("without_replay", 0.0)):
            data: dict[str, Any] = {"train": [b]}
            if ratio > 0:
                data["replay"] = {"ratio": ratio, "datasets": [a], "seed": 7}
            name = f"g2-{label}"
            run_contract(
                contract(
                    server.endpoint_url,
                    prefix,
                    name,
                    "sft",
                    data=data,
                    hyperparameters=hp,
                    **({} if args.fresh else {"parent": {"manifestUri": g1}}),
                )
            )
            current = evaluate_suites(
                server.endpoint_url, prefix, f"{name}-eval", f"{prefix}{name}/manifest.json"
            )
            report = evaluate(gates, current, baseline)
            out[label] = {
                "metrics": {k: round(v, 4) for k, v in current.items() if k.startswith("suite/")},
                "forgetting": {
                    r.suite + "/" + r.metric: round(r.forgetting or 0.0, 4) for r in report.results
                },
            }
    out["seconds"] = round(time.monotonic() - started, 1)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
