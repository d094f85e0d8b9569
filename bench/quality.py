"""Quality benchmark: what each stage really learns, on held-out problems, over 3 seeds.

    python bench/quality.py [--seeds 1 2 3] [--out bench/results/quality.json]

Starts a loopback S3 server and runs real stages through the trainer's entry point (``run_stage``,
what a pod runs) on the builtin tiny model: SFT on ``arith`` (a number below 100 plus a one-digit
number), DPO, GRPO and a reward model from held-out-evaluated data, and continual learning
(``subtract`` after ``arith``) with 0% and 10% replay. Every number is measured on held-out
problems: no stage trained on them, nor did the tiny model's pretraining (nor their commuted
twins). Prints, and writes, a JSON table of per-seed values with mean and spread (min, max, sample
standard deviation) against the goals of issue 16. Goals are not assertions: a miss is reported.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

from temper_dev.s3server import S3Server
from temper_trainer.experiments import quality

GOALS = {
    "sft_gain_points": ">= 30 (exact match, held-out, over the same-format base)",
    "dpo_heldout_preference_accuracy": ">= 0.90",
    "grpo_heldout_reward_gain": "reported",
    "reward_model_heldout_accuracy": "reported",
    "continual_forgetting_ratio": "<= 0.5 (10% replay vs no replay, exact match on held-out old-task items)",
    "continual_gain_ratio": ">= 0.9 (target-task gain, 10% replay vs no replay)",
}


def measures(run: dict[str, Any]) -> dict[str, float]:
    """The table's row values for one seed."""
    c = run["continual"]
    forget_0 = c["after_a"] - c["replay_0_arith"]
    forget_10 = c["after_a"] - c["replay_10_arith"]
    gain_0 = c["replay_0_subtract"] - c["b_before"]
    gain_10 = c["replay_10_subtract"] - c["b_before"]
    return {
        "sft_base_exact_match": run["sft"]["base_exact_match"],
        "sft_base_exact_match_pretrain_format": run["sft"]["base_exact_match_pretrain_format"],
        "sft_exact_match": run["sft"]["exact_match"],
        "sft_gain_points": 100 * run["sft"]["gain"],
        "dpo_heldout_preference_accuracy_before": run["dpo"]["accuracy_before"],
        "dpo_heldout_preference_accuracy": run["dpo"]["accuracy"],
        "grpo_heldout_reward_before": run["grpo"]["reward_before"],
        "grpo_heldout_reward_gain": run["grpo"]["gain"],
        "reward_model_heldout_accuracy": run["reward_model"]["accuracy"],
        "continual_forgetting_no_replay": forget_0,
        "continual_forgetting_replay_10": forget_10,
        "continual_forgetting_ratio": forget_10 / forget_0 if forget_0 > 0 else float("nan"),
        "continual_gain_no_replay": gain_0,
        "continual_gain_replay_10": gain_10,
        "continual_gain_ratio": gain_10 / gain_0 if gain_0 > 0 else float("nan"),
    }


def _num(value: float) -> float | None:
    return round(value, 4) if math.isfinite(value) else None


def table(rows: list[dict[str, float]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for key in rows[0]:
        seeds = [r[key] for r in rows]
        values = [v for v in seeds if math.isfinite(v)] or [math.nan]  # a ratio of a zero: undefined
        out[key] = {
            "per_seed": [round(v, 4) if math.isfinite(v) else None for v in seeds],
            "mean": _num(statistics.fmean(values)),
            "min": _num(min(values)),
            "max": _num(max(values)),
            "stdev": _num(statistics.stdev(values)) if len(values) > 1 else 0.0,
            **({"goal": GOALS[key]} if key in GOALS else {}),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--sft-steps", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "quality.json")
    parser.add_argument("--rows", type=Path, help="re-tabulate the per-seed JSON lines of an earlier run")
    args = parser.parse_args()
    if args.rows:
        lines = [json.loads(x) for x in args.rows.read_text().splitlines() if x.startswith('{"seed"')]
        rows = [{k: float(v) for k, v in r.items() if k != "seed"} for r in lines]
        result = {"seeds": [r["seed"] for r in lines], "heldout_items": 150, "table": table(rows)}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        return
    import torch

    torch.set_num_threads(1)  # tiny models train fastest on one thread; two spin-wait on 2 cores
    started = time.monotonic()
    rows = []
    with S3Server() as server:
        os.environ.update(server.env)
        bucket = server.create_bucket()
        for seed in args.seeds:
            run = quality(server.endpoint_url, f"s3://{bucket}/quality", seed, sft_steps=args.sft_steps)
            rows.append(measures(run))
            print(json.dumps({"seed": seed, **rows[-1]}), flush=True)
    result = {
        "seeds": args.seeds,
        "heldout_items": 150,
        "table": table(rows),
        "seconds": round(time.monotonic() - started, 1),
        "load_average": os.getloadavg()[0],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
