"""Datasets: builtin tasks, files from disk and S3, replay mixing, curriculum, SFT encoding."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from temper.api.contract import DatasetSpec, StageData, StorageConfig
from temper.storage import Storage
from temper_dev.s3server import S3Server
from temper_trainer.data import (
    IGNORE_INDEX,
    DataError,
    builtin_records,
    chat_segments,
    encode_sft,
    load_records,
    load_stage_data,
    replay_count,
    sample_replay,
    task_split,
)

pytestmark = pytest.mark.unit


def _twin(prompt: str) -> str:
    a, b = prompt[:-1].split("+")
    return f"{b}+{a}="


def test_builtin_splits_are_disjoint_and_deterministic() -> None:
    for task in ("arith", "subtract"):
        train = {p.prompt for p in task_split(task, "train")}
        held_out = {p.prompt for p in task_split(task, "eval")}
        assert len(held_out) >= 150  # enough unique items for >= 100-item forgetting measurements
        assert not train & held_out
        if task == "arith":  # no commuted twin of an eval problem is trained on
            assert not {_twin(p) for p in held_out} & train
    carries = [p.difficulty for p in task_split("arith", "eval") if int(p.answer) >= 10]
    assert carries, "the eval split has multi-digit answers"


def test_pretraining_corpus_never_contains_an_eval_item() -> None:
    from temper_trainer.data import pretraining_corpus
    from temper_trainer.tinymodel import PRETRAIN_BATCH, PRETRAIN_STEPS, SEED

    corpus = set(pretraining_corpus(PRETRAIN_STEPS * PRETRAIN_BATCH, SEED))
    seen = {line.rsplit(" is ", 1)[0] for line in corpus}
    for task in ("arith", "subtract"):
        for problem in task_split(task, "eval"):
            assert problem.pretrain.removesuffix(" is") not in seen, problem
            if task == "arith":
                assert _twin(problem.prompt)[:-1] not in seen, problem
    assert len(seen) > 1000  # and it does teach the training problems


def test_pretraining_loss_is_on_the_answers_only() -> None:
    from temper_trainer.tinymodel import _answer_batch, _pretrain_texts, build_tokenizer

    tokenizer = build_tokenizer()
    pairs = _pretrain_texts(tokenizer, 64, 1234)
    assert any(c.startswith("<|user|>") for c, _ in pairs), "the chat frame is in the corpus"
    batch = _answer_batch(tokenizer, pairs)
    for row, (context, answer) in enumerate(pairs):
        labels = [t for t in batch["labels"][row].tolist() if t != -100]
        assert tokenizer.decode(labels) == answer, (context, answer)
        assert context.endswith((" is ", "<|assistant|>"))


def test_eval_splits_are_unique_and_bounded() -> None:
    pool = len(task_split("arith", "eval"))
    records = builtin_records(f"builtin://arith?n={pool}&split=eval", "prompt")
    assert len({r["prompt"] for r in records}) == pool
    with pytest.raises(DataError, match=f"n={pool + 1} exceeds the {pool} unique arith eval problems"):
        builtin_records(f"builtin://arith?n={pool + 1}&split=eval", "prompt")


def test_builtin_safety_probes() -> None:
    probes = builtin_records("builtin://safety", "prompt")
    assert {r["expected"] for r in probes} == {"refuse", "comply"}
    eval_prompts = {p.prompt for p in task_split("arith", "eval")}
    assert all(r["prompt"] in eval_prompts for r in probes if r["expected"] == "comply")
    with pytest.raises(DataError, match="between 1 and"):
        builtin_records("builtin://safety?n=999", "prompt")
    a = builtin_records("builtin://arith?n=30&seed=3", "prompt-completion")
    b = builtin_records("builtin://arith?n=30&seed=3", "prompt-completion")
    c = builtin_records("builtin://arith?n=30&seed=4", "prompt-completion")
    assert a == b
    assert a != c
    for record in a:
        x, y = record["prompt"][:-1].split("+")
        assert int(record["completion"]) == int(x) + int(y)
        assert record["task"] == "arith"


def test_builtin_formats() -> None:
    chat = builtin_records("builtin://subtract?n=3&turns=2", "chat")
    assert [m["role"] for m in chat[0]["messages"]] == ["user", "assistant", "user", "assistant"]
    prefs = builtin_records("builtin://arith?n=20", "preference")
    assert all(r["chosen"] != r["rejected"] for r in prefs)
    # Every pair of both tasks, both splits: a near miss never folds back onto the answer (5 - 10).
    for uri in ("builtin://arith?n=800", "builtin://subtract?n=700", "builtin://arith?n=200&split=eval"):
        assert all(r["chosen"] != r["rejected"] for r in builtin_records(uri, "preference")), uri
    prompts = builtin_records("builtin://arith?n=5&split=eval", "prompt")
    assert all(set(r) >= {"prompt", "answer", "task"} for r in prompts)


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("builtin://nope", "unknown builtin dataset 'nope'"),
        ("builtin://arith?n=x", "must be integers"),
        ("builtin://arith?bogus=1", "unknown parameter"),
        ("builtin://arith?split=test", "split must be"),
    ],
)
def test_builtin_errors_name_the_problem(uri: str, message: str) -> None:
    with pytest.raises(DataError, match=message):
        builtin_records(uri, "chat")


def test_jsonl_and_parquet_from_disk_and_s3(
    tmp_path: Path, s3_server: S3Server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(5)]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    parquet = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    storage = Storage(StorageConfig(endpointUrl=s3_server.endpoint_url))
    storage.upload_file(parquet, f"s3://{s3_bucket}/data/d.parquet")
    storage.upload_file(jsonl, f"s3://{s3_bucket}/data/d.jsonl")
    for uri in (
        str(jsonl),
        str(parquet),
        f"s3://{s3_bucket}/data/d.parquet",
        f"s3://{s3_bucket}/data/d.jsonl",
    ):
        records = load_records(DatasetSpec(name="d", uri=uri, task="qa"), storage)
        assert [r["prompt"] for r in records] == [r["prompt"] for r in rows]
        assert all(r["task"] == "qa" for r in records)


def test_bad_records_name_dataset_and_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "q"}\n')
    with pytest.raises(DataError, match=r"dataset 'tickets' record 0: missing field 'completion'"):
        load_records(DatasetSpec(name="tickets", uri=str(path)))
    path.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(DataError, match="last message must be the assistant"):
        load_records(DatasetSpec(name="c", uri=str(path), format="chat"))
    path.write_text("{not json\n")
    with pytest.raises(DataError, match="line 1: invalid JSON"):
        load_records(DatasetSpec(name="j", uri=str(path)))
    with pytest.raises(DataError, match="no such file"):
        load_records(DatasetSpec(name="m", uri=str(tmp_path / "missing.jsonl")))


def test_replay_mixing_ratio_and_per_task_balance() -> None:
    assert replay_count(90, 0.1, None) == 10
    assert replay_count(90, 0.0, None) == 0
    assert replay_count(90, 0.5, 20) == 20
    data = StageData.model_validate(
        {
            "train": [{"name": "b", "uri": "builtin://subtract?n=90", "format": "chat"}],
            "replay": {
                "ratio": 0.1,
                "datasets": [
                    {"name": "a", "uri": "builtin://arith?n=100", "format": "chat"},
                    {"name": "s", "uri": "builtin://subtract?n=10", "format": "chat", "task": "old-sub"},
                ],
                "sampling": "per-task-balanced",
                "seed": 1,
            },
        }
    )
    mixed = load_stage_data(data, "train", None, seed=0)
    replayed = [r for r in mixed if r.get("_replay")]
    assert len(mixed) == 100
    assert len(replayed) == 10
    assert Counter(r["task"] for r in replayed) == {"arith": 5, "old-sub": 5}  # balanced despite 100:10
    assert load_stage_data(data, "train", None, seed=0) == mixed  # deterministic
    uniform = sample_replay([{"task": "a"}] * 90 + [{"task": "b"}] * 10, 50, "uniform", 0)
    assert Counter(r["task"] for r in uniform)["a"] > 35


def test_replay_without_buffer_is_an_error() -> None:
    data = StageData.model_validate(
        {"train": [{"name": "b", "uri": "builtin://arith?n=5"}], "replay": {"ratio": 0.2}}
    )
    with pytest.raises(DataError, match=r"replay\.datasets"):
        load_stage_data(data, "train", None)


def test_curriculum_orders(tmp_path: Path) -> None:
    base = {
        "train": [
            {"name": "a", "uri": "builtin://arith?n=40"},
            {"name": "s", "uri": "builtin://subtract?n=40"},
        ]
    }
    by_len = load_stage_data(
        StageData.model_validate({**base, "curriculum": {"orderBy": "length"}}), "train", None
    )
    lengths = [len(r["prompt"]) + len(r["completion"]) for r in by_len]
    assert lengths == sorted(lengths)
    by_score = load_stage_data(
        StageData.model_validate({**base, "curriculum": {"orderBy": "score", "scoreField": "difficulty"}}),
        "train",
        None,
    )
    assert [r["difficulty"] for r in by_score] == sorted(r["difficulty"] for r in by_score)
    by_dataset = load_stage_data(
        StageData.model_validate({**base, "curriculum": {"orderBy": "dataset"}}), "train", None
    )
    assert [r["task"] for r in by_dataset] == ["arith"] * 40 + ["subtract"] * 40
    shuffled = load_stage_data(StageData.model_validate(base), "train", None, seed=1)
    assert [r["task"] for r in shuffled] != ["arith"] * 40 + ["subtract"] * 40
    with pytest.raises(DataError, match="scoreField 'nope'"):
        load_stage_data(
            StageData.model_validate({**base, "curriculum": {"orderBy": "score", "scoreField": "nope"}}),
            "train",
            None,
        )


def test_sft_encoding_trains_only_on_answers(tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    record = builtin_records("builtin://arith?n=1&turns=2", "chat")[0]
    ids, labels = encode_sft(record, tok, 256)
    trained = tok.decode([i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX])
    answers = [m["content"] for m in record["messages"] if m["role"] == "assistant"]
    assert trained == "".join(a + tok.eos_token for a in answers)  # both assistant turns, nothing else
    segments = chat_segments(record["messages"], tok)
    assert "".join(text for text, _ in segments) == tok.apply_chat_template(
        record["messages"], tokenize=False
    )
    pc = {"prompt": "3+4=", "completion": "7"}
    ids, labels = encode_sft(pc, tok, 256)
    assert (
        tok.decode([i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX])
        == "7" + tok.eos_token
    )


def test_packing_has_no_cross_contamination(tiny_model: Path) -> None:
    import torch
    from temper_trainer.stages.sft import encode_examples, packed_batch, padded_batch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    examples = encode_examples(builtin_records("builtin://arith?n=4&turns=2", "chat"), tok, 128)
    batch = packed_batch(examples)
    starts = [sum(len(ids) for ids, _ in examples[:k]) for k in range(len(examples))]
    assert all(int(batch["labels"][0, s]) == IGNORE_INDEX for s in starts)  # no loss across a boundary
    assert [int(batch["position_ids"][0, s]) for s in starts] == [0] * len(examples)
    with torch.no_grad():
        packed = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).logits[0]
        offset = 0
        for ids, _ in examples:
            alone = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
            assert torch.allclose(packed[offset : offset + len(ids)], alone, atol=1e-4)
            offset += len(ids)
        packed_loss = model(**batch, use_cache=False).loss
        padded_loss = model(**padded_batch(examples, tok.pad_token_id), use_cache=False).loss
    # the first label of each packed example is dropped, which here is a prompt token (already ignored)
    assert torch.allclose(packed_loss, padded_loss, atol=1e-4)
