"""From launch to the first reply byte, on the demo model: ours cold and warm, and llama.cpp.

    python -m bench.start          # after `mixtral-chat --demo` has built the demo once

Each run is a fresh process answering one question, timed from the process start to the first byte of
the reply on stdout:
- ours, cold: `mixtral-chat --demo --headless` with an empty cache (it loads, traces and compiles);
- ours, warm: the same again (the compiled programs come from the executable cache);
- llama.cpp (llama-cpp-python, when installed) on the very GGUF the demo is built from: load + first token.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import gguf_peer
from chat_app import demo, paths

QUESTION = "What is the capital of France?"
LLAMA_CPP = r"""
import sys
from llama_cpp import Llama
llm = Llama(sys.argv[1], n_ctx=4096, verbose=False)
for chunk in llm.create_chat_completion([{"role": "user", "content": sys.argv[2]}], temperature=0, max_tokens=16, stream=True):
    text = chunk["choices"][0]["delta"].get("content")
    if text:
        sys.stdout.write(text)
        sys.stdout.flush()
"""


def first_byte_seconds(argv: list[str], env: dict, stdin: str = "") -> tuple[float, str]:
    """Seconds from starting `argv` to its first byte on stdout, and all it printed."""
    start = time.perf_counter()
    process = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    process.stdin.write(stdin)
    process.stdin.close()
    first = process.stdout.read(1)
    seconds = time.perf_counter() - start
    rest = process.stdout.read()
    process.wait(300)
    if process.returncode != 0:
        raise RuntimeError(process.stderr.read())
    return seconds, first + rest


def main() -> None:
    results = {}
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "XDG_CACHE_HOME": cache}
        ours = [sys.executable, "-m", "chat_app", "--demo", "--headless", "--temperature", "0", "--no-save"]
        for run in ("cold", "warm"):
            results[f"ours, {run}"] = first_byte_seconds(ours, env, QUESTION + "\n")
    if gguf_peer.available():
        gguf = demo.demo_gguf(paths.downloads_dir(paths.resolve_data_dir()))
        results["llama.cpp"] = first_byte_seconds([sys.executable, "-c", LLAMA_CPP, str(gguf), QUESTION], dict(os.environ))
    print("| engine | launch to first reply byte (s) | reply |\n|---|---|---|")
    for name, (seconds, text) in results.items():
        print(f"| {name} | {seconds:.2f} | {text.strip()[:40]} |")
    Path(__file__).with_name("results").mkdir(exist_ok=True)
    Path(__file__).with_name("results").joinpath("start.json").write_text(
        json.dumps({name: seconds for name, (seconds, _) in results.items()}, indent=2))


if __name__ == "__main__":
    main()
