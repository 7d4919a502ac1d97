"""Compiled programs kept on disk (model/executables.py): a warm start neither traces nor compiles the
model's programs, and a damaged cache is rebuilt without a word."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# One engine, one greedy turn, in a fresh process; prints what jax traced and compiled meanwhile.
TURN = r"""
import json, sys, jax
from jax._src import dispatch
events = {"trace": [], "lower": [], "compile": []}
names = {dispatch.JAXPR_TRACE_EVENT: "trace", dispatch.JAXPR_TO_MLIR_MODULE_EVENT: "lower",
         dispatch.BACKEND_COMPILE_EVENT: "compile"}
def listen(event, seconds, **kw):
    if event in names:
        events[names[event]].append(kw.get("fun_name", "?"))
jax.monitoring.register_event_duration_secs_listener(listen)
from model.engine import Engine
from model.engine_api import Compiling, SamplingParams, TextDelta
engine = Engine(sys.argv[1], mesh_shape=(1, 1), context_length=256, executable_cache=sys.argv[2])
before = {k: list(v) for k, v in events.items()}
turn = list(engine.generate("c", [{"role": "user", "content": "Hello there"}], SamplingParams(temperature=0, max_new_tokens=8)))
print(json.dumps({"text": "".join(e.text for e in turn if isinstance(e, TextDelta)),
                  "compiling": any(isinstance(e, Compiling) for e in turn),
                  "turn": {k: v[len(before[k]):] for k, v in events.items()}}))
"""


def run_turn(ckpt, cache) -> dict:
    done = subprocess.run([sys.executable, "-c", TURN, str(ckpt), str(cache)], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.slow
def test_warm_start_loads_programs_instead_of_tracing_them(tiny_ckpt, tmp_path):
    cold = run_turn(tiny_ckpt, tmp_path)
    assert cold["compiling"] and any("step" in name for name in cold["turn"]["compile"])
    saved = sorted(tmp_path.glob("*.executable"))
    assert len(saved) == 2  # one prefill bucket, the decode step

    warm = run_turn(tiny_ckpt, tmp_path)
    assert warm["text"] == cold["text"] and not warm["compiling"]
    # the model's programs were neither traced, lowered nor compiled
    for kind in ("trace", "lower", "compile"):
        assert not [name for name in warm["turn"][kind] if "step" in name], warm["turn"]

    # a damaged executable (cut short) and another one's bytes in its place: rebuilt silently
    saved[0].write_bytes(saved[0].read_bytes()[:1000])
    saved[1].write_bytes(b"not an executable")
    again = run_turn(tiny_ckpt, tmp_path)
    assert again["text"] == cold["text"]
    assert len([name for name in again["turn"]["compile"] if "step" in name]) == 2
    assert run_turn(tiny_ckpt, tmp_path)["turn"]["compile"] == warm["turn"]["compile"]  # and saved again


def test_idle_preparation_readies_every_program_smallest_first(tiny_ckpt, tmp_path):
    """What the app's worker does while idle: one program per call, until a turn of any length compiles
    nothing; the programs land in the executable cache."""
    from model.engine import Engine
    from model.generate import PREFILL_BUCKETS

    engine = Engine(tiny_ckpt, mesh_shape=(1, 1), context_length=600, executable_cache=tmp_path)
    assert engine.generator.will_compile(10, engine.capacity)
    assert engine.prepare_next()  # the smallest prefill bucket
    assert engine.prepare_next()  # the decode step: a short first message compiles nothing now
    assert not engine.generator.will_compile(10, engine.capacity)
    assert engine.generator.will_compile(100, engine.capacity)
    while engine.prepare_next():
        pass
    assert not engine.generator.will_compile(600, engine.capacity)
    assert len(list(tmp_path.glob("*.executable"))) == len(PREFILL_BUCKETS) + 1


def test_int4_weights_on_xla_run_without_the_executable_cache(tiny_hf, tmp_path):
    """jax refuses sub-byte arguments (int4 weights kept for XLA's matmuls when the CPU kernels are not
    used) to a program compiled through lower().compile(): such a model compiles as usual instead."""
    import jax
    import model
    from model.engine_api import SamplingParams
    from model.executables import ExecutableCache
    from model.generate import Generator
    from model.sampling import SamplingArrays

    ckpt = model.convert_hf(tiny_hf, tmp_path / "int4", quantize="int4")
    on_xla = model.load(ckpt, model.make_mesh((1, 1)), cpu_kernels=False)
    generator = Generator(on_xla, ExecutableCache(tmp_path / "executables"))
    assert generator.executables is None
    greedy, key = SamplingArrays.of(SamplingParams(temperature=0)), jax.random.key(0)
    token, cache = generator.prefill(generator.new_cache(64), [1, 415, 2936], generator.seen_mask([]), key, greedy)
    token, _, _ = generator.decode(cache, token, generator.seen_mask([]), key, greedy)
    assert 0 <= int(token[0]) < on_xla.config.vocab_size
    assert not list((tmp_path / "executables").glob("*.executable"))
