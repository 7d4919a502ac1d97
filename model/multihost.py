"""One model across several processes (hosts): JAX's multi-controller runtime.

Every process calls `join` first (`jax.distributed.initialize`), then builds the same `Engine` from the
same checkpoint on one mesh over all the processes' devices, and every process must then run the same
programs in the same order. Process 0, the driver, runs the app on a `DriverEngine`; every other
process, a follower, runs `follow`. The driver decides everything that must be the same everywhere and
sends it, in order, through JAX's coordination service (its key-value store): the prompt ids and the
sampling settings of each turn with its seed (drawn on the driver when the turn has none), whether to
stop (decided every `STOP_CHECK_TOKENS` tokens), which conversations to forget, and when to get the next
program ready in idle time. The followers' replies are thrown away: the driver's are the same.

Faults end every process with one line (`on_fatal`) instead of a hang: a follower that does not join
within `START_TIMEOUT_S` or stops sending signs of life for `PEER_TIMEOUT_S`, a follower started with
another checkpoint or mesh (refused by the driver at start), a driver that went away.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from .engine_api import ContextTrimmed, Event, SamplingParams
from .errors import UserError

START_TIMEOUT_S = 15  # the driver waits this long for every follower to join
FOLLOWER_START_TIMEOUT_S = 300  # a follower waits this long for the driver (followers usually start first)
PEER_TIMEOUT_S = 10  # a follower silent this long is taken for dead
HEARTBEAT_S = 1.0
STOP_CHECK_TOKENS = 4  # every process asks "stop?" after this many tokens of a turn (the driver answers)
CLOSE_WAIT_S = 60  # the driver waits this long for what runs to end before telling the followers to quit
_WAIT_MS = 60_000  # one wait for the driver's next command (waits repeat while the driver is idle)
_KEY = "mixtral-chat"


class MultihostError(UserError):
    """A process group that cannot run (bad options, a cluster that cannot be detected)."""


@dataclasses.dataclass(frozen=True)
class ProcessGroup:
    """What `--distributed` asked for: the coordinator (process 0's HOST:PORT, or "auto" to let JAX
    detect the cluster: TPU VMs, SLURM, ...) and this process's place."""

    coordinator: str
    num_processes: int | None = None
    process_id: int | None = None


def identity(ckpt_dir: Path, mesh_shape: tuple[int, int] | None, context_length: int | None) -> dict:
    """What must be the same on every process: the checkpoint's content (its manifest: file names and
    hashes, wherever it lies), the mesh and the context length asked for (`join` adds the devices)."""
    manifest = (Path(ckpt_dir) / "manifest.json").read_bytes()
    return {"checkpoint": f"{Path(ckpt_dir).name} ({hashlib.sha256(manifest).hexdigest()[:12]})",
            "mesh": "default" if mesh_shape is None else f"{mesh_shape[0]}x{mesh_shape[1]}",
            "context length": context_length or "default"}


def join(group: ProcessGroup, me: dict, on_fatal: Callable[[str], None]) -> Link:
    """`jax.distributed.initialize` (before anything else initialises jax), then the driver checks that
    every follower's `identity` equals its own. `on_fatal(message)` must end the process (it is called
    from a watchdog thread when another process fails); a mismatch ends this process through it too."""
    import jax
    from jax._src import distributed

    auto = group.coordinator == "auto"
    if group.process_id == 0:
        wait_s = START_TIMEOUT_S
        late = (f"not every one of the {group.num_processes} processes joined within {wait_s} s: start the others "
                "with the same --distributed and --num-processes and their own --process-id")
    else:  # a follower (or, with auto, a process JAX has not numbered yet)
        wait_s = FOLLOWER_START_TIMEOUT_S
        late = (f"the process group ({group.coordinator}) did not form within {wait_s} s: start process 0 "
                "and the others, or check the address and port")
    gave_up = threading.Timer(wait_s, lambda: on_fatal(late))
    gave_up.daemon = True
    gave_up.start()
    try:
        jax.distributed.initialize(None if auto else group.coordinator, group.num_processes, group.process_id,
                                   initialization_timeout=wait_s + 30, heartbeat_timeout_seconds=3 * PEER_TIMEOUT_S,
                                   shutdown_timeout_seconds=PEER_TIMEOUT_S)
    except (ValueError, RuntimeError) as e:  # auto: no cluster found; a bad address
        raise MultihostError(f"cannot start the process group: {e}") from None
    finally:
        gave_up.cancel()
    link = Link(distributed.global_state.client, jax.process_index(), jax.process_count(), on_fatal)
    link.agree({**me, "devices": jax.local_device_count()})
    return link


class Link:
    """This process's end of the driver's commands, through the coordination service's key-value store.
    Every key is written once per reader (`.../<follower id>/...`) and deleted by its reader."""

    def __init__(self, client, process_id: int, num_processes: int, on_fatal: Callable[[str], None]):
        self._client, self.process_id, self.num_processes = client, process_id, num_processes
        self._on_fatal = on_fatal
        self._followers = range(1, num_processes)
        self._sent = 0  # commands sent (driver) or received (follower): the current command's number
        self._running = threading.Lock()  # driver: held while every process runs a command (`together`)
        self._closed = False
        self._leaving = threading.Event()
        self._watch = threading.Thread(target=self._watch_followers if self.is_driver else self._beat,
                                       name="multihost-watch", daemon=True)
        self._watch.start()

    @property
    def is_driver(self) -> bool:
        return self.process_id == 0

    # --- start ---------------------------------------------------------------------------------
    def agree(self, me: dict) -> None:
        """The driver refuses (ending every process concerned) a follower whose identity differs."""
        late = f"a process did not answer within {START_TIMEOUT_S} s while starting"
        if not self.is_driver:
            self._client.key_value_set(f"{_KEY}/hello/{self.process_id}", json.dumps(me))
            verdict = self._get(f"{_KEY}/verdict/{self.process_id}", START_TIMEOUT_S * 1000, late)
            self._client.key_value_set(f"{_KEY}/verdict-read/{self.process_id}", "")
            if verdict:
                self._on_fatal(f"the driver (process 0) refused this process: {verdict}")
            return
        problems = []
        for follower in self._followers:
            theirs = json.loads(self._get(f"{_KEY}/hello/{follower}", START_TIMEOUT_S * 1000, late))
            differ = [f"{what} {theirs.get(what)} (the driver: {value})" for what, value in me.items()
                      if theirs.get(what) != value]
            if differ:
                problems.append(f"process {follower} was started with {', '.join(differ)}")
            self._client.key_value_set(f"{_KEY}/verdict/{follower}", problems[-1] if differ else "")
        for follower in self._followers:  # each reads its verdict before a refusing driver goes away
            self._get(f"{_KEY}/verdict-read/{follower}", START_TIMEOUT_S * 1000, late)
        if problems:
            time.sleep(1)  # and the refused end first: a driver gone before them would abort them
            self._on_fatal("; ".join(problems) + ": start every process with the same model, --mesh and "
                           "--context-length")

    # --- commands --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def together(self, command: dict) -> Iterator[int]:
        """Driver: send `command` to every follower and hold the group while this process runs it too
        (`close` waits); gives the command's number. After `close`: MultihostError."""
        with self._running:
            if self._closed:
                raise MultihostError("the other processes have quit")
            yield self._send(command)

    def _send(self, command: dict) -> int:
        self._sent += 1
        text = json.dumps(command)
        for follower in self._followers:
            self._client.key_value_set(f"{_KEY}/command/{follower}/{self._sent}", text)
        return self._sent

    def receive(self) -> tuple[int, dict]:
        """Follower: the driver's next command and its number (waits as long as the driver is idle)."""
        self._sent += 1
        return self._sent, json.loads(self._get(f"{_KEY}/command/{self.process_id}/{self._sent}", None))

    def stop_check(self, command: int, should_stop: Callable[[], bool] = lambda: False) -> StopCheck:
        """The `should_stop` of the turn sent as `command`, the same on every process."""
        return StopCheck(self, command, should_stop)

    def decide_stop(self, check: str, stop: bool) -> None:
        """Driver: the answer to the stop check named `check` (a turn's command number / token count)."""
        for follower in self._followers:
            self._client.key_value_set(f"{_KEY}/stop/{follower}/{check}", "1" if stop else "0")

    def stop_decided(self, check: str) -> bool:
        """Follower: the driver's answer to the stop check named `check`."""
        return self._get(f"{_KEY}/stop/{self.process_id}/{check}") == "1"

    def close(self) -> None:
        """Driver: once what runs has ended (a cancelled turn within a few tokens; a program being
        compiled in idle time: waited for up to CLOSE_WAIT_S), tell the followers to quit and leave the
        process group together. Past that wait the followers find process 0 gone."""
        if not self._running.acquire(timeout=CLOSE_WAIT_S):
            return
        self._closed = True
        self._send({"op": "quit"})
        self._running.release()
        self.leave()

    def leave(self) -> None:
        """Leave the process group with the others (the driver's `close`, a follower told to quit). The
        watch thread ends first: a thread inside the coordination client when the interpreter exits
        aborts the process."""
        import jax

        self._leaving.set()
        self._watch.join()
        jax.distributed.shutdown()

    # --- the store ----------------------------------------------------------------------------
    def _get(self, key: str, timeout_ms: int | None = None, late: str = "") -> str:
        """The value at `key` once it is set, deleted after reading (each reader has its own keys).
        `timeout_ms` None waits for ever; past it, this process ends saying `late`. A driver gone away
        ends this process too."""
        while True:
            try:
                value = self._client.blocking_key_value_get(key, timeout_ms or _WAIT_MS)
                break
            except Exception as e:  # noqa: BLE001 (jax raises JaxRuntimeError with the gRPC status)
                if "DEADLINE_EXCEEDED" not in str(e):
                    self._on_fatal("the driver (process 0) stopped; this process stops too")
                elif timeout_ms is not None:
                    self._on_fatal(late)
        self._client.key_value_delete(key)
        return value

    def outlive_watchdog(self) -> None:
        """Driver, after an unexpected error: wait until the watchdog would have found a dead follower
        (which may have caused it); it then ends the process with its own line."""
        time.sleep(PEER_TIMEOUT_S + 2 * HEARTBEAT_S)

    def _beat(self) -> None:
        """Follower: a sign of life every HEARTBEAT_S."""
        beats = 0
        while not self._leaving.is_set():
            beats += 1
            try:
                self._client.key_value_set(f"{_KEY}/alive/{self.process_id}", str(beats), allow_overwrite=True)
            except Exception:  # noqa: BLE001 (the driver went away: the command loop reports it)
                return
            self._leaving.wait(HEARTBEAT_S)

    def _watch_followers(self) -> None:
        """Driver: end every process when a follower has shown no sign of life for PEER_TIMEOUT_S."""
        last = {f: (None, time.monotonic()) for f in self._followers}
        while not self._leaving.wait(HEARTBEAT_S):
            for follower, (beat, since) in last.items():
                try:
                    now_beat = self._client.key_value_try_get(f"{_KEY}/alive/{follower}")
                except Exception:  # noqa: BLE001 (NOT_FOUND before its first beat)
                    now_beat = None
                if now_beat != beat:
                    last[follower] = (now_beat, time.monotonic())
                elif time.monotonic() - since > PEER_TIMEOUT_S:
                    self._on_fatal(f"process {follower} stopped responding (no sign of life for {PEER_TIMEOUT_S} s); "
                                   "every process stops")
                    return


class StopCheck:
    """A turn's `should_stop` that answers the same on every process: only every STOP_CHECK_TOKENS-th
    call (one call per token) asks anything; the driver asks its own `should_stop` and sends the answer,
    a follower waits for it."""

    def __init__(self, link: Link, command: int, should_stop: Callable[[], bool]):
        self._link, self._command, self._should_stop = link, command, should_stop
        self._calls = 0
        self.forced = False  # the driver stops at the next check whatever `should_stop` says

    def __call__(self) -> bool:
        self._calls += 1
        if self._calls % STOP_CHECK_TOKENS:
            return False
        check = f"{self._command}/{self._calls}"
        if not self._link.is_driver:
            return self._link.stop_decided(check)
        stop = self.forced or self._should_stop()
        self._link.decide_stop(check, stop)
        return stop


class DriverEngine:
    """The driver's engine (a `ChatEngine`): every call that runs programs is sent to the followers,
    then run here."""

    def __init__(self, engine, link: Link):
        self.engine, self.link = engine, link
        self.model_name, self.context_limit = engine.model_name, engine.context_limit
        self.device_summary = engine.device_summary

    def generate(self, conversation_id: str, messages: list[dict], sampling: SamplingParams,
                 should_stop: Callable[[], bool] = lambda: False) -> Iterator[Event]:
        from .engine import with_seed

        prompt, dropped = self.engine.plan_turn(messages, sampling)
        sampling = with_seed(sampling)
        if dropped:
            yield ContextTrimmed(dropped)
        with self.link.together({"op": "reply", "conversation_id": conversation_id, "prompt": prompt,
                                 "sampling": dataclasses.asdict(sampling)}) as command:
            stop = self.link.stop_check(command, should_stop)
            events = self.engine.reply(conversation_id, prompt, sampling, stop)
            try:
                for event in events:
                    yield event
            except GeneratorExit:  # the caller stopped listening: the followers still run up to the next check
                stop.forced = True
                for _ in events:
                    pass
                raise

    def count_tokens(self, messages: list[dict]) -> int:
        return self.engine.count_tokens(messages)

    def forget(self, conversation_id: str) -> None:
        with self.link.together({"op": "forget", "conversation_id": conversation_id}):
            self.engine.forget(conversation_id)

    def prepare_next(self) -> bool:
        with self.link.together({"op": "prepare_next"}):
            return self.engine.prepare_next()

    def warm_up(self) -> None:
        with self.link.together({"op": "warm_up"}):
            self.engine.warm_up()


def follow(engine, link: Link) -> None:
    """A follower's life: run the driver's commands on `engine` (an Engine like the driver's) until it
    says quit."""
    while True:
        command_number, command = link.receive()
        op = command["op"]
        if op == "reply":
            stop = link.stop_check(command_number)
            for _ in engine.reply(command["conversation_id"], command["prompt"], SamplingParams(**command["sampling"]),
                                  stop):
                pass
        elif op == "forget":
            engine.forget(command["conversation_id"])
        elif op == "prepare_next":
            try:
                engine.prepare_next()
            except Exception:  # noqa: BLE001 (as on the driver: a turn that needs that program reports it)
                pass
        elif op == "warm_up":
            engine.warm_up()
        elif op == "quit":
            link.leave()
            return
