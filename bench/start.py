"""From launch to the first reply token, on the demo model: ours cold and warm, transformers and llama.cpp.

    python -m bench.start                  # float32 and int4 demo checkpoints, 3 warm runs each
    python -m bench.start --weights int4 --runs 5

Each run is a fresh process answering one question, timed from the process start to the first byte of
the reply on stdout:
- ours, cold: `mixtral-chat --model CKPT --headless` with an empty executable cache (it loads, traces
  and compiles); warm: the same again, the best of `--runs` (the programs come from the executable
  cache). Ours also reports where the time up to the first token went, measured inside the process
  (`--split`): imports, the engine's load (weights, tokenizer), waiting for programs (deserialized, or
  traced + compiled), tracing and lowering, compiling, and the rest of the turn (prefill);
- transformers on the same weights (our checkpoint exported to a Hugging Face folder): load + first token;
- llama.cpp (llama-cpp-python, when installed) on the GGUF the demo is built from: load + first token.
Results go to bench/results/start.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUESTION = "What is the capital of France?"
RESULTS = Path(__file__).with_name("results")
TRANSFORMERS = r"""
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
hf = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
ids = tok.apply_chat_template([{"role": "user", "content": sys.argv[2]}], add_generation_prompt=True, return_tensors="pt")
ids = ids if torch.is_tensor(ids) else ids["input_ids"]
with torch.no_grad():
    out = hf.generate(ids, max_new_tokens=1, do_sample=False)
sys.stdout.write(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True) or "?")
sys.stdout.flush()
"""
LLAMA_CPP = r"""
import sys
from llama_cpp import Llama
llm = Llama(sys.argv[1], n_ctx=4096, verbose=False)
for chunk in llm.create_chat_completion([{"role": "user", "content": sys.argv[2]}], temperature=0, max_tokens=8, stream=True):
    text = chunk["choices"][0]["delta"].get("content")
    if text:
        sys.stdout.write(text)
        sys.stdout.flush()
"""


def first_byte_seconds(argv: list[str], env: dict, stdin: str = "") -> tuple[float, str, str]:
    """Seconds from starting `argv` to its first byte on stdout; what it printed on stdout and stderr."""
    start = time.perf_counter()
    process = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    process.stdin.write(stdin)
    process.stdin.close()
    first = process.stdout.read(1)
    seconds = time.perf_counter() - start
    rest = process.stdout.read()
    err = process.stderr.read()
    process.wait(600)
    if process.returncode != 0:
        raise RuntimeError(err)
    return seconds, first + rest, err


def split_child(argv: list[str]) -> None:
    """Run the CLI in this process, timing its phases; prints them as one JSON line on stderr at exit."""
    import atexit

    started = time.perf_counter()
    import jax
    from jax._src import dispatch

    sums = {"trace": 0.0, "compile": 0.0}
    kinds = {dispatch.JAXPR_TRACE_EVENT: "trace", dispatch.JAXPR_TO_MLIR_MODULE_EVENT: "trace",
             dispatch.BACKEND_COMPILE_EVENT: "compile"}

    def listen(event, seconds, **kw):
        if event in kinds:
            sums[kinds[event]] += seconds

    jax.monitoring.register_event_duration_secs_listener(listen)
    from model import engine, executables

    marks: dict[str, float] = {}
    waits = [0.0]
    at_first: dict[str, float] = {}  # waits and sums when the first token was written

    def timed_init(original):
        def init(self, *args, **kw):
            marks["engine"] = time.perf_counter()
            original(self, *args, **kw)
            marks["loaded"] = time.perf_counter()
        return init

    def timed_get(original):
        def get(self, *args, **kw):
            start = time.perf_counter()
            try:
                return original(self, *args, **kw)
            finally:
                waits[0] += time.perf_counter() - start
        return get

    engine.Engine.__init__ = timed_init(engine.Engine.__init__)
    executables.ExecutableCache.get = timed_get(executables.ExecutableCache.get)

    class FirstByte:
        def __init__(self, stream):
            self.stream = stream

        def write(self, text):
            if text.strip() and "first" not in marks:  # what happened up to the first token
                marks["first"] = time.perf_counter()
                at_first.update(waits=waits[0], **sums)
            return self.stream.write(text)

        def __getattr__(self, name):
            return getattr(self.stream, name)

    def report():
        first = marks.get("first", time.perf_counter())
        done = at_first or {"waits": waits[0], **sums}
        split = {"imports": marks["engine"] - started, "load": marks["loaded"] - marks["engine"],
                 "programs": done["waits"], "trace": done["trace"], "compile": done["compile"],
                 "turn": first - marks["loaded"] - done["waits"]}
        print("SPLIT " + json.dumps(split), file=sys.stderr, flush=True)

    atexit.register(report)
    sys.stdout = FirstByte(sys.stdout)
    from chat_app import cli

    sys.exit(cli.main(argv))


def checkpoints(weights: list[str]) -> tuple[Path, dict[str, Path]]:
    """(the float32 demo as a Hugging Face Mixtral folder, for transformers; our demo checkpoint of each
    `weights`), built once in the bench cache as the demo is (from its GGUF: the user's download, or
    fetched as `mixtral-chat --demo` does). Ours are converted from the dense folder, not from the
    export: a Mixtral folder would get Mixtral's chat format instead of the demo's ChatML template."""
    import model
    from bench.run import CACHE
    from chat_app import demo, paths
    from model.gguf_import import gguf_to_hf

    root = CACHE / "start"
    dense = root / "dense"
    if not (dense / "config.json").exists():
        gguf_to_hf(demo.demo_gguf(paths.downloads_dir(paths.resolve_data_dir())), dense)
    ours = {}
    for w in dict.fromkeys(["float32", *weights]):
        ckpt = root / f"ours-{w}"
        if not ckpt.exists():
            model.convert_hf(dense, ckpt, dtype="bfloat16" if w == "bfloat16" else "float32",
                             quantize=w if w in ("int8", "int4") else None, upcycle_experts=demo.UPCYCLE_EXPERTS)
        ours[w] = ckpt
    hf_dir = root / "hf"
    if not (hf_dir / "config.json").exists():
        model.export_hf(ours["float32"], hf_dir)
    return hf_dir, {w: ours[w] for w in weights}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.start", description=__doc__.splitlines()[0])
    parser.add_argument("--weights", nargs="+", default=["float32", "int4"], choices=["float32", "bfloat16", "int8", "int4"])
    parser.add_argument("--runs", type=int, default=3, help="warm runs (the best is kept)")
    parser.add_argument("--split", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)  # the timed child
    args = parser.parse_args(argv)
    if args.split is not None:
        split_child(args.split)
    from bench import gguf_peer

    hf_dir, ours = checkpoints(args.weights)
    rows = []
    for weights, ckpt in ours.items():
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "XDG_CACHE_HOME": cache}
            cli = [sys.executable, "-m", "bench.start", "--split", "--model", str(ckpt), "--headless",
                   "--temperature", "0", "--no-save", "--max-new-tokens", "8"]
            for run in ["cold"] + ["warm"] * args.runs:
                seconds, text, err = first_byte_seconds(cli, env, QUESTION + "\n")
                if not text.strip():  # its first byte was the end of an empty reply: not a first token
                    raise RuntimeError(f"{ckpt} gave an empty reply")
                split = json.loads(next(line for line in err.splitlines() if line.startswith("SPLIT "))[6:])
                rows.append({"engine": "ours", "weights": weights, "run": run, "seconds": seconds, "split": split,
                             "reply": text.strip()})
    peers = [("transformers", "float32", [sys.executable, "-c", TRANSFORMERS, str(hf_dir), QUESTION])]
    if gguf_peer.available():
        from chat_app import demo, paths

        gguf = demo.demo_gguf(paths.downloads_dir(paths.resolve_data_dir()))
        peers.append(("llama.cpp", "Q4_1 (the demo's GGUF)", [sys.executable, "-c", LLAMA_CPP, str(gguf), QUESTION]))
    else:
        print("llama.cpp: llama-cpp-python is not installed (pip install llama-cpp-python); not measured")
    for engine, weights, argv in peers:
        for run in ["cold"] + ["warm"] * args.runs:
            seconds, text, _ = first_byte_seconds(argv, dict(os.environ))
            rows.append({"engine": engine, "weights": weights, "run": run, "seconds": seconds, "reply": text.strip()})
    print(table(rows))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "start.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


def table(rows: list[dict]) -> str:
    """One line per engine and weights: cold, best warm, and ours' split of each."""
    lines = ["| engine | weights | cold (s) | warm, best (s) | cold split | warm split |", "|---|---|---|---|---|---|"]
    for key in dict.fromkeys((r["engine"], r["weights"]) for r in rows):
        runs = [r for r in rows if (r["engine"], r["weights"]) == key]
        cold = next(r for r in runs if r["run"] == "cold")
        warm = min((r for r in runs if r["run"] == "warm"), key=lambda r: r["seconds"], default=cold)
        lines.append(f"| {key[0]} | {key[1]} | {cold['seconds']:.2f} | {warm['seconds']:.2f} | "
                     f"{describe(cold.get('split'))} | {describe(warm.get('split'))} |")
    return "\n".join(lines)


def describe(split: dict | None) -> str:
    if not split:
        return ""
    return ", ".join(f"{name} {seconds:.2f}" for name, seconds in split.items())


if __name__ == "__main__":
    sys.exit(main())
