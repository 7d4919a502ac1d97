"""Conversations -> prompt token ids, in the format the model was fine-tuned on.

`mixtral-instruct` is Mixtral-8x7B-Instruct's format, token for token what mistral_common's
`MistralTokenizer.v1().encode_chat_completion` produces (the reference Mistral ships), including how
it merges, places and rejects messages:

    <s>[INST] {system}\\n\\n{user} [/INST]{reply}</s>[INST] {user} [/INST]

Each user block is `encode("[INST] " + text + " [/INST]")`, each reply `encode(text) + [EOS]`, BOS
once; `[INST]` is plain text in v1. All system messages, joined with a blank line, go before the
FIRST user message; consecutive user (or assistant) messages are merged with a blank line, empty
ones skipped (a system message between two user messages keeps them apart); a conversation that
opens with a reply gets an empty user block first. Refused, as mistral_common refuses them: an empty
reply, a system message right after a reply, a conversation ending with a reply (unless
add_generation_prompt=False). Refused here only: a conversation without a user message
(mistral_common would encode a lone system prompt as the user block).

`template` renders the checkpoint's Jinja chat template the way HF's `apply_chat_template` does
(sandboxed; trim_blocks, lstrip_blocks, loop controls; raise_exception, strftime_now, tojson; the
bos/eos token strings; not the `{% generation %}` tag, which only marks training targets) and
encodes the text with the control tokens it writes recognised.

Appending turns: encoding a conversation that ends with a user message and then the same
conversation plus [assistant reply, next user message] gives ids that start with ALL of the first
encoding, for mixtral-instruct and for ChatML templates such as SmolLM2's (tested): the generation
prompt (mixtral-instruct has none beyond the user block's ` [/INST]`; ChatML:
`<|im_start|>assistant\\n`) is exactly what the reply's own block starts with, so nothing differs.
The cached prefix stays valid as long as no system message is added or changed later (in
mixtral-instruct the system prompt lives in the first user block) and the reply re-encodes to the
ids that were generated (the engine's concern: sampled ids need not be the canonical encoding of
their text).
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.ext
import jinja2.sandbox

from .config import CHAT_FORMATS

if TYPE_CHECKING:
    from model.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")

# mistral_common joins merged messages and the system prompt with this
_BLANK_LINE = "\n\n"


def encode_chat(
    tok: Tokenizer,
    messages: list[dict],
    chat_format: str = "mixtral-instruct",
    add_generation_prompt: bool = True,
) -> list[int]:
    """The prompt ids for a conversation, ready for the model to write the next assistant reply.

    Args:
        tok: the model's tokenizer.
        messages: [{"role": "system"|"user"|"assistant", "content": str}, ...]; other keys are ignored.
        chat_format: one of CHAT_FORMATS (`tok.chat_format` is the checkpoint's own).
        add_generation_prompt: end with the cue for the assistant to answer. With False a finished
            conversation (ending with a reply) can be encoded; mixtral-instruct has no separate
            cue, so there it only decides whether a final assistant message is allowed.

    Raises:
        ValueError: bad messages (unknown role, non-string content, no user message, or a
            conversation mistral_common rejects), an unknown chat_format, or a template that fails.
    """
    if chat_format not in CHAT_FORMATS:
        raise ValueError(f"unknown chat_format {chat_format!r} (expected one of {', '.join(CHAT_FORMATS)})")
    messages = _checked_messages(messages)
    if chat_format == "mixtral-instruct":
        return _encode_mixtral_instruct(tok, messages, add_generation_prompt)
    return _encode_template(tok, messages, add_generation_prompt)


def _checked_messages(messages: Any) -> list[dict[str, str]]:
    """Plain {"role", "content"} copies, or a ValueError that names the offending message."""
    if not isinstance(messages, list):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ValueError(f"messages[{i}] has unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}] ({role}) content must be a string, got {type(content).__name__}")
        checked.append({"role": role, "content": content})
    if not any(m["role"] == "user" for m in checked):
        raise ValueError("the conversation has no user message")
    return checked


def _encode_mixtral_instruct(
    tok: Tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool
) -> list[int]:
    if tok.bos_id is None:
        raise ValueError("chat_format 'mixtral-instruct' needs a tokenizer with a BOS token")
    # mistral_common's rules, in its order (it raises on each of these)
    for i in range(1, len(messages)):
        if messages[i - 1]["role"] == "assistant" and messages[i]["role"] == "system":
            raise ValueError(
                f"messages[{i}]: a system message cannot follow an assistant reply in mixtral-instruct "
                "(system prompts go before the first user message)"
            )
    if add_generation_prompt and messages[-1]["role"] == "assistant":
        raise ValueError(
            "the conversation ends with an assistant reply, so there is nothing to answer "
            "(encode a finished conversation with add_generation_prompt=False)"
        )
    for i, message in enumerate(messages):
        if message["role"] == "assistant" and not message["content"]:
            raise ValueError(f"messages[{i}]: an assistant reply cannot be empty")

    system_prompt = _BLANK_LINE.join(m["content"] for m in messages if m["role"] == "system" and m["content"])
    # consecutive user (or assistant) messages form one turn; a system message ends a run
    runs: list[tuple[str, list[str]]] = []
    previous_role = None
    for message in messages:
        if message["role"] != "system":
            if message["role"] == previous_role:
                runs[-1][1].append(message["content"])
            else:
                runs.append((message["role"], [message["content"]]))
        previous_role = message["role"]
    turns = [(role, _BLANK_LINE.join(part for part in parts if part)) for role, parts in runs]
    if turns[0][0] != "user":
        turns.insert(0, ("user", ""))

    ids = [tok.bos_id]
    for i, (role, content) in enumerate(turns):
        if role == "user":
            if i == 0 and system_prompt:
                content = system_prompt + _BLANK_LINE + content
            ids += tok.encode(f"[INST] {content} [/INST]")
        else:
            ids += tok.encode(content) + [tok.eos_id]
    return ids


def _encode_template(tok: Tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
    if tok.chat_template is None:
        raise ValueError("chat_format 'template' needs a chat template, and this model's tokenizer has none")
    template = _compile(tok.chat_template)
    # as transformers passes its special_tokens_map: tokens the model lacks stay undefined, not "None"
    special_tokens = {k: v for k, v in (("bos_token", tok.bos_token), ("eos_token", tok.eos_token)) if v is not None}
    try:
        text = template.render(messages=messages, add_generation_prompt=add_generation_prompt, **special_tokens)
    except (jinja2.TemplateError, TypeError) as e:
        raise ValueError(f"the chat template failed on this conversation: {e}") from e
    return tok.encode_with_control_tokens(text)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value: Any, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # transformers replaces Jinja's tojson, which escapes HTML characters
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@functools.lru_cache(maxsize=8)
def _compile(chat_template: str) -> jinja2.Template:
    """The template in transformers' environment (chat templates are untrusted code: sandboxed)."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(chat_template)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"the chat template is not valid Jinja (line {e.lineno}): {e.message}") from e
