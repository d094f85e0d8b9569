"""Continual learning: task A (arith), then task B (subtract) with 0% and 10% replay of A."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from temper_dev.s3server import S3Server
from temper_trainer.experiments import continual_forgetting

pytestmark = [pytest.mark.unit, pytest.mark.slow]


def test_replay_cuts_forgetting_and_keeps_the_gain(
    s3_server: S3Server, s3_bucket: str, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    result = continual_forgetting(s3_server.endpoint_url, f"s3://{s3_bucket}/continual", steps=200)
    print(json.dumps(result, indent=1))
    no_replay, replay = result["runs"]["0.0"], result["runs"]["0.1"]
    # Honest tasks (issue 16): the tiny model gets few held-out sums exact, so forgetting is
    # measured on held-out completion loss (100 items per task); exact match is reported.
    assert no_replay["forgetting_a_loss"] > 0.5  # B without replay really does damage A
    assert replay["forgetting_a_loss"] <= 0.5 * no_replay["forgetting_a_loss"]
    assert replay["gain_b_loss"] >= 0.9 * no_replay["gain_b_loss"]
