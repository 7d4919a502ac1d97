"""Tiny real models for tests: a random Mixtral made by `transformers`, converted by our converter.

It uses Mixtral's real tokenizer (shipped by mistral_common), so chat encoding, streaming and the app
run exactly as with the full model, only with random weights (the replies are gibberish).

Its fixtures `tiny_hf` and `tiny_ckpt` (session-scoped) are registered in conftest.py for every test.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import mistral_common

MIXTRAL_TOKENIZER = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"

TINY_MIXTRAL = dict(
    vocab_size=32000, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
    num_key_value_heads=4, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=4096,
    rope_theta=1e6, bos_token_id=1, eos_token_id=2,
)


def build_hf_mixtral(out_dir: Path, seed: int = 0, max_shard_size: str = "50MB", qk_scale: float = 1.0,
                     **overrides) -> Path:
    """A random Mixtral saved as the hub has it (safetensors, classic expert names) + the real tokenizer.
    `overrides` change the MixtralConfig (sizes, sliding_window, ...); `qk_scale` multiplies the query and
    key weights, which makes attention sharp (random init alone gives near-uniform attention, which
    hides masking and position bugs)."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    model = MixtralForCausalLM(MixtralConfig(**{**TINY_MIXTRAL, **overrides})).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(qk_scale)
            layer.self_attn.k_proj.weight.mul_(qk_scale)
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    shutil.copyfile(MIXTRAL_TOKENIZER, out_dir / "tokenizer.model")
    (out_dir / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return out_dir


def write_word_tokenizer(folder: Path, vocab_size: int) -> Path:
    """A `tokenizer.json` of exactly `vocab_size` whole-word tokens (<unk>, <s>, </s>, w3, w4, ...), for
    models whose vocabulary is smaller than Mixtral's (the converter refuses a larger tokenizer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


def build_tiny_checkpoint(out_dir: Path, hf_dir: Path) -> Path:
    import model

    return model.convert_hf(hf_dir, out_dir)


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory) -> Path:
    """The HF folder of the tiny random Mixtral."""
    return build_hf_mixtral(tmp_path_factory.mktemp("tiny_hf"))


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, tiny_hf) -> Path:
    """Our converted checkpoint of the tiny Mixtral (read-only: copy it before changing it)."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny-mixtral", tiny_hf)



def greedy_tokens(m, prompt: list[int], n: int = 8) -> list[int]:
    """n greedy tokens after `prompt` through the engine's own programs (prefill, then decode steps)."""
    from model.generate import Generator

    return Generator(m).greedy(prompt, n, capacity=64)


def flip_byte(path: Path, offset: int) -> None:
    """Change one byte of a file in place: same size, new mtime (what a bad disk or a stray write does)."""
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def mapped_file(address: int) -> str | None:
    """The file mapped in this process's memory at `address` (None: memory of its own)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split()
        low, high = (int(x, 16) for x in parts[0].split("-"))
        if low <= address < high:
            return parts[5] if len(parts) > 5 else None
    return None
