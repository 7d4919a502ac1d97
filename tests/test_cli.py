"""The `mixtral-chat` command line, run as real subprocesses (`python -m chat_app`) on a temporary
data dir: argument validation, one-line errors, `models`, and the `personas` commands."""

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from chat_app import model_registry
from chat_app.model_registry import ModelError
from model.config import MixtralConfig

REPO = Path(__file__).resolve().parents[1]


def install(ckpt, data_dir, name="tiny"):
    """A copy of a converted checkpoint installed under DATA/models/<name>."""
    return Path(shutil.copytree(ckpt, data_dir / "models" / name))


@pytest.fixture
def data_dir(tmp_path):
    return tmp_path / "data"


def run_cli(*args, data_dir=None, stdin="", env=None):
    """`mixtral-chat ARGS` in a subprocess; the per-user dirs point into the data dir's parent, so
    nothing outside the test's temporary folder is read or written."""
    argv = [sys.executable, "-m", "chat_app", *map(str, args)]
    if data_dir is not None:
        argv += ["--data-dir", str(data_dir)]
    home = Path(data_dir).parent if data_dir is not None else REPO / ".pytest_cache"
    environment = {**os.environ, "XDG_DATA_HOME": str(home / "xdg-data"), "XDG_CACHE_HOME": str(home / "xdg-cache"),
                   **(env or {})}
    return subprocess.run(argv, cwd=REPO, input=stdin, capture_output=True, text=True, env=environment, timeout=120)


def assert_one_line_error(result, *fragments, status=None):
    assert result.returncode != 0 if status is None else result.returncode == status
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert re.match(r"mixtral-chat( [a-z]+)*: error: ", lines[0]), lines[0]  # "mixtral-chat personas add: error: "
    for fragment in fragments:
        assert fragment in lines[0]


def test_help_answers_without_loading_jax_or_textual():
    probe = ("import sys, contextlib, io\n"
             "from chat_app.cli import main\n"
             "with contextlib.redirect_stdout(io.StringIO()):\n"
             "    try: main(['--help'])\n"
             "    except SystemExit: pass\n"
             "    main(['personas', 'list', '--data-dir', sys.argv[1]])\n"
             "    main(['models', '--data-dir', sys.argv[1]])\n"
             "print(sorted(m for m in ('jax', 'textual', 'torch', 'transformers') if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", probe, str(REPO / ".pytest_cache" / "cli-probe")],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "[]", result.stderr
    shown = run_cli("--help")
    assert shown.returncode == 0
    for command in ("setup", "convert", "models", "personas", "--headless", "--mesh", "--data-dir", "--jsonl"):
        assert command in shown.stdout


@pytest.mark.parametrize("args, fragment", [
    (["--temperature", "-1"], "temperature must be between 0 and 2"),
    (["--temperature", "warm"], "'warm' is not a number"),
    (["--top-p", "0"], "top_p must be greater than 0 and at most 1"),
    (["--top-p", "1.01"], "top_p must be greater than 0 and at most 1"),
    (["--top-k", "-3"], "top_k must be a whole number"),
    (["--max-new-tokens", "0"], "max_new_tokens must be a whole number from 1"),
    (["--mesh", "2y4"], "--mesh must look like AxB with positive integers (e.g. 1x8, 2x4), got '2y4'"),
    (["--mesh", "0x8"], "--mesh must look like AxB"),
    (["--mesh", "8"], "--mesh must look like AxB"),
    (["--context-length", "-5"], "'-5' is not a whole number of 1 or more"),
    (["--seed", "x"], "invalid int value"),
    (["--demo", "--model", "x"], "not allowed with argument"),
    (["frobnicate"], "invalid choice"),
    (["setup"], "one of the arguments --repo --local --demo is required"),
    (["convert", "only-one-dir"], "the following arguments are required: OUT_DIR"),
    (["personas"], "the following arguments are required: ACTION"),
])
def test_bad_command_lines_get_one_line_and_status_2(args, fragment):
    assert_one_line_error(run_cli(*args), fragment, "--help", status=2)


@pytest.mark.parametrize("args, fragment", [
    (["--jsonl"], "--jsonl is for --headless mode"),
    (["--no-save"], "--no-save is for --headless mode"),
    (["--conversation", "abc"], "--conversation is for --headless mode"),
    (["--headless", "--conversation", "abc", "--no-save"], "cannot be combined with --no-save"),
    (["--headless", "--persona", "Nobody"], "no persona named 'Nobody' (available: Assistant, Menny)"),
    (["--persona", "Nobody"], "no persona named 'Nobody'"),  # the UI is not started
    (["--model", "nope"], "no model named 'nope'"),
    (["--headless", "--model", "nope"], "no model named 'nope' and no such folder (none installed"),
    (["--headless"], "no model to use: pass --model NAME|PATH or --demo"),
    (["--headless", "--conversation", "abc"], "no conversation with id 'abc'"),
    (["--headless", "--num-processes", "2"], "--num-processes and --process-id go with --distributed HOST:PORT"),
    (["--headless", "--distributed", "alpha"], "--distributed takes HOST:PORT (process 0's address and a free port)"),
    (["--headless", "--distributed", "alpha:1234", "--process-id", "1"], "needs --num-processes N and --process-id I"),
    (["--headless", "--distributed", "alpha:1234", "--num-processes", "2", "--process-id", "2"],
     "--process-id must be below --num-processes (2), got 2"),
    (["--headless", "--conversation", "abc", "--distributed", "alpha:1234", "--num-processes", "2", "--process-id",
      "0"], "--distributed needs the model on every process: pass --model NAME|PATH or --demo"),
])
def test_bad_requests_get_one_line_and_a_failure_status(data_dir, args, fragment):
    assert_one_line_error(run_cli(*args, data_dir=data_dir), fragment)


def test_unreadable_checkpoints_are_refused_with_the_reason(data_dir, tmp_path):
    garbled = tmp_path / "garbled"
    garbled.mkdir()
    (garbled / "config.json").write_text("{not json")
    assert_one_line_error(run_cli("--headless", "--model", garbled, data_dir=data_dir), str(garbled), "cannot read")
    hf_folder = tmp_path / "hf"
    hf_folder.mkdir()
    (hf_folder / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    assert_one_line_error(run_cli("--headless", "--model", hf_folder, data_dir=data_dir), "not converted yet")
    assert_one_line_error(run_cli("--headless", "--model", tmp_path / "missing", data_dir=data_dir),
                          "no such folder")


def test_a_damaged_history_is_named_and_left_alone(data_dir):
    data_dir.mkdir()
    history = data_dir / "history.sqlite3"
    history.write_bytes(b"\x00garbage" * 512)
    result = run_cli("--headless", data_dir=data_dir)
    assert_one_line_error(result, str(history), "has not been changed", "mv ")
    assert history.read_bytes() == b"\x00garbage" * 512


def test_models_lists_installed_checkpoints_and_unusable_folders(data_dir, tiny_ckpt, tiny_hf):
    assert "No models installed" in run_cli("models", data_dir=data_dir).stdout
    install(tiny_ckpt, data_dir)
    (data_dir / "models" / "half-copied").mkdir()
    result = run_cli("models", data_dir=data_dir)
    assert result.returncode == 0, result.stderr
    header, broken, tiny = result.stdout.splitlines()
    assert header.split() == ["NAME", "PARAMS", "DTYPE", "SIZE", "SOURCE"]
    params = MixtralConfig.load(tiny_ckpt / "config.json").num_params
    assert tiny.split()[:3] == ["tiny", f"{params / 1e6:.1f}M", "float32"] and tiny.endswith(str(tiny_hf))
    assert broken.split()[0] == "half-copied" and "unusable: not a converted checkpoint (no config.json)" in broken


def test_convert_writes_a_checkpoint_that_models_lists(data_dir, tiny_hf):
    out = data_dir / "models" / "tiny-int8"
    result = run_cli("convert", tiny_hf, out, "--quantize", "int8")
    assert result.returncode == 0, result.stderr
    assert f"Converted {tiny_hf} -> {out}" in result.stdout
    [listed] = model_registry.list_installed(data_dir)
    assert (listed.name, listed.dtype, listed.quantization, listed.problem) == ("tiny-int8", "float32", "int8", None)
    assert_one_line_error(run_cli("convert", tiny_hf, out), "already exists")
    assert_one_line_error(run_cli("convert", data_dir / "nowhere", data_dir / "x"), "has no config.json")


def test_data_dir_goes_before_or_after_the_command(data_dir):
    run_cli("personas", "add", "Early", "--system-prompt", "x", data_dir=data_dir)
    before = run_cli("--data-dir", data_dir, "personas", "list")
    after = run_cli("personas", "--data-dir", data_dir, "list")
    assert "Early" in before.stdout and before.stdout == after.stdout


def test_personas_add_list_show_edit_and_remove(data_dir, tmp_path):
    added = run_cli("personas", "add", "Pirate", "--system-prompt", "Talk like a pirate.", "--temperature", "1.2",
                    "--top-k", "40", data_dir=data_dir)
    assert added.returncode == 0, added.stderr
    listing = run_cli("personas", "list", data_dir=data_dir).stdout.splitlines()
    assert [line.split()[0] for line in listing] == ["NAME", "Assistant", "Menny", "Pirate"]
    assert listing[3].split()[1:3] == ["yours", "1.2"]
    shown = tomllib.loads(run_cli("personas", "show", "pirate", data_dir=data_dir).stdout)
    assert shown == {"name": "Pirate", "system_prompt": "Talk like a pirate.", "temperature": 1.2, "top_p": 0.95,
                     "top_k": 40, "max_new_tokens": 1024}

    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("Talk like a pirate\nwho is also a poet.\n")
    edited = run_cli("personas", "edit", "Pirate", "--rename", "Poet Pirate", "--system-prompt-file", prompt_file,
                     "--top-p", "0.5", data_dir=data_dir)
    assert edited.returncode == 0, edited.stderr
    shown = tomllib.loads(run_cli("personas", "show", "Poet Pirate", data_dir=data_dir).stdout)
    assert (shown["system_prompt"], shown["top_p"], shown["temperature"]) == (prompt_file.read_text(), 0.5, 1.2)
    assert sorted(p.name for p in (data_dir / "personas").iterdir()) == ["Poet Pirate.toml"]

    removed = run_cli("personas", "rm", "poet pirate", data_dir=data_dir)
    assert removed.returncode == 0 and "Deleted persona 'Poet Pirate'" in removed.stdout
    assert [line.split()[0] for line in run_cli("personas", "list", data_dir=data_dir).stdout.splitlines()] == [
        "NAME", "Assistant", "Menny"]


def test_editing_a_builtin_keeps_the_original_recoverable(data_dir):
    assert run_cli("personas", "edit", "Menny", "--temperature", "0.3", data_dir=data_dir).returncode == 0
    listing = run_cli("personas", "list", data_dir=data_dir).stdout
    assert "yours (edited built-in)" in listing
    assert tomllib.loads(run_cli("personas", "show", "Menny", data_dir=data_dir).stdout)["temperature"] == 0.3
    restored = run_cli("personas", "rm", "Menny", data_dir=data_dir)
    assert "the built-in one is back" in restored.stdout
    assert tomllib.loads(run_cli("personas", "show", "Menny", data_dir=data_dir).stdout)["temperature"] == 0.9
    assert_one_line_error(run_cli("personas", "rm", "Menny", data_dir=data_dir), "built-in persona and cannot be deleted")


def test_personas_import_and_export(data_dir, tmp_path):
    exported = tmp_path / "menny.toml"
    assert run_cli("personas", "export", "Menny", exported, data_dir=data_dir).returncode == 0
    assert_one_line_error(run_cli("personas", "export", "Menny", exported, data_dir=data_dir), "already exists")
    assert run_cli("personas", "export", "Menny", exported, "--force", data_dir=data_dir).returncode == 0

    incoming = tmp_path / "critic.toml"
    incoming.write_text('name = "Critic"\nsystem_prompt = "Find the flaws."\ntemperature = 0.4\n')
    assert run_cli("personas", "import", incoming, data_dir=data_dir).returncode == 0
    assert_one_line_error(run_cli("personas", "import", incoming, data_dir=data_dir), "already exists")
    incoming.write_text('name = "Critic"\nsystem_prompt = "Find more flaws."\n')
    assert run_cli("personas", "import", incoming, "--replace", data_dir=data_dir).returncode == 0
    assert "more flaws" in run_cli("personas", "show", "critic", data_dir=data_dir).stdout

    bad = tmp_path / "bad.toml"
    bad.write_text('name = "Bad"\nsystem_prompt = "x"\ntop_p = 7\n')
    assert_one_line_error(run_cli("personas", "import", bad, data_dir=data_dir), str(bad), "top_p must be")


@pytest.mark.parametrize("args, fragment", [
    (["personas", "add", "Menny2"], "one of the arguments --system-prompt --system-prompt-file is required"),
    (["personas", "add", "bad/name", "--system-prompt", "x"], "persona name 'bad/name' is not valid"),
    (["personas", "add", "Assistant2", "--system-prompt-file", "/nonexistent/p.txt"], "cannot read the system prompt file"),
    (["personas", "edit", "Menny"], "nothing to change"),
    (["personas", "edit", "Menny", "--rename", "Assistant"], "a persona named 'Assistant' already exists"),
    (["personas", "edit", "Nobody", "--top-k", "3"], "no persona named 'Nobody'"),
    (["personas", "show", "Nobody"], "no persona named 'Nobody'"),
    (["personas", "add", "Pirate", "--system-prompt", "x", "--top-p", "2"], "top_p must be"),
    (["personas", "add", "menny", "--system-prompt", "x"], "a persona named 'menny' already exists"),
])
def test_bad_persona_commands_get_one_line(data_dir, args, fragment):
    assert_one_line_error(run_cli(*args, data_dir=data_dir), fragment)
    assert not (data_dir / "personas").exists() or list((data_dir / "personas").iterdir()) == []


def test_add_refuses_an_existing_name_and_keeps_the_file(data_dir):
    run_cli("personas", "add", "Pirate", "--system-prompt", "Arr.", data_dir=data_dir)
    assert_one_line_error(run_cli("personas", "add", "pirate", "--system-prompt", "Different", data_dir=data_dir),
                          "already exists")
    assert "Arr." in run_cli("personas", "show", "Pirate", data_dir=data_dir).stdout


def test_a_broken_persona_file_is_reported_but_the_list_still_works(data_dir):
    (data_dir / "personas").mkdir(parents=True)
    (data_dir / "personas" / "oops.toml").write_text("name = ")
    result = run_cli("personas", "list", data_dir=data_dir)
    assert result.returncode == 0 and "Assistant" in result.stdout
    assert "warning: persona file" in result.stderr and "oops.toml" in result.stderr


@pytest.mark.parametrize("mode", [["--headless"], []], ids=["headless", "ui"])
def test_persona_option_naming_a_broken_file_points_at_the_file(data_dir, mode):
    (data_dir / "personas").mkdir(parents=True)
    broken = data_dir / "personas" / "Pirate.toml"
    broken.write_text('name = "Pirate"\nsystem_prompt = ')
    result = run_cli(*mode, "--persona", "Pirate", data_dir=data_dir)
    assert_one_line_error(result, "persona 'Pirate' cannot be used: ", f"persona file {broken} is not valid TOML",
                          "fix or delete the file", status=1)  # before any model or UI is started


# --- model_registry: what `models` lists and how `--model` is resolved ----------------------------
def test_installed_models_are_described_from_their_files(data_dir, tiny_ckpt, tiny_hf):
    tiny = install(tiny_ckpt, data_dir)
    (data_dir / "models" / ".converting-next").mkdir()  # a conversion in progress is not listed
    [model] = model_registry.list_installed(data_dir)
    config = MixtralConfig.load(tiny / "config.json")
    assert (model.name, model.path, model.source, model.dtype, model.quantization, model.n_params, model.problem) == (
        "tiny", tiny, str(tiny_hf), "float32", None, config.num_params, None)
    assert model.size_bytes == sum(f.stat().st_size for f in tiny.iterdir())


def test_resolve_takes_a_name_or_a_checkpoint_dir(data_dir, tmp_path, tiny_ckpt):
    tiny = install(tiny_ckpt, data_dir)
    assert model_registry.resolve(data_dir, "tiny") == tiny
    assert model_registry.resolve(data_dir, str(tiny_ckpt)) == tiny_ckpt
    assert model_registry.model_label(data_dir, tiny) == "tiny"
    assert model_registry.model_label(data_dir, tiny_ckpt) == str(tiny_ckpt)
    with pytest.raises(ModelError, match=r"no model named 'tinny' and no such folder \(installed: tiny\)"):
        model_registry.resolve(data_dir, "tinny")
    for weights in tiny.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(ModelError, match="has no weights"):
        model_registry.resolve(data_dir, "tiny")


def test_default_model_is_the_configured_or_the_only_one(data_dir, tiny_ckpt):
    assert model_registry.default_model(data_dir) is None
    first = install(tiny_ckpt, data_dir, "first")
    assert model_registry.default_model(data_dir) == first
    second = install(tiny_ckpt, data_dir, "second")
    assert model_registry.default_model(data_dir) is None  # two and no default: the caller must ask
    (data_dir / "settings.toml").write_text('default_model = "second"\n')
    assert model_registry.default_model(data_dir) == second
    (data_dir / "settings.toml").write_text('default_model = "gone"\n')
    with pytest.raises(ModelError, match="the default_model in .*settings.toml is not usable: no model named 'gone'"):
        model_registry.default_model(data_dir)
    (data_dir / "settings.toml").write_text("default_model = \n")
    with pytest.raises(ModelError, match="cannot read .*settings.toml"):
        model_registry.default_model(data_dir)
