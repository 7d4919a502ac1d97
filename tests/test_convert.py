"""Conversion from Hugging Face safetensors into our checkpoint, and back."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

import model
from model.safetensors_io import TensorFiles
from tiny_model import MIXTRAL_TOKENIZER, TINY_MIXTRAL, write_word_tokenizer


def test_round_trip_is_identical(tiny_hf, tiny_ckpt, tmp_path):
    exported = model.export_hf(tiny_ckpt, tmp_path / "hf")
    original, back = TensorFiles(tiny_hf), TensorFiles(exported)
    assert sorted(original.names()) == sorted(back.names())
    for name in original.names():
        a, b = original.read(name), back.read(name)
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), name
    # transformers loads the export and computes the same thing
    from transformers import MixtralForCausalLM

    ids = torch.tensor([[1, 733, 16289, 28793, 22557]])
    with torch.no_grad():
        ref = MixtralForCausalLM.from_pretrained(tiny_hf).eval()(ids).logits
        out = MixtralForCausalLM.from_pretrained(exported).eval()(ids).logits
    assert torch.equal(ref, out)


def test_manifest_records_source_and_hashes(tiny_hf, tiny_ckpt):
    manifest = json.loads((tiny_ckpt / "manifest.json").read_text())
    assert manifest["dtype"] == "float32" and manifest["quantization"] is None
    assert manifest["source"]["path"] == str(tiny_hf.resolve())
    assert {"model.safetensors", "config.json", "tokenizer.model"} <= set(manifest["files"])
    model.verify(tiny_ckpt, deep=True)


def test_fused_expert_names_convert_to_the_same_model(tiny_hf, tiny_ckpt, tmp_path):
    """transformers' in-memory layout (mlp.experts.gate_up_proj / down_proj) is accepted too."""
    from transformers import MixtralForCausalLM

    fused = tmp_path / "fused"
    fused.mkdir()
    hf = MixtralForCausalLM.from_pretrained(tiny_hf)
    state = {k: v.contiguous().numpy() for k, v in hf.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    save_file(state, fused / "model.safetensors")
    for name in ("config.json", "tokenizer.model"):
        shutil.copyfile(tiny_hf / name, fused / name)
    ours = TensorFiles(model.convert_hf(fused, tmp_path / "ours"))
    reference = TensorFiles(tiny_ckpt)
    for name in reference.names():
        np.testing.assert_array_equal(ours.read(name), reference.read(name), err_msg=name)


@pytest.fixture(scope="module")
def dense_llama(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(4)
    folder = tmp_path_factory.mktemp("llama")
    cfg = LlamaConfig(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      rope_theta=100000.0, max_position_embeddings=2048)
    llama = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in llama.model.layers:
            layer.self_attn.q_proj.weight.mul_(6)
            layer.self_attn.k_proj.weight.mul_(6)
    llama.save_pretrained(folder)
    shutil.copyfile(MIXTRAL_TOKENIZER, folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages[0]['content'] }}"}))
    return llama, folder


def test_upcycled_dense_model_equals_the_dense_model(dense_llama, tmp_path):
    llama, folder = dense_llama
    ckpt = model.convert_hf(folder, tmp_path / "up", upcycle_experts=4)
    config = model.verify(ckpt)
    assert (config.num_experts, config.experts_per_token, config.tie_word_embeddings) == (4, 2, True)
    ids = np.random.default_rng(0).integers(3, 32000, (1, 16)).astype(np.int32)
    ours = np.asarray(model.load(ckpt, model.make_mesh((1, 1)))(ids))
    with torch.no_grad():
        ref = llama(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    assert np.abs(ours - ref).max() <= 1e-4


def test_bad_sources_are_refused_clearly(dense_llama, tiny_hf, tmp_path):
    _, llama = dense_llama
    with pytest.raises(model.ConversionError, match="--upcycle-experts"):
        model.convert_hf(llama, tmp_path / "a")
    with pytest.raises(model.ConversionError, match="already Mixtral"):
        model.convert_hf(tiny_hf, tmp_path / "b", upcycle_experts=4)
    with pytest.raises(model.ConversionError, match="no config.json"):
        model.convert_hf(tmp_path, tmp_path / "c")
    no_tokenizer = tmp_path / "no_tok"
    shutil.copytree(tiny_hf, no_tokenizer)
    (no_tokenizer / "tokenizer.model").unlink()
    with pytest.raises(model.ConversionError, match="neither tokenizer.model nor tokenizer.json"):
        model.convert_hf(no_tokenizer, tmp_path / "d")
    assert not any(p.name in "abcd" for p in tmp_path.iterdir())


def test_interrupted_conversion_leaves_nothing_and_existing_output_is_kept(tiny_hf, tiny_ckpt, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_hf, broken)
    shard = sorted(broken.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # a half-downloaded shard
    out = tmp_path / "out"
    with pytest.raises(model.ConversionError, match="truncated"):
        model.convert_hf(broken, out)
    assert list(tmp_path.iterdir()) == [broken]  # no output, no temp folder

    existing = tmp_path / "existing"
    shutil.copytree(tiny_ckpt, existing)
    with pytest.raises(model.ConversionError, match="already exists"):
        model.convert_hf(tiny_hf, existing)
    with pytest.raises(model.ConversionError):
        model.convert_hf(broken, existing, overwrite=True)
    model.verify(existing, deep=True)  # a failed replacement leaves the old checkpoint intact


def _hf_folder_of_size(folder, layers: int, hidden: int, inter: int, experts: int):
    """A Mixtral HF folder written shard by shard with numpy (fast, bounded memory): ~layers * 3 *
    experts * hidden * inter * 4 bytes."""
    folder.mkdir()
    config = {**TINY_MIXTRAL, "vocab_size": 1000, "hidden_size": hidden, "intermediate_size": inter,
              "num_hidden_layers": layers, "num_local_experts": experts, "model_type": "mixtral"}
    (folder / "config.json").write_text(json.dumps(config))
    write_word_tokenizer(folder, config["vocab_size"])
    rng = np.random.default_rng(0)

    def rand(*shape):
        return rng.standard_normal(shape, dtype=np.float32)

    weight_map = {}
    kv = TINY_MIXTRAL["num_key_value_heads"] * hidden // TINY_MIXTRAL["num_attention_heads"]
    for layer in range(layers):
        p = f"model.layers.{layer}"
        tensors = {f"{p}.input_layernorm.weight": rand(hidden), f"{p}.post_attention_layernorm.weight": rand(hidden),
                   f"{p}.self_attn.q_proj.weight": rand(hidden, hidden), f"{p}.self_attn.o_proj.weight": rand(hidden, hidden),
                   f"{p}.self_attn.k_proj.weight": rand(kv, hidden), f"{p}.self_attn.v_proj.weight": rand(kv, hidden),
                   f"{p}.block_sparse_moe.gate.weight": rand(experts, hidden)}
        for e in range(experts):
            q = f"{p}.block_sparse_moe.experts.{e}"
            tensors |= {f"{q}.w1.weight": rand(inter, hidden), f"{q}.w3.weight": rand(inter, hidden),
                        f"{q}.w2.weight": rand(hidden, inter)}
        name = f"model-{layer:05d}.safetensors"
        save_file(tensors, folder / name)
        weight_map |= dict.fromkeys(tensors, name)
    last = {"model.embed_tokens.weight": rand(1000, hidden), "model.norm.weight": rand(hidden),
            "lm_head.weight": rand(1000, hidden)}
    save_file(last, folder / "model-last.safetensors")
    weight_map |= dict.fromkeys(last, "model-last.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.slow
def test_conversion_streams_with_bounded_memory(tmp_path):
    """Peak resident memory grows by a few tensors (2 MB each here), not by the model (600 MB)."""
    _hf_folder_of_size(tmp_path / "hf", layers=12, hidden=512, inter=1024, experts=8)
    model_bytes = sum(f.stat().st_size for f in (tmp_path / "hf").glob("*.safetensors"))
    assert model_bytes > 550e6
    script = textwrap.dedent(f"""
        import resource, sys
        import model, model.convert, numpy
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if sys.argv[1] == "convert":
            model.convert_hf({str(tmp_path / 'hf')!r}, {str(tmp_path / 'out')!r})
        print(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    """)
    peaks = {}
    for mode in ("idle", "convert"):
        out = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, check=True)
        peaks[mode] = int(out.stdout.split()[1]) * 1024  # ru_maxrss is in KiB
    growth = peaks["convert"] - peaks["idle"]
    print(f"model {model_bytes / 1e6:.0f} MB, peak RSS growth while converting {growth / 1e6:.0f} MB")
    assert growth < 0.1 * model_bytes
    model.verify(tmp_path / "out", deep=True)


@pytest.mark.parametrize("dtype, quantization", [("float32", None), ("bfloat16", None), ("float32", "int8"),
                                                 ("float32", "int4")])
def test_format_1_checkpoints_still_load(tiny_hf, tmp_path, dtype, quantization):
    """Format 2 stores the linear weights out-major (the CPU kernels' layout, read as they are); format 1
    ([in, out]) is read transposed for them. Both give the same model, on the CPU kernels' path and on
    XLA's (the GPU's, which reads format 2 transposed), sharded too."""
    ids = np.array([[1, 733, 16289, 28793, 22557, 28804]], np.int32)
    logits = {}
    for layout in ("in_major", "out_major"):
        ckpt = model.convert_hf(tiny_hf, tmp_path / layout, dtype=dtype, quantize=quantization, weight_layout=layout)
        config = json.loads((ckpt / "config.json").read_text())
        assert config["format_version"] == (1 if layout == "in_major" else 2)
        if layout == "in_major":  # as versions before 2 wrote it: no weight_layout, a dense LM head
            del config["weight_layout"], config["lm_head_quantized"]
            (ckpt / "config.json").write_text(json.dumps(config))
            manifest = json.loads((ckpt / "manifest.json").read_text())
            manifest["files"]["config.json"] = {"bytes": (ckpt / "config.json").stat().st_size,
                                                "sha256": model.manifest.sha256_file(ckpt / "config.json")}
            (ckpt / "manifest.json").write_text(json.dumps(manifest))
        for mesh, branchless in (((1, 1), False), ((2, 4), False), ((1, 1), True)):
            logits[layout, mesh, branchless] = np.asarray(model.load(ckpt, model.make_mesh(mesh), branchless=branchless)(ids))
    # each format the same on every path, but that the CPU's int4 gemv rounds x to int8 where the GPU's does
    # not, and its int8 gemm rounds x to int16 per 32 inputs of each device's shard (of 16 inputs here)
    for (layout, mesh, branchless), value in logits.items():
        want = logits[layout, (1, 1), False]
        relative = 2e-3 if quantization == "int4" and branchless else 1e-4 if quantization == "int8" else None
        atol = 2e-2 if dtype == "bfloat16" else relative * np.abs(want).max() if relative else 1e-5
        np.testing.assert_allclose(value, want, atol=atol, err_msg=str((layout, mesh, branchless)))
    old, new = logits["in_major", (1, 1), False], logits["out_major", (1, 1), False]
    if quantization is None:  # the same weights
        np.testing.assert_allclose(old, new, atol=2e-2 if dtype == "bfloat16" else 1e-5)
    else:  # format 2 quantizes the LM head too (the bounds of test_quantize's whole-model check)
        assert np.abs(old - new).max() < (0.02 if quantization == "int8" else 0.25) * np.abs(new).max()


@pytest.mark.parametrize("quantization", [None, "int8"])
def test_accelerators_transpose_format_2_weights_on_the_device(tiny_hf, tmp_path, quantization):
    """Where a backend wants [in, out] weights (XLA's matmuls, the GPU's dense ones) the accelerators read
    format 2's out-major tensors as they are and transpose them themselves (numpy on the host: ~1 GB/s):
    the same model as transposing each block on the host."""
    import jax

    from model.checkpoint import CheckpointWeights
    from model.mixtral import Mixtral
    from model.safetensors_io import TensorFiles

    ckpt = model.convert_hf(tiny_hf, tmp_path / "ours", quantize=quantization)
    config, mesh = model.verify(ckpt), model.make_mesh((2, 4))
    ids = np.array([[1, 733, 16289, 28793, 22557, 28804]], np.int32)

    def logits(on_device: bool) -> np.ndarray:
        weights = CheckpointWeights(TensorFiles(ckpt), config, mesh, transpose_on_device=on_device)
        with jax.set_mesh(mesh):
            m = Mixtral(config, weights, mesh, branchless=False, cpu_kernels=False)
        assert m.layers[0].attn.wq.kernel.shape == (config.hidden_size, config.num_heads * config.head_dim)
        return np.asarray(m(ids))

    np.testing.assert_array_equal(logits(True), logits(False))
