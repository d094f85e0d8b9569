"""reward-model, grpo scored by that reward model, and synthetic-preferences: real tiny-model
training on CPU, data and artifacts in a real moto S3 server, the trainer's real runner."""

from __future__ import annotations

import json
from typing import Any

import pytest
from temper.api.contract import EXIT_INVALID_INPUT, EXIT_OK

from tests.unit.trainer_helpers import RlStages, rl_fixture  # noqa: F401  (the rl fixture)

pytestmark = pytest.mark.unit


def terse_vs_rambling(split: str) -> list[dict[str, str]]:
    """A house-style preference: the bare answer beats the tiny model's pretraining phrasing."""
    from temper_trainer.data import task_split

    rows = []
    problems = task_split("arith", split)[:: 19 if split == "train" else 3]  # 43 train, 67 held out
    for problem in problems:
        a, b = problem.prompt[:-1].split("+")
        rows.append(
            {
                "prompt": problem.prompt,
                "chosen": problem.answer,
                "rejected": f"sum {a} {b} is {problem.answer}.",
            }
        )
    return rows


@pytest.fixture
def style_prefs(rl: RlStages) -> dict[str, dict[str, str]]:
    specs = {}
    for split in ("train", "eval"):
        uri = f"s3://{rl.bucket}/data/style-{split}.jsonl"
        rl.storage.put_bytes(uri, "".join(json.dumps(r) + "\n" for r in terse_vs_rambling(split)).encode())
        specs[split] = {"name": f"style-{split}", "uri": uri, "format": "preference"}
    return specs


def train_reward_model(rl: RlStages, prefs: dict[str, dict[str, str]]) -> tuple[int, dict[str, Any]]:
    doc = rl.doc(
        "rm",
        "reward-model",
        data={"train": [prefs["train"]], "eval": [prefs["eval"]]},
        peft={"method": "lora", "r": 8, "alpha": 16},
        hyperparameters={"maxSteps": 30, "batchSize": 16, "learningRate": 3e-3},
    )
    return rl.run(doc)


def test_reward_model_learns_the_preference_and_loads_the_stock_way_then_drives_grpo(
    rl: RlStages, style_prefs: dict[str, dict[str, str]]
) -> None:
    import torch
    from peft import PeftModel
    from temper_trainer.models import resolve_model_dir
    from temper_trainer.rewards import reward_model_input_ids
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    code, result = train_reward_model(rl, style_prefs)
    assert code == EXIT_OK, result
    m = result["metrics"]
    assert m["eval/accuracy"] >= 0.9, m
    assert m["eval/accuracy"] >= m["eval/accuracy_before"] + 0.2, m
    manifest = rl.published(result)
    assert manifest["stageType"] == "reward-model"

    # stock loading: base as a 1-logit classifier + PeftModel.from_pretrained, scores as recorded
    folder = rl.download(result["manifestUri"], "rm-artifact")
    assert json.loads((folder / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    base = AutoModelForSequenceClassification.from_pretrained(
        str(resolve_model_dir("builtin://tiny", None)), num_labels=1
    )
    base.config.pad_token_id = tokenizer.pad_token_id
    model = PeftModel.from_pretrained(base, str(folder)).eval()
    wins = 0
    held_out = terse_vs_rambling("eval")
    with torch.no_grad():
        for row in held_out:
            chosen = model(
                input_ids=torch.tensor([reward_model_input_ids(tokenizer, row["prompt"], row["chosen"], 64)])
            )
            rejected = model(
                input_ids=torch.tensor(
                    [reward_model_input_ids(tokenizer, row["prompt"], row["rejected"], 64)]
                )
            )
            wins += int(float(chosen.logits[0, 0]) > float(rejected.logits[0, 0]))
    assert wins / len(held_out) == pytest.approx(m["eval/accuracy"])

    # "reward model + RL": grpo scored by that published reward model raises its reward
    doc = rl.doc(
        "rl-rm",
        "grpo",
        data={
            "train": [{"name": "sums", "uri": "builtin://arith?n=80", "format": "prompt"}],
            "eval": [{"name": "sums-heldout", "uri": "builtin://arith?n=20&split=eval", "format": "prompt"}],
        },
        rewards=[{"type": "reward-model", "model": {"name": "rm", "manifestUri": result["manifestUri"]}}],
        peft={"method": "lora", "r": 8, "alpha": 16},
        hyperparameters={
            "maxSteps": 40,
            "batchSize": 32,
            "numGenerations": 8,
            "maxNewTokens": 8,
            "learningRate": 3e-3,
            "maxGradNorm": 0,
        },
    )
    code, grpo = rl.run(doc)
    assert code == EXIT_OK, grpo
    # The tiny reward model's scores span ~1 unit on these prompts: +0.5 held on the machines this was
    # first tuned on, but GRPO saturates near +0.24 here (40 or 80 steps alike), on the old loop too.
    assert grpo["metrics"]["eval/reward"] > grpo["metrics"]["eval/reward_before"] + 0.15, grpo["metrics"]
    assert grpo["metrics"]["train/reward"] > grpo["metrics"]["train/reward_first"]
    judge_an_eval_stage_with_it(rl, result["manifestUri"], grpo["manifestUri"])


def judge_an_eval_stage_with_it(rl: RlStages, rm_manifest: str, grpo_manifest: str) -> None:
    """An eval stage's judge suite scores grpo's adapter with the same reward model: above the
    base model's completions (the baseline), a zero-regression gate on it holds."""
    heldout = {"name": "sums-heldout", "uri": "builtin://arith?n=20&split=eval", "format": "prompt"}
    doc = rl.doc(
        "judged",
        "eval",
        parent={"name": "rl-rm", "manifestUri": grpo_manifest},
        suites=[
            {
                "name": "taste",
                "dataset": heldout,
                "metric": "judge",
                "judge": {"name": "rm", "manifestUri": rm_manifest},
                "maxRegression": 0.0,
            }
        ],
        hyperparameters={"maxNewTokens": 8},
    )
    code, judged = rl.run(doc)
    assert code == EXIT_OK, judged
    (taste,) = judged["evals"]
    assert (taste["metric"], taste["examples"], taste["baselineSource"]) == ("judge", 20, "base model")
    assert taste["value"] > taste["baseline"] + 0.1, taste
    assert taste["winRate"] > 0.5, taste
    assert judged["metrics"]["suite/taste/judge"] == taste["value"]
    assert judged["metrics"]["suite/taste/judge_win_rate"] == taste["winRate"]
    # A judge that is no reward model is refused, naming the suite's field.
    doc["stage"]["name"] = "misjudged"
    doc["output"]["prefix"] = doc["output"]["prefix"].replace("judged", "misjudged")
    doc["suites"][0]["judge"] = {"name": "rl-rm", "manifestUri": grpo_manifest}
    code, refused = rl.run(doc)
    assert code == EXIT_INVALID_INPUT, refused
    assert "suites[taste].judge" in refused["error"], refused
    assert "not a reward-model stage" in refused["error"], refused


def test_synthetic_preferences_writes_valid_correctly_ordered_pairs(rl: RlStages) -> None:
    from temper.api.contract import DatasetSpec
    from temper_trainer.data import load_records
    from temper_trainer.rewards import Candidate, length_reward, regex_reward

    doc = rl.doc(
        "synth",
        "synthetic-preferences",
        data={"train": [{"name": "sums", "uri": "builtin://arith?n=24", "format": "prompt"}]},
        rewards=[{"type": "regex", "pattern": r"\d+"}, {"type": "length", "targetLength": 2, "weight": 0.5}],
        hyperparameters={"numGenerations": 6, "maxNewTokens": 6, "temperature": 1.0},
    )
    code, result = rl.run(doc)
    assert code == EXIT_OK, result
    manifest = rl.published(result)
    paths = [f["path"] for f in manifest["files"]]
    data_path = next(p for p in paths if p.endswith("preferences.jsonl"))
    assert manifest["lineage"]["dataset"]["file"] == "preferences.jsonl"

    # the published file is a valid preference dataset for a later dpo / reward-model stage
    uri = result["manifestUri"].rsplit("/", 1)[0] + "/" + data_path
    records = load_records(DatasetSpec(name="synth", uri=uri, format="preference"), rl.storage)
    assert len(records) == result["metrics"]["pairs/count"] > 0
    assert result["metrics"]["pairs/count"] + result["metrics"]["pairs/skipped_ties"] == 24
    import re

    regex, length = regex_reward(re.compile(r"\d+")), length_reward(2)
    for record in records:
        assert record["chosen_score"] > record["rejected_score"]
        for side in ("chosen", "rejected"):  # the recorded scores are the rewards' real values
            candidate = [Candidate(record["prompt"], record[side], None)]
            rescored = regex(candidate)[0] + 0.5 * length(candidate)[0]
            assert rescored == pytest.approx(record[f"{side}_score"])

    # same seed, same pairs: a rerun (fresh output prefix) reproduces the file byte for byte
    again = dict(doc, stage={"name": "synth-again", "type": "synthetic-preferences"})
    again["output"] = {"prefix": f"s3://{rl.bucket}/rl/synth-again/"}
    code, second = rl.run(again)
    assert code == EXIT_OK
    sha = {f["path"]: f["sha256"] for f in manifest["files"]}[data_path]
    assert {f["path"]: f["sha256"] for f in rl.published(second)["files"]}[data_path] == sha
