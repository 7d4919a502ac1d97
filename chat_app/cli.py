"""The `mixtral-chat` command: parses the command line and hands each command to its module.

Errors the user can fix (a bad option, an unknown persona, a missing model, an unreadable history or
checkpoint) end the program with one line on stderr and a non-zero status, never a traceback.
jax and textual are imported only by the commands that run a model or the UI, so `--help`,
`models` and `personas ...` answer at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from chat_app import model_registry, paths
from chat_app.engine_factory import EngineFactory, engine_factory
from chat_app.errors import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_STDOUT_CLOSED,
    EXIT_USAGE,
    PROG,
    STOP_SIGNALS,
    UserError,
    signal_exit_status,
)
from chat_app.personas import (
    SETTING_RULES,
    Persona,
    PersonaError,
    PersonaLibrary,
    builtin_personas,
    check_setting,
)
from chat_app.terminal import StderrProgress, format_bytes, format_count
from model.config import QUANTIZATIONS

ALL_MODELS = ""  # `models --verify` without a name
if TYPE_CHECKING:
    from chat_app.setup_flow import SetupPlan
    from model.multihost import Link, ProcessGroup

QUANTIZE_CHOICES = tuple(q or "none" for q in QUANTIZATIONS)


class CliError(UserError):
    """A problem with what the user asked for, reported as one line."""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args) or 0
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except UserError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_ERROR


# --- the parser ---------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """One line instead of argparse's usage block, and the exit status it would use."""
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Chat in the terminal with Mixtral-8x7B-Instruct (or any converted Mixtral) running "
                    "locally on JAX. With no command: the chat UI (the set-up wizard when no model is installed).",
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--demo", action="store_true", help="chat with the small demo model (built first if missing)")
    which.add_argument("--model", metavar="NAME|PATH", help="an installed model's name or a converted checkpoint dir")
    parser.add_argument("--headless", action="store_true",
                        help="no UI: each stdin line is a user turn, each reply goes to stdout")
    parser.add_argument("--jsonl", action="store_true",
                        help='headless: stdin lines are {"role": "user", "content": ...}; replies are JSON lines '
                             "with token counts and timings")
    parser.add_argument("--no-save", action="store_true", help="headless: do not save the conversation")
    parser.add_argument("--conversation", metavar="ID", help="headless: continue this saved conversation")
    parser.add_argument("--persona", metavar="NAME", help="the persona to chat with (default: Assistant)")
    _add_sampling_options(parser)
    parser.add_argument("--seed", type=int, metavar="S", help="random seed, for replies that can be repeated")
    parser.add_argument("--mesh", type=_mesh_shape, metavar="AxB",
                        help="devices per mesh axis, expert x model, e.g. 1x8 (default: all devices)")
    parser.add_argument("--context-length", type=_positive_int, metavar="N",
                        help="the most tokens of conversation the model sees (default: 4096, or the model's own limit if smaller)")
    parser.add_argument("--distributed", metavar="HOST:PORT|auto",
                        help="run one model across several processes (hosts): process 0's address and a free port "
                             "(every process gives the same), or auto where JAX detects the cluster (TPU VMs, SLURM)")
    parser.add_argument("--num-processes", type=_positive_int, metavar="N", help="--distributed: how many processes")
    parser.add_argument("--process-id", type=_natural_int, metavar="I",
                        help="--distributed: this process's number, 0 to N-1; 0 runs the chat, the others follow it")
    _add_data_dir(parser, top_level=True)
    parser.set_defaults(handler=_chat)

    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    setup = commands.add_parser("setup", help="download or convert a model, or build the demo model",
                                description="Install a model into the data dir.")
    source = setup.add_mutually_exclusive_group(required=True)
    source.add_argument("--repo", metavar="ID", help="a Hugging Face hub repo to download and convert")
    source.add_argument("--local", metavar="HF_DIR", type=Path, help="an HF model folder already on disk")
    source.add_argument("--demo", action="store_true", help="build the small demo model")
    setup.add_argument("--revision", metavar="REV", help="hub branch, tag or commit (default: main)")
    setup.add_argument("--quantize", choices=QUANTIZE_CHOICES,
                       help="default: int4 on CPU; on GPU/TPU none if the model fits in bfloat16, else int8, else int4")
    setup.add_argument("--dtype", choices=("bfloat16", "float32"),
                       help="default: bfloat16 on GPU/TPU, float32 on CPU (faster there)")
    setup.add_argument("--name", help="the installed model's name (default: from the repo or folder)")
    setup.add_argument("--yes", action="store_true", help="do not ask before downloading")
    setup.add_argument("--endpoint", metavar="URL", help="the Hugging Face hub to use (default: $HF_ENDPOINT, "
                                                         "else https://huggingface.co)")
    setup.add_argument("--hf-cache", metavar="DIR", type=Path,
                       help="the Hugging Face cache to download into (default: $HF_HUB_CACHE, else HF's own)")
    _add_data_dir(setup)
    setup.set_defaults(handler=_setup)

    convert = commands.add_parser("convert", help="convert an HF safetensors model to our checkpoint",
                                  description="Convert a Hugging Face Mixtral (or dense Llama/Mistral with "
                                              "--upcycle-experts) folder into a mixtral-chat checkpoint.")
    convert.add_argument("hf_dir", type=Path, metavar="HF_DIR")
    convert.add_argument("out_dir", type=Path, metavar="OUT_DIR")
    convert.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    convert.add_argument("--quantize", choices=QUANTIZE_CHOICES, default="none")
    convert.add_argument("--upcycle-experts", type=_positive_int, metavar="N",
                         help="turn a dense model's MLP into N identical experts")
    convert.set_defaults(handler=_convert)

    models = commands.add_parser("models", help="list installed models, or verify them",
                                 description="List installed models.")
    models.add_argument("--verify", nargs="?", const=ALL_MODELS, metavar="NAME",
                        help="check the sha256 of every file of model NAME (default: of every installed model)")
    _add_data_dir(models)
    models.set_defaults(handler=_list_models)

    personas = commands.add_parser("personas", help="list, show, add, edit, remove, import or export personas",
                                   description="Manage personas (system prompt + sampling settings).")
    _add_data_dir(personas)
    actions = personas.add_subparsers(title="actions", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="list personas")
    listing.set_defaults(handler=_personas_list)
    show = actions.add_parser("show", help="print a persona as TOML")
    show.add_argument("name")
    show.set_defaults(handler=_personas_show)
    add = actions.add_parser("add", help="add a persona")
    add.add_argument("name")
    _add_system_prompt_options(add, required=True)
    _add_sampling_options(add)
    add.set_defaults(handler=_personas_add)
    edit = actions.add_parser("edit", help="change a persona (editing a built-in saves your own copy)")
    edit.add_argument("name")
    edit.add_argument("--rename", metavar="NEW_NAME", help="give the persona a new name")
    _add_system_prompt_options(edit, required=False)
    _add_sampling_options(edit)
    edit.set_defaults(handler=_personas_edit)
    remove = actions.add_parser("rm", help="delete a persona (for a built-in: your copy of it)")
    remove.add_argument("name")
    remove.set_defaults(handler=_personas_rm)
    import_ = actions.add_parser("import", help="add the persona in a TOML file")
    import_.add_argument("file", type=Path)
    import_.add_argument("--replace", action="store_true", help="replace your persona of the same name")
    import_.set_defaults(handler=_personas_import)
    export = actions.add_parser("export", help="write a persona to a TOML file")
    export.add_argument("name")
    export.add_argument("file", type=Path)
    export.add_argument("--force", action="store_true", help="overwrite the file if it exists")
    export.set_defaults(handler=_personas_export)
    for action in (listing, show, add, edit, remove, import_, export):
        _add_data_dir(action)
    return parser


def _add_data_dir(parser: argparse.ArgumentParser, top_level: bool = False) -> None:
    """--data-dir is accepted before or after a command. Below the top level its default is
    SUPPRESS, or a subcommand's default would overwrite a value given before the command."""
    parser.add_argument("--data-dir", type=Path, metavar="DIR", default=None if top_level else argparse.SUPPRESS,
                        help="where models, history and personas live (default: the per-user data dir)")


def _add_sampling_options(parser: argparse.ArgumentParser) -> None:
    for option, setting, metavar in (("--temperature", "temperature", "T"), ("--top-p", "top_p", "P"),
                                     ("--top-k", "top_k", "K"), ("--max-new-tokens", "max_new_tokens", "N")):
        parser.add_argument(option, type=_setting_type(setting), metavar=metavar, help=SETTING_RULES[setting][2])


def _add_system_prompt_options(parser: argparse.ArgumentParser, required: bool) -> None:
    prompt = parser.add_mutually_exclusive_group(required=required)
    prompt.add_argument("--system-prompt", metavar="TEXT")
    prompt.add_argument("--system-prompt-file", metavar="FILE", type=Path, help="read the prompt from FILE (- for stdin)")


def _setting_type(setting: str) -> Callable[[str], float | int]:
    kind = SETTING_RULES[setting][0]

    def parse(text: str) -> float | int:
        try:
            return check_setting(setting, kind(text))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        except PersonaError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = setting  # argparse names the type in some messages
    return parse


def _mesh_shape(text: str) -> tuple[int, int]:
    from model.sharding import (  # imports jax: only when --mesh is given
        MeshError,
        parse_mesh_shape,
    )

    try:
        return parse_mesh_shape(text)
    except MeshError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of 1 or more")
    return int(text)


def _natural_int(text: str) -> int:
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of 0 or more")
    return int(text)


# --- chatting: the UI or headless ---------------------------------------------------------------
def _chat(args: argparse.Namespace) -> int:
    if not args.headless:
        for option in ("jsonl", "no_save", "conversation"):
            if getattr(args, option):
                raise CliError(f"--{option.replace('_', '-')} is for --headless mode")
    if args.conversation and args.no_save:
        raise CliError("--conversation continues a saved conversation; it cannot be combined with --no-save")
    data_dir = paths.resolve_data_dir(args.data_dir)
    if args.persona:
        PersonaLibrary(paths.personas_dir(data_dir)).get(args.persona)  # an unknown name fails now, not later
    overrides = _sampling_changes(args)
    group = _process_group(args)
    model_dir = _chosen_model(args, data_dir)
    if group is None:
        return _chat_on(args, data_dir, model_dir, overrides,
                        engine_factory(mesh_shape=args.mesh, context_length=args.context_length, compilation_cache=True))
    from model.multihost import identity, join

    if model_dir is None:
        raise CliError("--distributed needs the model on every process: pass --model NAME|PATH or --demo")
    _keep_stdout_for_replies(args.headless)
    link = join(group, identity(model_dir, args.mesh, args.context_length),
                on_fatal=_ender(ui=not args.headless and group.process_id in (0, None)))
    if not link.is_driver:
        return _follow(link, model_dir, args)
    try:  # (programs compiled for a process group are not kept on disk)
        return _chat_on(args, data_dir, model_dir, overrides,
                        engine_factory(mesh_shape=args.mesh, context_length=args.context_length, link=link))
    except Exception as error:
        if not isinstance(error, UserError):  # maybe a follower died in the middle of a step
            link.outlive_watchdog()
        raise
    finally:
        link.close()


def _chat_on(args: argparse.Namespace, data_dir: Path, model_dir: Path | None, overrides: dict,
             open_engine: EngineFactory) -> int:
    """The UI or the headless loop, on the engine `open_engine` builds."""
    if args.headless:
        from chat_app.headless import run_headless

        sys.stdin.reconfigure(errors="surrogateescape")  # a bad byte reaches the turn loop, which replaces it
        with StderrProgress(terminal_only=True) as status:
            exit_status = run_headless(
                data_dir=data_dir, model_dir=model_dir, persona_name=args.persona, overrides=overrides,
                seed=args.seed, open_engine=open_engine, jsonl=args.jsonl, save=not args.no_save, stdout=sys.stdout,
                conversation_id=args.conversation, on_progress=lambda fraction, what: status.show(f"{what} {fraction:.0%}"))
        if exit_status == EXIT_STDOUT_CLOSED:  # the Python docs' recipe: the flush at exit must not fail
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return exit_status
    from chat_app.app import run_app

    if args.seed is not None:
        overrides["seed"] = args.seed
    return run_app(data_dir, model_dir, args.persona, overrides, open_engine)


def _process_group(args: argparse.Namespace) -> ProcessGroup | None:
    """What --distributed, --num-processes and --process-id ask for; None without --distributed."""
    from model.multihost import ProcessGroup

    if args.distributed is None:
        if args.num_processes is not None or args.process_id is not None:
            raise CliError("--num-processes and --process-id go with --distributed HOST:PORT")
        return None
    if args.distributed != "auto":
        host, _, port = args.distributed.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise CliError(f"--distributed takes HOST:PORT (process 0's address and a free port) or auto, "
                           f"got {args.distributed!r}")
        if args.num_processes is None or args.process_id is None:
            raise CliError("--distributed HOST:PORT needs --num-processes N and --process-id I")
    if args.num_processes is not None and args.process_id is not None and args.process_id >= args.num_processes:
        raise CliError(f"--process-id must be below --num-processes ({args.num_processes}), got {args.process_id}")
    return ProcessGroup(args.distributed, args.num_processes, args.process_id)


def _keep_stdout_for_replies(headless: bool) -> None:
    """gloo (JAX's collectives between processes on CPU) prints its connection lines on file descriptor 1:
    point that at stderr (headless) or at nothing (the UI), and give `sys.stdout` the real stdout."""
    replies = os.dup(sys.stdout.fileno())
    os.dup2(sys.stderr.fileno() if headless else os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.stdout = open(replies, "w", encoding=sys.stdout.encoding, errors=sys.stdout.errors, closefd=True)


def _follow(link: Link, model_dir: Path, args: argparse.Namespace) -> int:
    """A process other than 0: build the same engine, then run what process 0 sends until it quits."""
    from model.multihost import follow

    _say(f"Process {link.process_id} of {link.num_processes}: loading {model_dir.name}, then following process 0.")
    open_engine = engine_factory(mesh_shape=args.mesh, context_length=args.context_length)
    with StderrProgress(terminal_only=True) as status:
        engine = open_engine(model_dir, lambda fraction, what: status.show(f"{what} {fraction:.0%}"))
    follow(engine, link)
    return 0


def _ender(ui: bool) -> Callable[[str], None]:
    """What ends this process when another one failed (called from any thread): the terminal given back
    if the UI has it, one line, and the end at once, since what this process runs can no longer finish."""
    import termios

    terminal = sys.__stdin__.fileno() if ui and sys.__stdin__.isatty() else None
    settings = termios.tcgetattr(terminal) if terminal is not None else None

    def end(message: str) -> None:
        if settings is not None:  # Textual's screen: mouse reports off, cursor shown, the main screen back
            sys.__stderr__.write("\x1b[?1000l\x1b[?1003l\x1b[?1006l\x1b[?25h\x1b[?1049l")
            termios.tcsetattr(terminal, termios.TCSADRAIN, settings)
        print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
        os._exit(EXIT_ERROR)

    return end


def _chosen_model(args: argparse.Namespace, data_dir: Path) -> Path | None:
    """--model, or the demo model, or the default one; None when there is none to choose (the UI
    then opens the set-up wizard; headless uses a continued conversation's model or fails)."""
    if args.model:
        return model_registry.resolve(data_dir, args.model)
    if args.demo:
        return _ensure_demo(data_dir)
    if args.conversation:
        return None
    return model_registry.default_model(data_dir)


def _ensure_demo(data_dir: Path) -> Path:
    """The demo model's checkpoint, built first if needed, telling the user what happens on stderr."""
    from chat_app.demo import ensure_demo

    with StderrProgress(terminal_only=True) as progress:
        return ensure_demo(data_dir, on_status=_say,
                           on_verify=lambda fraction, what: progress.show(f"{what} {fraction:.0%}"))


# --- setup, convert, models ---------------------------------------------------------------------
def _setup(args: argparse.Namespace) -> int:
    args.data_dir = paths.resolve_data_dir(getattr(args, "data_dir", None))
    if args.demo:
        path = _ensure_demo(args.data_dir)
        print(f"The demo model is ready in {path}. Start chatting with: {PROG} --demo")
        return 0
    return _setup_from_hub_or_folder(args)


def _setup_from_hub_or_folder(args: argparse.Namespace) -> int:
    """`mixtral-chat setup --repo ID | --local DIR`: check, show the plan, ask (unless --yes), then download and
    convert with progress on stderr. Ctrl-C, SIGTERM or SIGHUP stops (keeping what was downloaded) and
    exits with 128 + the signal's number (130, 143, 129)."""
    from chat_app import hub  # huggingface_hub: only for this command
    from chat_app.setup_flow import (
        CANCELLED,
        describe_conversion,
        describe_download,
        folder_source,
        hub_endpoint,
        hub_source,
        install,
        name_problem,
        plan_setup,
    )

    if args.local is not None and args.revision:
        raise CliError("--revision is for --repo (a local folder has no revisions)")
    if args.name is not None and (problem := name_problem(args.name)):
        raise CliError(problem)
    token = hub.resolve_token() if args.repo is not None else None
    if args.repo is not None:
        endpoint = hub_endpoint(args.endpoint)
        _say(f"Asking {endpoint} about {args.repo}...")
        source = hub_source(args.repo, args.revision, endpoint=endpoint, token=token, cache_dir=args.hf_cache)
    else:
        source = folder_source(args.local)
    _say("Looking at the devices...")
    plan = plan_setup(source, data_dir=args.data_dir, name=args.name, dtype=args.dtype, quantization=args.quantize)
    _say("\n".join(plan.describe()))
    for warning in plan.warnings:
        _say(f"Note: {warning}")
    if not plan.can_start:
        raise CliError("cannot set up this model:\n  " + "\n  ".join(plan.problems))
    _confirm(plan, args.yes)
    with StderrProgress() as progress, _StopSignals() as stop:
        try:
            path = install(plan, token=token,
                           on_download=lambda p: progress.show(
                               describe_download(p), key=(p.stage, p.current_file), detail=p.current_file,
                               last=p.stage == "done"),
                           on_convert=lambda done, total, tensor: progress.show(
                               describe_conversion(done, total, tensor), key=done * 10 // total),
                           should_cancel=stop.event.is_set)
        except CANCELLED as error:
            progress.finish()
            _say(f"Interrupted. {error.message}\nTo resume, run the same command again: {PROG} "
                 f"{shlex.join(sys.argv[1:])}")
            return signal_exit_status(stop.signum)
        except UserError:
            progress.finish()
            raise
    print(f"Installed '{plan.name}' in {path}. Chat with it: {PROG} --model {plan.name}")
    return 0


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _confirm(plan: SetupPlan, yes: bool) -> None:
    """Go ahead only when the user agrees (or gave --yes); replacing an installed model needs a typed 'y'."""
    if plan.replaces_existing and yes:
        raise CliError(f"a model named '{plan.name}' is already installed ({plan.destination}): choose another "
                       "--name, or run without --yes to confirm replacing it")
    if yes:
        return
    if not sys.stdin.isatty():
        raise CliError("not asking for confirmation because stdin is not a terminal: add --yes to go ahead")
    if plan.replaces_existing and not _ask(f"Replace the installed model '{plan.name}'?"):
        raise CliError("nothing was changed")
    download = plan.source.download
    action = f"Download {format_bytes(download.bytes_to_download)} and install" if download else "Convert and install"
    if not _ask(f"{action} '{plan.name}'?"):
        raise CliError("nothing was changed")


def _ask(question: str) -> bool:
    print(f"{question} [y/N] ", end="", file=sys.stderr, flush=True)
    return sys.stdin.readline().strip().lower() in ("y", "yes")


class _StopSignals:
    """While active, the first stop signal (Ctrl-C, `kill`, a closed terminal) asks the work to stop
    (it keeps what it has) and is remembered in `signum`; a second one aborts."""

    def __enter__(self) -> _StopSignals:
        self.event = threading.Event()
        self.signum: int | None = None
        self._installed = threading.current_thread() is threading.main_thread()  # only there can it be
        if self._installed:
            self._previous = {signum: signal.signal(signum, self._handle) for signum in STOP_SIGNALS}
        return self

    def _handle(self, signum, frame) -> None:
        if self.event.is_set():
            raise KeyboardInterrupt
        self.signum = signum
        self.event.set()
        _say("\nStopping (Ctrl-C again to abort at once)..." if signum == signal.SIGINT else
             f"\nStopping ({signal.Signals(signum).name})...")

    def __exit__(self, *exc_info) -> None:
        if self._installed:
            for signum, handler in self._previous.items():
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def _convert(args: argparse.Namespace) -> int:
    import model

    try:
        with StderrProgress(terminal_only=True) as status:
            model.convert_hf(args.hf_dir, args.out_dir, dtype=args.dtype, quantize=args.quantize,
                             upcycle_experts=args.upcycle_experts,
                             on_progress=lambda done, total, name: status.show(f"tensor {done}/{total} ({name})",
                                                                               key=done * 10 // total))
    except model.ConversionError as e:
        raise CliError(f"cannot convert {args.hf_dir}: {e}") from None
    print(f"Converted {args.hf_dir} -> {args.out_dir}")
    return 0


def _list_models(args: argparse.Namespace) -> int:
    data_dir = paths.resolve_data_dir(getattr(args, "data_dir", None))
    if args.verify is not None:
        return _verify_models(data_dir, args.verify)
    installed = model_registry.list_installed(data_dir)
    if not installed:
        print(f"No models installed in {paths.models_dir(data_dir)}. "
              f"Try `{PROG} setup --demo` (small, quick) or `{PROG} setup --repo ID`.")
        return 0
    rows = [("NAME", "PARAMS", "DTYPE", "SIZE", "SOURCE")]
    for m in installed:
        if m.problem:
            rows.append((m.name, "-", "-", format_bytes(m.size_bytes), f"unusable: {m.problem}"))
        else:
            dtype = m.dtype + (f"+{m.quantization}" if m.quantization else "")
            rows.append((m.name, format_count(m.n_params), dtype, format_bytes(m.size_bytes), m.source or "-"))
    _print_table(rows)
    return 0


def _verify_models(data_dir: Path, name: str) -> int:
    """Hash every file of one installed model (or of all of them) against its manifest; one line per
    model on stdout, status 1 when one is damaged."""
    import model
    from chat_app.demo import DEMO_NAME

    installed = {m.name: m.path for m in model_registry.list_installed(data_dir)}  # usable or not
    if name:
        targets = [(name, installed[name] if name in installed else model_registry.resolve(data_dir, name))]
    else:
        targets = list(installed.items())
        if not targets:
            raise CliError(f"no models installed in {paths.models_dir(data_dir)}")
    damaged = 0
    for label, path in targets:
        started = time.monotonic()
        try:
            with StderrProgress() as status:
                model.verify(path, deep=True, on_progress=lambda fraction, what: status.show(
                    f"{label}: {what} {fraction:.0%}", key=what))
        except model.CheckpointError as e:
            damaged += 1
            remedy = f"; `{PROG} setup --demo` rebuilds it" if path.name == DEMO_NAME else ""
            print(f"{label}: DAMAGED: {e}{remedy}")
            continue
        size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
        print(f"{label}: ok ({format_bytes(size)} checked in {time.monotonic() - started:.1f} s)")
    return 1 if damaged else 0


def _print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])


# --- personas -----------------------------------------------------------------------------------
def _library(args: argparse.Namespace) -> PersonaLibrary:
    return PersonaLibrary(paths.personas_dir(paths.resolve_data_dir(getattr(args, "data_dir", None))))


def _personas_list(args: argparse.Namespace) -> int:
    library = _library(args)
    builtin_names = {p.name.casefold() for p in builtin_personas()}
    rows = [("NAME", "KIND", "TEMP", "TOP-P", "SYSTEM PROMPT")]
    for p in library.list():
        kind = "built-in" if p.builtin else "yours" if p.name.casefold() not in builtin_names else "yours (edited built-in)"
        prompt = " ".join(p.system_prompt.split())
        rows.append((p.name, kind, f"{p.temperature:g}", f"{p.top_p:g}", prompt[:60] + ("…" if len(prompt) > 60 else "")))
    _print_table(rows)
    for problem in library.problems:
        print(f"{PROG}: warning: {problem}", file=sys.stderr)
    return 0


def _personas_show(args: argparse.Namespace) -> int:
    print(_library(args).get(args.name).to_toml(), end="")
    return 0


def _personas_add(args: argparse.Namespace) -> int:
    library = _library(args)
    if any(p.name.casefold() == args.name.casefold() for p in library.list()):
        raise CliError(f"a persona named {args.name!r} already exists (change it with `{PROG} personas edit`)")
    persona = Persona(name=args.name, system_prompt=_system_prompt(args), **_sampling_changes(args))
    print(f"Saved persona {persona.name!r} in {library.save(persona)}")
    return 0


def _personas_edit(args: argparse.Namespace) -> int:
    library = _library(args)
    old = library.get(args.name)
    changes = _sampling_changes(args)
    if args.system_prompt is not None or args.system_prompt_file is not None:
        changes["system_prompt"] = _system_prompt(args)
    if args.rename:
        changes["name"] = args.rename
    if not changes:
        raise CliError("nothing to change: give --system-prompt, --system-prompt-file, --rename or a sampling option")
    new = dataclasses.replace(old, **changes)
    renamed = new.name.casefold() != old.name.casefold()
    if renamed and any(p.name.casefold() == new.name.casefold() for p in library.list()):
        raise CliError(f"a persona named {new.name!r} already exists")
    path = library.save(new)
    if renamed and not old.builtin:
        library.delete(old.name)
    print(f"Saved persona {new.name!r} in {path}")
    return 0


def _personas_rm(args: argparse.Namespace) -> int:
    library = _library(args)
    persona = library.get(args.name)
    library.delete(args.name)
    restored = any(p.name.casefold() == persona.name.casefold() for p in library.list())
    print(f"Deleted your copy of {persona.name!r}; the built-in one is back." if restored
          else f"Deleted persona {persona.name!r}.")
    return 0


def _personas_import(args: argparse.Namespace) -> int:
    persona = _library(args).import_toml(args.file, replace=args.replace)
    print(f"Imported persona {persona.name!r}")
    return 0


def _personas_export(args: argparse.Namespace) -> int:
    path = _library(args).export_toml(args.name, args.file, overwrite=args.force)
    print(f"Wrote {path}")
    return 0


def _sampling_changes(args: argparse.Namespace) -> dict:
    return {s: getattr(args, s) for s in SETTING_RULES if getattr(args, s) is not None}


def _system_prompt(args: argparse.Namespace) -> str:
    if args.system_prompt is not None:
        return args.system_prompt
    if str(args.system_prompt_file) == "-":
        return sys.stdin.read()
    try:
        return args.system_prompt_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CliError(f"cannot read the system prompt file {args.system_prompt_file}: {e}") from None
