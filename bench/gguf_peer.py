"""llama.cpp as a peer in bench/run.py: the same Hugging Face weights converted to GGUF by llama.cpp's own
converter, run through llama-cpp-python (`pip install llama-cpp-python`; the bench skips llama.cpp
without it).

The converter (convert_hf_to_gguf.py and its gguf-py) comes from the source release of the installed
llama-cpp-python, fetched from PyPI once, so converter and runtime always match.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import tarfile
from pathlib import Path

OUTTYPES = {"float32": "f32", "bfloat16": "bf16"}


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def converter(cache: Path) -> Path:
    """llama.cpp's convert_hf_to_gguf.py matching the installed llama-cpp-python."""
    version = importlib.metadata.version("llama-cpp-python")
    root = cache / f"llama-cpp-python-{version}"
    pattern = "*/vendor/llama.cpp/convert_hf_to_gguf.py"
    script = next(root.glob(pattern), None)
    if script is None:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={version}", "-d", str(root)], check=True)
        with tarfile.open(next(root.glob("*.tar.gz"))) as sdist:
            sdist.extractall(root, filter="data")
        script = next(root.glob(pattern))
    return script


def gguf_for(hf_dir: Path, dtype: str, cache: Path) -> Path:
    """The GGUF file of an HF folder in `dtype`, converted once and kept beside the folder."""
    out = hf_dir.parent / f"llama-cpp-{dtype}.gguf"
    if not out.exists():
        script = converter(cache)
        partial = out.with_suffix(".partial")
        env = {**os.environ, "PYTHONPATH": str(script.parent / "gguf-py")}
        subprocess.run([sys.executable, str(script), str(hf_dir), "--outtype", OUTTYPES[dtype], "--outfile", str(partial)],
                       check=True, env=env, capture_output=True)
        partial.rename(out)
    return out
