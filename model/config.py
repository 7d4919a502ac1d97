"""The model's sizes and options: read from a Hugging Face `config.json`, saved as our own."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

DEFAULT_CONTEXT = 4096  # tokens of conversation the engine keeps unless told otherwise
QUANTIZATIONS = (None, "int8", "int4")  # weight-only, see quantize.py; None: the dtype as it is
DTYPES = ("float32", "bfloat16", "float16")
CHAT_FORMATS = ("mixtral-instruct", "template")  # see chat_format.py
FORMAT_VERSIONS = {"in_major": 1, "out_major": 2}  # of our checkpoints, by how they store linear weights
WEIGHT_LAYOUTS = tuple(FORMAT_VERSIONS)


class ConfigError(UserError, ValueError):
    """A config.json we cannot run, with the reason in words."""


@dataclass(frozen=True)
class MixtralConfig:
    vocab_size: int
    hidden_size: int  # D
    intermediate_size: int  # I, per expert
    num_layers: int
    num_heads: int  # H (query heads)
    num_kv_heads: int  # KV (GQA: each KV head serves H / KV query heads)
    head_dim: int  # Dh
    num_experts: int  # E
    experts_per_token: int  # top-k
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-5
    sliding_window: int | None = None  # a query sees keys at most this many positions back (itself included)
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    dtype: str = "float32"  # of the weights, the activations and the KV cache
    quantization: str | None = None  # weight-only: None, "int8" (per output channel), "int4" (group-wise)
    quant_group_size: int = 32  # int4: input rows sharing one scale
    # the (untied) LM head is quantized too (format 2; format 1 checkpoints, without the key, keep it in `dtype`)
    lm_head_quantized: bool = False
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)
    chat_format: str = "mixtral-instruct"
    # How a checkpoint stores its linear weights (weight_table.stored_out_major): "out_major" (format 2,
    # the layout our kernels read), or "in_major" [.., in, out] (format 1: checkpoints converted before)
    weight_layout: str = "out_major"

    def __post_init__(self):
        def need(ok: bool, what: str):
            if not ok:
                raise ConfigError(what)

        need(self.num_heads % self.num_kv_heads == 0,
             f"num_attention_heads ({self.num_heads}) must be a multiple of num_key_value_heads ({self.num_kv_heads})")
        need(self.head_dim % 2 == 0, f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        need(1 <= self.experts_per_token <= self.num_experts,
             f"num_experts_per_tok ({self.experts_per_token}) must be between 1 and the number of experts ({self.num_experts})")
        need(self.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        need(self.quantization in QUANTIZATIONS, f"quantization must be none, int8 or int4, got {self.quantization!r}")
        need(self.chat_format in CHAT_FORMATS, f"chat_format must be one of {', '.join(CHAT_FORMATS)}, got {self.chat_format!r}")
        need(self.weight_layout in WEIGHT_LAYOUTS, f"weight_layout must be one of {', '.join(WEIGHT_LAYOUTS)}, got {self.weight_layout!r}")
        if self.quantization == "int4":
            need(self.quant_group_size % 2 == 0, "the int4 group size must be even")

    @property
    def num_params(self) -> int:
        D, I, E, V = self.hidden_size, self.intermediate_size, self.num_experts, self.vocab_size
        attn = D * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        per_layer = attn + D * E + 3 * E * D * I + 2 * D
        return self.num_layers * per_layer + V * D * (1 if self.tie_word_embeddings else 2) + D

    @property
    def _lm_head_linear(self) -> int:
        """Parameters of the LM head counted as a quantized linear weight (0: kept in the model dtype)."""
        return self.vocab_size * self.hidden_size if self.lm_head_quantized and self.quantization else 0

    def _bytes(self, linear: int, other: int) -> int:
        """Bytes of `linear` parameters of linear weights (quantized: 1 or 1/2 byte + scales) and `other`
        parameters in the model dtype."""
        itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}[self.dtype]
        if self.quantization is None:
            return (linear + other) * itemsize
        bits = 8 if self.quantization == "int8" else 4
        # int8 a float32 scale per output (roughly: per hidden_size inputs), int4 a float16 scale and offset
        # per group
        scales = linear // self.hidden_size * 4 if self.quantization == "int8" else linear // self.quant_group_size * 4
        return other * itemsize + linear * bits // 8 + scales

    def weight_bytes(self) -> int:
        """Bytes of the weights in device memory."""
        D, I, E = self.hidden_size, self.intermediate_size, self.num_experts
        linear = (self.num_layers * (D * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads) + 3 * E * D * I)
                  + self._lm_head_linear)
        return self._bytes(linear, self.num_params - linear)

    def decode_bytes(self, context: int) -> int:
        """Bytes one decoded token reads: attention weights, the top-k experts, router and norms of every
        layer, the LM head, and the KV cache of `context` tokens (the bandwidth ceiling's denominator)."""
        D, I, k, V = self.hidden_size, self.intermediate_size, self.experts_per_token, self.vocab_size
        linear = (self.num_layers * (D * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads) + 3 * k * D * I)
                  + self._lm_head_linear)
        other = self.num_layers * (D * self.num_experts + 2 * D) + V * D - self._lm_head_linear + 2 * D  # + one embedding row
        return self._bytes(linear, other) + self.kv_cache_bytes(context)

    def kv_cache_bytes(self, tokens: int) -> int:
        itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}[self.dtype]
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * tokens * itemsize

    # --- our own config.json -------------------------------------------------------------------
    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return {"format": "mixtral-chat", "format_version": FORMAT_VERSIONS[self.weight_layout], **d}

    @classmethod
    def from_json(cls, d: dict) -> MixtralConfig:
        if d.get("format") != "mixtral-chat":
            raise ConfigError("not a mixtral-chat checkpoint config (no \"format\": \"mixtral-chat\")")
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in fields}
        kw["eos_token_ids"] = tuple(kw.get("eos_token_ids", (2,)))
        kw.setdefault("weight_layout", "in_major")  # format 1 had only that
        try:
            return cls(**kw)
        except TypeError as e:
            raise ConfigError(f"incomplete checkpoint config: {e}") from None

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> MixtralConfig:
        try:
            return cls.from_json(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read {path}: {e}") from None

    # --- Hugging Face config.json --------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf: dict, *, upcycle_experts: int | None = None, dtype: str = "float32",
                quantization: str | None = None) -> MixtralConfig:
        """Mixtral as it is, or a dense Llama/Mistral whose MLP becomes `upcycle_experts` identical experts."""
        model_type = hf.get("model_type")
        if model_type == "mixtral":
            if upcycle_experts is not None:
                raise ConfigError("--upcycle-experts is for dense Llama/Mistral checkpoints; this one is already Mixtral")
            num_experts, top_k = hf["num_local_experts"], hf["num_experts_per_tok"]
        elif model_type in ("llama", "mistral"):
            if not upcycle_experts:
                raise ConfigError(f"this is a dense {model_type} checkpoint: pass --upcycle-experts N to turn its MLP into N experts")
            if hf.get("attention_bias") or hf.get("mlp_bias"):
                raise ConfigError("checkpoints with attention or MLP biases are not supported")
            num_experts, top_k = upcycle_experts, min(2, upcycle_experts)
        else:
            raise ConfigError(f"unsupported model_type {model_type!r}: expected mixtral, or llama/mistral with --upcycle-experts")
        if hf.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"unsupported activation {hf['hidden_act']!r} (only silu)")
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
            raise ConfigError(f"unsupported rope scaling {rope.get('rope_type', rope.get('type'))!r}")
        rope_theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        num_heads = hf["num_attention_heads"]
        eos = hf.get("eos_token_id", 2)
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            num_experts=num_experts,
            experts_per_token=top_k,
            rope_theta=float(rope_theta),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
            sliding_window=hf.get("sliding_window") if hf.get("use_sliding_window", True) else None,
            max_position_embeddings=hf.get("max_position_embeddings", 32768),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            dtype=dtype,
            quantization=quantization,
            lm_head_quantized=quantization is not None and not hf.get("tie_word_embeddings", False),
            bos_token_id=hf.get("bos_token_id", 1),
            eos_token_ids=tuple(eos) if isinstance(eos, list) else (eos,),
            chat_format="mixtral-instruct" if model_type == "mixtral" else "template",
        )

    def to_hf(self) -> dict:
        """The Hugging Face MixtralForCausalLM config.json of this model (for export)."""
        return {
            "architectures": ["MixtralForCausalLM"],
            "model_type": "mixtral",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "num_local_experts": self.num_experts,
            "num_experts_per_tok": self.experts_per_token,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "sliding_window": self.sliding_window,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) > 1 else self.eos_token_ids[0],
            "torch_dtype": self.dtype,
        }
