"""The native CPU matmul kernels (model/cpu_matmul.py): every weight type and instruction set against a
numpy reference, odd shapes, inside jit and shard_map, the message when they cannot load; and models
running through them: the same numbers as on XLA's matmuls, the demo's greedy replies in int4."""

from __future__ import annotations

import importlib.machinery
import itertools
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import model
from chat_app.demo import UPCYCLE_EXPERTS
from model import cpu_matmul, quantize
from model.linear import CpuKernels
from model.sharding import make_mesh
from tiny_model import greedy_tokens

pytest_plugins = ["demo_gguf"]

TYPES = ["float32", "bfloat16", "int8", "int4"]
# (rows, inputs, outputs): 1 row and a few (gemv), many (gemm, with a partial block of rows); inputs
# and outputs that are not multiples of the vector width (int4: of its 32-input blocks)
SHAPES = [(1, 67, 5), (3, 99, 37), (5, 131, 70), (29, 547, 33), (200, 300, 129)]
GROUP = 32


def isas() -> list[str]:
    """The instruction sets this CPU can run (the scalar reference always)."""
    original = cpu_matmul.isa()
    found = [name for name in cpu_matmul.ISAS if cpu_matmul.set_isa(name)]
    cpu_matmul.set_isa(original)
    return found


def weight(kind: str, n_in: int, n_out: int, seed: int = 0, in_shards: int = 1):
    """(the float32 weight [in, out] it stands for, the kernel's arrays); int4 values split `in_shards`
    ways along `in` are laid out a block at a time, as a load onto that many devices does."""
    w = np.random.default_rng(seed).standard_normal((n_in, n_out), np.float32)
    if kind in ("float32", "bfloat16"):
        w = w.astype(ml_dtypes.bfloat16 if kind == "bfloat16" else np.float32)
        return w.astype(np.float32), jnp.asarray(cpu_matmul.layout(w, (), None)[0]), ()
    q, params = quantize.quantize(w, kind, GROUP)
    kernel, kernel_params = cpu_matmul.layout(q, params, kind)
    if kind == "int4":
        kernel = np.concatenate([cpu_matmul.layout(block, (), kind)[0] for block in np.split(q, in_shards)], axis=-1)
    return (quantize.dequantize_numpy(q, params, kind, GROUP), jnp.asarray(kernel),
            tuple(map(jnp.asarray, kernel_params)))


def as_the_kernel_takes_it(x: np.ndarray, kind: str, isa: str) -> np.ndarray:
    """x [rows, in] as the kernels multiply it (float64), each block of inputs rounded with one scale (as
    matmul.cc does, in float32). The gemm (many rows): int8 and int4 round each INT4_UNIT inputs to int16
    (the last ones padded with zeros). The gemv (a few): int8 each whole block of X16_BLOCK inputs to
    int16, int4 each INT4_UNIT to int8; bfloat16 on a CPU with bfloat16 dot products splits each whole 32
    inputs into two bfloat16 parts. Else x itself."""
    x = x.astype(np.float32)
    out = x.astype(np.float64)
    if x.shape[0] > cpu_matmul.GEMV_MAX_ROWS:
        if kind in ("int8", "int4"):
            padded = np.pad(x, ((0, 0), (0, -x.shape[1] % cpu_matmul.INT4_UNIT)))
            out[:] = _rounded(padded, cpu_matmul.INT4_UNIT, 32767)[:, :x.shape[1]]
        return out
    if kind == "bfloat16" and isa == "avx512_bf16":
        whole = x.shape[1] // 32 * 32
        high = x.astype(ml_dtypes.bfloat16).astype(np.float32)
        low = (x - high).astype(ml_dtypes.bfloat16).astype(np.float32)
        out[:, :whole] = high[:, :whole].astype(np.float64) + low[:, :whole]
    elif kind == "int8":
        out[:, :_whole(x, cpu_matmul.X16_BLOCK)] = _rounded(x, cpu_matmul.X16_BLOCK, 32767)
    elif kind == "int4":  # (its inputs are whole units)
        out[:] = _rounded(x, cpu_matmul.INT4_UNIT, 127)
    return out


def _whole(x: np.ndarray, block: int) -> int:
    return x.shape[1] // block * block


def _rounded(x: np.ndarray, block: int, largest_int: int) -> np.ndarray:
    """The whole blocks of x, each rounded to integers of at most `largest_int` times its scale."""
    blocks = x[:, :_whole(x, block)].reshape(x.shape[0], -1, block)
    largest = np.abs(blocks).max(axis=-1, keepdims=True)
    to_int = np.where(largest > 0, np.float32(largest_int) / np.maximum(largest, np.float32(1e-30)), np.float32(0))
    whole = np.rint(blocks * to_int.astype(np.float32))
    assert np.abs(whole).max(initial=0) <= largest_int
    taken = whole * (largest / np.float32(largest_int)).astype(np.float64)
    return taken.reshape(x.shape[0], -1)


def close(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.abs(want).max() * np.sqrt(want.size))


def test_the_kernels_are_built():
    assert cpu_matmul.available(), cpu_matmul.unavailable_reason()
    assert cpu_matmul.isa() == isas()[-1]  # the best this CPU has


@pytest.mark.parametrize("kind", TYPES)
def test_each_kernel_matches_numpy(kind):
    original = cpu_matmul.isa()
    try:
        for rows, n_in, n_out in SHAPES:
            n_in = n_in // GROUP * GROUP if kind == "int4" else n_in
            w, kernel, params = weight(kind, n_in, n_out)
            x = np.random.default_rng(1).standard_normal((rows, n_in)).astype(np.float32)
            # bfloat16 weights: also x that is bfloat16 already (a bfloat16 model's): one dot product per input
            # (gemv), x in tiles of bfloat16 pairs where K is even (gemm), on CPUs with bfloat16 dot products
            xs = [x, x.astype(ml_dtypes.bfloat16).astype(np.float32)] if kind == "bfloat16" else [x]
            matmul = jax.jit(partial(cpu_matmul.matmul, group=GROUP))
            for isa, x in itertools.product(isas(), xs):
                cpu_matmul.set_isa(isa)
                y = matmul(x, kernel, params)
                assert y.shape == (rows, n_out) and y.dtype == jnp.float32
                taken = as_the_kernel_takes_it(x, kind, isa)
                close(y, taken @ w)
                # the roundings are that small (int4's gemv: half an int8 step of a unit's largest |x|)
                rounding = 0.5 / 127 if kind == "int4" and rows <= cpu_matmul.GEMV_MAX_ROWS else 2e-5
                np.testing.assert_allclose(taken, x, rtol=0, atol=rounding * np.abs(x).max())
    finally:
        cpu_matmul.set_isa(original)


@pytest.mark.parametrize("kind", TYPES)
def test_several_weights_in_one_call_match_numpy(kind):
    """x times several weights of one type in one call (the attention's q, k and v): each result as
    that weight's alone, for the gemv and the gemm, on every instruction set."""
    original = cpu_matmul.isa()
    n_in = 96 if kind == "int4" else 99
    weights = [weight(kind, n_in, n_out, seed=n_out) for n_out in (70, 5, 37)]
    try:
        for rows, isa in itertools.product([1, 3, 29, 200], isas()):
            cpu_matmul.set_isa(isa)
            x = np.random.default_rng(rows).standard_normal((rows, n_in)).astype(np.float32)
            ys = jax.jit(partial(cpu_matmul.matmuls, group=GROUP))(x, [(kernel, params) for _, kernel, params in weights])
            assert [y.shape for y in ys] == [(rows, 70), (rows, 5), (rows, 37)]
            for y, (w, _, _) in zip(ys, weights):
                close(y, as_the_kernel_takes_it(x, kind, isa) @ w)
    finally:
        cpu_matmul.set_isa(original)


@pytest.mark.parametrize("split", ["out", "in"])
def test_several_weights_in_one_call_inside_shard_map_on_8_devices(split):
    """`linear.cpu_matmuls`: each device multiplies its shard of x by its shards of all the weights in one
    call; outputs split, or inputs split and summed."""
    from model.linear import cpu_matmuls

    mesh = make_mesh((1, 8))
    axis = mesh.axis_names[1]
    spec = (None, axis) if split == "out" else (axis, None)  # the checkpoint layout's [in, out]
    weights = [weight("int4", 8 * 64, 8 * n_out, seed=n_out, in_shards=8 if split == "in" else 1) for n_out in (6, 2)]
    x = np.random.default_rng(4).standard_normal((3, 8 * 64)).astype(np.float32)
    ys = jax.jit(lambda x, matrices: cpu_matmuls(x, [(CpuKernels(mesh, spec), m) for m in matrices], "int4", GROUP))(
        x, [(kernel, params) for _, kernel, params in weights])
    for y, (w, _, _) in zip(ys, weights):
        taken = np.concatenate([as_the_kernel_takes_it(part, "int4", cpu_matmul.isa()) for part in np.split(x, 8, axis=1)], axis=1)
        close(y, taken @ w)


def test_int4_rows_are_interleaved_as_kernels_h_says(monkeypatch):
    """Byte j of unit u (16 bytes, 32 inputs) at 4 U c + 4 u' + j % 4 of its block (c = j // 4, u' its
    place in the block, U the block's units: 16, or fewer in a row's last block); rows laid out by
    several threads, a few at a time, the same."""
    for shape, part_bytes in itertools.product([(3, 48), (2, 5, 256), (4, 272), (3, 528)], [cpu_matmul.INTERLEAVE_BYTES, 600]):
        monkeypatch.setattr(cpu_matmul, "INTERLEAVE_BYTES", part_bytes)
        packed = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
        units = shape[-1] // 16
        want = np.empty_like(packed)
        for u, j in itertools.product(range(units), range(16)):
            first = u // 16 * 16
            want[..., 16 * first + 4 * min(16, units - first) * (j // 4) + 4 * (u - first) + j % 4] = packed[..., 16 * u + j]
        np.testing.assert_array_equal(cpu_matmul.interleave_int4(packed), want)


@pytest.mark.parametrize("group", [64, 128, 512])
def test_int4_groups_of_several_units(group):
    """Groups of 2 to 16 units (a whole interleaved block), in whole blocks and a short last one."""
    original = cpu_matmul.isa()
    try:
        for rows, n_in, n_out in [(1, 1536, 19), (3, 1024 + group, 8), (9, 512 + group, 5)]:
            w = np.random.default_rng(n_in).standard_normal((n_in, n_out), np.float32)
            q, params = quantize.quantize(w, "int4", group)
            kernel, kernel_params = jax.tree.map(jnp.asarray, cpu_matmul.layout(q, params, "int4"))
            x = np.random.default_rng(1).standard_normal((rows, n_in)).astype(np.float32)
            for isa in isas():
                cpu_matmul.set_isa(isa)
                y = jax.jit(partial(cpu_matmul.matmul, group=group))(x, kernel, kernel_params)
                close(y, as_the_kernel_takes_it(x, "int4", isa) @ quantize.dequantize_numpy(q, params, "int4", group))
    finally:
        cpu_matmul.set_isa(original)


def test_leading_dims_are_kept_and_bfloat16_activations_taken():
    w, kernel, params = weight("int8", 64, 48)
    x = np.random.default_rng(2).standard_normal((2, 3, 64)).astype(np.float32)
    y = jax.jit(lambda x: cpu_matmul.matmul(x.astype(jnp.bfloat16), kernel, params, GROUP))(x)
    assert y.shape == (2, 3, 48) and y.dtype == jnp.float32
    want = x.astype(ml_dtypes.bfloat16).astype(np.float64) @ w
    np.testing.assert_allclose(np.asarray(y, np.float64), want, rtol=0, atol=0.02 * np.abs(want).max())


@pytest.mark.parametrize("kind", TYPES)
@pytest.mark.parametrize("split", ["out", "in"])
def test_inside_shard_map_on_8_devices(kind, split):
    """Each device multiplies by its shard of the weight: outputs split, or inputs split and summed."""
    mesh = make_mesh((1, 8))
    axis = mesh.axis_names[1]
    w, kernel, params = weight(kind, 8 * 64, 8 * 24, seed=3, in_shards=mesh.shape[axis] if split == "in" else 1)
    x = np.random.default_rng(4).standard_normal((6, 8 * 64)).astype(np.float32)
    if split == "out":  # kernel [out, in]: rows split; int8 scale [out], int4 params [out, in/group]
        w_spec, x_spec, y_spec = P(axis, None), P(), P(None, axis)
        param_specs = tuple(P(axis, *([None] * (p.ndim - 1))) for p in params)
        local = partial(cpu_matmul.matmul, group=GROUP)
    else:
        w_spec, x_spec, y_spec = P(None, axis), P(None, axis), P()
        param_specs = tuple(P(None, axis) if kind == "int4" else P() for _ in params)  # int8: scale [out]

        def local(x, kernel, params):
            return jax.lax.psum(cpu_matmul.matmul(x, kernel, params, GROUP), axis)

    y = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(x_spec, w_spec, param_specs), out_specs=y_spec))(
        x, kernel, params)
    close(y, as_the_kernel_takes_it(x, kind, cpu_matmul.isa()) @ w)  # (int4's units do not straddle shards)


def silu(v):
    return v / (1 + np.exp(-v))


def numpy_routing(logits: np.ndarray, live: np.ndarray, k: int) -> np.ndarray:
    """moe.route's choice as weights [N, E] (0: not chosen): softmax, the k largest (ties: the lower
    expert), renormalised; tokens not live choose none."""
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    top = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    chosen = np.take_along_axis(probs, top, -1)
    weights = np.zeros_like(probs)
    np.put_along_axis(weights, top, chosen / chosen.sum(-1, keepdims=True), -1)
    return weights * live[:, None]


@pytest.mark.parametrize("kind", TYPES)
def test_the_fused_experts_match_numpy(kind):
    """moe: the tokens routed from the router's logits (top 2 of 6 experts), and the SwiGLU experts a
    token chose among the call's 4 (global experts 1-4, as one device's), weighted and summed, in one
    call (gemv: a few tokens; gemm: more, and more than one block of the gemm's rows); experts no token
    chose are not read (a NaN weight there would show); a token not live chooses none. Experts 0 and 1
    come alone, 2 and 3 as one stack. Of bfloat16 weights, the hidden activations are bfloat16 (so w2
    takes bfloat16 x's paths)."""
    D, I = (96, 160) if kind == "int4" else (99, 70)
    experts, dense = [], []
    for e in range(4):
        mats = [weight(kind, n_in, n_out, seed=10 * e + j) for j, (n_in, n_out) in enumerate([(D, I), (D, I), (I, D)])]
        dense.append([w for w, *_ in mats])
        experts.append([(kernel, params) for _, kernel, params in mats])
    kernel, params = experts[2][0]
    if params:  # expert 2, which no token chooses: NaN weights
        experts[2][0] = (kernel, (jnp.full_like(params[0], jnp.nan), *params[1:]))
    else:
        experts[2][0] = (jnp.full_like(kernel, jnp.nan), ())
    def stacked(*matrices):
        return (jnp.stack([kernel for kernel, _ in matrices]),
                tuple(jnp.stack(p) for p in zip(*(params for _, params in matrices))))

    stacks = [experts[0], experts[1], [stacked(*mats) for mats in zip(experts[2], experts[3])]]
    first = np.int32(1)  # the call's experts: global 1-4 of 6
    moe = jax.jit(partial(cpu_matmul.moe, group=GROUP, k=2))
    for rows in (1, 3, 37, 400):
        rng = np.random.default_rng(rows)
        x = rng.standard_normal((rows, D)).astype(np.float32)
        logits = rng.standard_normal((rows, 6)).astype(np.float32)
        logits[:, 1 + 2] = -30  # no token chose expert 2
        logits[0, 1 + 1] = -30  # expert 1: not the first token
        live = np.arange(rows) != rows // 2 if rows > 1 else np.ones(1, bool)
        routing = numpy_routing(logits, live, 2)[:, 1:5]
        assert (routing > 0).any() and (rows < 37 or (routing[:, [0, 1, 3]] > 0).any(axis=0).all())  # (experts run)
        got = np.asarray(moe(x, logits, live, first, stacks))
        want = np.zeros((rows, D))
        for e in (0, 1, 3):
            w1, w3, w2 = dense[e]
            taken = as_the_kernel_takes_it(x, kind, cpu_matmul.isa())
            h = silu(taken @ w1) * (taken @ w3)
            if kind == "bfloat16":  # a bfloat16 model's hidden activations are bfloat16
                h = h.astype(np.float32).astype(ml_dtypes.bfloat16)
            want += routing[:, e:e + 1] * (as_the_kernel_takes_it(h.astype(np.float32), kind, cpu_matmul.isa()) @ w2)
        assert got.shape == (rows, D) and np.isfinite(got).all()
        if rows > 1:
            assert not got[rows // 2].any()
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max() * np.sqrt(want.size))


def test_says_once_why_when_the_kernels_cannot_load(tmp_path):
    """A copy of the package without the library, then with a broken one: the model package imports,
    `available()` is False, and the warning names the cause and the fix, once."""
    package = tmp_path / "model"
    shutil.copytree(Path(cpu_matmul.__file__).parent, package, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    script = ("import model.cpu_matmul as c; assert not c.available(); c.warn_once(); c.warn_once(); "
              "print(c.unavailable_reason())")

    def run() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                              env={"PYTHONPATH": str(tmp_path), "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})

    missing = run()
    assert missing.returncode == 0, missing.stderr
    assert missing.stderr.count("warning:") == 1
    assert "were not built" in missing.stderr and "pip install ." in missing.stderr
    assert "C++ compiler" in missing.stderr and "slower" in missing.stderr

    (package / f"{cpu_matmul.LIBRARY}{importlib.machinery.EXTENSION_SUFFIXES[0]}").write_bytes(b"not a library")
    broken = run()
    assert broken.returncode == 0, broken.stderr
    assert broken.stderr.count("warning:") == 1 and "failed to load" in broken.stderr


def uses_kernels(m) -> bool:
    layer = m.layers[0]
    lm_head = m.tied_lm_head if m.lm_head is None else m.lm_head.kernels
    return isinstance(layer.attn.wq.kernels, CpuKernels) and layer.moe.layout.cpu_kernels and isinstance(lm_head, CpuKernels)


IDS = np.random.default_rng(5).integers(3, 32000, (2, 12)).astype(np.int32)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_a_quantized_model_computes_what_its_dequantized_float32_does_on_xla(tiny_hf, tmp_path, mode):
    """Attention projections, experts (decode, few-token and longer prefills) and the LM head go
    through the kernels, on one device and split over 8."""
    ckpt = model.convert_hf(tiny_hf, tmp_path / mode, quantize=mode)
    dequantized = model.convert_hf(model.export_hf(ckpt, tmp_path / "hf"), tmp_path / "float32")
    xla = model.load(dequantized, make_mesh((1, 1)), cpu_kernels=False)
    assert not uses_kernels(xla)
    want = np.asarray(xla(IDS))
    long_ids = np.random.default_rng(6).integers(3, 32000, (1, 80)).astype(np.int32)  # > MOE_TILE tokens
    want_long = np.asarray(xla(long_ids))
    for mesh in ((1, 1), (2, 4)):
        ours = model.load(ckpt, make_mesh(mesh))
        assert uses_kernels(ours)
        close(ours(IDS), want)
        close(ours(long_ids), want_long)
    assert greedy_tokens(ours, IDS[0].tolist()) == greedy_tokens(xla, IDS[0].tolist())


def test_a_bfloat16_model_through_the_kernels_is_close_to_xla(tiny_hf, tmp_path):
    ckpt = model.convert_hf(tiny_hf, tmp_path / "bf16", dtype="bfloat16")
    want = np.asarray(model.load(ckpt, make_mesh((1, 1)), cpu_kernels=False)(IDS))
    ours = model.load(ckpt, make_mesh((1, 1)))
    assert uses_kernels(ours) and ours.layers[0].attn.wq.kernel[...].dtype == jnp.bfloat16
    got = np.asarray(ours(IDS))
    assert np.abs(got - want).max() < 0.02 * np.abs(want).max()  # bfloat16 activations, summed in another order
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9


@pytest.mark.slow
def test_the_demo_in_int4_replies_as_in_float32(demo_files, tmp_path):
    """The demo's weights are Q4_1 (groups of 32, scale + minimum): int4 holds them exactly."""
    tok = None
    replies = {}
    for mode in ("int4", None):
        ckpt = model.convert_hf(demo_files.hf_dir, tmp_path / str(mode), quantize=mode, upcycle_experts=UPCYCLE_EXPERTS)
        tok = tok or model.load_tokenizer(ckpt)
        prompt = model.encode_chat(tok, [{"role": "user", "content": "What is the capital of France?"}],
                                   chat_format=tok.chat_format)
        m = model.load(ckpt, make_mesh((1, 1)))
        assert uses_kernels(m)
        replies[mode] = greedy_tokens(m, prompt, n=24)
    assert replies["int4"] == replies[None]
    assert "Paris" in tok.decode(replies["int4"])
