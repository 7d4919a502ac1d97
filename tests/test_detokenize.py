"""`StreamDecoder` on real tokenizers: Mixtral's sentencepiece (byte fallback, `▁` spaces) and a
byte-level BPE tokenizer.json. The invariant: for any id sequence, the deltas concatenate to
`tok.decode(ids)`, and no delta holds U+FFFD unless the decode does."""

from __future__ import annotations

import random

import pytest
from test_tokenizer import SAMPLE_TEXTS, write_chatml_checkpoint, write_mixtral_checkpoint

from model.detokenize import StreamDecoder
from model.tokenizer import Tokenizer, load_tokenizer


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory) -> Tokenizer:
    return load_tokenizer(write_mixtral_checkpoint(tmp_path_factory.mktemp("mixtral")))


@pytest.fixture(scope="module")
def chatml(tmp_path_factory) -> Tokenizer:
    return load_tokenizer(write_chatml_checkpoint(tmp_path_factory.mktemp("chatml")))


def _stream(tok, ids: list[int]) -> list[str]:
    decoder = StreamDecoder(tok)
    deltas = [decoder.push(i) for i in ids]
    deltas.append(decoder.flush())
    assert decoder.text == "".join(deltas)
    return deltas


def _assert_streams_like_decode(tok, ids: list[int]) -> None:
    deltas = _stream(tok, ids)
    full = tok.decode(ids)
    assert "".join(deltas) == full, ids
    if "\ufffd" not in full:
        assert not any("\ufffd" in delta for delta in deltas), (ids, deltas)


def _byte_ids(tok: Tokenizer, first: int, last: int) -> list[int]:
    return [tok.token_to_id(f"<0x{b:02X}>") for b in range(first, last + 1)]


def test_multibyte_character_over_byte_fallback_tokens(mixtral):
    euro = _byte_ids(mixtral, 0xE2, 0xE2) + _byte_ids(mixtral, 0x82, 0x82) + _byte_ids(mixtral, 0xAC, 0xAC)
    hello = mixtral.encode("Hello")
    assert _stream(mixtral, [*hello, *euro, *hello]) == ["Hello", "", "", "€", " Hello", ""]


def test_first_piece_loses_its_dummy_prefix_space_like_decode(mixtral):
    ids = mixtral.encode("Hello world, fine")
    deltas = _stream(mixtral, ids)
    assert deltas[0] == "Hello" and deltas[1] == " world"
    assert "".join(deltas) == "Hello world, fine" == mixtral.decode(ids)
    lone_space_then_x = [mixtral.token_to_id("▁"), *mixtral.encode("x")]
    assert "".join(_stream(mixtral, lone_space_then_x)) == mixtral.decode(lone_space_then_x) == " x"


def test_bos_and_eos_neither_print_nor_eat_a_space(mixtral):
    hello = mixtral.encode("Hello")
    assert _stream(mixtral, [1, *hello, 2, *hello, 2]) == ["", "Hello", "", " Hello", "", ""]


def test_unfinished_character_is_flushed_as_decode_shows_it(mixtral):
    ids = mixtral.encode("ok") + _byte_ids(mixtral, 0xE2, 0xE2) + _byte_ids(mixtral, 0x82, 0x82)
    deltas = _stream(mixtral, ids)
    assert deltas == ["ok", "", "", mixtral.decode(ids)[2:]]
    assert deltas[-1].count("\ufffd") == 2  # sentencepiece: one per stray byte


@pytest.mark.parametrize("tokenizer", ["mixtral", "chatml"])
def test_real_text_streams_without_replacement_characters(request, tokenizer):
    tok = request.getfixturevalue(tokenizer)
    for text in SAMPLE_TEXTS:
        ids = tok.encode(text)
        deltas = _stream(tok, ids)
        assert "".join(deltas) == text
        assert not any("\ufffd" in delta for delta in deltas)
    # byte-level BPE splits characters inside tokens; some pushes must have waited
    emoji = tok.encode("😀👍🏽🎉")
    assert "".join(_stream(tok, emoji)) == "😀👍🏽🎉"


@pytest.mark.parametrize("tokenizer", ["mixtral", "chatml"])
def test_random_id_sequences_stream_like_decode(request, tokenizer):
    """Random ids, biased towards what breaks streaming: stray and partial UTF-8 bytes, lone `▁`,
    BOS/EOS in the middle, special tokens."""
    tok: Tokenizer = request.getfixturevalue(tokenizer)
    rng = random.Random(7)
    if tokenizer == "mixtral":
        tricky = _byte_ids(tok, 0x00, 0xFF) + [0, 1, 2, tok.token_to_id("▁"), tok.token_to_id("▁▁")]
    else:
        tricky = list(range(3)) + [i for i in range(3, tok.vocab_size) if "\ufffd" in tok.decode([i])]
    corpus_ids = [tok.encode(text) for text in SAMPLE_TEXTS]
    for _ in range(600):
        kind = rng.random()
        if kind < 0.3:
            ids = rng.choice(corpus_ids)[rng.randrange(5) :]  # real text, sometimes cut mid-character
        elif kind < 0.7:
            ids = [rng.choice(tricky) for _ in range(rng.randint(1, 25))]
        else:
            ids = [rng.choice(tricky) if rng.random() < 0.5 else rng.randrange(tok.vocab_size) for _ in range(30)]
        _assert_streams_like_decode(tok, ids)


class _DecodeCounter:
    """A real tokenizer that counts how many ids `decode` is asked to read."""

    def __init__(self, tok: Tokenizer):
        self._tok = tok
        self.boundary_ids = tok.boundary_ids
        self.ids_decoded = 0

    def decode(self, ids) -> str:
        self.ids_decoded += len(ids)
        return self._tok.decode(ids)


@pytest.mark.parametrize("stream", ["one stray byte repeated", "random bytes", "text"])
def test_work_per_token_stays_bounded(mixtral, stream):
    """Even a reply made of stray bytes (text ending in U+FFFD all along) is decoded in a bounded
    window: re-decoding everything would read ~n^2/2 = 2,000,000 ids here."""
    rng = random.Random(3)
    n = 2000
    byte_ids = _byte_ids(mixtral, 0x00, 0xFF)
    ids = {
        "one stray byte repeated": _byte_ids(mixtral, 0xE2, 0xE2) * n,
        "random bytes": [rng.choice(byte_ids) for _ in range(n)],
        "text": (mixtral.encode(" ".join(SAMPLE_TEXTS)) * 50)[:n],
    }[stream]
    counter = _DecodeCounter(mixtral)
    decoder = StreamDecoder(counter)
    text = "".join(decoder.push(i) for i in ids) + decoder.flush()
    assert text == mixtral.decode(ids)
    assert counter.ids_decoded < 20 * n
