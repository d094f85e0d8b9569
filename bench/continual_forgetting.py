"""Continual-learning benchmark: forgetting on task A and gain on task B, with 0% and 10% replay.

    python bench/continual_forgetting.py [--steps 100] [--n 400]

Starts a loopback S3 server, trains task A (arith) then task B (subtract) from A's adapter
through the real stage runner, and prints JSON. Forgetting is reported two ways: the drop in
A's held-out exact match, and the rise in A's held-out completion loss (smoother on 20 examples).
"""

from __future__ import annotations

import argparse
import json
import os
import time

from temper_dev.s3server import S3Server
from temper_trainer.experiments import continual_forgetting


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--n", type=int, default=400)
    args = parser.parse_args()
    with S3Server() as server:
        os.environ.update(server.env)
        bucket = server.create_bucket()
        started = time.monotonic()
        result = continual_forgetting(
            server.endpoint_url, f"s3://{bucket}/continual", steps=args.steps, n=args.n
        )
    no_replay, replay = result["runs"]["0.0"], result["runs"]["0.1"]
    result["forgetting_ratio_loss"] = round(
        replay["forgetting_a_loss"] / max(no_replay["forgetting_a_loss"], 1e-9), 3
    )
    result["gain_ratio_loss"] = round(replay["gain_b_loss"] / max(no_replay["gain_b_loss"], 1e-9), 3)
    result["seconds"] = round(time.monotonic() - started, 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
