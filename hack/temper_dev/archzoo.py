"""Small random-initialised models of the architectures users fine-tune, in Hugging Face format.

Each one is a real ``transformers`` architecture class (Llama, Qwen2, Mistral, Gemma 2, Phi-3)
at a tiny width, with a byte-level BPE tokenizer trained here with ``tokenizers`` on the
builtin tasks' text and that family's own special tokens and chat template. Deterministic: the
same seed gives the same weights and vocabulary. Used by the architecture matrix tests, served
through the Hub path (:mod:`temper_dev.hub`).

    python -m temper_dev.archzoo OUT_DIR [ARCH ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RECIPE_VERSION = "archzoo-v2"  # bump when a config, the corpus or the tokenizer recipe changes
VOCAB_SIZE = 480
WIDTH = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}


@dataclass(frozen=True)
class Arch:
    name: str
    config_class: str
    bos: str | None
    eos: str
    pad: str
    extra_specials: tuple[str, ...]
    chat_template: str
    config: dict[str, Any] = field(default_factory=dict)
    # Linear layers of one decoder block, as PEFT's ``all-linear`` must find them.
    linear_modules: frozenset[str] = frozenset(
        {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    )


ARCHS: dict[str, Arch] = {
    "llama": Arch(
        "llama",
        "LlamaConfig",
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
        pad="<|finetune_right_pad_id|>",
        extra_specials=("<|start_header_id|>", "<|end_header_id|>"),
        chat_template=(
            "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
            "{{ m['content'] }}<|eot_id|>{% endfor %}"
            "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
        ),
    ),
    "qwen2": Arch(
        "qwen2",
        "Qwen2Config",
        bos=None,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        extra_specials=("<|im_start|>",),
        chat_template=(
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
        ),
    ),
    "mistral": Arch(
        "mistral",
        "MistralConfig",
        bos="<s>",
        eos="</s>",
        pad="<pad>",
        extra_specials=("[INST]", "[/INST]"),
        chat_template=(
            "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} "
            "[/INST]{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
        ),
        config={"sliding_window": None},
    ),
    "gemma2": Arch(
        "gemma2",
        "Gemma2Config",
        bos="<bos>",
        eos="<end_of_turn>",
        pad="<pad>",
        extra_specials=("<start_of_turn>", "<eos>"),
        chat_template=(
            "{{ bos_token }}{% for m in messages %}<start_of_turn>"
            "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
            "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
        ),
        config={"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 64},
    ),
    "phi3": Arch(
        "phi3",
        "Phi3Config",
        bos=None,
        eos="<|end|>",
        pad="<|endoftext|>",
        extra_specials=("<|system|>", "<|user|>", "<|assistant|>"),
        chat_template=(
            "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
        ),
        linear_modules=frozenset({"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}),
    ),
}


def _corpus() -> list[str]:
    from temper_trainer.data import builtin_records, pretraining_corpus

    texts = pretraining_corpus(400, seed=7)
    for task in ("arith", "subtract"):
        for record in builtin_records(f"builtin://{task}?n=200", "prompt-completion"):
            texts.append(f"{record['prompt']}{record['completion']}")
    texts.append("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 say user assistant model")
    return texts


def train_tokenizer(arch: Arch) -> Any:
    """A byte-level BPE tokenizer trained on the builtin tasks' text, with the family's tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [t for t in (arch.pad, arch.bos, arch.eos, *arch.extra_specials) if t]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_corpus(), trainer)
    roles = {"eos_token": arch.eos, "pad_token": arch.pad}
    if arch.bos:
        roles["bos_token"] = arch.bos
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **roles)  # type: ignore[no-untyped-call]
    tokenizer.chat_template = arch.chat_template
    tokenizer.padding_side = "left"  # generation batches; training builds its own
    return tokenizer


def build_config(arch: Arch, tokenizer: Any) -> Any:
    import transformers

    ids = {
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
    }
    config_class = getattr(transformers, arch.config_class)
    return config_class(vocab_size=len(tokenizer), tie_word_embeddings=True, **WIDTH, **arch.config, **ids)


def build_model(arch_name: str, out_dir: Path, seed: int = 0) -> Path:
    """Save a random-initialised ``arch_name`` model and its tokenizer into ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM

    arch = ARCHS[arch_name]
    tokenizer = train_tokenizer(arch)
    config = build_config(arch, tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "README.md").write_text(
        f"---\nlibrary_name: transformers\n---\nRandom-init tiny {arch.name}.\n"
    )
    return out_dir


def ensure_model(arch_name: str, cache_dir: Path | None = None) -> Path:
    """The cached build of ``arch_name`` (built once, atomically, behind a file lock)."""
    import os

    from filelock import FileLock

    root = (cache_dir or Path.home() / ".cache" / "temper" / "archzoo") / RECIPE_VERSION
    target = root / arch_name
    if (target / "config.json").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{arch_name}.lock")):
        if not (target / "config.json").exists():
            staging = build_model(arch_name, root / f"{arch_name}.building-{os.getpid()}")
            staging.rename(target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="temper_dev.archzoo")
    parser.add_argument("out", type=Path)
    parser.add_argument("archs", nargs="*", default=sorted(ARCHS))
    args = parser.parse_args(argv)
    for name in args.archs:
        print(json.dumps({"arch": name, "path": str(build_model(name, args.out / name))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
