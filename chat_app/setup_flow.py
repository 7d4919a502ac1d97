"""Installing a model: where its weights come from, whether it fits, then download + convert.

Shared by the first-run wizard (chat_app.wizard) and `mixtral-chat setup --repo/--local` (in chat_app.cli):

    source = hub_source(repo_id, ...) | folder_source(path)    where the Hugging Face weights are (or will be)
    plan = plan_setup(source, data_dir=...)                    name, dtype, sizes, the memory and disk verdicts
    install(plan, token=..., on_download=..., on_convert=...)  download into the HF cache, convert atomically

Nothing is written before `install` (but the measured memory speed, DATA/bandwidth.json): planning reads the
hub's file metadata (sizes and hashes, no weights) and the config.json, so it can refuse a model that cannot fit
with the numbers and what to change. Every error a user can act on is a `UserError` (a `SetupError`, a
`chat_app.hub.HubError`, ...) that says what to do.

Memory: what the weights take in the chosen dtype/quantization, plus the KV cache of one conversation at the
default context (4096 tokens), plus 10% headroom, against the devices jax sees: the sum of the accelerators'
`bytes_limit`, or the machine's RAM on CPU (`plan_memory`; per device too when a mesh splits the model). Speed:
the most decode can reach, the devices' memory bandwidth (chat_app.bandwidth: measured on a CPU) over the
bytes one token reads. Both are shown for each setting (`settings_compared`) before anything starts.
jax is imported only to look at the devices (the wizard opens without it).

Defaults (a user's explicit choice always wins): dtype bfloat16 on GPU/TPU, float32 on CPU (the native kernels of
model/cpu_matmul.py compute in float32); quantization int4 on CPU (a fifth of float32's memory, the fastest
decode), and on GPU/TPU (or a CPU without the native kernels, where only float32 runs at memory speed) none
when the model fits in the dtype, else int8, else int4 (`default_quantization`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import constants as hf_constants
from huggingface_hub import get_token

from chat_app import hub, paths
from chat_app.bandwidth import Bandwidth, memory_bandwidth
from chat_app.errors import PROG, UserError
from chat_app.terminal import format_bytes, format_duration
from model.config import DEFAULT_CONTEXT, QUANTIZATIONS, ConfigError, MixtralConfig

DEFAULT_REPO = hub.EXAMPLE_REPO
MEMORY_HEADROOM = 0.10  # activations, compiled programs, the allocator's slack
_NAME_CHARS = re.compile(r"[^A-Za-z0-9._+-]+")
_SNAPSHOT = re.compile(r"models--(?P<org>[^/]+)--(?P<name>[^/]+)/snapshots/[0-9a-f]{40}$")

DownloadCallback = Callable[[hub.DownloadProgress], None]
ConvertCallback = Callable[[int, int, str], None]  # (tensors done, tensors in all, current tensor)


class SetupError(UserError):
    """A choice that cannot be set up, or a conversion that failed; the message says what to do."""


class SetupCancelled(SetupError):
    """Cancelled during the conversion: nothing was installed (the download, if any, is complete)."""


CANCELLED = (hub.DownloadCancelled, SetupCancelled)


# ---- where the hub and its cache are --------------------------------------------------------------------------
def hub_endpoint(given: str | None = None) -> str:
    """`given`, else HF_ENDPOINT as it is now (huggingface_hub read it at import), else the public hub."""
    return (given or os.environ.get("HF_ENDPOINT") or hf_constants.ENDPOINT).rstrip("/")


def hf_cache_dir(given: str | Path | None = None) -> Path:
    """`given`, else HF_HUB_CACHE, else HF_HOME/hub as they are now, else huggingface_hub's default."""
    if given:
        return Path(given).expanduser()
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(hf_constants.HF_HUB_CACHE)


def token_status() -> str:
    """Which token a download sends when none is typed, in words: for the wizard's token field."""
    if (os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or "").strip():
        return "using HF_TOKEN"
    if get_token():
        return "using your huggingface login"
    return "none"


# ---- the devices ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceMemory:
    """The memory a model can use: the accelerators' (summed), or the machine's RAM on CPU."""

    platform: str  # "cpu", "gpu", "tpu"
    count: int
    kind: str  # e.g. "NVIDIA H100 80GB HBM3", "cpu"
    total_bytes: int
    available_bytes: int | None = None  # CPU: RAM free right now (other programs use the rest)

    @property
    def default_dtype(self) -> str:
        return "float32" if self.platform == "cpu" else "bfloat16"

    @property
    def default_dtype_reason(self) -> str:
        if self.platform == "cpu":
            return "float32: the default dtype on CPU, where the kernels compute in it"
        return f"bfloat16: the default on {self.platform.upper()}, half the memory of float32 at full speed"

    def describe(self) -> str:
        if self.platform == "cpu":
            free = f", {format_bytes(self.available_bytes)} free now" if self.available_bytes is not None else ""
            return f"CPU, {format_bytes(self.total_bytes)} of RAM{free}"
        return f"{self.count} x {self.kind}, {format_bytes(self.total_bytes)} in all"


def detect_devices() -> DeviceMemory:
    """The devices jax sees and their memory (imports jax: a second or two the first time)."""
    import jax

    devices = jax.devices()
    platform = devices[0].platform
    if platform == "cpu":  # simulated CPU devices share the one RAM
        total, available = _ram_bytes()
        return DeviceMemory("cpu", len(devices), "cpu", total, available)
    limits = [(d.memory_stats() or {}).get("bytes_limit", 0) for d in devices]
    return DeviceMemory(platform, len(devices), devices[0].device_kind, sum(limits))


def _ram_bytes() -> tuple[int, int | None]:
    """(total, available) RAM: /proc/meminfo on Linux, else sysconf (no 'available' figure)."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        kib = {name: int(fields[name].split()[0]) * 1024 for name in ("MemTotal", "MemAvailable") if name in fields}
        return kib["MemTotal"], kib.get("MemAvailable")
    except (OSError, ValueError, KeyError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), None


# ---- where the weights come from -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    """The Hugging Face-format model to convert: on the hub (`download` says what to fetch) or on disk."""

    label: str  # for the user: "org/name @ main" or the folder
    repo_id: str | None  # the hub repo it is (or was downloaded) from; None for a plain folder
    hf_config: dict  # its config.json
    folder: Path  # the HF-format folder converted (the HF cache snapshot, for the hub)
    download: hub.DownloadPlan | None = None  # None: everything is on disk already


def hub_source(repo_id: str, revision: str | None = None, *, endpoint: str | None = None,
               token: str | None = None, cache_dir: str | Path | None = None) -> Source:
    """Ask the hub what `repo_id` at `revision` holds (sizes, hashes, config.json); downloads no weights.
    Raises HubError (gated, bad token, no such repo/revision, unreachable, not a safetensors checkpoint)."""
    repo_id = repo_id.strip()
    plan = hub.plan_download(repo_id, (revision or "").strip() or None, endpoint=hub_endpoint(endpoint),
                             token=token, cache_dir=hf_cache_dir(cache_dir))
    pinned = plan.revision if plan.revision == plan.commit else f"{plan.revision} (commit {plan.commit[:8]})"
    return Source(label=f"{repo_id} @ {pinned}", repo_id=repo_id, hf_config=plan.config,
                  folder=plan.snapshot_dir, download=plan)


def folder_source(folder: str | Path, repo_id: str | None = None) -> Source:
    """An HF model folder on disk (for an HF cache snapshot, `repo_id` is found from its path). Raises
    SetupError saying what is missing."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise SetupError(f"{folder} is not a folder. Give the folder that holds the model's config.json and "
                         "*.safetensors files.")
    folder = folder.absolute()
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SetupError(f"{folder} has no config.json: is it a Hugging Face model folder?") from None
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise SetupError(f"Cannot read {folder / 'config.json'}: {error}") from None
    if not isinstance(config, dict):
        raise SetupError(f"{folder / 'config.json'} is not a model config (not a JSON object).")
    if config.get("format") == "mixtral-chat":
        raise SetupError(f"{folder} is already a converted mixtral-chat model: chat with it using "
                         f"`{PROG} --model {folder}`.")
    lacking = []
    if not any(folder.glob("*.safetensors")):
        lacking.append("weights in .safetensors format")
    if not any((folder / name).is_file() for name in ("tokenizer.model", "tokenizer.json")):
        lacking.append("tokenizer (tokenizer.model or tokenizer.json)")
    if lacking:
        raise SetupError(f"{folder} cannot be converted: it has no {' and no '.join(lacking)}.")
    if repo_id is None and (match := _SNAPSHOT.search(folder.resolve().as_posix())):
        repo_id = f"{match['org']}/{match['name']}"
    return Source(label=str(folder), repo_id=repo_id, hf_config=config, folder=folder)


# ---- the plan ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryNeed:
    """What the model takes on the devices, and reads per decoded token, for one dtype/quantization."""

    dtype: str
    quantization: str | None
    weights_bytes: int
    kv_cache_bytes: int  # one conversation of `context_tokens`
    context_tokens: int
    token_read_bytes: int  # what one decoded token reads: the weights it uses, and the cache half full
    devices: int  # accelerators a mesh splits it over (CPU devices share one RAM: 1)
    per_device_bytes: int  # what the fullest of them needs, with the headroom

    @property
    def needed_bytes(self) -> int:
        return _with_headroom(self.weights_bytes + self.kv_cache_bytes)

    @property
    def label(self) -> str:
        return f"{self.dtype}{'+' + self.quantization if self.quantization else ''}"


def _with_headroom(nbytes: int) -> int:
    return int(nbytes * (1 + MEMORY_HEADROOM))


def plan_memory(hf_config: dict, dtype: str, quantization: str | None, context_length: int = DEFAULT_CONTEXT,
                devices: DeviceMemory | None = None) -> MemoryNeed:
    """The memory the model needs as `dtype`+`quantization` with a KV cache of `context_length` tokens (at most
    the model's own limit), per device when `devices` are accelerators a mesh splits it over (the weights as
    the default mesh really splits them, `model.sharding`; the cache by kv heads, whole on each device when
    they do not divide), and what a decoded
    token reads. Raises ConfigError (in words) for a model we cannot run."""
    from model.sharding import MeshShape, device_share

    try:
        config = MixtralConfig.from_hf(hf_config, dtype=dtype, quantization=quantization)
    except (KeyError, TypeError) as error:
        raise ConfigError(f"its config.json lacks or garbles {error}") from None
    tokens = min(context_length, config.max_position_embeddings)
    weights, kv_cache = config.weight_bytes(), config.kv_cache_bytes(tokens)
    count = devices.count if devices is not None and devices.platform != "cpu" else 1
    return MemoryNeed(dtype, quantization, weights, kv_cache, tokens, config.decode_bytes(tokens // 2), count,
                      _with_headroom(device_share(config, MeshShape(1, count), kv_cache)))


def int4_possible(hf_config: dict) -> bool:
    """Whether every quantized weight's input dim is a whole number of int4 groups (the converter's rule)."""
    try:
        config = MixtralConfig.from_hf(hf_config, quantization="int4")
    except (KeyError, TypeError, ConfigError):
        return False
    inputs = (config.hidden_size, config.num_heads * config.head_dim, config.intermediate_size)
    return all(n % config.quant_group_size == 0 for n in inputs)


def default_quantization(hf_config: dict, dtype: str, devices: DeviceMemory,
                         cpu_kernels: bool = True) -> tuple[str | None, str]:
    """(quantization, why) when the user chose none. On a CPU with the native kernels (`cpu_kernels`) int4 (int8
    for a model whose shapes int4 cannot group): about a fifth of float32's memory and the fastest decode, as
    local-LLM users expect. Elsewhere the most exact setting that fits: `dtype` unquantized, else int8, else int4
    (on a CPU without the kernels only float32 runs at memory speed)."""
    if devices.platform == "cpu" and cpu_kernels:
        if int4_possible(hf_config):
            return "int4", "int4: the default on CPU, about a fifth of float32's memory and the fastest decode"
        return "int8", "int8: the default on CPU for this model (its shapes do not split into int4's groups of 32)"
    where = devices.platform.upper() + ("" if cpu_kernels else " without the native kernels")
    for quantization in (None, "int8"):
        try:
            fits = plan_memory(hf_config, dtype, quantization, devices=devices).needed_bytes <= devices.total_bytes
        except ConfigError:
            fits = True  # plan_setup reports the config itself
        if fits:
            return quantization, (f"no quantization: the default on {where} when {dtype} fits" if quantization is None
                                  else f"int8: the default on {where} when {dtype} does not fit and int8 does")
    return "int4", f"int4: the default on {where} when neither {dtype} nor int8 fits"


def settings_compared(hf_config: dict, dtype: str, devices: DeviceMemory) -> tuple[MemoryNeed, ...]:
    """The settings a user chooses between: `dtype` and bfloat16 unquantized, `dtype` with int8 and with int4."""
    settings = dict.fromkeys([(dtype, None), ("bfloat16", None), (dtype, "int8")]
                             + ([(dtype, "int4")] if int4_possible(hf_config) else []))
    return tuple(plan_memory(hf_config, d, q, devices=devices) for d, q in settings)


@dataclass(frozen=True)
class SetupPlan:
    """Everything `install` will do and whether it can; built by `plan_setup`, nothing written yet."""

    source: Source
    name: str  # the installed model's name: its folder under DATA/models
    destination: Path
    dtype: str
    dtype_reason: str  # why this dtype: the user's choice or the devices' default
    quantization: str | None
    quantization_reason: str  # why this quantization: the user's choice or the devices' default
    devices: DeviceMemory
    bandwidth: Bandwidth  # the devices' memory read speed, which bounds decode
    memory: MemoryNeed | None  # None when the config cannot be read as a Mixtral
    settings: tuple[MemoryNeed, ...]  # the settings compared before starting (the chosen one among them)
    output_bytes: int  # the converted checkpoint on disk
    replaces_existing: bool  # a model of that name is installed: go ahead only if the user confirms
    problems: tuple[str, ...]  # why it cannot go ahead; each says what to change
    warnings: tuple[str, ...] = ()  # worth knowing, not blocking

    @property
    def can_start(self) -> bool:
        return not self.problems

    def describe(self) -> list[str]:
        """The plan in a few lines for the user (the CLI prints them, the wizard shows them)."""
        lines = [f"Model:     {self.source.label}"]
        download = self.source.download
        if download is not None:
            cached = f", {format_bytes(download.cached_bytes)} of it already downloaded" if download.cached_bytes else ""
            lines.append(f"Download:  {format_bytes(download.total_bytes)} in {len(download.files)} files{cached}, "
                         f"into the Hugging Face cache {download.cache_dir}")
            lines.append(f"           {format_bytes(download.bytes_to_download)} left to download")
        quantization = f"{self.quantization} quantization" if self.quantization else "no quantization"
        lines.append(f"Install:   '{self.name}' in {self.destination}"
                     + (" (REPLACES the installed model of that name)" if self.replaces_existing else ""))
        lines.append(f"Weights:   {self.dtype}, {quantization}: {format_bytes(self.output_bytes)} on disk")
        lines.append(f"           ({self.quantization_reason})")
        lines.append(f"           ({self.dtype_reason})")
        lines.append(f"Devices:   {self.devices.describe()}; {self.bandwidth.describe()}")
        if self.memory is not None:
            m = self.memory
            fits = "fits" if m.needed_bytes <= self.devices.total_bytes else "does NOT fit"
            lines.append(f"Memory:    needs {format_bytes(m.needed_bytes)} of {format_bytes(self.devices.total_bytes)}: {fits}")
            lines.append(f"           (weights {format_bytes(m.weights_bytes)} + KV cache {format_bytes(m.kv_cache_bytes)} "
                         f"for {m.context_tokens} tokens + {MEMORY_HEADROOM:.0%} headroom)")
            lines.extend(self._settings_table())
        return lines

    def _settings_table(self) -> list[str]:
        """The settings side by side: memory (per device under a mesh), and the most decode can reach here."""
        per_device = self.memory.devices > 1
        rows = [("setting", "memory" + (" (per device)" if per_device else ""), "decode, at most", "")]
        for setting in self.settings:
            chosen = (setting.dtype, setting.quantization) == (self.dtype, self.quantization)
            memory = format_bytes(setting.needed_bytes) + (f" ({format_bytes(setting.per_device_bytes)})"
                                                           if per_device else "")
            speed = self.bandwidth.tokens_per_s(setting.token_read_bytes)
            verdict = "<- chosen" if chosen else "too big" if setting.needed_bytes > self.devices.total_bytes else ""
            rows.append((setting.label, memory, "unknown" if speed is None else f"{_format_rate(speed)} tok/s", verdict))
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        lines = [f"{'Settings:' if i == 0 else '':11}{label:{widths[0]}}  {memory:>{widths[1]}}  {speed:>{widths[2]}}  "
                 f"{verdict}".rstrip() for i, (label, memory, speed, verdict) in enumerate(rows)]
        if self.bandwidth.bytes_per_s is not None:
            lines.append("           (decode reads every weight a token uses once, so memory speed bounds it; "
                         "expect less)")
        return lines


def _format_rate(per_s: float) -> str:
    """A rate to two significant figures, or whole above 10: 0.041, 0.85, 3.0, 7.3, 42, 138."""
    return f"{per_s:.0f}" if per_s >= 10 else f"{per_s:.1f}" if per_s >= 1 else f"{per_s:.2g}"


def default_name(source: Source, quantization: str | None) -> str:
    """The repo's name (or the folder's), plus -int8/-int4 when quantized: `Mixtral-8x7B-Instruct-v0.1-int4`."""
    base = source.repo_id.rsplit("/", 1)[-1] if source.repo_id else source.folder.name
    base = _NAME_CHARS.sub("-", base).strip(".-") or "model"
    return f"{base}-{quantization}" if quantization else base


def name_problem(name: str) -> str | None:
    """Why `name` cannot name an installed model (it is a folder name), or None."""
    if not name.strip():
        return "The model's name is empty."
    if name != name.strip() or "/" in name or "\\" in name or name.startswith(".") or len(name) > 100:
        return (f"'{name}' cannot be a model name: use letters, digits, '-', '_' and '.', not starting with '.' "
                "(at most 100 characters).")
    return None


def plan_setup(source: Source, *, data_dir: Path, devices: DeviceMemory | None = None, name: str | None = None,
               dtype: str | None = None, quantization: str | None = None,
               bandwidth: Bandwidth | None = None) -> SetupPlan:
    """Work out what installing `source` takes and whether it fits. `dtype` None: the devices' default;
    `quantization` "none", "int8" or "int4", None: `default_quantization`; `name` None: `default_name`;
    `bandwidth` None: the devices' (measured once on a CPU, ~0.3 s, then kept in the data dir)."""
    devices = devices or detect_devices()
    bandwidth = bandwidth or memory_bandwidth(devices.platform, devices.kind, devices.count, data_dir)
    if dtype is None:
        dtype, dtype_reason = devices.default_dtype, devices.default_dtype_reason
    else:
        dtype_reason = f"{dtype}: as chosen"
    kernels_missing = _cpu_kernels_missing() if devices.platform == "cpu" else None
    if quantization is None:
        quantization, quantization_reason = default_quantization(source.hf_config, dtype, devices,
                                                                 cpu_kernels=kernels_missing is None)
    else:
        quantization = None if quantization == "none" else quantization
        quantization_reason = f"{quantization or 'no quantization'}: as chosen"
    name = default_name(source, quantization) if name is None else name
    destination = paths.models_dir(data_dir) / name
    problems, warnings = [], []
    if problem := name_problem(name):
        problems.append(problem)
    if quantization == "int4" and not int4_possible(source.hf_config):
        problems.append("int4 needs every layer's input size to be a multiple of 32, and this model's are not: "
                        "choose int8.")
    try:
        if source.hf_config.get("model_type") in ("llama", "mistral"):
            raise ConfigError(f"it is a dense {source.hf_config['model_type']} model, not a Mixtral "
                              f"(`{PROG} convert HF_DIR OUT_DIR --upcycle-experts N` can turn one into a Mixtral)")
        memory = plan_memory(source.hf_config, dtype, quantization, devices=devices)
        settings = settings_compared(source.hf_config, dtype, devices)
    except ConfigError as error:
        memory, settings = None, ()
        problems.append(f"{source.label} cannot be set up: {error}.")
    output_bytes = memory.weights_bytes if memory else 0
    if memory is not None:
        if memory.needed_bytes > devices.total_bytes:
            problems.append(_memory_problem(source.hf_config, memory, devices))
        elif problem := _per_device_problem(source.hf_config, memory, devices):
            problems.append(problem)
        elif devices.available_bytes is not None and memory.needed_bytes > devices.available_bytes:
            warnings.append(f"Only {format_bytes(devices.available_bytes)} of RAM is free right now: close other "
                            "programs before chatting, or the model will load slowly or not at all.")
        warnings.extend(_replicated_notes(source.hf_config, memory, devices))
        if problem := _disk_problem(source, destination, output_bytes):
            problems.append(problem)
    if kernels_missing and (quantization or dtype != "float32"):
        warnings.append(f"{kernels_missing}: until then {memory.label if memory else dtype} decodes many times slower than "
                        "shown (only float32 runs at memory speed without them).")
    return SetupPlan(source=source, name=name, destination=destination, dtype=dtype, dtype_reason=dtype_reason,
                     quantization=quantization, quantization_reason=quantization_reason, devices=devices,
                     bandwidth=bandwidth, memory=memory, settings=settings, output_bytes=output_bytes,
                     replaces_existing=destination.exists(), problems=tuple(problems), warnings=tuple(warnings))


def _default_mesh_split(hf_config: dict, memory: MemoryNeed, devices: DeviceMemory):
    """(config, mesh shape) of the app's default mesh: every device on the model axis."""
    from model.sharding import MeshShape

    return MixtralConfig.from_hf(hf_config, dtype=memory.dtype, quantization=memory.quantization), MeshShape(1, devices.count)


def _replicated_notes(hf_config: dict, memory: MemoryNeed, devices: DeviceMemory) -> list[str]:
    """What the default mesh cannot split, so every device holds it whole ("attention replicated on 8 devices")."""
    from model.sharding import replicated

    notes = replicated(*_default_mesh_split(hf_config, memory, devices))
    return [f"{note.capitalize()}: the mesh does not divide it (--mesh can choose another split)." for note in notes]


def _per_device_problem(hf_config: dict, memory: MemoryNeed, devices: DeviceMemory) -> str | None:
    """Accelerators under a mesh: whether each holds its share (`plan_memory`: the weights as the default
    mesh really splits them, what it cannot split held whole by every device)."""
    from model.sharding import replicated

    limit = devices.total_bytes // devices.count
    if memory.devices == 1 or memory.per_device_bytes <= limit:
        return None
    notes = replicated(*_default_mesh_split(hf_config, memory, devices))
    why = f" ({'; '.join(notes)})" if notes else ""
    return (f"Not enough memory per device: as {memory.label} each of the {devices.count} devices would hold "
            f"{format_bytes(memory.per_device_bytes)}{why}, but has {format_bytes(limit)}. Quantize the model, or "
            "use more devices.")


def _cpu_kernels_missing() -> str | None:
    """Why the native CPU kernels (int8, int4, bfloat16 at memory speed) cannot run here, or None."""
    from model import cpu_matmul  # imports jax, as detect_devices does

    return None if cpu_matmul.available() else cpu_matmul.unavailable_reason()


def _memory_problem(hf_config: dict, memory: MemoryNeed, devices: DeviceMemory) -> str:
    """Too big: the numbers, and which smaller settings would fit."""
    message = (f"Not enough memory: as {memory.label} the model needs {format_bytes(memory.needed_bytes)} "
               f"(weights {format_bytes(memory.weights_bytes)} + KV cache {format_bytes(memory.kv_cache_bytes)} + "
               f"{MEMORY_HEADROOM:.0%} headroom) but this machine has {devices.describe()}.")
    smaller = [plan_memory(hf_config, dtype, quantization, devices=devices)
               for dtype in dict.fromkeys((memory.dtype, "bfloat16"))
               for quantization in QUANTIZATIONS[QUANTIZATIONS.index(memory.quantization):]]
    smaller = sorted((m for m in smaller if m.needed_bytes < memory.needed_bytes), key=lambda m: -m.needed_bytes)
    fitting = [m for m in smaller if m.needed_bytes <= devices.total_bytes]
    if fitting:
        options = ", ".join(f"{m.label} ({format_bytes(m.needed_bytes)})" for m in fitting)
        return f"{message} It would fit as: {options}. Choose one of those dtype/quantization settings."
    smallest = f" Even the smallest setting, {smaller[-1].label}, needs {format_bytes(smaller[-1].needed_bytes)}." \
        if smaller else ""
    return f"{message}{smallest} Use a smaller model, or a machine with more memory (or more GPUs/TPUs)."


def _disk_problem(source: Source, destination: Path, output_bytes: int) -> str | None:
    if source.download is not None:
        try:
            hub.check_disk_space(source.download, output_dir=destination, output_bytes=output_bytes)
        except hub.DiskSpaceError as error:
            return error.message
        return None
    existing = destination
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if output_bytes > free:
        return (f"Not enough disk space: the converted model needs {format_bytes(output_bytes)} in {destination} "
                f"but that disk has only {format_bytes(free)} free. Free up {format_bytes(output_bytes - free)} "
                "or choose a smaller quantization.")
    return None


# ---- doing it ------------------------------------------------------------------------------------------------
def install(plan: SetupPlan, *, token: str | None = None, on_download: DownloadCallback | None = None,
            on_convert: ConvertCallback | None = None, should_cancel: Callable[[], bool] | None = None) -> Path:
    """Download what the plan lists (resuming what is on disk), convert it into the plan's destination
    atomically, and return the checkpoint folder. Synchronous: run it on a worker thread.

    `should_cancel` is polled every 0.1 s while downloading and between tensors while converting; cancelling
    raises DownloadCancelled or SetupCancelled and keeps every downloaded byte. The destination is replaced
    only when `plan.replaces_existing` (the user confirmed); a model installed meanwhile is never overwritten.
    """
    import model

    should_cancel = should_cancel or (lambda: False)
    if not plan.can_start:
        raise SetupError(" ".join(plan.problems))
    if plan.source.download is not None:
        hub.download(plan.source.download, token=token, on_progress=on_download, should_cancel=should_cancel)

    def converted(done: int, total: int, tensor: str) -> None:
        if should_cancel():  # raised inside convert_hf, which then removes its temporary folder
            raise SetupCancelled("Cancelled during the conversion: nothing was installed. "
                                 + ("The download is complete, so " if plan.source.download else "")
                                 + "starting again converts from the beginning.")
        if on_convert is not None:
            on_convert(done, total, tensor)

    try:
        return model.convert_hf(plan.source.folder, plan.destination, dtype=plan.dtype, quantize=plan.quantization,
                                overwrite=plan.replaces_existing, on_progress=converted)
    except model.ConversionError as error:
        raise SetupError(f"Could not convert {plan.source.label}: {error}") from None
    except OSError as error:  # the disk filled up or is not writable; convert_hf removed its partial output
        kept = " The download is kept." if plan.source.download else ""
        raise SetupError(f"Could not write the converted model to {plan.destination} ({error.strerror or error}). "
                         f"Nothing was installed.{kept} Free up space or fix the folder, then try again.") from None


# ---- words for progress --------------------------------------------------------------------------------------
def describe_download(progress: hub.DownloadProgress) -> str:
    """One line: bytes done of the total, rate and time left (or what is being checked)."""
    done = f"{format_bytes(progress.done_bytes)} of {format_bytes(progress.total_bytes)}"
    percent = f"{progress.done_bytes / progress.total_bytes:.0%}" if progress.total_bytes else "100%"
    if progress.stage == "done":
        return f"Downloaded and verified {format_bytes(progress.total_bytes)}"
    if progress.stage == "checking":
        return f"Checking what is already downloaded: {done} ({percent})"
    rate = f"{format_bytes(progress.bytes_per_s)}/s" if progress.bytes_per_s else "measuring speed"
    left = f", {format_duration(progress.eta_s)} left" if progress.eta_s is not None else ""
    return f"Downloading {done} ({percent}), {rate}{left}"


def describe_conversion(done: int, total: int, tensor: str) -> str:
    return f"Converting: tensor {done} of {total} ({tensor})"
