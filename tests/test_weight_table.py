"""The weight table (model/weight_table.py) against the real things: the HF checkpoint `transformers`
writes, the checkpoints our converter writes (plain, int8, int4), the config's parameter count, and
the partition specs its axis names give on a real mesh."""

from __future__ import annotations

import json

import jax
import pytest
from flax import nnx

import model
from bench.full_size import RandomWeights
from model import quantize
from model.config import MixtralConfig
from model.mixtral import Mixtral
from model.safetensors_io import TensorFiles
from model.sharding import EXPERT, MODEL, make_mesh, weight_specs
from model.weight_table import AXES, checkpoint_weights, swap_last, weight_table
from test_setup_flow import MIXTRAL_8X7B_CONFIG


def test_the_hf_checkpoint_holds_every_weight_by_the_tables_names_and_shapes(tiny_hf):
    config = MixtralConfig.from_hf(json.loads((tiny_hf / "config.json").read_text()))
    files = TensorFiles(tiny_hf)
    expected = {}
    for layer, info in checkpoint_weights(config):
        for expert in range(config.num_experts) if info.stacked_experts else (None,):
            expected[info.hf(layer, expert)] = info.hf_shape()
    assert {name: files.shape(name) for name in files.names()} == expected


@pytest.mark.parametrize("quantization", [None, "int8", "int4"])
def test_our_checkpoint_holds_the_tables_weights_in_file_order(tiny_hf, tmp_path, quantization):
    ckpt = model.convert_hf(tiny_hf, tmp_path / "ours", quantize=quantization)
    config = model.verify(ckpt)
    files = TensorFiles(ckpt)
    expected = []
    for layer, info in checkpoint_weights(config):
        name = info.name(layer)

        def stored(shape):  # the linear weights' tensors of their rank out-major (format 2)
            linear = info.quantizable or info.kind == "lm_head"
            return swap_last(shape) if linear and len(shape) == len(info.shape) else shape

        if quantization and info.quantizable:
            expected.append((name, stored(quantize.stored_values(info.shape, quantization)[1])))
            param_shape = stored(quantize.param_shape(info.shape, quantization, config.quant_group_size))
            expected += [(f"{name}.{param}", param_shape) for param in quantize.PARAMS[quantization]]
        else:
            expected.append((name, stored(info.shape)))
    assert [(name, files.shape(name)) for name in files.names()] == expected

    # The bench's random weights (drawn from the same table) make the same model as loading does.
    mesh = make_mesh((2, 4))
    loaded = model.load(ckpt, mesh)
    with jax.set_mesh(mesh):
        drawn = Mixtral(config, RandomWeights(config, mesh), mesh)
    assert _layout(drawn) == _layout(loaded)


def _layout(m) -> dict:
    """path -> (shape, dtype, shape of a device's shard) of every array of a model."""
    return {path: (a.shape, a.dtype, a.sharding.shard_shape(a.shape))
            for path, a in nnx.to_flat_state(nnx.state(m)) if hasattr(a, "sharding")}


@pytest.mark.parametrize("tied", [False, True])
def test_the_table_counts_the_configs_parameters(tied):
    config = MixtralConfig.from_hf({**MIXTRAL_8X7B_CONFIG, "tie_word_embeddings": tied})
    count = 0
    for layer, info in checkpoint_weights(config):
        size = 1
        for dim in info.shape:
            size *= dim
        count += size
    assert count == config.num_params
    assert ("lm_head" in weight_table(config)) is not tied


def test_named_axes_give_each_weight_its_partition_spec():
    config = MixtralConfig.from_hf({**MIXTRAL_8X7B_CONFIG, "num_hidden_layers": 1})
    assert all(axis in AXES for info in weight_table(config).values() for axis in info.axes)
    specs = weight_specs(config, make_mesh((2, 4)))
    assert specs == {
        "embed": (MODEL, None), "attn_norm": (None,), "ffn_norm": (None,), "final_norm": (None,),
        "wq": (None, MODEL), "wk": (None, MODEL), "wv": (None, MODEL), "wo": (MODEL, None), "router": (None, None),
        "w1": (EXPERT, None, MODEL), "w3": (EXPERT, None, MODEL), "w2": (EXPERT, MODEL, None), "lm_head": (None, MODEL),
    }
    # 8 kv heads on a model axis of 8 split; 3 kv heads would not, and stay whole on every device
    three_kv = MixtralConfig.from_hf({**MIXTRAL_8X7B_CONFIG, "num_hidden_layers": 1, "num_attention_heads": 24,
                                      "num_key_value_heads": 3})
    assert weight_specs(three_kv, make_mesh((1, 8)))["wk"] == (None, None)
