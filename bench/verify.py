"""What verifying a checkpoint's sha256s costs (`model.manifest.verify`): the first use of a
checkpoint hashes every file; a warm start only compares each file's size and mtime with the record.

    python -m bench.verify [--gb 1.5] [--files 1] [--dir DIR]

The checkpoint is `--files` weights files of random bytes (verify reads bytes; what they mean does not
matter) plus a config and a manifest. The file was just written, so it is read from the page cache:
the first-use number is the hashing cost; a cold disk adds its own read time on top.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from model.manifest import CONFIG, MANIFEST, VERIFIED, verify
from model.config import MixtralConfig
from model.safetensors_io import StreamingWriter, TensorSpec

CHUNK = 64 << 20


def build(folder: Path, n_bytes: int, n_files: int) -> None:
    config = MixtralConfig.from_hf({"model_type": "mixtral", "vocab_size": 32000, "hidden_size": 64,
                                    "intermediate_size": 96, "num_hidden_layers": 1, "num_attention_heads": 8,
                                    "num_local_experts": 2, "num_experts_per_tok": 1})
    config.save(folder / CONFIG)
    rng = np.random.default_rng(0)
    files = {}
    for i in range(n_files):
        name = f"model-{i + 1:05d}-of-{n_files:05d}.safetensors"
        size = n_bytes // n_files
        writer = StreamingWriter(folder / name, [TensorSpec("blob", np.dtype(np.uint8), (size,))])
        for start in range(0, size, CHUNK):
            writer.append(rng.integers(0, 256, min(CHUNK, size - start), dtype=np.uint8))
        files[name] = {"bytes": (folder / name).stat().st_size, "sha256": writer.close()}
    (folder / MANIFEST).write_text(json.dumps({"format": "mixtral-chat", "files": files}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=1.5, help="size of the weights file")
    parser.add_argument("--files", type=int, default=1, help="how many files it is split into")
    parser.add_argument("--dir", type=Path, default=None, help="where to build it (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp)
        n_bytes = int(args.gb * 1e9)
        build(folder, n_bytes, args.files)
        first = []
        for _ in range(3):
            (folder / VERIFIED).unlink(missing_ok=True)
            start = time.perf_counter()
            verify(folder)
            first.append(time.perf_counter() - start)
        warm = []
        for _ in range(50):
            start = time.perf_counter()
            verify(folder)
            warm.append(time.perf_counter() - start)
        result = {"bytes": n_bytes, "files": args.files, "first_use_s": min(first), "hash_gb_per_s": n_bytes / min(first) / 1e9,
                  "warm_start_ms": statistics.median(warm) * 1e3, "cpus": os.cpu_count()}
        print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
