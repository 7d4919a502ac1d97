"""Speed of our engine against Hugging Face transformers and llama.cpp on the same weights, in one run.

    python -m bench.run                      # demo + mini-mixtral, float32: a table, and bench/results/latest-float32.json
    python -m bench.run --configs mini --dtype bfloat16
    python -m bench.run --configs mini --quantize int4     # against llama.cpp's Q4_1 (int8: Q8_0)
    python -m bench.run --configs mini --quantize int4 --start   # and launch to first token (bench/start.py)

llama.cpp runs through llama-cpp-python when it is installed (bench/gguf_peer.py), on the matching type
(F32, BF16, Q8_0, Q4_1); transformers only unquantized. For each config and
engine a fresh worker process measures (batch 1, greedy):
- decode tokens/s (128 tokens after a 32-token prompt) in ROUNDS rounds, the engines taking turns, ours
  between the peers (this machine's memory speed swings by up to 1.5x within seconds, so engines
  measured apart are not comparable): the median round, and ours / each peer as the median of the
  rounds' ratios, each of two runs made one after the other,
- prefill tokens/s of a 512-token prompt,
- time to first token of a 64-token prompt,
- compile time of a new conversation (ours: the 64-token prefill bucket and the decode step, cold),
- peak resident memory of the process,
and for ours, time to first token at turn 20 vs turn 1 of a conversation of equal-length turns, against
re-prefilling the whole history every turn. The bandwidth ceiling is this machine's measured read
bandwidth divided by the bytes one decoded token reads (active weights + KV cache). `--start` adds, on
the demo with the same weights, launch to first token cold and warm for ours, transformers and llama.cpp
(`bench/start.py`, which runs it alone too).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import model
from bench import gguf_peer
from bench.bandwidth import read_bandwidth

CACHE = Path(os.environ.get("MIXTRAL_CHAT_BENCH_CACHE", Path.home() / ".cache" / "mixtral-chat-bench"))
RESULTS = Path(__file__).parent / "results"
MINI_MIXTRAL = dict(hidden_size=1024, intermediate_size=3584, num_hidden_layers=8, num_attention_heads=16,
                    num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000)
PROMPT, DECODE, PREFILL, TTFT_PROMPT, TURNS = 32, 128, 512, 64, 20
ROUNDS = 16  # of decode, the engines taking turns (the median of 8 moved ~5% between runs: see the README)


# --- models ----------------------------------------------------------------------------------------

def weights_name(dtype: str, quantize: str | None) -> str:
    """float32, bfloat16, int8 or int4: what a run measures (quantized weights keep the model dtype's
    activations)."""
    return quantize or dtype


def prepare(config: str, dtype: str, quantize: str | None) -> tuple[Path, Path]:
    """(HF folder, our checkpoint) of a bench config, built once and kept in CACHE."""
    root = CACHE / config
    hf_dir, ours = root / "hf", root / (f"ours-{dtype}" + (f"-{quantize}" if quantize else ""))
    if config == "mini":
        if not (hf_dir / "config.json").exists():
            sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
            from tiny_model import build_hf_mixtral

            build_hf_mixtral(hf_dir, seed=0, max_shard_size="4GB", **MINI_MIXTRAL)
        if not ours.exists():
            model.convert_hf(hf_dir, ours, dtype=dtype, quantize=quantize)
    else:  # the demo: SmolLM2 upcycled to 4 experts; transformers runs our weights exported back to HF
        from chat_app.demo import ensure_demo

        demo = ensure_demo(root / "data")
        hf_dir = root / "exported"
        if not (hf_dir / "config.json").exists():
            model.export_hf(demo, hf_dir)
        built = model.MixtralConfig.load(demo / "config.json")  # int4 where the CPU kernels load, else float32
        if (built.dtype, built.quantization) == (dtype, quantize):
            return hf_dir, demo
        if not ours.exists():
            model.convert_hf(hf_dir, ours, dtype=dtype, quantize=quantize)
    return hf_dir, ours


# --- workers (each in its own process) -------------------------------------------------------------

def _best(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


class Greedy:
    """Our engine on a checkpoint (one device, one row, greedy) and the prefill and decode every figure of
    ours times (worker_ours, bench/kernels_ab.py), on one random prompt of PREFILL tokens."""

    def __init__(self, ckpt: Path):
        import numpy as np

        from model.engine import Engine
        from model.engine_api import SamplingParams
        from model.sampling import SamplingArrays

        self.engine = Engine(ckpt, mesh_shape=(1, 1))
        self.gen = self.engine.generator
        self.sampling, self.seed = SamplingArrays.of(SamplingParams(temperature=0)), self.gen.seed(0)
        self.ids = np.random.default_rng(0).integers(3, self.engine.config.vocab_size, PREFILL).tolist()

    def prefill(self, n: int):
        """The first n tokens of the prompt into a fresh cache -> (next token, cache, seen), done."""
        cache, seen = self.gen.new_cache(self.engine.capacity), self.gen.seen_mask([])
        token, cache = self.gen.prefill(cache, self.ids[:n], seen, self.seed, self.sampling)
        token.block_until_ready()
        return token, cache, seen

    def step(self, token, cache, seen):
        """One decode call (as the engine makes them: `tokens_per_call` tokens) -> (its last token, cache,
        seen)."""
        _, token, cache, seen = self.gen.decode(cache, token, seen, self.seed, 1, self.sampling)
        return token, cache, seen

    def decode_seconds(self, step: Callable | None = None) -> float:
        """Seconds of DECODE tokens after a PROMPT-token prompt, the prompt not timed; made by decode calls
        step(token, cache, seen) -> (token, cache, seen) of `tokens_per_call` tokens each (default: `self.step`)."""
        step = step or self.step
        token, cache, seen = self.prefill(PROMPT)
        start = time.perf_counter()
        for _ in range(DECODE // self.gen.tokens_per_call):
            token, cache, seen = step(token, cache, seen)
        token.block_until_ready()
        return time.perf_counter() - start


def worker_ours(hf_dir: Path, ckpt: Path, turns: bool = True) -> tuple[dict, Callable[[], dict]]:
    import jax

    compile_s = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, seconds, **kw: compile_s.append(seconds) if event.startswith("/jax/core/compile/") else None)
    from model.engine_api import SamplingParams

    ours = Greedy(ckpt)
    engine = ours.engine

    # a new conversation: the bucket of its first prompt and the decode step, compiled cold
    compile_s.clear()
    token, _, _ = ours.step(*ours.prefill(TTFT_PROMPT))
    token.block_until_ready()
    new_conversation_compile_s = sum(compile_s)

    # every program compiled, as the app's idle preparation leaves them (else a prefill runs in chunks of
    # the largest bucket ready: generate.chunk_buckets)
    engine.warm_up()
    ttft = _best(lambda: ours.prefill(TTFT_PROMPT))
    prefill_s = _best(lambda: ours.prefill(PREFILL))
    ours.decode_seconds()  # (untimed: the decode rounds come later)

    # time to first token along a conversation: kept cache vs re-prefilling the history
    ttft_turns = {}
    for mode in ("kept cache", "re-prefill") if turns else ():
        messages, firsts = [], []
        for turn in range(TURNS):
            messages.append({"role": "user", "content": f"Turn {turn}: " + "tell me about the sea " * 6})
            if mode == "re-prefill":
                engine.forget(mode)
            *_, done = engine.generate(mode, messages, SamplingParams(temperature=0, max_new_tokens=24))
            firsts.append(done.time_to_first_token_s)
            messages.append({"role": "assistant", "content": done.text or "ok"})
        ttft_turns[mode] = {"turn_1_s": firsts[0], "turn_20_s": firsts[-1], "ratio": firsts[-1] / firsts[0],
                            "context_tokens": done.context_used}
    return {"prefill_tok_s": PREFILL / prefill_s, "ttft_s": ttft, "ttft_by_turn": ttft_turns,
            "compile_new_conversation_s": new_conversation_compile_s}, lambda: decode_round(ours.decode_seconds)


def decode_round(decode: Callable[[], float]) -> dict:
    """One round of decode: this machine's read bandwidth just before, and tok/s of `decode()` (seconds of
    DECODE tokens)."""
    bandwidth = read_bandwidth()
    return {"decode_tok_s": DECODE / decode(), "bandwidth_bytes_per_s": bandwidth}


def _peer_timings(generate: Callable[[int, int], None], prefill: Callable[[], None]) -> tuple[dict, Callable[[], dict]]:
    """A peer engine's figures and its decode round, from `generate(prompt_tokens, new_tokens)` (greedy,
    fresh each call) and `prefill()` (the PREFILL-token prompt): a decode takes the time of DECODE + 1 new
    tokens minus that of 1."""
    generate(PROMPT, 4)  # warm up
    prefill_s = _best(prefill)
    ttft = _best(lambda: generate(TTFT_PROMPT, 1))

    def decode() -> float:
        start = time.perf_counter()
        generate(PROMPT, 1)
        one = time.perf_counter() - start
        generate(PROMPT, DECODE + 1)
        return time.perf_counter() - start - 2 * one

    return {"prefill_tok_s": PREFILL / prefill_s, "ttft_s": ttft}, lambda: decode_round(decode)


def worker_hf(hf_dir: Path, ckpt: Path) -> tuple[dict, Callable[[], dict]]:
    import torch
    from transformers import AutoModelForCausalLM

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[model.verify(ckpt).dtype]
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).eval()
    vocab = hf.config.vocab_size
    ids = torch.randint(3, vocab, (1, PREFILL), generator=torch.Generator().manual_seed(0))

    def generate(prompt: int, new: int):
        with torch.no_grad():
            hf.generate(ids[:, :prompt], max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)

    def prefill():
        with torch.no_grad():
            hf(ids)

    return _peer_timings(generate, prefill)


def worker_llama_cpp(hf_dir: Path, ckpt: Path) -> tuple[dict, Callable[[], dict]]:
    import numpy as np
    from llama_cpp import Llama

    config = model.verify(ckpt)
    gguf = gguf_peer.gguf_for(hf_dir, weights_name(config.dtype, config.quantization), CACHE)
    llm = Llama(model_path=str(gguf), n_ctx=2 * PREFILL, n_batch=PREFILL, n_threads=os.cpu_count(),
                n_threads_batch=os.cpu_count(), verbose=False)
    ids = np.random.default_rng(0).integers(3, llm.n_vocab(), PREFILL).tolist()

    def generate(prompt: int, new: int):
        llm.reset()  # no prefix reuse between runs
        for n, _ in enumerate(llm.generate(ids[:prompt], temp=0.0), start=1):  # greedy
            if n == new:
                return

    def prefill():
        llm.reset()
        llm.eval(ids)

    return _peer_timings(generate, prefill)


WORKERS = {"ours": worker_ours, "transformers": worker_hf, "llama.cpp": worker_llama_cpp}
PEERS = ("transformers", "llama.cpp")  # rows after ours, measured against the first


class Worker:
    """One engine in a fresh process (clean memory numbers, no shared caches): its one-off figures when it
    starts, then a decode round each time it is asked, until closed."""

    def __init__(self, kind: str, config: str, dtype: str, quantize: str | None, turns: bool):
        self.kind, self.config = kind, config
        self.log = tempfile.TemporaryFile("w+")  # its stderr: a pipe nobody reads would fill and stall it
        env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.run", "--worker", kind, "--configs", config, "--dtype", dtype,
             "--quantize", quantize or "none"] + ([] if turns else ["--no-turns"]),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env,
            cwd=Path(__file__).parents[1])
        self.result = self._reply()
        self.result["decode_rounds"] = []

    def _reply(self) -> dict:
        """The worker's next JSON line (a library may print other lines)."""
        for line in self.process.stdout:
            if line.startswith("{"):
                return json.loads(line)
        self.process.wait()
        self.log.seek(0)
        raise RuntimeError(f"{self.kind} worker failed on {self.config}:\n{self.log.read()[-3000:]}")

    def decode_round(self) -> None:
        self.process.stdin.write("decode\n")
        self.process.stdin.flush()
        self.result["decode_rounds"].append(self._reply())

    def close(self) -> dict:
        self.process.stdin.close()
        self.process.wait()
        self.log.close()
        return self.result


def measure(config: str, dtype: str, quantize: str | None, turns: bool, engines: list[str],
            bytes_per_token: int) -> dict:
    """Each engine's figures on a config: its one-off figures, one engine at a time, then ROUNDS rounds of
    decode in which the engines take turns, ours between the peers (the order reversed every other round),
    so that each of a round's ratios compares two runs made one right after the other. Decode tok/s, read
    bandwidth and of-ceiling are each the median of the rounds; ours / this engine is the median of the
    rounds' ratios."""
    workers = []
    try:
        for kind in engines:
            workers.append(Worker(kind, config, dtype, quantize, turns))
        peers = [worker for worker in workers if worker.kind != "ours"]
        order = [*peers[:1], *(worker for worker in workers if worker.kind == "ours"), *peers[1:]]
        for round_ in range(ROUNDS):
            for worker in order if round_ % 2 == 0 else order[::-1]:
                worker.decode_round()
    except BaseException:
        for worker in workers:
            worker.process.kill()
        raise
    results = {worker.kind: worker.close() for worker in workers}
    ours = [r["decode_tok_s"] for r in results["ours"]["decode_rounds"]]
    for row in results.values():
        rounds = row["decode_rounds"]
        row["decode_tok_s"] = statistics.median(r["decode_tok_s"] for r in rounds)
        row["bandwidth_bytes_per_s"] = statistics.median(r["bandwidth_bytes_per_s"] for r in rounds)
        row["of_ceiling"] = statistics.median(r["decode_tok_s"] * bytes_per_token / r["bandwidth_bytes_per_s"]
                                              for r in rounds)
        row["ours_over_this"] = statistics.median(mine / r["decode_tok_s"] for mine, r in zip(ours, rounds))
    return results


# --- report ----------------------------------------------------------------------------------------

def table(results: dict) -> str:
    lines = [f"weights {results['weights']} (llama.cpp: {gguf_peer.PEER_TYPES[results['weights']]}); batch 1, greedy; "
             f"decode: the median of {ROUNDS} rounds taken in turns, ours / this engine the median of the rounds' "
             "ratios, the ceiling from the read bandwidth measured in each round", "",
             "| config | engine | decode tok/s | ours / this | of ceiling | prefill 512 tok/s | TTFT 64 (s) "
             "| compile, new conversation (s) | peak RSS (GB) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for config, r in results["configs"].items():
        for engine in ("ours", *PEERS):
            if engine not in r:
                continue
            row = r[engine]
            compile_s = f"{row['compile_new_conversation_s']:.1f}" if "compile_new_conversation_s" in row else "-"
            lines.append(f"| {config} | {engine} | {row['decode_tok_s']:.1f} | {row['ours_over_this']:.2f} "
                         f"| {row['of_ceiling']:.2f} | {row['prefill_tok_s']:.0f} "
                         f"| {row['ttft_s']:.3f} | {compile_s} | {row['peak_rss_bytes'] / 1e9:.2f} |")
        ceiling = r["ours"]["bandwidth_bytes_per_s"] / r["bytes_per_token"]
        lines.append(f"| {config} | ceiling | {ceiling:.1f} | | 1.00 | | | | |")
    turns = {config: r for config, r in results["configs"].items() if r["ours"]["ttft_by_turn"]}
    if turns:
        lines += ["", "time to first token along a conversation (equal-length turns):", "",
                  "| config | turn 1 (s) | turn 20 (s) | turn 20 / turn 1 | re-prefill: turn 20 / turn 1 |",
                  "|---|---|---|---|---|"]
    for config, r in turns.items():
        kept, again = r["ours"]["ttft_by_turn"]["kept cache"], r["ours"]["ttft_by_turn"]["re-prefill"]
        lines.append(f"| {config} | {kept['turn_1_s']:.3f} | {kept['turn_20_s']:.3f} | {kept['ratio']:.2f} "
                     f"| {again['ratio']:.2f} ({again['turn_20_s']:.3f} s) |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="demo,mini", help="comma-separated: demo, mini")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--quantize", default="none", choices=["none", "int8", "int4"])
    parser.add_argument("--no-turns", dest="turns", action="store_false",
                        help="skip the time-to-first-token-along-a-conversation measurement (minutes)")
    parser.add_argument("--start", action="store_true",
                        help="also launch to first token, cold and warm, on the demo with these weights (bench/start.py)")
    parser.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    configs = args.configs.split(",")
    quantize = None if args.quantize == "none" else args.quantize

    if args.worker:
        hf_dir, ckpt = prepare(configs[0], args.dtype, quantize)
        extra = (args.turns,) if args.worker == "ours" else ()
        result, decode_round = WORKERS[args.worker](hf_dir, ckpt, *extra)
        result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(json.dumps(result), flush=True)
        for _ in sys.stdin:  # the parent's decode rounds, until it closes stdin
            print(json.dumps(decode_round()), flush=True)
        return 0

    weights = weights_name(args.dtype, quantize)
    results = {"weights": weights, "configs": {}}
    engines = [kind for kind in WORKERS if (kind != "llama.cpp" or gguf_peer.available())
               and (kind != "transformers" or quantize is None)]
    for config in configs:
        _, ckpt = prepare(config, args.dtype, quantize)
        bytes_per_token = model.verify(ckpt).decode_bytes(PROMPT + DECODE // 2)
        results["configs"][config] = {"bytes_per_token": bytes_per_token,
                                      **measure(config, args.dtype, quantize, args.turns, engines, bytes_per_token)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"latest-{weights}.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    if args.start:
        from bench import start

        start.main(["--weights", quantize or args.dtype])
    return 0


if __name__ == "__main__":
    sys.exit(main())
