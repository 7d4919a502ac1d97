"""gguf_to_hf against transformers' own GGUF loading, on the real demo GGUF and on tiny GGUFs made here."""

from __future__ import annotations

import json
import re
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from tokenizers import pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer

from model.gguf_import import gguf_to_hf

pytest_plugins = ["demo_gguf"]

IM_START, IM_END = 1, 2  # SmolLM2's <|im_start|> and <|im_end|>

TEXTS = [
    "Hello, world!",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><repo_name>mixtral-chat<file_sep>README.md",
    "The year 2024 had 366 days; 3.14159 and 1,000,000 and 0x1F.",
    "Unicode: café naïve Ελληνικά русский 日本語のテキスト 한국어 😀👍🏽",
    "def f(a, b):\n    return a**b  # power\n\n\tif x != y: pass",
    "   leading and trailing   ",
    "runs\n\n\n\nof\r\nwhitespace\t\t\t and  double  spaces",
    "don't won't I'm you're they've we'll she'd",
    "",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer in one word."},
     {"role": "user", "content": "Hi there"},
     {"role": "assistant", "content": "Hello!"},
     {"role": "user", "content": "Name a colour: 1, 2, 3..."}],
]


# --- the demo GGUF vs transformers -------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference_model(demo_files):
    return AutoModelForCausalLM.from_pretrained(demo_files.gguf.parent, gguf_file=demo_files.gguf.name,
                                                dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def reference_tokenizer(demo_files):
    return AutoTokenizer.from_pretrained(demo_files.gguf.parent, gguf_file=demo_files.gguf.name)


@pytest.fixture(scope="module")
def our_model(demo_files):
    return AutoModelForCausalLM.from_pretrained(demo_files.hf_dir).eval()


@pytest.fixture(scope="module")
def our_tokenizer(demo_files):
    return AutoTokenizer.from_pretrained(demo_files.hf_dir)


@pytest.mark.slow
def test_every_weight_equals_transformers_dequantization(demo_files, reference_model):
    ours = load_file(demo_files.hf_dir / "model.safetensors")
    reference = reference_model.state_dict()
    # Tied embeddings: no lm_head tensor of ours; transformers lists the shared one under both names.
    assert set(ours) == set(reference) - {"lm_head.weight"}
    assert reference_model.config.tie_word_embeddings
    for name, weight in ours.items():
        assert weight.dtype == np.float32, name
        np.testing.assert_array_equal(weight, reference[name].numpy(), err_msg=name)


@pytest.mark.slow
def test_config_and_logits_match_transformers(demo_files, reference_model, our_model):
    config = json.loads((demo_files.hf_dir / "config.json").read_text())
    expected = reference_model.config
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "tie_word_embeddings",
                "bos_token_id"):
        assert config[key] == getattr(expected, key), key
    assert config["rms_norm_eps"] == pytest.approx(expected.rms_norm_eps)
    assert our_model.config.rope_parameters["rope_theta"] == expected.rope_parameters["rope_theta"] == 100000.0

    ids = torch.tensor([[IM_START, 4093, 198, 6004, IM_END, 33, 34, 905, 216, 1000, 40000, 12]])
    with torch.no_grad():
        np.testing.assert_allclose(our_model(ids).logits.numpy(), reference_model(ids).logits.numpy(), atol=1e-4)


def test_tokenizer_matches_transformers(our_tokenizer, reference_tokenizer):
    for text in TEXTS:
        ids = our_tokenizer.encode(text)
        assert ids == reference_tokenizer.encode(text), text
        assert our_tokenizer.decode(ids) == reference_tokenizer.decode(ids) == text


def test_every_numeral_is_its_own_piece_as_in_llama_cpp(our_tokenizer):
    """The GGUF's `smollm` pre-tokenizer isolates each \\p{N} character before the GPT-2 split, as llama.cpp
    (and SmolLM's own tokenizer.json) do. transformers' GGUF loader skips that step; it shows only on
    numerals the vocabulary could merge with a neighbour, like " ²" -> "ĠÂ" + "²" there, "Ġ" + "Â²" here."""
    assert our_tokenizer.tokenize(" ²³ ½") == ["Ġ", "Â²", "Â³", "Ġ", "Â½"]
    assert our_tokenizer.tokenize("x=2024") == ["x", "=", "2", "0", "2", "4"]


def test_chat_template_matches_transformers(demo_files, our_tokenizer, reference_tokenizer):
    config = json.loads((demo_files.hf_dir / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in config["chat_template"]
    for messages in CONVERSATIONS:
        ours = our_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert ours == reference_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert ours.endswith("<|im_start|>assistant\n")
        ids = our_tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
        assert ids == reference_tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
        assert ids.count(IM_START) == len(messages) + 1 + (messages[0]["role"] != "system")  # + default system


def test_control_tokens_are_special_and_the_reply_ends_at_im_end(demo_files, our_tokenizer):
    tokenizer_json = json.loads((demo_files.hf_dir / "tokenizer.json").read_text())
    specials = {t["content"] for t in tokenizer_json["added_tokens"] if t["special"]}
    assert {"<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<empty_output>"} <= specials
    assert len(specials) == 17
    assert our_tokenizer.decode([IM_START, 33, IM_END], skip_special_tokens=True) == "1"
    generation = json.loads((demo_files.hf_dir / "generation_config.json").read_text())
    assert IM_END in np.atleast_1d(generation["eos_token_id"])
    assert our_tokenizer.convert_ids_to_tokens(IM_END) == "<|im_end|>"


def test_greedy_reply_knows_the_capital_of_france(our_model, our_tokenizer):
    prompt = our_tokenizer.apply_chat_template(CONVERSATIONS[0], add_generation_prompt=True, return_tensors="pt")
    max_new_tokens = 30
    out = our_model.generate(**prompt, max_new_tokens=max_new_tokens, do_sample=False)
    reply = out[0, prompt["input_ids"].shape[1]:].tolist()
    assert "Paris" in our_tokenizer.decode(reply)
    assert reply[-1] == IM_END and len(reply) < max_new_tokens  # stopped by the end-of-turn token


# --- tiny GGUFs written here --------------------------------------------------------------------------

TINY = dict(layers=2, hidden=16, heads=4, kv_heads=2, intermediate=24)
BYTE_ALPHABET = sorted(pre_tokenizers.ByteLevel.alphabet())
TINY_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *BYTE_ALPHABET, "Ġt", "he", "Ġthe", "in", "Ġin"]
TINY_MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ in"]


def _llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """What llama.cpp's converter does to Q/K rows (convert_hf_to_gguf.py `permute`): halves -> pairs."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(weight.shape)


def _tiny_hf_weights(rng: np.random.Generator, tied: bool) -> dict[str, np.ndarray]:
    """Random weights by HF name, [out, in]."""
    D, I, V = TINY["hidden"], TINY["intermediate"], len(TINY_TOKENS)
    head_dim = D // TINY["heads"]
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    if not tied:
        shapes["lm_head.weight"] = (V, D)
    for i in range(TINY["layers"]):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
                   p + "self_attn.q_proj.weight": (TINY["heads"] * head_dim, D),
                   p + "self_attn.k_proj.weight": (TINY["kv_heads"] * head_dim, D),
                   p + "self_attn.v_proj.weight": (TINY["kv_heads"] * head_dim, D),
                   p + "self_attn.o_proj.weight": (D, TINY["heads"] * head_dim),
                   p + "mlp.gate_proj.weight": (I, D), p + "mlp.up_proj.weight": (I, D),
                   p + "mlp.down_proj.weight": (D, I)}
    return {name: rng.standard_normal(shape).astype(np.float32) * 0.3 for name, shape in shapes.items()}


def _write_tiny_gguf(path: Path, weights: dict[str, np.ndarray], *, arch: str = "llama", add_bos: bool = False,
                     expert_count: int = 0, pre: str = "smollm") -> Path:
    """A GGUF laid out as llama.cpp's converter writes one: GGUF tensor names, Q/K rows permuted.
    `weights` are by HF name; a name with no HF form (like "rope_freqs.weight") is written as it is."""
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(TINY["layers"])
    writer.add_context_length(128)
    writer.add_embedding_length(TINY["hidden"])
    writer.add_feed_forward_length(TINY["intermediate"])
    writer.add_head_count(TINY["heads"])
    writer.add_head_count_kv(TINY["kv_heads"])
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(TINY["hidden"] // TINY["heads"])
    if expert_count:
        writer.add_expert_count(expert_count)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(TINY_TOKENS)
    writer.add_token_types([gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * (len(TINY_TOKENS) - 3))
    writer.add_token_merges(TINY_MERGES)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(add_bos)
    gguf_names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                  "lm_head.weight": "output.weight"}
    parts = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name, weight in weights.items():
        if name.startswith("model.layers."):
            _, _, layer, part = name.removesuffix(".weight").split(".", 3)
            gguf_name = f"blk.{layer}.{parts[part]}.weight"
            if part == "self_attn.q_proj":
                weight = _llama_cpp_permute(weight, TINY["heads"])
            elif part == "self_attn.k_proj":
                weight = _llama_cpp_permute(weight, TINY["kv_heads"])
        else:
            gguf_name = gguf_names.get(name, name)
        writer.add_tensor(gguf_name, weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_tiny_untied_model_round_trips_and_matches_transformers(tmp_path):
    """The Q/K rows llama.cpp permuted come back in HF order; an untied lm_head is kept; a GGUF that asks
    for BOS gets it from the tokenizer, as transformers does."""
    weights = _tiny_hf_weights(np.random.default_rng(0), tied=False)
    gguf_file = _write_tiny_gguf(tmp_path / "tiny.gguf", weights, add_bos=True)
    hf_dir = gguf_to_hf(gguf_file, tmp_path / "hf")

    ours = load_file(hf_dir / "model.safetensors")
    assert set(ours) == set(weights)
    for name, weight in weights.items():
        np.testing.assert_array_equal(ours[name], weight, err_msg=name)
    assert json.loads((hf_dir / "config.json").read_text())["tie_word_embeddings"] is False

    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32).eval()
    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    ids = torch.tensor([[0, 5, 80, 259, 261, 3, 100, 42]])
    with torch.no_grad():
        np.testing.assert_allclose(model(ids).logits.numpy(), reference(ids).logits.numpy(), atol=1e-5)

    reference_tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    for text in ("the thin tin", " in the", "<|im_start|>then<|im_end|>"):
        ids = tokenizer.encode(text)
        assert ids[0] == 0
        assert ids == reference_tokenizer.encode(text), text


def test_not_a_gguf_is_refused_without_writing(tmp_path):
    path = tmp_path / "notes.gguf"
    path.write_text("just some text\n")
    with pytest.raises(ValueError, match="not a GGUF file"):
        gguf_to_hf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("cut", [lambda size: 300, lambda size: size - 100], ids=["in-metadata", "in-tensor-data"])
def test_truncated_gguf_is_refused(tmp_path, cut):
    path = _write_tiny_gguf(tmp_path / "tiny.gguf", _tiny_hf_weights(np.random.default_rng(2), tied=True))
    data = path.read_bytes()
    path.write_bytes(data[:cut(len(data))])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        gguf_to_hf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


REFUSED = {  # what is wrong with the tiny GGUF -> (how to write it, what the error says)
    "other architecture": (dict(arch="qwen2"), "architecture 'qwen2' is not supported"),
    "mixture of experts": (dict(expert_count=8), "mixture-of-experts GGUF files are not supported"),
    "other pre-tokenizer": (dict(pre="llama-bpe"), "pre-tokenizer 'llama-bpe' is not supported"),
    "unknown tensor": (dict(extra="rope_freqs.weight"), "tensor 'rope_freqs.weight' has no place in a Llama"),
    "missing tensor": (dict(drop="model.layers.1.mlp.up_proj.weight"),
                       "lacks 1 of the model's tensors, e.g. 'model.layers.1.mlp.up_proj.weight'"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_unsupported_ggufs_are_refused_without_writing(tmp_path, case):
    options, message = dict(REFUSED[case][0]), REFUSED[case][1]
    weights = _tiny_hf_weights(np.random.default_rng(1), tied=True)
    if "extra" in options:
        weights[options.pop("extra")] = np.ones(2, np.float32)
    weights.pop(options.pop("drop", None), None)
    path = _write_tiny_gguf(tmp_path / "tiny.gguf", weights, **options)
    with pytest.raises(ValueError, match=re.escape(message)):
        gguf_to_hf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
