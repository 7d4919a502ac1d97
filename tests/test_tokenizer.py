"""`load_tokenizer` / `Tokenizer` on real tokenizer files: Mixtral's sentencepiece model (shipped in
mistral_common) and a byte-level BPE tokenizer.json trained here with ChatML's special tokens.

The checkpoint writers at the top are also used by test_chat_format.py and test_detokenize.py.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import mistral_common
import numpy as np
import pytest
import sentencepiece
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from model.tokenizer import TokenizerError, load_tokenizer

MIXTRAL_TOKENIZER_MODEL = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"

# SmolLM2-135M-Instruct's chat template, as its GGUF (tokenizer.chat_template) carries it
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CHATML_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 as in SmolLM2

# text that exercises the byte-level merges: ASCII, accents, CJK, emoji, code, runs of whitespace
SAMPLE_TEXTS = [
    "Hello world, how are you today?",
    "The capital of France is Paris.",
    "café naïve résumé über straße",
    "日本語のテキストと中文文本。数学は面白い。",
    "emoji 😀👍🏽🎉 and flags 🇫🇷",
    "```python\ndef f(x):\n    return x * 2\n```",
    "  two leading spaces\n\nnew paragraph\t tab ",
]


@functools.cache
def _trained_bpe_json() -> str:
    """A small byte-level BPE (GPT-2 style, like SmolLM2's), trained once per session (~10 ms)."""
    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=CHATML_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(SAMPLE_TEXTS * 20, trainer)
    return tokenizer.to_str()


def write_chatml_checkpoint(directory: Path, chat_template: str | None = SMOLLM2_CHAT_TEMPLATE) -> Path:
    """An HF-style folder with a tokenizer.json, SmolLM2's special-token layout and its template."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.json").write_text(_trained_bpe_json(), encoding="utf-8")
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
    }
    if chat_template is not None:
        tokenizer_config["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config), encoding="utf-8")
    (directory / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}), encoding="utf-8")
    return directory


def write_mixtral_checkpoint(directory: Path) -> Path:
    """A folder holding Mixtral's tokenizer.model, nothing else."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(MIXTRAL_TOKENIZER_MODEL, directory / "tokenizer.model")
    return directory


def _write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value), encoding="utf-8")


@pytest.fixture(scope="module")
def sp() -> sentencepiece.SentencePieceProcessor:
    return sentencepiece.SentencePieceProcessor(model_file=str(MIXTRAL_TOKENIZER_MODEL))


def test_mixtral_tokenizer_model(tmp_path, sp):
    tok = load_tokenizer(write_mixtral_checkpoint(tmp_path))
    assert tok.vocab_size == 32000
    assert (tok.bos_id, tok.eos_id, tok.eos_ids) == (1, 2, frozenset({2}))
    assert (tok.bos_token, tok.eos_token) == ("<s>", "</s>")
    assert tok.chat_format == "mixtral-instruct"
    assert tok.chat_template is None
    for text in [*SAMPLE_TEXTS, "", " ", "[INST] hi [/INST]", "<s> is text here"]:
        ids = tok.encode(text)
        assert ids == sp.encode(text)  # dummy prefix included, no BOS/EOS
        assert tok.decode([1, *ids, 2]) == sp.decode(ids)
    assert tok.encode("Hello")[0] == sp.piece_to_id("▁Hello")
    assert tok.decode(tok.encode("café 日本 😀")) == "café 日本 😀"
    assert tok.id_to_token(tok.token_to_id("<0xE2>")) == "<0xE2>"
    assert tok.token_to_id("no such piece") is None


def test_decode_drops_bos_and_eos_only(tmp_path):
    mixtral = load_tokenizer(write_mixtral_checkpoint(tmp_path / "mixtral"))
    hello = mixtral.encode("Hello")
    assert mixtral.decode([1, *hello, 2, 2]) == "Hello"
    assert mixtral.decode([0, *hello]) == " ⁇  Hello"  # <unk> is not dropped

    chatml = load_tokenizer(write_chatml_checkpoint(tmp_path / "chatml"))
    text_ids = chatml.encode("Hello")
    # <|im_start|> is this checkpoint's BOS (config.json bos_token_id 1); <|endoftext|> is neither
    assert chatml.decode([1, *text_ids, 2]) == "Hello"
    assert chatml.decode([0, *text_ids]) == "<|endoftext|>Hello"


def test_tokenizer_json_recognises_special_tokens_in_text(tmp_path):
    tok = load_tokenizer(write_chatml_checkpoint(tmp_path))
    assert tok.vocab_size == HFTokenizer.from_str(_trained_bpe_json()).get_vocab_size() > 259  # bytes + 3 specials
    assert (tok.bos_id, tok.eos_id, tok.eos_ids) == (1, 2, frozenset({2}))
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert tok.chat_format == "template"
    assert tok.chat_template == SMOLLM2_CHAT_TEMPLATE
    ids = tok.encode("<|im_start|>user\nhi 日本<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2 and 1 not in ids[1:-1]
    chat_text = "<|im_start|>user\nhi<|im_end|>"
    assert tok.encode_with_control_tokens(chat_text) == tok.encode(chat_text)
    for text in SAMPLE_TEXTS:
        assert tok.decode(tok.encode(text)) == text


def test_sentencepiece_control_tokens_in_rendered_text(tmp_path, sp):
    tok = load_tokenizer(write_mixtral_checkpoint(tmp_path))
    text = "<s>[INST] hi [/INST] Hello</s>\n<|user|>"
    assert tok.encode(text) == sp.encode(text)  # plain encode: "<s>" is just text
    assert tok.encode_with_control_tokens(text) == [
        1, *sp.encode("[INST] hi [/INST] Hello"), 2, *sp.encode("\n<|user|>")
    ]  # fmt: skip


def test_eos_ids_are_the_union_of_every_source(tmp_path):
    directory = write_chatml_checkpoint(tmp_path)
    _write_json(directory / "config.json", {"bos_token_id": 1, "eos_token_id": 0})
    _write_json(directory / "generation_config.json", {"eos_token_id": [0, 2]})
    tok = load_tokenizer(directory)
    assert tok.eos_ids == {0, 2}
    assert tok.eos_id == 2  # tokenizer_config's eos_token is the one written after replies
    assert tok.decode(tok.encode("a<|endoftext|>b<|im_end|>")) == "ab"


def test_our_config_wins(tmp_path):
    directory = write_chatml_checkpoint(tmp_path)
    _write_json(
        directory / "config.json",
        {"bos_token_id": 1, "eos_token_id": 0, "eos_token_ids": [2], "chat_format": "mixtral-instruct"},
    )
    _write_json(directory / "generation_config.json", {"eos_token_id": 0})
    tok = load_tokenizer(directory)
    assert tok.eos_ids == {2}
    assert tok.chat_format == "mixtral-instruct"


def test_checkpoint_without_bos(tmp_path):
    directory = write_chatml_checkpoint(tmp_path)
    _write_json(directory / "config.json", {"eos_token_id": [2, 0]})
    _write_json(directory / "tokenizer_config.json", {"eos_token": "<|im_end|>", "bos_token": None})
    tok = load_tokenizer(directory)
    assert tok.bos_id is None and tok.bos_token is None
    assert tok.eos_ids == {0, 2} and tok.eos_id == 2
    assert tok.decode([1, 2]) == "<|im_start|>"


def test_chat_template_sources(tmp_path):
    directory = write_chatml_checkpoint(tmp_path, chat_template=None)
    assert load_tokenizer(directory).chat_template is None
    _write_json(
        directory / "tokenizer_config.json",
        {
            "eos_token": "<|im_end|>",
            "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}],
        },
    )
    assert load_tokenizer(directory).chat_template == "D"
    (directory / "chat_template.jinja").write_text("J {{ messages }}", encoding="utf-8")
    assert load_tokenizer(directory).chat_template == "J {{ messages }}"  # transformers' newer layout wins


def test_numpy_ids_decode(tmp_path):
    tok = load_tokenizer(write_mixtral_checkpoint(tmp_path))
    assert tok.decode(np.array(tok.encode("Hello world"), dtype=np.int32)) == "Hello world"


def test_decode_rejects_ids_outside_the_vocabulary(tmp_path):
    tok = load_tokenizer(write_mixtral_checkpoint(tmp_path))
    with pytest.raises(ValueError, match="32000 is outside the vocabulary"):
        tok.decode([1, 32000])
    with pytest.raises(ValueError, match="-1 is outside"):
        tok.decode([-1])


def test_missing_directory(tmp_path):
    with pytest.raises(TokenizerError, match=f"{tmp_path / 'nope'}: not a directory"):
        load_tokenizer(tmp_path / "nope")


# {file: new content (JSON-encoded unless str/bytes), None: delete it}, and what the error must say
BROKEN_CHECKPOINTS = {
    "no tokenizer file": ({"tokenizer.json": None}, "no tokenizer.model or tokenizer.json"),
    "corrupt tokenizer.json": ({"tokenizer.json": "{not json"}, "tokenizer.json: not a readable tokenizer.json"),
    "corrupt tokenizer.model": ({"tokenizer.model": b"garbage" * 10}, "tokenizer.model: not a readable sentencepiece"),
    "truncated config": ({"config.json": '{"eos_token_id": '}, "config.json: unreadable"),
    "config not an object": ({"config.json": "[1, 2]"}, "config.json: expected a JSON object"),
    "config not UTF-8": ({"config.json": b'{"a": "\xff"}'}, "config.json: unreadable"),
    "eos id too large": ({"config.json": {"eos_token_id": 9999}}, "9999 is outside the vocabulary"),
    "eos id a string": ({"config.json": {"eos_token_id": "2"}}, "eos_token_id must be an int"),
    "unknown chat format": ({"config.json": {"eos_token_ids": [2], "chat_format": "llama"}}, "unknown chat_format 'llama'"),
    "eos token not in vocab": (
        {"tokenizer_config.json": {"eos_token": "</s>"}},
        "eos_token '</s>' is not in the tokenizer's vocabulary",
    ),
    "no eos anywhere": ({"tokenizer_config.json": {}, "config.json": {}}, "no end-of-sequence token"),
    "template format without template": (
        {"tokenizer_config.json": {"eos_token": "<|im_end|>"}, "config.json": {"chat_format": "template"}},
        "chat_format is 'template' but the checkpoint has no chat template",
    ),
}


@pytest.mark.parametrize(("changes", "message"), BROKEN_CHECKPOINTS.values(), ids=BROKEN_CHECKPOINTS.keys())
def test_broken_checkpoints_raise_a_clear_error(tmp_path, changes, message):
    directory = write_chatml_checkpoint(tmp_path)
    for name, content in changes.items():
        path = directory / name
        if content is None:
            path.unlink()
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    with pytest.raises(TokenizerError, match=message) as error:
        load_tokenizer(directory)
    assert isinstance(error.value, ValueError)
    assert str(directory) in str(error.value)
