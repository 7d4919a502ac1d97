"""Weight-only int8 / int4: the arithmetic, the checkpoint sizes, and the model's accuracy."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import model
import model.safetensors_io
from model import quantize
from tiny_model import greedy_tokens

IDS = np.random.default_rng(7).integers(3, 32000, (1, 24)).astype(np.int32)


def test_int8_error_is_at_most_half_a_step():
    w = np.random.default_rng(0).standard_normal((64, 48)).astype(np.float32)
    q, (scale,) = quantize.quantize(w, "int8", 0)
    assert q.dtype == np.int8 and scale.shape == (48,)
    assert np.all(np.abs(quantize.dequantize_numpy(q, (scale,), "int8", 0) - w) <= scale / 2 + 1e-7)


def test_int4_packs_two_per_byte_and_round_trips():
    w = np.random.default_rng(1).standard_normal((3, 64, 40)).astype(np.float32)
    w[0, :32] = np.abs(w[0, :32])  # a group of positive values gets all 16 levels too
    packed, (scale, offset) = quantize.quantize(w, "int4", group=32)
    assert packed.dtype == np.uint8 and packed.shape == (3, 32, 40) and scale.shape == offset.shape == (3, 2, 40)
    values = quantize.unpack_int4(packed).astype(np.uint8)
    assert values.max() <= 15
    np.testing.assert_array_equal(quantize.pack_int4(values), packed)
    error = np.abs(quantize.dequantize_numpy(packed, (scale, offset), "int4", 32) - w)
    assert np.all(error <= np.repeat(scale, 32, axis=1) / 2 + 1e-6)
    # values already on a 16-level grid per group (as in a Q4_1 GGUF) come back exactly
    grid = quantize.dequantize_numpy(packed, (scale, offset), "int4", 32)
    again, params = quantize.quantize(grid, "int4", group=32)
    np.testing.assert_allclose(quantize.dequantize_numpy(again, params, "int4", 32), grid, atol=1e-6)


@pytest.fixture(scope="module")
def reference(tiny_ckpt):
    return np.asarray(model.load(tiny_ckpt, model.make_mesh((1, 1)))(IDS))


@pytest.mark.parametrize("mode, max_error, bytes_per_weight", [("int8", 0.02, 1.0), ("int4", 0.25, 0.5)])
def test_quantized_checkpoint_is_smaller_and_close(tiny_hf, tiny_ckpt, reference, tmp_path, mode, max_error,
                                                   bytes_per_weight):
    ckpt = model.convert_hf(tiny_hf, tmp_path / mode, quantize=mode)
    config = model.verify(ckpt, deep=True)
    assert config.quantization == mode
    files = model.safetensors_io.TensorFiles(ckpt)
    expert = files.read("layers.0.w1")
    assert expert.nbytes == config.num_experts * config.hidden_size * config.intermediate_size * bytes_per_weight
    logits = np.asarray(model.load(ckpt, model.make_mesh((1, 1)))(IDS))
    error = np.abs(logits - reference).max() / np.abs(reference).max()
    assert error < max_error
    assert (logits.argmax(-1) == reference.argmax(-1)).mean() >= 0.75
    # sharded over 8 devices, and the GPU's layout (int8 experts stored [out, in]): the same numbers, but
    # that the CPU's kernels round x for integer dot products, per 32 inputs of each device's shard, where
    # the GPU's do not: int4's gemv (the experts' of a few tokens here) to int8, the int8 and int4 gemms to
    # int16 (int8's shards of the attention's output projection here split its 32s)
    for mesh, branchless in (((2, 4), False), ((1, 1), True), ((2, 4), True)):
        other = model.load(ckpt, model.make_mesh(mesh), branchless=branchless)
        relative = 2e-3 if mode == "int4" and branchless else 1e-4 if mode == "int8" else None
        rounding = relative * np.abs(logits).max() if relative else 1e-5
        np.testing.assert_allclose(np.asarray(other(IDS)), logits, atol=rounding)
        if branchless:  # the GPU's layout: attention weights [out, in] (int4 packed along in), read by our kernels
            wq = other.layers[0].attn.wq
            assert wq.kernels is not None and wq.kernel.shape == (config.num_heads * config.head_dim,
                                                          config.hidden_size // (2 if mode == "int4" else 1))
    # the GPU's decode path (the expert_gemv kernel, interpreted) decodes the CPU path's tokens
    cpu_tokens = greedy_tokens(model.load(ckpt, model.make_mesh((1, 1))), IDS[0].tolist())
    assert greedy_tokens(model.load(ckpt, model.make_mesh((1, 1)), branchless=True), IDS[0].tolist()) == cpu_tokens
    # export writes the dequantized weights
    exported = model.export_hf(ckpt, tmp_path / f"{mode}-hf")
    assert json.loads((exported / "config.json").read_text())["torch_dtype"] == "float32"


def test_the_lm_head_is_quantized_and_older_checkpoints_keep_theirs(tiny_hf, tiny_ckpt, reference, tmp_path):
    """Conversions quantize the (untied) LM head with the rest; a checkpoint of format 1 (written before
    that: no `lm_head_quantized` in its config, the LM head in float32) still loads, with a dense LM head."""
    from model.config import MixtralConfig

    new = model.convert_hf(tiny_hf, tmp_path / "new", quantize="int8")
    config = model.verify(new)
    assert config.lm_head_quantized and model.safetensors_io.TensorFiles(new).read("lm_head").dtype == np.int8
    assert model.load(new, model.make_mesh((1, 1))).lm_head.quantization == "int8"

    old = model.convert_hf(tiny_hf, tmp_path / "old", quantize="int8", weight_layout="in_major")
    saved = json.loads((old / "config.json").read_text())
    for key in ("lm_head_quantized", "weight_layout"):  # as format 1 wrote it
        del saved[key]
    assert MixtralConfig.from_json(saved) == model.verify(old)
    assert model.safetensors_io.TensorFiles(old).read("lm_head").dtype == np.float32
    for cpu_kernels in (True, False):
        loaded = model.load(old, model.make_mesh((1, 1)), cpu_kernels=cpu_kernels)
        assert loaded.lm_head.quantization is None and loaded.layers[0].attn.wq.quantization == "int8"
        logits = np.asarray(loaded(IDS))
        assert np.abs(logits - reference).max() / np.abs(reference).max() < 0.02


def test_int4_checkpoints_with_float32_parameters_still_load(tiny_hf, tmp_path):
    """int4's scales and offsets are float16 (a sixth of int4's bytes); checkpoints converted before kept
    them in float32. Such a one (made here from a new one: the same values, widened) loads with them cast
    to float16, on the CPU kernels and on XLA's path: the same logits as the new one, exactly."""
    from model.safetensors_io import TensorFiles, TensorSpec, write_sharded

    new = model.convert_hf(tiny_hf, tmp_path / "new", quantize="int4")
    files = TensorFiles(new)
    assert files.dtype("layers.0.w1.scale") == files.dtype("layers.0.w1.offset") == np.float16
    old = tmp_path / "old"
    shutil.copytree(new, old)
    for f in old.glob("model*.safetensors*"):
        f.unlink()
    widened = lambda a: a.astype(np.float32) if a.dtype == np.float16 else a  # noqa: E731
    plan = [(TensorSpec(name, widened(files.read(name)).dtype, files.shape(name)),
             lambda name=name: [widened(files.read(name))]) for name in files.names()]
    hashes = write_sharded(old, plan, metadata={"format": "mixtral-chat"})
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["files"] = {name: info for name, info in manifest["files"].items() if not name.startswith("model")}
    manifest["files"].update({name: {"bytes": (old / name).stat().st_size, "sha256": digest} for name, digest in hashes.items()})
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert TensorFiles(old).dtype("layers.0.w1.scale") == np.float32
    for cpu_kernels in (True, False):
        loaded = {ckpt: model.load(ckpt, model.make_mesh((1, 1)), cpu_kernels=cpu_kernels) for ckpt in (new, old)}
        assert loaded[old].layers[0].attn.wq.qparams[0].dtype == np.float16
        np.testing.assert_array_equal(np.asarray(loaded[old](IDS)), np.asarray(loaded[new](IDS)))


def test_programs_of_a_model_on_our_kernels_have_no_ynnpack_fusions(tiny_hf, tiny_ckpt, tmp_path):
    """XLA:CPU's YNNPACK dots run XLA's float32 matmuls fast, but a program sets each up on its first run;
    a model whose weights go through our kernels (int8 and float32 here) is compiled without them, one on
    XLA's matmuls with."""
    import jax.numpy as jnp
    from model.engine_api import SamplingParams
    from model.generate import Generator
    from model.sampling import SamplingArrays

    int8 = model.convert_hf(tiny_hf, tmp_path / "int8", quantize="int8")
    for ckpt, cpu_kernels in ((int8, True), (tiny_ckpt, True), (tiny_ckpt, False)):
        gen = Generator(model.load(ckpt, model.make_mesh((1, 1)), cpu_kernels=cpu_kernels))
        compiled = gen.prefill_program.lower(gen.model_def, gen.params, gen.new_cache(64), jnp.zeros((1, 16), jnp.int32),
                                             np.int32(16), gen.seen_mask([]), gen.seed(0),
                                             SamplingArrays.of(SamplingParams())).compile()
        assert ("ynn_fusion" in compiled.as_text()) != cpu_kernels, (ckpt, cpu_kernels)
