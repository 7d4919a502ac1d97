"""Mixtral on JAX / Flax NNX: the model, its checkpoints, and the conversation engine.

    import model
    m = model.load(ckpt_dir)                  # our checkpoint -> NNX module, sharded over all devices
    logits = m(input_ids)                     # int32 [B, T] -> float32 [B, T, vocab]
    model.convert_hf(hf_dir, out_dir, dtype="float32", quantize=None, upcycle_experts=None)

Heavy submodules (jax) load on first use, so `import model` is instant.
"""

import importlib

_EXPORTS = {
    "load": "checkpoint", "verify": "manifest", "CheckpointError": "manifest",
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
