"""Personas: built-ins, user TOML files on disk, overrides, import/export, validation messages."""

import tomllib

import pytest

from chat_app.personas import Persona, PersonaError, PersonaLibrary, builtin_personas, check_setting, read_persona_file
from model.engine_api import SamplingParams


@pytest.fixture
def personas_dir(tmp_path):
    return tmp_path / "personas"


@pytest.fixture
def library(personas_dir):
    return PersonaLibrary(personas_dir)


def test_builtins_are_assistant_and_menny(library):
    personas = library.list()
    assert [(p.name, p.builtin) for p in personas] == [("Assistant", True), ("Menny", True)]
    menny = library.get("menny")  # lookups ignore case
    assert "cynical sixteen-year-old" in menny.system_prompt
    assert library.problems == []


def test_saved_persona_is_a_toml_file_listed_after_the_builtins(library, personas_dir):
    library.save(Persona("Zed", "You are Zed.", temperature=0.2))
    library.save(Persona("pirate", "Arr.", top_k=40, max_new_tokens=200))
    assert [p.name for p in library.list()] == ["Assistant", "Menny", "pirate", "Zed"]
    on_disk = tomllib.loads((personas_dir / "Zed.toml").read_text())
    assert on_disk == {"name": "Zed", "system_prompt": "You are Zed.", "temperature": 0.2, "top_p": 0.95,
                       "top_k": 0, "max_new_tokens": 1024}
    assert PersonaLibrary(personas_dir).get("PIRATE") == Persona("pirate", "Arr.", top_k=40, max_new_tokens=200)
    assert sorted(p.name for p in personas_dir.iterdir()) == ["Zed.toml", "pirate.toml"]  # no temporary files left


def test_editing_a_builtin_saves_an_override_and_deleting_it_restores_the_builtin(library, personas_dir):
    original = library.get("Menny")
    library.save(Persona("Menny", original.system_prompt, temperature=1.3, builtin=True))
    edited = library.get("Menny")
    assert (edited.temperature, edited.builtin) == (1.3, False)
    assert [p.name for p in library.list()] == ["Assistant", "Menny"]  # in place, not twice
    assert (personas_dir / "Menny.toml").exists()
    library.delete("menny")
    assert library.get("Menny") == original
    with pytest.raises(PersonaError, match="'Menny' is a built-in persona and cannot be deleted"):
        library.delete("Menny")
    with pytest.raises(PersonaError, match=r"no persona named 'Nobody' \(available: Assistant, Menny\)"):
        library.delete("Nobody")
    with pytest.raises(PersonaError, match="no persona named 'Nobody'"):
        library.get("Nobody")


def test_saving_again_replaces_the_same_file_whatever_its_name(library, personas_dir):
    personas_dir.mkdir()
    (personas_dir / "my coder.toml").write_text('name = "Coder"\nsystem_prompt = "Write code."\n')
    library.save(Persona("coder", "Write better code."))
    assert [p.name for p in personas_dir.iterdir()] == ["my coder.toml"]
    assert library.get("Coder").system_prompt == "Write better code."


def test_a_file_without_name_takes_its_file_name(library, personas_dir):
    personas_dir.mkdir()
    (personas_dir / "Haiku.toml").write_text('system_prompt = "Answer in haiku."\ntemperature = 1\n')
    haiku = library.get("haiku")
    assert (haiku.name, haiku.temperature) == ("Haiku", 1.0)
    assert isinstance(haiku.temperature, float)


def test_broken_user_files_are_skipped_with_a_reason_and_left_alone(library, personas_dir):
    personas_dir.mkdir()
    broken = personas_dir / "broken.toml"
    broken.write_text('name = "Broken"\nsystem_prompt = "unterminated\n')
    (personas_dir / "good.toml").write_text('name = "Good"\nsystem_prompt = "ok"\n')
    (personas_dir / "twin.toml").write_text('name = "good"\nsystem_prompt = "same name"\n')
    assert [p.name for p in library.list()] == ["Assistant", "Menny", "Good"]
    assert len(library.problems) == 2
    assert str(broken) in library.problems[0] and "not valid TOML" in library.problems[0]
    assert "twin.toml was skipped" in library.problems[1] and "good.toml has the same name" in library.problems[1]
    assert broken.read_text() == 'name = "Broken"\nsystem_prompt = "unterminated\n'


def test_asking_for_a_broken_file_s_persona_points_at_the_file(library, personas_dir):
    personas_dir.mkdir()
    broken = personas_dir / "Pirate.toml"
    broken.write_text('name = "Pirate"\nsystem_prompt = "Arr"\ntemperature = 7\n')
    with pytest.raises(PersonaError) as error:
        library.get("pirate")
    assert str(error.value) == (f"persona 'pirate' cannot be used: persona file {broken}: temperature must be "
                                "between 0 and 2 (0: greedy), got 7; fix or delete the file")


def test_a_broken_override_of_a_builtin_leaves_the_builtin_with_one_warning(library, personas_dir):
    personas_dir.mkdir()
    broken = personas_dir / "assistant.toml"
    broken.write_text('name = "Assistant"\nsystem_prompt = "unterminated\n')
    assistant = library.get("Assistant")
    assert assistant.builtin and assistant == next(p for p in builtin_personas() if p.name == "Assistant")
    [problem] = library.problems
    assert problem.startswith(f"persona file {broken} is not valid TOML")
    assert problem.endswith("; the built-in persona 'Assistant' is used instead until the file is fixed or deleted")


@pytest.mark.parametrize("content, problem", [
    ('name = "X"\nsystem_prompt = "hi', "not valid TOML"),
    ('name = "X"\n', "missing 'system_prompt'"),
    ('name = "X"\nsystem_prompt = "hi"\ntemprature = 0.5\n', "unknown key 'temprature'"),
    ('name = "X"\nsystem_prompt = "hi"\ntemperature = 2.5\n', "temperature must be between 0 and 2"),
    ('name = "X"\nsystem_prompt = "hi"\ntemperature = -0.1\n', "temperature must be between 0 and 2"),
    ('name = "X"\nsystem_prompt = "hi"\ntemperature = "hot"\n', "temperature must be between 0 and 2.*'hot'"),
    ('name = "X"\nsystem_prompt = "hi"\ntemperature = nan\n', "temperature must be"),
    ('name = "X"\nsystem_prompt = "hi"\ntop_p = 0\n', "top_p must be greater than 0 and at most 1"),
    ('name = "X"\nsystem_prompt = "hi"\ntop_p = 1.5\n', "top_p must be greater than 0 and at most 1"),
    ('name = "X"\nsystem_prompt = "hi"\ntop_k = -1\n', "top_k must be a whole number"),
    ('name = "X"\nsystem_prompt = "hi"\ntop_k = 2.5\n', "top_k must be a whole number"),
    ('name = "X"\nsystem_prompt = "hi"\nmax_new_tokens = 0\n', "max_new_tokens must be a whole number from 1"),
    ('name = "X"\nsystem_prompt = "hi"\nmax_new_tokens = true\n', "max_new_tokens must be"),
    ('name = "X"\nsystem_prompt = 42\n', "system_prompt must be text"),
    ('name = "../evil"\nsystem_prompt = "hi"\n', "persona name '../evil' is not valid"),
    ('name = ""\nsystem_prompt = "hi"\n', "persona name '' is not valid"),
    ('builtin = true\nname = "X"\nsystem_prompt = "hi"\n', "unknown key 'builtin'"),
])
def test_import_of_a_bad_file_names_the_file_and_the_problem(library, tmp_path, content, problem):
    source = tmp_path / "incoming.toml"
    source.write_text(content)
    with pytest.raises(PersonaError, match=problem) as refused:
        library.import_toml(source)
    assert str(source) in str(refused.value)
    assert [p.name for p in library.list()] == ["Assistant", "Menny"]  # nothing was added


def test_import_does_not_replace_an_existing_persona_unless_asked(library, tmp_path, personas_dir):
    library.save(Persona("Poet", "Rhyme."))
    before = (personas_dir / "Poet.toml").read_text()
    source = tmp_path / "poet.toml"
    source.write_text('name = "poet"\nsystem_prompt = "Free verse."\ntop_p = 0.5\n')
    with pytest.raises(PersonaError, match="a persona named 'poet' already exists"):
        library.import_toml(source)
    assert (personas_dir / "Poet.toml").read_text() == before
    imported = library.import_toml(source, replace=True)
    assert library.get("Poet") == imported == Persona("poet", "Free verse.", top_p=0.5)


def test_import_reads_a_missing_file_as_a_clear_error(library, tmp_path):
    with pytest.raises(PersonaError, match="cannot read persona file .*nowhere.toml"):
        library.import_toml(tmp_path / "nowhere.toml")


def test_export_writes_an_importable_file_and_never_overwrites_silently(library, tmp_path):
    target = tmp_path / "menny.toml"
    library.export_toml("Menny", target)
    assert read_persona_file(target) == Persona.from_snapshot(library.get("Menny").snapshot())
    target.write_text("my notes")
    with pytest.raises(PersonaError, match="already exists"):
        library.export_toml("Menny", target)
    assert target.read_text() == "my notes"
    library.export_toml("Menny", target, overwrite=True)
    assert read_persona_file(target).name == "Menny"
    other = PersonaLibrary(tmp_path / "elsewhere")
    assert other.import_toml(target).system_prompt == library.get("Menny").system_prompt


@pytest.mark.parametrize("prompt", [
    "",
    "plain",
    'quotes " and \'single\' and """triple""" and trailing "',
    "back\\slash at the end\\",
    "line one\nline two\n\n  indented\n",
    "\nstarts with a newline",
    "windows\r\nline ends\r\n",
    "tabs\tand control \x01 \x1b[31m and DEL \x7f",
    "unicode: 你好, émojis 🎉, right-to-left שלום",
    "ends with quote\n\"",
    'ends with two quotes\n""',
])
def test_any_system_prompt_survives_a_trip_through_a_toml_file(library, personas_dir, prompt):
    persona = Persona("Tricky", prompt, temperature=0.0, top_p=1, top_k=5, max_new_tokens=1)
    path = library.save(persona)
    assert read_persona_file(path) == persona


def test_snapshot_and_sampling():
    persona = Persona("Menny", "Be snarky.", temperature=0.9, top_p=0.8, top_k=40, max_new_tokens=77, builtin=True)
    assert persona.snapshot() == {"name": "Menny", "system_prompt": "Be snarky.", "temperature": 0.9, "top_p": 0.8,
                                  "top_k": 40, "max_new_tokens": 77}
    assert Persona.from_snapshot(persona.snapshot()) == Persona("Menny", "Be snarky.", 0.9, 0.8, 40, 77)
    assert persona.sampling(seed=7) == SamplingParams(temperature=0.9, top_p=0.8, top_k=40, max_new_tokens=77, seed=7)
    with pytest.raises(PersonaError, match="the persona snapshot: missing 'system_prompt'"):
        Persona.from_snapshot({"name": "x"})


def test_check_setting_normalises_and_explains():
    assert check_setting("temperature", 1) == 1.0 and isinstance(check_setting("temperature", 1), float)
    assert check_setting("top_k", 0) == 0
    with pytest.raises(PersonaError, match=r"top_p must be greater than 0 and at most 1, got 0"):
        check_setting("top_p", 0)
    with pytest.raises(PersonaError, match="temperature must be"):
        check_setting("temperature", True)


def test_builtins_are_valid_and_named_uniquely():
    names = [p.name.casefold() for p in builtin_personas()]
    assert len(names) == len(set(names)) and all(p.builtin for p in builtin_personas())
