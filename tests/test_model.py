"""Numerical parity of our Mixtral with Hugging Face transformers' MixtralForCausalLM (float32).

Random tiny configs of several shapes, with query/key weights scaled x6 so attention is sharp.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx

import model
from model import cpu_matmul
from model.generate import Generator
from model.kv_cache import KVCache
from model.sampling import SamplingArrays
from model.engine_api import SamplingParams
from tiny_model import build_hf_mixtral, mapped_file

import jax

TOLERANCE = 1e-4  # max abs logit difference allowed against transformers in float32

CONFIGS = {
    "base": dict(),
    # MQA, a head_dim that is not hidden / heads, 8 experts, other rope theta and eps
    "mqa-headdim": dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                        num_local_experts=8, rope_theta=10000.0, rms_norm_eps=1e-6),
    # a sliding window much shorter than the sequence
    "window": dict(num_key_value_heads=2, sliding_window=5),
    # top-3 of 6 experts, 3 layers
    "top3": dict(num_local_experts=6, num_experts_per_tok=3, intermediate_size=80, num_hidden_layers=3),
}



def one_device():
    return model.make_mesh((1, 1))


def forward(m, ids, mask):
    return m(ids, mask)


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    """(name, HF torch model, our checkpoint dir) for one config."""
    root = tmp_path_factory.mktemp(request.param)
    hf_dir = build_hf_mixtral(root / "hf", seed=1, qk_scale=6.0, **CONFIGS[request.param])
    ckpt = model.convert_hf(hf_dir, root / "ours")
    from transformers import MixtralForCausalLM

    hf = MixtralForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    return request.param, hf, ckpt


def hf_logits(hf, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()


def random_ids(batch: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, 32000, (batch, length)).astype(np.int32)


def test_logits_match_transformers(pair):
    name, hf, ckpt = pair
    ids = random_ids(2, 24)
    ours = np.asarray(forward(model.load(ckpt, one_device()), ids, None))
    ref = hf_logits(hf, ids)
    diff = np.abs(ours - ref).max()
    print(f"[{name}] max abs logit diff vs transformers: {diff:.2e}")
    assert diff <= TOLERANCE
    assert np.array_equal(ours.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("branchless, cpu_kernels", [(False, None), (False, False), (True, False)],
                         ids=["cpu-kernels-decode", "cpu-xla-decode", "gpu-decode"])
def test_cached_decode_equals_full_forward(pair, branchless, cpu_kernels):
    """Prefill 10 tokens (padded to a bucket of 16), then feed the rest one by one through the cache:
    every step's logits equal the full forward's at that position. Every decode path: the CPU's
    through our kernels (attention included), the CPU's on XLA alone (attention in conds), and the
    GPU's (whole-cache attention, experts in the expert_gemv kernel, interpreted)."""
    _, _, ckpt = pair
    m = model.load(ckpt, one_device(), branchless=branchless, cpu_kernels=cpu_kernels)
    assert (m.layers[0].attn.cpu_attention is not None) == (cpu_kernels is None and cpu_matmul.available())
    ids = random_ids(1, 20, seed=3)
    full = np.asarray(forward(m, ids, None))[0]

    @nnx.jit
    def step(m, tokens, cache, num_new):
        return m.forward(tokens, cache, num_new)

    cache = KVCache.create(m.config, m.mesh, batch=1, capacity=32)
    padded = np.zeros((1, 16), np.int32)
    padded[0, :10] = ids[0, :10]
    logits, cache = step(m, padded, cache, 10)
    np.testing.assert_allclose(np.asarray(logits)[0, :10], full[:10], atol=TOLERANCE)
    for t in range(10, 20):
        logits, cache = step(m, ids[:, t:t + 1], cache, 1)
        np.testing.assert_allclose(np.asarray(logits)[0, 0], full[t], atol=TOLERANCE)
    assert int(cache.end) == 20


def test_a_bfloat16_cache_holds_the_bits_of_its_keys_and_values(tiny_hf, tmp_path):
    """A bfloat16 model's cache is held as uint16 (kv_cache.storage_dtype): the decode steps through it
    give the logits of the full forward, and the slots hold the bfloat16 keys the full forward wrote."""
    m = model.load(model.convert_hf(tiny_hf, tmp_path / "bf16", dtype="bfloat16"), one_device())
    ids = random_ids(1, 12, seed=4)

    @nnx.jit
    def step(m, tokens, cache, num_new):
        return m.forward(tokens, cache, num_new)

    whole, whole_cache = step(m, ids, KVCache.create(m.config, m.mesh, batch=1, capacity=16), 12)
    cache = KVCache.create(m.config, m.mesh, batch=1, capacity=16)
    assert cache.k[0].dtype == np.uint16 and cache.v[0].dtype == np.uint16
    logits, cache = step(m, ids[:, :4], cache, 4)
    for t in range(4, 12):
        logits, cache = step(m, ids[:, t:t + 1], cache, 1)
        want = np.asarray(whole[0, t], np.float32)
        assert np.abs(np.asarray(logits[0, 0], np.float32) - want).max() <= 0.05 * np.abs(want).max()
    for kept, written in zip(cache.k + cache.v, whole_cache.k + whole_cache.v):
        held = np.asarray(kept).view(ml_dtypes.bfloat16).astype(np.float32)
        ref = np.asarray(written).view(ml_dtypes.bfloat16).astype(np.float32)
        assert np.isfinite(held).all() and np.abs(held).max() > 0
        np.testing.assert_allclose(held, ref, rtol=0.05, atol=0.05 * np.abs(ref).max())


def test_greedy_generation_matches_transformers(pair):
    _, hf, ckpt = pair
    prompt = random_ids(1, 12, seed=5)
    with torch.no_grad():
        ref = hf.generate(torch.tensor(prompt, dtype=torch.long), max_new_tokens=32, do_sample=False,
                          min_new_tokens=32, pad_token_id=0)[0, 12:].tolist()
    ours = Generator(model.load(ckpt, one_device())).greedy(prompt[0].tolist(), 32, capacity=64)
    assert ours == ref


def test_left_padded_batch(pair):
    """Rows of different lengths, left-padded in one batch, give each row's own logits."""
    _, hf, ckpt = pair
    lengths = [24, 17, 9]
    rows = [random_ids(1, n, seed=10 + i)[0] for i, n in enumerate(lengths)]
    ids = np.zeros((3, 24), np.int32)
    mask = np.zeros((3, 24), np.int32)
    for i, row in enumerate(rows):
        ids[i, 24 - len(row):] = row
        mask[i, 24 - len(row):] = 1
    ours = np.asarray(forward(model.load(ckpt, one_device()), ids, mask))
    for i, row in enumerate(rows):
        ref = hf_logits(hf, row[None])[0]
        np.testing.assert_allclose(ours[i, 24 - len(row):], ref, atol=TOLERANCE)


def test_weights_are_the_checkpoint_file_mapped_in_place(tiny_ckpt):
    """On a CPU every weight of a checkpoint we converted (tensors on 64-byte boundaries, each kept as
    stored) is the file mapped in memory, used by XLA in place: loading reads and copies nothing."""
    m = model.load(tiny_ckpt, one_device())
    weights = jax.tree.leaves(nnx.state(m))
    files = {mapped_file(a.unsafe_buffer_pointer()) for a in weights}
    assert files == {str(tiny_ckpt / "model.safetensors")}


def test_long_context_decode_crosses_attention_blocks(tiny_ckpt):
    """700 tokens prefilled in two chunks (512 + 188), then decoded one by one in a 1024-slot cache:
    the decode step walks its blocks (256 + 512 + 256 slots here) and agrees with the full forward."""
    m = model.load(tiny_ckpt, one_device())
    ids = random_ids(1, 720, seed=9)
    full = np.asarray(forward(m, ids, None))[0]
    gen = Generator(m)
    cache = gen.new_cache(1024)
    greedy = SamplingArrays.of(SamplingParams(temperature=0))
    seen, key = gen.seen_mask([]), gen.seed(0)
    token, cache = gen.prefill(cache, ids[0, :700].tolist(), seen, key, greedy)
    assert int(token[0]) == full[699].argmax()

    @nnx.jit
    def step(m, tokens, cache):
        return m.forward(tokens, cache, 1)

    for t in range(700, 720):
        logits, cache = step(m, ids[:, t:t + 1], cache)
        np.testing.assert_allclose(np.asarray(logits)[0, 0], full[t], atol=TOLERANCE)


def test_prefill_in_chunks_of_a_ready_bucket(tiny_ckpt):
    """Where the buckets a prefill would pick are not compiled but a big enough one is (a conversation
    resumed after a restart), the prefill runs in chunks of that one, and agrees with the full forward."""
    from model.generate import chunk_buckets

    assert chunk_buckets(700, {16, 32, 64, 128, 256, 512}) == [512, 256]
    assert chunk_buckets(700, ()) == [512, 256]  # nothing ready: compile what fits best
    assert chunk_buckets(700, {16, 32}) == [512, 256]  # too small to be worth it
    assert chunk_buckets(300, {16, 64}) == [64] * 4 + [64]
    assert chunk_buckets(300, {16, 32, 64, 128}) == [128, 128, 64]
    assert chunk_buckets(10, {64}) == [64]
    m = model.load(tiny_ckpt, one_device())
    ids = random_ids(1, 310, seed=4)
    full = np.asarray(forward(m, ids, None))[0]
    gen = Generator(m)
    gen.ready_buckets = lambda capacity: {16, 64}  # as if only these had been compiled
    cache = gen.new_cache(1024)
    token, cache = gen.prefill(cache, ids[0, :300].tolist(), gen.seen_mask([]), gen.seed(0),
                               SamplingArrays.of(SamplingParams(temperature=0)))
    assert int(token[0]) == full[299].argmax() and int(cache.end) == 300
    logits, _ = nnx.jit(lambda m, tokens, cache: m.forward(tokens, cache, 10))(m, ids[:, 300:], cache)
    np.testing.assert_allclose(np.asarray(logits)[0], full[300:], atol=TOLERANCE)
