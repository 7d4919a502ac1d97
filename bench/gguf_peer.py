"""llama.cpp as a peer in bench/run.py: the same Hugging Face weights converted to GGUF by llama.cpp's own
converter (and quantized by llama.cpp's own quantizer, through llama-cpp-python, to the type that matches
ours), run through llama-cpp-python (`pip install llama-cpp-python`; the bench skips llama.cpp without it).

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

OUTTYPES = {"float32": "f32", "bfloat16": "bf16", "int8": "q8_0"}  # the converter's --outtype for ours
# llama.cpp's type for our int4 (groups of 32 inputs, a scale and a minimum each): Q4_1, by its quantizer
Q4_1 = 3  # llama_ftype LLAMA_FTYPE_MOSTLY_Q4_1
PEER_TYPES = {"float32": "F32", "bfloat16": "BF16", "int8": "Q8_0", "int4": "Q4_1"}


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


def gguf_for(hf_dir: Path, weights: str, cache: Path) -> Path:
    """The GGUF file of an HF folder with `weights` (float32, bfloat16, int8, int4: PEER_TYPES), converted
    once and kept beside the folder."""
    out = hf_dir.parent / f"llama-cpp-{weights}.gguf"
    if out.exists():
        return out
    partial = out.with_suffix(".partial")
    if weights == "int4":
        import llama_cpp

        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = Q4_1
        source = gguf_for(hf_dir, "float32", cache)
        if llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), params) != 0:
            raise RuntimeError(f"llama.cpp could not quantize {source} to Q4_1")
    else:
        script = converter(cache)
        env = {**os.environ, "PYTHONPATH": str(script.parent / "gguf-py")}
        subprocess.run([sys.executable, str(script), str(hf_dir), "--outtype", OUTTYPES[weights], "--outfile", str(partial)],
                       check=True, env=env, capture_output=True)
    partial.rename(out)
    return out
