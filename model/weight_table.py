"""Every weight of the model, declared once: its shape (from the config), a name for each of its axes,
where it is in a Hugging Face checkpoint, and whether it may be quantized. In the spirit of
jax-llm-examples' `ArrayInfo` + sharding rules: conversion and export (convert.py), loading
(checkpoint.py), the mesh placement (sharding.py maps each axis name to a mesh axis) and the
random-weight bench (bench/full_size.py) all read this table.

Our checkpoint stores weight `kind` of layer l as `layers.{l}.{kind}` (the others by their kind alone)
in the layout declared here: linear weights `[in, out]` (y = x @ w), a layer's experts stacked on a
first dim. A quantized weight keeps its name for the values and adds its parameters (quantize.py).
Checkpoints of format 2 (config `weight_layout` "out_major") store the linear weights with their last
two dims swapped (`stored_out_major`): the layout our kernels read (linear.out_major), so loading them
is a plain read; a backend that wants the other layout gets each block transposed as it is read.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import MixtralConfig

# What each dim of a weight is: the sharding rules (sharding.weight_specs) map these to mesh axes.
VOCAB = "vocab"  # V
HIDDEN = "hidden"  # D, the residual stream
Q = "q"  # H * Dh: the query heads' outputs
KV = "kv"  # KV * Dh: the key / value heads' outputs
EXPERTS = "experts"  # E: a layer's experts, stacked
FFN = "ffn"  # I: an expert's intermediate dim
ROUTES = "routes"  # E: the router's logit for each expert (every device routes every token)
AXES = (VOCAB, HIDDEN, Q, KV, EXPERTS, FFN, ROUTES)

_LAYER = "model.layers.{layer}"


@dataclass(frozen=True)
class WeightInfo:
    """One kind of weight (one per layer for the layers' kinds)."""

    kind: str  # "embed", "wq", "w1", ...: the last part of its name in our checkpoint
    shape: tuple[int, ...]  # in our checkpoint and in device memory (int4 values unpacked)
    axes: tuple[str, ...]  # a name from AXES for each dim
    hf_name: str  # in a Hugging Face Mixtral checkpoint; {layer}, and {expert} for one expert of a stack
    hf_transposed: bool  # HF keeps it [out, in] (torch's Linear); experts one tensor each
    per_layer: bool
    quantizable: bool = False  # linear weights: int8 / int4 when the checkpoint is quantized
    init: str = "normal"  # random weights (the bench): "normal", or "ones" for a norm's scale

    @property
    def stacked_experts(self) -> bool:
        return self.axes[0] == EXPERTS

    def name(self, layer: int | None = None) -> str:
        """Its name in our checkpoint."""
        return f"layers.{layer}.{self.kind}" if self.per_layer else self.kind

    def hf(self, layer: int | None = None, expert: int | None = None) -> str:
        """Its name in a Hugging Face checkpoint (of one expert, for stacked experts)."""
        return self.hf_name.format(layer=layer, expert=expert)

    def hf_shape(self) -> tuple[int, ...]:
        """Its shape in a Hugging Face checkpoint (one expert's, for stacked experts)."""
        shape = self.shape[1:] if self.stacked_experts else self.shape
        return shape[::-1] if self.hf_transposed else shape


def weight_table(config: MixtralConfig) -> dict[str, WeightInfo]:
    """Every kind of weight, in checkpoint order within a layer (the layer's kinds between `embed` and
    `final_norm`); `lm_head` is left out when it is tied to `embed`."""
    D, I, E, V = config.hidden_size, config.intermediate_size, config.num_experts, config.vocab_size
    q_out, kv_out = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    moe = f"{_LAYER}.block_sparse_moe"

    def attention(kind: str, shape, axes, proj: str) -> WeightInfo:
        return WeightInfo(kind, shape, axes, f"{_LAYER}.self_attn.{proj}.weight", True, True, quantizable=True)

    def expert(kind: str, shape, axes) -> WeightInfo:
        return WeightInfo(kind, shape, axes, f"{moe}.experts.{{expert}}.{kind}.weight", True, True, quantizable=True)

    def norm(kind: str, hf_name: str, per_layer: bool) -> WeightInfo:
        return WeightInfo(kind, (D,), (HIDDEN,), hf_name, False, per_layer, init="ones")

    weights = [
        WeightInfo("embed", (V, D), (VOCAB, HIDDEN), "model.embed_tokens.weight", False, False),
        norm("attn_norm", f"{_LAYER}.input_layernorm.weight", True),
        attention("wq", (D, q_out), (HIDDEN, Q), "q_proj"),
        attention("wk", (D, kv_out), (HIDDEN, KV), "k_proj"),
        attention("wv", (D, kv_out), (HIDDEN, KV), "v_proj"),
        attention("wo", (q_out, D), (Q, HIDDEN), "o_proj"),
        norm("ffn_norm", f"{_LAYER}.post_attention_layernorm.weight", True),
        WeightInfo("router", (D, E), (HIDDEN, ROUTES), f"{moe}.gate.weight", True, True),
        expert("w1", (E, D, I), (EXPERTS, HIDDEN, FFN)),
        expert("w3", (E, D, I), (EXPERTS, HIDDEN, FFN)),
        expert("w2", (E, I, D), (EXPERTS, FFN, HIDDEN)),
        norm("final_norm", "model.norm.weight", False),
    ]
    if not config.tie_word_embeddings:
        weights.append(WeightInfo("lm_head", (D, V), (HIDDEN, VOCAB), "lm_head.weight", True, False,
                                  quantizable=config.lm_head_quantized))
    return {info.kind: info for info in weights}


def stored_out_major(info: WeightInfo, config: MixtralConfig) -> bool:
    """Whether the checkpoint stores this weight's tensors of its rank with their last two dims swapped:
    [.., out, in] (int4 values packed two per byte along `in`, their scales and offsets [.., out, in/group];
    int8 scales [.., out] as they are). The linear weights of an "out_major" checkpoint."""
    return config.weight_layout == "out_major" and (info.quantizable or info.kind == "lm_head")


def swap_last(dims: tuple) -> tuple:
    """A shape, an index or a partition spec with its last two dims swapped."""
    return (*dims[:-2], dims[-1], dims[-2])


def checkpoint_weights(config: MixtralConfig) -> list[tuple[int | None, WeightInfo]]:
    """(layer, info) of every weight of a checkpoint in file order (embed, each layer's, the rest);
    layer None for the weights outside the layers. Its name: `info.name(layer)`."""
    table = weight_table(config)
    layer_kinds = [info for info in table.values() if info.per_layer]
    top = [info for info in table.values() if not info.per_layer]
    return ([(None, top[0])] + [(layer, info) for layer in range(config.num_layers) for info in layer_kinds]
            + [(None, info) for info in top[1:]])


def info_of(table: dict[str, WeightInfo], name: str) -> WeightInfo:
    """The entry of a checkpoint name (`layers.3.wq` -> the "wq" entry)."""
    return table[name.rsplit(".", 1)[-1]]
