"""Sharding over 8 simulated CPU devices: same numbers as one device, weights really split."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import model
from model.engine_api import SamplingParams
from model.generate import Generator
from model.sampling import SamplingArrays
from tiny_model import build_hf_mixtral, greedy_tokens

MESHES = [(1, 8), (2, 4), (8, 1)]
def forward(m, ids):
    return m(ids)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """8 experts, 8 heads, 4 kv heads, intermediate 96: every mesh above splits something."""
    root = tmp_path_factory.mktemp("shard")
    hf = build_hf_mixtral(root / "hf", seed=2, qk_scale=6.0, num_local_experts=8, num_key_value_heads=4)
    return model.convert_hf(hf, root / "ours")


@pytest.fixture(scope="module")
def single(ckpt):
    """Logits and greedy tokens on one device."""
    ids = np.random.default_rng(0).integers(3, 32000, (2, 20)).astype(np.int32)
    m = model.load(ckpt, model.make_mesh((1, 1)))
    return ids, np.asarray(forward(m, ids)), greedy_tokens(m, ids[0].tolist())


def device0_bytes(arrays) -> int:
    return sum(a.addressable_shards[0].data.nbytes for a in arrays)


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_sharded_model_equals_single_device(ckpt, single, shape):
    ids, logits, tokens = single
    m = model.load(ckpt, model.make_mesh(shape))
    np.testing.assert_allclose(np.asarray(forward(m, ids)), logits, atol=1e-5)
    assert greedy_tokens(m, ids[0].tolist()) == tokens


@pytest.mark.parametrize("shape", [(2, 4), (8, 1)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_gpu_decode_path_sharded_equals_single_device(ckpt, single, shape):
    """The GPU's decode path (all experts stacked, each device's own picked in the kernel) on a mesh
    with an expert axis gives the single device's greedy tokens."""
    ids, _, tokens = single
    m = model.load(ckpt, model.make_mesh(shape), branchless=True)
    assert greedy_tokens(m, ids[0].tolist()) == tokens


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_weights_are_split_not_replicated(ckpt, shape):
    m = model.load(ckpt, model.make_mesh(shape))
    experts = [lin.kernel[...] for layer in m.layers for lin in (*layer.moe.w1, *layer.moe.w3, *layer.moe.w2)]
    total = sum(a.nbytes for a in experts)
    assert device0_bytes(experts) * 8 == total  # every expert weight: 1/8 on each device
    model_axis = shape[1]
    for name, heads in (("wq", 8), ("wo", 8), ("wk", 4), ("wv", 4)):  # split by heads where they divide
        kernels = [getattr(layer.attn, name).kernel[...] for layer in m.layers]
        ways = model_axis if heads % model_axis == 0 else 1
        assert device0_bytes(kernels) * ways == sum(a.nbytes for a in kernels), name
    vocab = [m.embed[...], m.lm_head.kernel[...]]  # 32000 rows split over the model axis
    assert device0_bytes(vocab) * model_axis == sum(a.nbytes for a in vocab)


def test_cache_split_by_kv_heads_and_collectives_compiled(ckpt):
    m = model.load(ckpt, model.make_mesh((2, 4)))
    gen = Generator(m)
    cache = gen.new_cache(64)
    assert cache.k[0].addressable_shards[0].data.shape[1] == 1  # 4 kv heads over 4 devices
    sampling = SamplingArrays.of(SamplingParams())
    token = jax.numpy.zeros((1,), jax.numpy.int32)
    hlo = gen.decode_program.lower(gen.model_def, gen.params, cache, token, gen.seen_mask([]), gen.seed(0),
                                   np.int32(1), sampling).compile().as_text()
    assert "all-reduce" in hlo


def test_mesh_errors_are_clear(ckpt):
    with pytest.raises(model.MeshError, match="needs 16 devices"):
        model.make_mesh((2, 8))
    with pytest.raises(model.MeshError, match="must divide the number of experts"):
        model.load(ckpt, model.make_mesh((3, 1)))
    with pytest.raises(model.MeshError, match="AxB"):
        model.parse_mesh_shape("eight")


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_bytes_per_device_and_what_is_replicated_as_loaded(ckpt, shape):
    """What the memory checks count is what a device really holds; the 4 kv heads on 8 devices leave
    attention whole on each."""
    from flax import nnx

    from model.manifest import read_config
    from model.sharding import replicated, weight_bytes_per_device

    mesh, config = model.make_mesh(shape), read_config(ckpt)
    arrays = [a for a in jax.tree.leaves(nnx.state(model.load(ckpt, mesh))) if isinstance(a, jax.Array)]
    assert weight_bytes_per_device(config, mesh) == device0_bytes(arrays)
    assert replicated(config, mesh) == (["attention replicated on 8 devices"] if shape == (1, 8) else [])


def test_the_status_bar_says_what_is_replicated(ckpt):
    from model.engine import Engine

    assert Engine(ckpt, mesh_shape=(1, 8)).device_summary == "8 x cpu, mesh 1x8; attention replicated on 8 devices"
    assert Engine(ckpt, mesh_shape=(2, 4)).device_summary == "8 x cpu, mesh 2x4"
