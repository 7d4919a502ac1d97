"""One tokenizer interface over a sentencepiece `tokenizer.model` (Mixtral) or an HF `tokenizer.json`.

The chat encoder, the engine and the stream decoder only need text <-> ids and the special ids, so
both file formats sit behind `Tokenizer`. `load_tokenizer` also gathers, from the checkpoint's JSON
files, what HF scatters over several of them: which ids start and end a sequence, the chat template,
and (in our own `config.json`) which chat format the model was trained on.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import sentencepiece
import tokenizers

from model.config import CHAT_FORMATS
from model.errors import UserError


class TokenizerError(UserError, ValueError):
    """A checkpoint's tokenizer files are missing, unreadable or contradict each other."""


class _Backend(Protocol):
    """What each tokenizer file format provides; `Tokenizer` adds the special ids on top."""

    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def token_to_id(self, token: str) -> int | None: ...

    def id_to_token(self, token_id: int) -> str: ...

    def encode_with_control_tokens(self, text: str) -> list[int]: ...

    def own_special_ids(self) -> tuple[int | None, int | None]:
        """(BOS, EOS) as the tokenizer file itself defines them, when it does."""
        ...


class _SentencePiece:
    """`tokenizer.model`: encode is `sp.encode(text)`, dummy-prefix space included, no BOS/EOS."""

    def __init__(self, path: Path):
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{path}: not a readable sentencepiece model ({e})") from e
        self.vocab_size = self._sp.vocab_size()
        # <s>, </s>, ...: pieces that `sp.encode` never produces from text
        self._control_ids = {self._sp.id_to_piece(i): i for i in range(self.vocab_size) if self._sp.is_control(i)}
        # longest first, so that a control token containing another one wins
        alternatives = "|".join(re.escape(t) for t in sorted(self._control_ids, key=len, reverse=True))
        self._control_pattern = re.compile(f"({alternatives})") if self._control_ids else None

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_with_control_tokens(self, text: str) -> list[int]:
        """Control tokens' strings -> their ids; the text between them `sp.encode`d piece by piece
        (as mistral_common encodes its pieces, and HF's legacy Llama tokenizer)."""
        if self._control_pattern is None:
            return self._sp.encode(text)
        ids: list[int] = []
        for piece in self._control_pattern.split(text):
            if piece in self._control_ids:
                ids.append(self._control_ids[piece])
            elif piece:
                ids.extend(self._sp.encode(piece))
        return ids

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode(ids)

    def token_to_id(self, token: str) -> int | None:
        token_id = self._sp.piece_to_id(token)
        # piece_to_id answers the unknown id for any string it does not know
        return None if token_id == self._sp.unk_id() and token != self._sp.id_to_piece(token_id) else token_id

    def id_to_token(self, token_id: int) -> str:
        return self._sp.id_to_piece(token_id)

    def own_special_ids(self) -> tuple[int | None, int | None]:
        bos_id, eos_id = self._sp.bos_id(), self._sp.eos_id()  # -1: not defined
        return (bos_id if bos_id >= 0 else None, eos_id if eos_id >= 0 else None)


class _HFTokenizers:
    """`tokenizer.json`: special tokens written in the text are recognised (`<|im_start|>` -> its id)."""

    def __init__(self, path: Path):
        try:
            self._tk = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a bare Exception for every parse error
            raise TokenizerError(f"{path}: not a readable tokenizer.json ({e})") from e
        self.vocab_size = self._tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tk.decode(ids, skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self._tk.token_to_id(token)

    def id_to_token(self, token_id: int) -> str:
        return self._tk.id_to_token(token_id)

    def encode_with_control_tokens(self, text: str) -> list[int]:
        return self.encode(text)  # encode already recognises them

    def own_special_ids(self) -> tuple[int | None, int | None]:
        return (None, None)  # tokenizer.json leaves them to tokenizer_config.json


class Tokenizer:
    """Text <-> token ids for one checkpoint, with the ids that start and end a sequence.

    Attributes:
        vocab_size: number of token ids (added tokens included).
        bos_id: the id that starts a sequence, or None when the model has none (Qwen-style).
        eos_id: the id written after each assistant reply when a conversation is encoded.
        eos_ids: every id that ends a reply (contains `eos_id`); generation stops on any of them.
        bos_token, eos_token: their strings, for chat templates (`{{ bos_token }}`).
        chat_template: the Jinja chat template from the checkpoint, if any.
        chat_format: how `encode_chat` should format conversations for this model (one of
            `model.chat_format.CHAT_FORMATS`).
    """

    def __init__(
        self,
        backend: _Backend,
        *,
        bos_id: int | None,
        eos_id: int,
        eos_ids: Iterable[int],
        chat_template: str | None,
        chat_format: str,
    ):
        self._backend = backend
        self.vocab_size = backend.vocab_size
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.eos_ids = frozenset(eos_ids) | {eos_id}
        self.bos_token = None if bos_id is None else backend.id_to_token(bos_id)
        self.eos_token = backend.id_to_token(eos_id)
        self.chat_template = chat_template
        self.chat_format = chat_format
        # ids that `decode` drops: they only mark where sequences start and end
        self.boundary_ids = self.eos_ids | ({bos_id} if bos_id is not None else set())

    def encode(self, text: str) -> list[int]:
        """Ids for `text`, without BOS/EOS. For `tokenizer.model` this is exactly `sp.encode(text)`;
        for `tokenizer.json`, special tokens written in the text (`<|im_start|>`) become their ids."""
        return self._backend.encode(text)

    def encode_with_control_tokens(self, text: str) -> list[int]:
        """Like `encode`, but control tokens written in the text (`<s>`, `</s>`, `<|im_end|>`) always
        become their ids: what a rendered chat template needs. For `tokenizer.model` the text between
        them is encoded piece by piece with `sp.encode`; `tokenizer.json`'s `encode` already does this."""
        return self._backend.encode_with_control_tokens(text)

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids`. BOS/EOS ids (`boundary_ids`) are dropped, nothing else is skipped."""
        ids = [int(i) for i in ids]
        for token_id in ids:
            if not 0 <= token_id < self.vocab_size:
                raise ValueError(f"token id {token_id} is outside the vocabulary (0..{self.vocab_size - 1})")
        return self._backend.decode([i for i in ids if i not in self.boundary_ids])

    def token_to_id(self, token: str) -> int | None:
        """The id of one vocabulary entry (`"</s>"`, `"<|im_end|>"`), None if there is none."""
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str:
        """The vocabulary entry of one id (a sentencepiece piece such as `▁the` or `<0xE2>`)."""
        return self._backend.id_to_token(token_id)


def load_tokenizer(ckpt_dir: str | Path) -> Tokenizer:
    """The tokenizer of a checkpoint dir (ours or an HF folder).

    Reads `tokenizer.model` if present, else `tokenizer.json`.
    - EOS ids: our `config.json`'s `eos_token_ids` when present; else every id the folder names
      (`eos_token_id`, an int or a list, in `generation_config.json` and `config.json`; the
      `eos_token` string of `tokenizer_config.json`; the sentencepiece model's own EOS).
    - BOS id: the first of `bos_token_id` (generation_config.json, config.json), the `bos_token`
      string, the sentencepiece model's own BOS; None if there is none.
    - chat template: `chat_template.jinja`, else `tokenizer_config.json`'s `chat_template`.
    - chat format: our `config.json`'s `chat_format`, else `mixtral-instruct` for sentencepiece and
      `template` for tokenizer.json.

    Raises:
        TokenizerError: a missing or unreadable file, or ids that do not fit the vocabulary.
    """
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise TokenizerError(f"{ckpt_dir}: not a directory")
    config = _read_json(ckpt_dir / "config.json")
    generation_config = _read_json(ckpt_dir / "generation_config.json")
    tokenizer_config = _read_json(ckpt_dir / "tokenizer_config.json")
    special_tokens_map = _read_json(ckpt_dir / "special_tokens_map.json")

    backend: _Backend
    if (ckpt_dir / "tokenizer.model").is_file():
        backend = _SentencePiece(ckpt_dir / "tokenizer.model")
        default_chat_format = "mixtral-instruct"
    elif (ckpt_dir / "tokenizer.json").is_file():
        backend = _HFTokenizers(ckpt_dir / "tokenizer.json")
        default_chat_format = "template"
    else:
        raise TokenizerError(f"{ckpt_dir}: no tokenizer.model or tokenizer.json")

    def token_id_of(key: str) -> int | None:
        """The id of the `bos_token`/`eos_token` string named in tokenizer_config.json."""
        token = _token_string(tokenizer_config.get(key, special_tokens_map.get(key)))
        if token is None:
            return None
        token_id = backend.token_to_id(token)
        if token_id is None:
            raise TokenizerError(f"{ckpt_dir}: {key} {token!r} is not in the tokenizer's vocabulary")
        return token_id

    own_bos_id, own_eos_id = backend.own_special_ids()
    bos_id = _first_int(
        ckpt_dir,
        "bos_token_id",
        generation_config.get("bos_token_id"),
        config.get("bos_token_id"),
        token_id_of("bos_token"),
        own_bos_id,
    )
    eos_token_id = token_id_of("eos_token")
    if "eos_token_ids" in config:
        eos_ids = _int_list(ckpt_dir / "config.json", "eos_token_ids", config["eos_token_ids"])
    else:
        eos_ids = [
            *_int_list(ckpt_dir / "generation_config.json", "eos_token_id", generation_config.get("eos_token_id")),
            *_int_list(ckpt_dir / "config.json", "eos_token_id", config.get("eos_token_id")),
            *(i for i in (eos_token_id, own_eos_id) if i is not None),
        ]
    if not eos_ids:
        raise TokenizerError(
            f"{ckpt_dir}: no end-of-sequence token (set eos_token_id in config.json or eos_token in "
            "tokenizer_config.json)"
        )
    # the id written after replies: the tokenizer's own EOS token when it is one of them
    eos_id = next((i for i in (eos_token_id, own_eos_id) if i in eos_ids), eos_ids[0])
    for token_id in [bos_id, *eos_ids]:
        if token_id is not None and not 0 <= token_id < backend.vocab_size:
            raise TokenizerError(
                f"{ckpt_dir}: special token id {token_id} is outside the vocabulary (0..{backend.vocab_size - 1})"
            )

    chat_template = _chat_template(ckpt_dir, tokenizer_config)
    chat_format = config.get("chat_format", default_chat_format)
    if chat_format not in CHAT_FORMATS:
        raise TokenizerError(
            f"{ckpt_dir / 'config.json'}: unknown chat_format {chat_format!r} (expected one of {CHAT_FORMATS})"
        )
    if "chat_format" in config and chat_format == "template" and chat_template is None:
        raise TokenizerError(f"{ckpt_dir}: chat_format is 'template' but the checkpoint has no chat template")
    return Tokenizer(
        backend,
        bos_id=bos_id,
        eos_id=eos_id,
        eos_ids=eos_ids,
        chat_template=chat_template,
        chat_format=chat_format,
    )


def _read_json(path: Path) -> dict[str, Any]:
    """The object in an optional JSON file: {} when it does not exist."""
    if not path.exists():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path}: unreadable ({e})") from e
    if not isinstance(value, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _token_string(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _int_list(path: Path, key: str, value: Any) -> list[int]:
    """An id field that HF writes as an int, a list of ints, or null."""
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise TokenizerError(f"{path}: {key} must be an int or a list of ints, got {value!r}")
    return values


def _first_int(ckpt_dir: Path, key: str, *candidates: int | None) -> int | None:
    for value in candidates:
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            raise TokenizerError(f"{ckpt_dir}: {key} must be an int, got {value!r}")
        return value
    return None


def _chat_template(ckpt_dir: Path, tokenizer_config: dict[str, Any]) -> str | None:
    """`chat_template.jinja` (how transformers saves it now), else tokenizer_config's `chat_template`:
    a string, or a list of named templates of which we use "default"."""
    jinja_path = ckpt_dir / "chat_template.jinja"
    if jinja_path.is_file():
        try:
            return jinja_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{jinja_path}: unreadable ({e})") from e
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise TokenizerError(f"{ckpt_dir / 'tokenizer_config.json'}: chat_template is not a string")
    return template
