"""`encode_chat` against the references: mistral_common's v1 encoder for `mixtral-instruct`, and
transformers' `apply_chat_template` for `template` (SmolLM2's ChatML template on a byte-level BPE)."""

from __future__ import annotations

import json
import random

import pytest
import transformers
from mistral_common.exceptions import MistralCommonException
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from test_tokenizer import (
    MIXTRAL_TOKENIZER_MODEL,
    SMOLLM2_CHAT_TEMPLATE,
    write_chatml_checkpoint,
    write_mixtral_checkpoint,
)

from model.chat_format import CHAT_FORMATS, encode_chat
from model.tokenizer import Tokenizer, load_tokenizer

_MISTRAL_MESSAGE = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}

# contents that stress the encoder: whitespace at the edges, unicode, code, text that looks like markup
CONTENTS = [
    "Hi",
    "What is the capital of France?",
    "  leading spaces",
    "trailing spaces   ",
    "\nleading newline",
    "trailing newlines\n\n",
    " ",
    "\n",
    "日本語で答えてください。中文也可以。",
    "emoji 😀👍🏽🎉",
    "café, naïve, Ångström, Ελληνικά, русский",
    "```python\ndef f(x):\n    return x * 2\n```",
    "[INST] not a real marker [/INST]",
    "</s><s> look like tokens",
    "a\tb\r\nc",
]


def _msgs(*pairs: tuple[str, str]) -> list[dict]:
    return [{"role": role, "content": content} for role, content in pairs]


def _mistral_tokens(reference: MistralTokenizer, messages: list[dict]) -> list[int]:
    request = ChatCompletionRequest(messages=[_MISTRAL_MESSAGE[m["role"]](content=m["content"]) for m in messages])
    return reference.encode_chat_completion(request).tokens


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory) -> Tokenizer:
    return load_tokenizer(write_mixtral_checkpoint(tmp_path_factory.mktemp("mixtral")))


@pytest.fixture(scope="module")
def reference() -> MistralTokenizer:
    return MistralTokenizer.v1()


@pytest.fixture(scope="module")
def chatml_dir(tmp_path_factory):
    return write_chatml_checkpoint(tmp_path_factory.mktemp("chatml"))


@pytest.fixture(scope="module")
def chatml(chatml_dir) -> Tokenizer:
    return load_tokenizer(chatml_dir)


@pytest.fixture(scope="module")
def hf_chatml(chatml_dir):
    return transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(chatml_dir / "tokenizer.json"), bos_token="<|im_start|>", eos_token="<|im_end|>"
    )


def test_reference_is_the_shipped_v1_tokenizer():
    assert MistralTokenizer.v1().instruct_tokenizer.tokenizer.n_words == 32000
    assert MIXTRAL_TOKENIZER_MODEL.stat().st_size == 493_443


MIXTRAL_CONVERSATIONS = {
    "single user": _msgs(("user", "Hi")),
    "system prompt": _msgs(("system", "You are terse."), ("user", "Hi")),
    "multi-turn": _msgs(
        ("system", "You are terse."), ("user", "Hi"), ("assistant", "Hello."), ("user", "How are you?"),
        ("assistant", "Fine."), ("user", "Bye"),
    ),
    "unicode": _msgs(("user", CONTENTS[8]), ("assistant", CONTENTS[9]), ("user", CONTENTS[10])),
    "code block": _msgs(("user", CONTENTS[11]), ("assistant", CONTENTS[11]), ("user", "and in C?")),
    "edge whitespace": _msgs(
        ("system", "  S  \n"), ("user", "  U\n\n"), ("assistant", "\nA  "), ("user", "V "),
    ),
    "whitespace-only reply": _msgs(("user", "U"), ("assistant", " "), ("user", "V")),
    "empty user": _msgs(("user", "")),
    "empty user merged away": _msgs(("user", ""), ("user", "V")),
    "consecutive users merged": _msgs(("user", "first"), ("user", "second"), ("user", "third")),
    "consecutive replies merged": _msgs(("user", "U"), ("assistant", "A"), ("assistant", "B"), ("user", "V")),
    "several system messages": _msgs(("system", "S1"), ("system", ""), ("system", "S2"), ("user", "U")),
    "system after the first user": _msgs(("user", "U"), ("system", "S")),
    "system between users splits them": _msgs(("user", "U"), ("system", "S"), ("user", "V")),
    "opens with a reply": _msgs(("assistant", "Hello! How can I help?"), ("user", "Hi")),
    "system then reply first": _msgs(("system", "S"), ("assistant", "Hello!"), ("user", "Hi")),
    "markers as text": _msgs(("user", CONTENTS[12]), ("assistant", CONTENTS[13]), ("user", "ok")),
}


@pytest.mark.parametrize("messages", MIXTRAL_CONVERSATIONS.values(), ids=MIXTRAL_CONVERSATIONS.keys())
def test_mixtral_instruct_matches_mistral_common(mixtral, reference, messages):
    assert encode_chat(mixtral, messages) == _mistral_tokens(reference, messages)


def test_mixtral_instruct_layout(mixtral):
    """The v1 rule spelled out, so a failure says which part moved."""
    messages = _msgs(("system", "S"), ("user", "U"), ("assistant", "A"), ("user", "V"))
    expected = [
        1, *mixtral.encode("[INST] S\n\nU [/INST]"), *mixtral.encode("A"), 2, *mixtral.encode("[INST] V [/INST]")
    ]  # fmt: skip
    assert encode_chat(mixtral, messages, chat_format="mixtral-instruct") == expected


MISTRAL_COMMON_REJECTS = {
    "ends with a reply": (_msgs(("user", "U"), ("assistant", "A")), "ends with an assistant reply"),
    "empty reply": (_msgs(("user", "U"), ("assistant", ""), ("user", "V")), "assistant reply cannot be empty"),
    "system after a reply": (
        _msgs(("user", "U"), ("assistant", "A"), ("system", "S"), ("user", "V")),
        "system message cannot follow an assistant reply",
    ),
    "only a reply": (_msgs(("assistant", "A")), "no user message"),
    "empty conversation": ([], "no user message"),
}


@pytest.mark.parametrize(("messages", "error"), MISTRAL_COMMON_REJECTS.values(), ids=MISTRAL_COMMON_REJECTS.keys())
def test_mixtral_instruct_rejects_what_mistral_common_rejects(mixtral, reference, messages, error):
    with pytest.raises(MistralCommonException):
        _mistral_tokens(reference, messages)
    with pytest.raises(ValueError, match=error):
        encode_chat(mixtral, messages)


def test_no_user_message_is_rejected_even_where_mistral_common_accepts(mixtral, reference):
    """mistral_common turns a lone system prompt into `[INST] {system}\\n\\n [/INST]`; for a chat app
    that is a bug in the caller, so we say so."""
    messages = _msgs(("system", "S"))
    assert _mistral_tokens(reference, messages)[0] == 1
    with pytest.raises(ValueError, match="no user message"):
        encode_chat(mixtral, messages)


def _random_conversation(rng: random.Random) -> list[dict]:
    roles = ["user", "user", "assistant", "assistant", "system"]
    return [
        {"role": rng.choice(roles), "content": rng.choice([*CONTENTS, ""])} for _ in range(rng.randint(1, 7))
    ]


def test_mixtral_instruct_matches_mistral_common_on_random_conversations(mixtral, reference):
    """Either both encode to the same ids or both refuse; order, merging, empties are all random."""
    rng = random.Random(1234)
    outcomes = {"same ids": 0, "both refuse": 0}
    for _ in range(400):
        messages = _random_conversation(rng)
        if not any(m["role"] == "user" for m in messages):
            continue
        try:
            expected = _mistral_tokens(reference, messages)
        except MistralCommonException:
            with pytest.raises(ValueError):
                encode_chat(mixtral, messages)
            outcomes["both refuse"] += 1
        else:
            assert encode_chat(mixtral, messages) == expected, messages
            outcomes["same ids"] += 1
    assert min(outcomes.values()) > 50, outcomes  # both branches exercised


def test_finished_conversation_matches_mistral_common_agnostic_mode(mixtral):
    """add_generation_prompt=False accepts a conversation that ends with a reply (reply + EOS), as
    mistral_common does when it is not told the model must answer next."""
    agnostic = MistralTokenizer.from_file(str(MIXTRAL_TOKENIZER_MODEL), mode=ValidationMode.agnostic)
    for messages in [
        _msgs(("user", "U"), ("assistant", "A")),
        _msgs(("system", "S"), ("user", "U"), ("assistant", "A"), ("user", "V"), ("assistant", " B\n")),
    ]:
        ids = encode_chat(mixtral, messages, add_generation_prompt=False)
        assert ids == _mistral_tokens(agnostic, messages)
        assert ids[-1] == 2
    user_last = _msgs(("user", "U"))
    assert encode_chat(mixtral, user_last, add_generation_prompt=False) == encode_chat(mixtral, user_last)


APPENDABLE = [
    _msgs(("user", "Hi")),
    _msgs(("system", "You are terse."), ("user", "Hi")),
    _msgs(("user", CONTENTS[8]), ("assistant", CONTENTS[9]), ("user", "  and now?\n")),
    _msgs(("assistant", "Welcome!"), ("user", "Hi")),
]
REPLIES = ["Hello.", " leading space", "\n\nnewlines first", "日本語", "😀", "```\ncode\n```\n", "newline at the end\n"]


@pytest.mark.parametrize("chat_format", CHAT_FORMATS)
def test_appending_a_turn_keeps_the_whole_prompt_as_prefix(mixtral, chatml, chat_format):
    """What the engine's KV-cache reuse relies on: after the reply and the next user message, the
    previous prompt (generation prompt included) is a prefix of the new one, with nothing to cut."""
    tok = mixtral if chat_format == "mixtral-instruct" else chatml
    for conversation in APPENDABLE:
        for reply in REPLIES:
            prompt = encode_chat(tok, conversation, chat_format=chat_format)
            extended = conversation + _msgs(("assistant", reply), ("user", "Next question?"))
            next_prompt = encode_chat(tok, extended, chat_format=chat_format)
            assert next_prompt[: len(prompt)] == prompt, (conversation, reply)


CHATML_CONVERSATIONS = {
    "default system prompt": _msgs(("user", "Hi")),
    "own system prompt": _msgs(("system", "You are terse."), ("user", "Hi")),
    "multi-turn": _msgs(("user", "Hi"), ("assistant", "Hello."), ("user", "How are you?")),
    "unicode and code": _msgs(("user", CONTENTS[8]), ("assistant", CONTENTS[11]), ("user", CONTENTS[9])),
    "edge whitespace": _msgs(("system", "  S  \n"), ("user", "  U\n\n"), ("assistant", "\nA  "), ("user", " ")),
    "special tokens typed as text": _msgs(("user", "say <|im_end|> please")),
    "ends with a reply": _msgs(("user", "Hi"), ("assistant", "Hello.")),
}


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("messages", CHATML_CONVERSATIONS.values(), ids=CHATML_CONVERSATIONS.keys())
def test_template_matches_transformers(chatml, hf_chatml, messages, add_generation_prompt):
    expected = hf_chatml.apply_chat_template(
        messages, chat_template=SMOLLM2_CHAT_TEMPLATE, add_generation_prompt=add_generation_prompt, return_dict=False
    )
    ids = encode_chat(chatml, messages, chat_format="template", add_generation_prompt=add_generation_prompt)
    assert ids == list(expected)


def test_template_text_is_smollm2_chatml(chatml):
    ids = encode_chat(chatml, _msgs(("user", "Hi")), chat_format="template")
    assert chatml.decode(ids) == (  # decode drops <|im_start|> (BOS) and <|im_end|> (EOS)
        "system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face\nuser\nHi\nassistant\n"
    )
    assert ids[0] == chatml.token_to_id("<|im_start|>")
    assert ids.count(chatml.token_to_id("<|im_end|>")) == 2


def _chatml_with_template(directory, template: str) -> Tokenizer:
    """The ChatML checkpoint's real tokenizer files with another chat template."""
    return load_tokenizer(write_chatml_checkpoint(directory, chat_template=template))


def test_template_globals_match_transformers(tmp_path, hf_chatml):
    """bos/eos strings, tojson without HTML escaping, loop controls, raise_exception's absence."""
    template = (
        "{{ bos_token }}{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}"
        "{{ m | tojson }}{{ eos_token }}\n{% endfor %}"
    )
    messages = _msgs(("system", "skip me"), ("user", "<b>é & \"q\"</b>"))
    expected = hf_chatml.apply_chat_template(messages, chat_template=template, return_dict=False)
    assert encode_chat(_chatml_with_template(tmp_path, template), messages, chat_format="template") == list(expected)


def test_template_on_a_sentencepiece_tokenizer(tmp_path, mixtral):
    """A Zephyr-style template (TinyLlama-Chat) writes `</s>`: it must become EOS, not text."""
    zephyr = "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}{{ eos_token }}\n{% endfor %}<|assistant|>"
    directory = write_mixtral_checkpoint(tmp_path)
    (directory / "tokenizer_config.json").write_text(json.dumps({"chat_template": zephyr}))
    (directory / "config.json").write_text('{"chat_format": "template"}')
    tok = load_tokenizer(directory)
    assert tok.chat_format == "template"
    ids = encode_chat(tok, _msgs(("user", "Hi")), chat_format="template")
    assert ids == [*mixtral.encode("<|user|>\nHi"), 2, *mixtral.encode("\n<|assistant|>")]


def test_template_without_bos_leaves_it_undefined(tmp_path):
    """transformers leaves a missing special token out of the template's variables ("", not "None")."""
    directory = write_chatml_checkpoint(tmp_path)
    (directory / "config.json").write_text('{"eos_token_id": 2}')
    (directory / "tokenizer_config.json").write_text(
        '{"eos_token": "<|im_end|>", "chat_template": "{{ bos_token }}{{ messages[0].content }}"}'
    )
    tok = load_tokenizer(directory)
    assert tok.bos_id is None
    assert encode_chat(tok, _msgs(("user", "Hi")), chat_format="template") == tok.encode("Hi")


@pytest.mark.parametrize(
    ("template", "error"),
    [
        (
            "{% if messages[0].role != 'system' %}{{ raise_exception('a system message must come first') }}"
            "{% endif %}",
            "the chat template failed on this conversation: a system message must come first",
        ),
        ("{% for m in messages %}{{ m.content", "not valid Jinja"),
        ("{{ messages.__class__.__mro__ }}", "failed on this conversation"),  # the sandbox refuses
        ("{{ messages[0].content + 1 }}", "failed on this conversation"),
    ],
)
def test_template_errors_are_value_errors(tmp_path, template, error):
    tok = _chatml_with_template(tmp_path, template)
    with pytest.raises(ValueError, match=error):
        encode_chat(tok, _msgs(("user", "Hi")), chat_format="template")


def test_template_format_needs_a_template(tmp_path):
    tok = load_tokenizer(write_chatml_checkpoint(tmp_path, chat_template=None))
    with pytest.raises(ValueError, match="needs a chat template"):
        encode_chat(tok, _msgs(("user", "Hi")), chat_format="template")


@pytest.mark.parametrize("chat_format", CHAT_FORMATS)
@pytest.mark.parametrize(
    ("messages", "error"),
    [
        (_msgs(("user", "Hi"), ("tool", "x")), r"messages\[1\] has unknown role 'tool'"),
        ([{"content": "Hi"}], r"messages\[0\] has unknown role None"),
        ([{"role": "user", "content": 42}], r"messages\[0\] \(user\) content must be a string, got int"),
        ([{"role": "user"}], r"content must be a string, got NoneType"),
        ([{"role": "user", "content": ["chunks"]}], "got list"),
        (["Hi"], r"messages\[0\] must be a dict"),
        ({"role": "user", "content": "Hi"}, "messages must be a list"),
        (_msgs(("system", "S"), ("assistant", "A")), "no user message"),
    ],
)
def test_bad_messages_get_a_clear_error(mixtral, chatml, chat_format, messages, error):
    tok = mixtral if chat_format == "mixtral-instruct" else chatml
    with pytest.raises(ValueError, match=error):
        encode_chat(tok, messages, chat_format=chat_format)


def test_unknown_chat_format(mixtral):
    with pytest.raises(ValueError, match=r"unknown chat_format 'chatml' \(expected one of mixtral-instruct, template\)"):
        encode_chat(mixtral, _msgs(("user", "Hi")), chat_format="chatml")


def test_mixtral_instruct_needs_bos(tmp_path):
    directory = write_chatml_checkpoint(tmp_path)
    (directory / "config.json").write_text('{"eos_token_id": 2}')
    (directory / "tokenizer_config.json").write_text('{"eos_token": "<|im_end|>"}')
    with pytest.raises(ValueError, match="needs a tokenizer with a BOS token"):
        encode_chat(load_tokenizer(directory), _msgs(("user", "Hi")))


def test_caller_messages_are_not_modified(mixtral, chatml):
    messages = _msgs(("system", "S"), ("user", "U"), ("user", "V"))
    snapshot = [dict(m) for m in messages]
    encode_chat(mixtral, messages)
    encode_chat(chatml, messages, chat_format="template")
    assert messages == snapshot
