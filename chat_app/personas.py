"""Personas: a name, a system prompt and sampling settings, chosen per conversation.

Two ship with the app (`builtin_personas.toml`: "Assistant" and "Menny"); the user's own are TOML
files in DATA/personas/, one per persona:

    name = "Pirate"
    system_prompt = "You are a pirate. Answer like one."
    temperature = 0.8        # optional: 0 (greedy) to 2; default 0.7
    top_p = 0.95             # optional: greater than 0, at most 1
    top_k = 0                # optional: 0 = off
    max_new_tokens = 1024    # optional

A user file with a built-in's name overrides it (that is how a built-in is edited); deleting the
file brings the built-in back. A conversation stores a `snapshot()` of its persona, so editing a
persona later does not change conversations already had with it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from chat_app.errors import UserError

if TYPE_CHECKING:  # model.engine_api is imported when sampling() is called, keeping start-up light
    from model.engine_api import SamplingParams

# name -> (type, rule it must satisfy, the rule in words)
SETTING_RULES = {
    "temperature": (float, lambda v: 0 <= v <= 2, "between 0 and 2 (0: greedy)"),
    "top_p": (float, lambda v: 0 < v <= 1, "greater than 0 and at most 1"),
    "top_k": (int, lambda v: v >= 0, "a whole number, 0 or more (0: off)"),
    "max_new_tokens": (int, lambda v: 1 <= v <= 1_000_000, "a whole number from 1 to 1000000"),
}
# Letters, digits, spaces and - _ . ' ; the name is also the file name, so no path characters.
_NAME_PATTERN = re.compile(r"[^\W_][\w .'-]{0,63}")
_PERSONA_KEYS = ("name", "system_prompt", *SETTING_RULES)


class PersonaError(UserError):
    """A persona that does not exist or is not valid, in words fit for the user."""


def check_setting(name: str, value: object) -> float | int:
    """`value` if it is a valid sampling setting `name` (an int is accepted for a float setting and
    returned as float); otherwise PersonaError saying what the valid values are."""
    kind, rule, rule_in_words = SETTING_RULES[name]
    number_types = (int, float) if kind is float else (int,)
    if (isinstance(value, bool) or not isinstance(value, number_types)
            or (kind is float and not math.isfinite(value)) or not rule(value)):
        raise PersonaError(f"{name} must be {rule_in_words}, got {value!r}")
    return kind(value)


DEFAULT_PERSONA = "Assistant"  # the persona of a new conversation unless the user picks another


@dataclass(frozen=True)
class Persona:
    name: str
    system_prompt: str
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 0
    max_new_tokens: int = 1024
    builtin: bool = False

    def __post_init__(self):
        if not isinstance(self.name, str) or not _NAME_PATTERN.fullmatch(self.name):
            raise PersonaError(
                f"persona name {self.name!r} is not valid: use 1 to 64 letters, digits, spaces or - _ . ' "
                f"starting with a letter or digit")
        if not isinstance(self.system_prompt, str):
            raise PersonaError(f"system_prompt must be text, got {self.system_prompt!r}")
        try:
            self.system_prompt.encode("utf-8")
        except UnicodeEncodeError:  # e.g. undecodable bytes from a command line
            raise PersonaError("system_prompt contains characters that are not valid Unicode text") from None
        for setting in SETTING_RULES:
            object.__setattr__(self, setting, check_setting(setting, getattr(self, setting)))

    def sampling(self, seed: int | None = None) -> SamplingParams:
        from model.engine_api import SamplingParams

        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              max_new_tokens=self.max_new_tokens, seed=seed)

    def snapshot(self) -> dict:
        """The settings a conversation keeps (chat_app.store.Conversation.persona)."""
        return {key: getattr(self, key) for key in _PERSONA_KEYS}

    @classmethod
    def from_snapshot(cls, snapshot: dict) -> Persona:
        return _persona_from_dict(snapshot, "the persona snapshot")

    def to_toml(self) -> str:
        """The persona as a user persona file."""
        return "".join(f"{key} = {_toml_value(getattr(self, key))}\n" for key in _PERSONA_KEYS)


def read_persona_file(path: Path) -> Persona:
    """A persona TOML file; PersonaError naming the file and the problem if it is not a valid one."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise PersonaError(f"cannot read persona file {path}: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise PersonaError(f"persona file {path} is not valid TOML: {e}") from None
    data.setdefault("name", path.stem)
    return _persona_from_dict(data, f"persona file {path}")


class PersonaLibrary:
    """The built-in personas plus the user's files in `personas_dir`, read afresh on each call (the
    CLI or another window may have changed them). Lookups ignore letter case."""

    def __init__(self, personas_dir: Path):
        self.personas_dir = Path(personas_dir)
        self.problems: list[str] = []  # user files skipped by the last list()/get(), each in words

    def list(self) -> list[Persona]:
        """Built-ins first (overridden ones replaced by the user's version), then the user's by name."""
        by_key = {p.name.casefold(): p for p in builtin_personas()}
        user = {key: persona for key, (_, persona) in self._user_files().items()}
        merged = [user.pop(key, persona) for key, persona in by_key.items()]
        return merged + sorted(user.values(), key=lambda p: p.name.casefold())

    def get(self, name: str) -> Persona:
        personas = self.list()
        for persona in personas:
            if persona.name.casefold() == name.casefold():
                return persona
        raise PersonaError(f"no persona named {name!r} (available: {', '.join(p.name for p in personas)})")

    def save(self, persona: Persona) -> Path:
        """Write the persona as a user file (replacing the user's persona of that name, if any)."""
        persona = dataclasses.replace(persona, builtin=False)
        existing = self._user_files().get(persona.name.casefold())
        path = existing[0] if existing else self.personas_dir / f"{persona.name}.toml"
        if not existing and path.exists():
            raise PersonaError(f"{path} exists and holds another persona; rename that file first")
        self.personas_dir.mkdir(parents=True, exist_ok=True)
        _write_atomically(path, persona.to_toml())
        return path

    def delete(self, name: str) -> None:
        """Delete a user persona. Deleting the user's copy of a built-in brings the built-in back."""
        existing = self._user_files().get(name.casefold())
        if existing:
            existing[0].unlink()
            return
        if self.get(name).builtin:  # get() raises for an unknown name
            raise PersonaError(f"{name!r} is a built-in persona and cannot be deleted")

    def import_toml(self, path: Path, replace: bool = False) -> Persona:
        """Add the persona in a TOML file to the library; an existing user persona of that name is
        replaced only with `replace`."""
        persona = read_persona_file(path)
        if not replace and persona.name.casefold() in self._user_files():
            raise PersonaError(f"a persona named {persona.name!r} already exists (import with replace to overwrite it)")
        self.save(persona)
        return persona

    def export_toml(self, name: str, path: Path, overwrite: bool = False) -> Path:
        path = Path(path)
        if path.exists() and not overwrite:
            raise PersonaError(f"{path} already exists (export with overwrite to replace it)")
        _write_atomically(path, self.get(name).to_toml())
        return path

    def _user_files(self) -> dict[str, tuple[Path, Persona]]:
        """casefolded name -> (file, persona) for each valid user file; the others go to `problems`."""
        self.problems = []
        found: dict[str, tuple[Path, Persona]] = {}
        if not self.personas_dir.is_dir():
            return found
        for path in sorted(self.personas_dir.glob("*.toml")):
            try:
                persona = read_persona_file(path)
            except PersonaError as e:
                self.problems.append(str(e))
                continue
            key = persona.name.casefold()
            if key in found:
                self.problems.append(f"persona file {path} was skipped: {found[key][0]} has the same name")
                continue
            found[key] = (path, persona)
        return found


def builtin_personas() -> list[Persona]:
    """The personas that ship with the app, as shipped (user overrides not applied)."""
    text = resources.files(__package__).joinpath("builtin_personas.toml").read_text(encoding="utf-8")
    return [dataclasses.replace(_persona_from_dict(d, "built-in persona"), builtin=True)
            for d in tomllib.loads(text)["persona"]]


def _persona_from_dict(data: dict, source: str) -> Persona:
    unknown = sorted(set(data) - set(_PERSONA_KEYS))
    if unknown:
        raise PersonaError(f"{source}: unknown key {unknown[0]!r} (known: {', '.join(_PERSONA_KEYS)})")
    missing = [key for key in ("name", "system_prompt") if key not in data]
    if missing:
        raise PersonaError(f"{source}: missing {missing[0]!r}")
    try:
        return Persona(**data)
    except PersonaError as e:
        raise PersonaError(f"{source}: {e}") from None


def _toml_value(value: str | float | int) -> str:
    if not isinstance(value, str):
        return repr(value)
    if "\n" not in value:
        return _escape_toml(json.dumps(value, ensure_ascii=False))
    # A multi-line basic string, readable in an editor. Its first newline is dropped by TOML parsers.
    body = value.replace("\\", "\\\\").replace('"', '\\"').replace("\r", "\\r")
    return '"""\n' + _escape_toml(body) + '"""'


def _escape_toml(text: str) -> str:
    """TOML forbids raw control characters other than tab and newline in basic strings."""
    return re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", lambda m: f"\\u{ord(m.group()):04x}", text)


def _write_atomically(path: Path, text: str) -> None:
    """Replace `path` in one step, so a crash leaves the old file or the new one, never half of one."""
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, path)
    except OSError as e:
        temporary.unlink(missing_ok=True)
        raise PersonaError(f"cannot write {path}: {e}") from None
