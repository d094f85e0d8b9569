"""``builtin://tiny``: a small Llama built deterministically here, so tests and the demo run offline.

A character-level tokenizer (``tokenizers`` WordLevel, wrapped in ``PreTrainedTokenizerFast``)
with a chat template and pad/bos/eos tokens, plus a small Llama pretrained on
``temper_trainer.data.pretraining_corpus``: the builtin tasks' *training* problems in raw text
(``"47+8 is 55."``, the loss on the answer only), never an eval problem and never the
``builtin://`` prompt formats, so held-out scores are generalization and SFT has a format to
teach. One thread, fixed seeds: the same weights every build. Cached under
``$TEMPER_MODEL_CACHE`` (default ``~/.cache/temper/models``) behind a file lock, keyed by
:func:`recipe_version`: a hash of this file and of the corpus itself, so any change to the recipe
or to the tasks builds a new model instead of reusing a stale one.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import time
from pathlib import Path
from typing import Any

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
SPECIAL_ROLES = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
CHARS = " 0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ+-*/=.,:;!?'\"()[]_#\n"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
PRETRAIN_STEPS = 800
PRETRAIN_BATCH = 128  # per-step overhead dominates on CPU: wide batches are nearly free
PRETRAIN_LR = 3e-3
SEED = 1234


@functools.cache
def recipe_version() -> str:
    """``tiny-<hash>``: this file's source and the pretraining corpus, hashed."""
    from temper_trainer.data import pretraining_corpus

    digest = hashlib.sha256(Path(__file__).read_bytes())
    digest.update("\n".join(pretraining_corpus(PRETRAIN_STEPS * PRETRAIN_BATCH, SEED)).encode())
    return f"tiny-{digest.hexdigest()[:12]}"


def model_cache_dir() -> Path:
    return Path(os.environ.get("TEMPER_MODEL_CACHE") or Path.home() / ".cache" / "temper" / "models")


def build_tokenizer() -> Any:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS + list(CHARS))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_ROLES["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(SPECIALS)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL_ROLES)  # type: ignore[no-untyped-call]
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.padding_side = "left"  # generation batches; training builds its own batches
    return tokenizer


def build_config(vocab_size: int) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def _pretrain_texts(tokenizer: Any, n: int, seed: int) -> list[tuple[str, str]]:
    """``(context, answer)`` pairs: the corpus's problems split at ``" is "``, plus chat frames."""
    from temper_trainer.data import pretraining_corpus

    rng = random.Random(seed + 1)
    texts = []
    for line in pretraining_corpus(n, seed):
        if rng.random() < 0.15:  # the chat frame, with echo answers only
            word = "".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 4)))
            user = [{"role": "user", "content": f"say {word}"}]
            frame = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
            texts.append((frame, f"{word}</s>"))
        else:
            problem, _, answer = line.rpartition(" is ")
            texts.append((f"<s>{problem} is ", f"{answer}</s>"))
    return texts


def _answer_batch(tokenizer: Any, pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """A left-padded batch whose labels are the answers only: the operands are random digits, and
    a loss on them drowns the sum's signal (measured: full-text loss left 13% of the held-out sums
    right after 800 steps; the answer-only loss got 100%)."""
    enc = tokenizer([c + a for c, a in pairs], add_special_tokens=False, padding=True, return_tensors="pt")
    labels = enc["input_ids"].clone()
    width = labels.shape[1]
    for row, (_, answer) in enumerate(pairs):
        labels[row, : width - len(tokenizer(answer, add_special_tokens=False)["input_ids"])] = -100
    return {**enc, "labels": labels}


def build_tiny_model(out_dir: Path, *, steps: int = PRETRAIN_STEPS, seed: int = SEED) -> dict[str, float]:
    """Build tokenizer + pretrained weights into ``out_dir``; returns build stats."""
    import torch
    from transformers import LlamaForCausalLM

    started = time.monotonic()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bitwise-reproducible reductions, and the build fits one core
    try:
        torch.manual_seed(seed)
        tokenizer = build_tokenizer()
        model = LlamaForCausalLM(build_config(len(tokenizer)))
        texts = _pretrain_texts(tokenizer, steps * PRETRAIN_BATCH, seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=PRETRAIN_LR, weight_decay=0.01)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=PRETRAIN_LR, total_steps=steps, pct_start=0.1
        )
        model.train()
        loss = torch.tensor(0.0)
        for step in range(steps):
            batch = texts[step * PRETRAIN_BATCH : (step + 1) * PRETRAIN_BATCH]
            loss = model(**_answer_batch(tokenizer, batch)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        model.eval()  # type: ignore[no-untyped-call]
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
    finally:
        torch.set_num_threads(threads)
    stats = {"seconds": round(time.monotonic() - started, 2), "final_loss": round(float(loss.detach()), 4)}
    (out_dir / "build.json").write_text(json.dumps({"recipe": recipe_version(), **stats}))
    return stats


def ensure_tiny_model(cache_dir: Path | None = None) -> Path:
    """The cached tiny model's folder, built once (other processes wait on the lock)."""
    from filelock import FileLock

    version = recipe_version()
    baked = Path(os.environ.get("TEMPER_BAKED_MODELS") or "/nonexistent") / version
    if cache_dir is None and (baked / "build.json").exists():
        return baked  # the image's read-only copy: nothing to build or lock
    root = cache_dir or model_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    target = root / version
    if (target / "build.json").exists():
        return target
    with FileLock(str(root / f"{version}.lock")):
        if (target / "build.json").exists():
            return target
        staging = root / f"{version}.building-{os.getpid()}"
        build_tiny_model(staging)
        staging.rename(target)  # atomic: readers see a complete folder or none
    return target
