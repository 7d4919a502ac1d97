"""Compiled programs kept on disk (model/executables.py): a warm start neither traces nor compiles the
model's programs, and a damaged cache is rebuilt without a word."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from model.engine_api import SamplingParams, TextDelta

REPO = Path(__file__).resolve().parent.parent

# In a fresh process: one engine (which prepares `prepare` programs, as the app's worker does while idle),
# then one greedy turn on `messages`; prints what jax traced, lowered and compiled during each phase.
TURN = r"""
import json, sys, jax
from jax._src import dispatch
spec = json.loads(sys.stdin.read())
events = []
names = {dispatch.JAXPR_TRACE_EVENT: "trace", dispatch.JAXPR_TO_MLIR_MODULE_EVENT: "lower",
         dispatch.BACKEND_COMPILE_EVENT: "compile"}
def listen(event, seconds, **kw):
    if event in names:
        events.append((names[event], kw.get("fun_name", "?")))
jax.monitoring.register_event_duration_secs_listener(listen)
from model.engine import Engine
from model.engine_api import Compiling, SamplingParams, TextDelta, TurnDone
engine = Engine(sys.argv[1], mesh_shape=(1, 1), context_length=600, executable_cache=sys.argv[2])
for _ in range(spec.get("prepare", 0)):
    engine.prepare_next()
start = list(events)
turn = list(engine.generate("c", spec["messages"], SamplingParams(temperature=0, max_new_tokens=8)))
done = next(e for e in turn if isinstance(e, TurnDone))
phases = {"start": start, "turn": events[len(start):]}
print(json.dumps({"text": "".join(e.text for e in turn if isinstance(e, TextDelta)),
                  "compiling": any(isinstance(e, Compiling) for e in turn),
                  "prompt_tokens": done.prompt_tokens, "prefilled_tokens": done.prefilled_tokens,
                  **{phase: {kind: [name for k, name in found if k == kind] for kind in names.values()}
                     for phase, found in phases.items()}}))
"""
HELLO = [{"role": "user", "content": "Hello there"}]


def run_turn(ckpt, cache, messages=HELLO, prepare: int = 0) -> dict:
    done = subprocess.run([sys.executable, "-c", TURN, str(ckpt), str(cache)], cwd=REPO, capture_output=True,
                          input=json.dumps({"messages": messages, "prepare": prepare}), text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def nothing_built(run: dict) -> bool:
    """Nothing traced, lowered or compiled, from the process start to the end of the turn."""
    return not any(run[phase][kind] for phase in ("start", "turn") for kind in ("trace", "lower", "compile"))


@pytest.mark.slow
def test_warm_start_loads_programs_instead_of_tracing_them(tiny_ckpt, tmp_path):
    cold = run_turn(tiny_ckpt, tmp_path)
    assert cold["compiling"] and any("step" in name for name in cold["turn"]["compile"])
    saved = sorted(tmp_path.glob("*.executable"))
    assert len(saved) == 2  # one prefill bucket, the decode step

    warm = run_turn(tiny_ckpt, tmp_path)
    assert warm["text"] == cold["text"] and not warm["compiling"]
    # neither the model's programs nor anything around them (the cache, the seed, the loading) was
    # traced, lowered or compiled
    assert nothing_built(warm), warm

    # a damaged executable (cut short) and another one's bytes in its place: rebuilt silently
    saved[0].write_bytes(saved[0].read_bytes()[:1000])
    saved[1].write_bytes(b"not an executable")
    again = run_turn(tiny_ckpt, tmp_path)
    assert again["text"] == cold["text"]
    assert len([name for name in again["turn"]["compile"] if "step" in name]) == 2
    assert nothing_built(run_turn(tiny_ckpt, tmp_path))  # and saved again

    # a program saved for parameters laid out otherwise (a key that failed to tell them apart): rebuilt
    layout, *program = pickle.loads(saved[0].read_bytes())
    saved[0].write_bytes(pickle.dumps(("another layout", *program)))
    stale = run_turn(tiny_ckpt, tmp_path)
    assert stale["text"] == cold["text"]
    assert len([name for name in stale["turn"]["compile"] if "step" in name]) == 1
    assert pickle.loads(saved[0].read_bytes())[0] == layout


@pytest.mark.slow
def test_resumed_conversation_compiles_nothing_a_new_one_did_not(tiny_ckpt, tmp_path):
    """A conversation continued after a restart prefills its whole history at once, in chunks of the
    programs the earlier session prepared, instead of compiling the bucket its length would pick."""
    from model.generate import PREFILL_BUCKETS, READY_CHUNK_MIN

    prepared = 2 + PREFILL_BUCKETS.index(READY_CHUNK_MIN)  # a short idle time: that bucket, decode, the smaller ones
    first = run_turn(tiny_ckpt, tmp_path, prepare=prepared)
    history = HELLO + [{"role": "assistant", "content": first["text"]},
                       {"role": "user", "content": " ".join(["tell me more about that"] * 40)},
                       {"role": "assistant", "content": "Well, " * 30},
                       {"role": "user", "content": "And then?"}]
    resumed = run_turn(tiny_ckpt, tmp_path, history)
    assert resumed["prompt_tokens"] > READY_CHUNK_MIN * 2  # several chunks (its own bucket was not prepared)
    assert resumed["prefilled_tokens"] == resumed["prompt_tokens"]  # the whole history, once
    assert not resumed["compiling"] and nothing_built(resumed), resumed
    assert len(list(tmp_path.glob("*.executable"))) == prepared  # no new program


def test_idle_preparation_readies_every_program_the_64_token_prefill_first(tiny_ckpt, tmp_path):
    """What the app's worker does while idle: one program per call, until a turn of any length compiles
    nothing; the programs land in the executable cache. The first is the 64-token prefill: with it, a
    first message of any length gets its first token without compiling, the decode step comes next."""
    from model.engine import Engine
    from model.generate import PREFILL_BUCKETS, program_name

    engine = Engine(tiny_ckpt, mesh_shape=(1, 1), context_length=600, executable_cache=tmp_path)
    assert engine.generator.will_compile(10, engine.capacity)
    assert engine.prepare_next()  # the 64-token prefill
    for tokens in (10, 100, 600):
        prefills = engine.generator.turn_programs(tokens, engine.capacity)[:-1]
        assert prefills == [program_name("prefill 64", capacity=engine.capacity)]
    assert engine.generator.will_compile(10, engine.capacity)  # (the decode step)
    assert engine.prepare_next()  # the decode step: a message of any length compiles nothing now
    assert not engine.generator.will_compile(10, engine.capacity)
    assert not engine.generator.will_compile(600, engine.capacity)
    while engine.prepare_next():
        pass
    assert not engine.generator.will_compile(600, engine.capacity)
    engine.generator.executables.wait()  # (programs are saved in the background)
    assert len(list(tmp_path.glob("*.executable"))) == len(PREFILL_BUCKETS) + 1


def test_a_start_loads_first_the_programs_the_last_first_turn_ran(tiny_ckpt, tmp_path):
    """The cache keeps which programs a start's first turn ran; the next start deserializes their
    prefills while its weights load, and the decode step once the first turn's prefill is done (a start
    with no record: the decode step while the weights load). A damaged record is ignored and written
    again."""
    from model.engine import Engine
    from model.executables import FIRST_TURN_SUFFIX, ExecutableCache

    def start() -> Engine:
        return Engine(tiny_ckpt, mesh_shape=(1, 1), context_length=600, executable_cache=tmp_path)

    def turn(engine: Engine, conversation: str, messages: list[dict]) -> None:
        list(engine.generate(conversation, messages, SamplingParams(temperature=0, max_new_tokens=2)))

    long_message = [{"role": "user", "content": " ".join(["tell me more about that"] * 8)}]
    engine = start()
    turn(engine, "a", long_message)
    ran = engine.generator.turn_programs(len(engine._encode(long_message)), engine.capacity)
    assert ran[0].startswith("prefill") and ran[-1].startswith("decode")
    turn(engine, "b", HELLO)  # a later turn (a smaller bucket) changes nothing
    cache = engine.generator.executables
    assert cache.first_turn() == ran

    engine = start()
    loading = engine.generator.executables._loading  # what the next start deserializes, in order
    assert list(loading) == ran[:-1]
    events = engine.generate("d", HELLO, SamplingParams(temperature=0, max_new_tokens=2))
    next(events)  # the first token (the prefill is done): the decode step loads, or has been loaded
    assert ran[-1] in loading or ran[-1] in engine.generator._loaded
    list(events)

    record = next(tmp_path.glob(f"*{FIRST_TURN_SUFFIX}"))
    record.write_text('{"not": "a list"')
    assert ExecutableCache(tmp_path, cache.model, cache.devices).first_turn() == []
    engine = start()
    assert list(engine.generator.executables._loading) == ran[-1:]  # the decode step alone
    turn(engine, "c", HELLO)
    assert engine.generator.executables.first_turn() == engine.generator.turn_programs(
        len(engine._encode(HELLO)), engine.capacity)  # recorded again


def test_a_warm_start_builds_no_model_until_a_program_must_be_traced(tiny_ckpt, tmp_path):
    """A start keeps, beside its programs, how its model made each array; the next start makes them so
    without building the model, answers the same, and builds it only for a program not in the cache. A
    damaged record is ignored and written again."""
    from model.engine import Engine
    from model.executables import WEIGHTS_PLAN_SUFFIX

    def start() -> Engine:
        return Engine(tiny_ckpt, mesh_shape=(1, 1), context_length=600, executable_cache=tmp_path)

    def reply(engine: Engine, conversation: str, messages: list[dict]) -> str:
        events = engine.generate(conversation, messages, SamplingParams(temperature=0, max_new_tokens=4))
        return "".join(e.text for e in events if isinstance(e, TextDelta))

    cold = start()
    answer = reply(cold, "a", HELLO)
    warm = start()
    assert warm.generator._model_def is None  # no model built
    assert reply(warm, "a", HELLO) == answer and warm.generator._model_def is None
    long_message = [{"role": "user", "content": " ".join(["tell me more about that"] * 8)}]
    assert reply(warm, "b", long_message) == reply(cold, "b", long_message)  # a new bucket: built for it
    assert warm.generator._model_def is not None

    plan = next(tmp_path.glob(f"*{WEIGHTS_PLAN_SUFFIX}"))
    plan.write_text('[{"name": "embed"}]')
    damaged = start()
    assert damaged.generator._model_def is not None and reply(damaged, "a", HELLO) == answer
    assert start().generator._model_def is None  # recorded again


def test_int4_weights_on_xla_run_without_the_executable_cache(tiny_hf, tmp_path):
    """jax refuses sub-byte arguments (int4 weights kept for XLA's matmuls when the CPU kernels are not
    used) to a program compiled through lower().compile(): such a model compiles as usual instead."""
    import model
    from model.executables import ExecutableCache, model_key
    from model.generate import Generator

    ckpt = model.convert_hf(tiny_hf, tmp_path / "int4", quantize="int4")
    on_xla = model.load(ckpt, model.make_mesh((1, 1)), cpu_kernels=False)
    cache = ExecutableCache(tmp_path / "executables", model_key(on_xla.config.to_json(), on_xla.mesh),
                            list(on_xla.mesh.devices.flat))
    generator = Generator(on_xla, cache)
    assert generator.executables is None
    assert generator.greedy([1, 415, 2936], 3) == Generator(on_xla).greedy([1, 415, 2936], 3)
    assert not list((tmp_path / "executables").glob("*.executable"))
