"""What running across processes costs: decode ms/token of 2 processes x 4 devices against 1 process x 8
devices, the same 2x4 mesh (expert x model), on simulated CPU devices of this machine.

    python -m bench.multihost CKPT [--tokens 64] [--runs 3]

Each setting runs in fresh processes (XLA_FLAGS sets the devices per process, as a user would); each
measures greedy turns of `--tokens` tokens on a fresh conversation after a warm-up turn and reports
the best run's decode time per token (the engine's TurnDone.tokens_per_s). Across processes the turns
go through `DriverEngine`, as the app's do (stop checks every few tokens included).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

MESH = (2, 4)


def measure(engine, tokens: int, runs: int) -> float:
    """Best decode ms/token over `runs` greedy turns (after one warm-up turn)."""
    from model.engine_api import SamplingParams, TurnDone

    greedy = SamplingParams(temperature=0, max_new_tokens=tokens)
    best = float("inf")
    for run in range(runs + 1):
        messages = [{"role": "user", "content": f"Tell me a long story, number {run}"}]
        done = next(e for e in engine.generate(f"run {run}", messages, greedy) if isinstance(e, TurnDone))
        if run and done.generated_tokens > 1:
            best = min(best, 1000 / done.tokens_per_s)
    return best


def worker(ckpt: Path, tokens: int, runs: int, port: int | None, process_id: int) -> None:
    """One process: alone (port None), or one of two."""
    link = None
    if port is not None:
        from model.multihost import ProcessGroup, identity, join

        def fatal(message: str) -> None:
            print(message, file=sys.stderr, flush=True)
            os._exit(1)

        link = join(ProcessGroup(f"127.0.0.1:{port}", 2, process_id), identity(ckpt, MESH, None), fatal)
    from model.engine import Engine
    from model.multihost import DriverEngine, follow

    engine = Engine(ckpt, mesh_shape=MESH, context_length=1024)
    if link is None:
        print(json.dumps({"ms_per_token": measure(engine, tokens, runs)}))
    elif link.is_driver:
        result = measure(DriverEngine(engine, link), tokens, runs)
        link.close()
        print(json.dumps({"ms_per_token": result}))
    else:
        follow(engine, link)


def run(ckpt: Path, tokens: int, runs: int, processes: int) -> float:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={8 // processes}",
           "JAX_PLATFORMS": "cpu"}
    port = None
    if processes > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    started = [subprocess.Popen([sys.executable, "-m", "bench.multihost", str(ckpt), "--tokens", str(tokens),
                                 "--runs", str(runs), "--worker", str(i), *(["--port", str(port)] if port else [])],
                                env=env, stdout=subprocess.PIPE, text=True)
               for i in reversed(range(processes))]
    outputs = [p.communicate(timeout=1800)[0] for p in started]
    if any(p.returncode for p in started):
        raise SystemExit(f"a worker failed: {[p.returncode for p in started]}")
    return json.loads(outputs[-1].splitlines()[-1])["ms_per_token"]  # process 0 started last; gloo prints lines before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt", type=Path)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        return worker(args.ckpt, args.tokens, args.runs, args.port, args.worker)
    alone = run(args.ckpt, args.tokens, args.runs, 1)
    together = run(args.ckpt, args.tokens, args.runs, 2)
    print(f"{args.ckpt.name}, mesh 2x4, decode of {args.tokens} tokens (best of {args.runs}):")
    print(f"  1 process  x 8 devices: {alone:8.2f} ms/token")
    print(f"  2 processes x 4 devices: {together:8.2f} ms/token  ({together / alone:.2f}x)")


if __name__ == "__main__":
    main()
