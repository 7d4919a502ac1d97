"""Mixtral on JAX / Flax NNX: the model, its checkpoints, and the conversation engine.

    import model
    m = model.load(ckpt_dir)                  # our checkpoint -> NNX module, sharded over all devices
    logits = m(input_ids)                     # int32 [B, T] -> float32 [B, T, vocab]
    model.convert_hf(hf_dir, out_dir, dtype="float32", quantize=None, upcycle_experts=None)

Heavy submodules (jax) load on first use, so `import model` is instant.
"""

import importlib
import os

# XLA:CPU's YNNPACK fusions (all kinds on by default in jax 0.10) make a serialized executable ~2x slower
# to load (each fusion looks its instructions up one by one); its dot fusions are what run float32
# matmuls fast (a 512-token prefill of float32 mini-mixtral: 41-113 tok/s without, 265 with). So dots
# only, unless XLA_FLAGS sets them (and none in the programs of a model whose weights all go through our
# kernels: generate.NO_YNN_FUSIONS). This acts when jax starts its CPU backend, so `import model` before
# using jax.
_YNN_FUSIONS = "--xla_cpu_experimental_ynn_fusion_type"
if _YNN_FUSIONS not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_YNN_FUSIONS}=dot".strip()

_EXPORTS = {
    "load": "checkpoint", "maps_in_place": "checkpoint", "verify": "manifest", "CheckpointError": "manifest",
    "convert_hf": "convert", "export_hf": "convert", "ConversionError": "convert",
    "MixtralConfig": "config", "ConfigError": "config",
    "make_mesh": "sharding", "parse_mesh_shape": "sharding", "MeshError": "sharding",
    "load_tokenizer": "tokenizer", "encode_chat": "chat_format",
}


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'model' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
