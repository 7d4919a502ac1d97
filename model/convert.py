"""Hugging Face safetensors <-> our checkpoint, streamed tensor by tensor.

Import reads each source tensor (or one expert of it) on its own, puts it in our layout (weight_table.py:
the one list of weights, their shapes and HF names), casts or quantizes it and appends it to the output file, so peak memory is a few tensors, never the model. It
builds no torch model and initialises nothing at random. The output is written to a hidden temp folder
next to the destination and renamed into place only when complete, with a manifest of sha256s.

Source names: Mixtral's `model.layers.{l}.block_sparse_moe.experts.{e}.w1/w2/w3.weight` (the hub's
layout) or transformers' fused `mlp.experts.gate_up_proj` / `down_proj`; dense Llama/Mistral
`mlp.{gate,up,down}_proj` become N identical experts with a zero router (`upcycle_experts=N`): every
expert pair the router picks then sums to the dense MLP.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from . import disk, quantize
from .config import FORMAT_VERSIONS, ConfigError, MixtralConfig
from .errors import UserError
from .manifest import CONFIG, MANIFEST, TOKENIZER_FILES, read_config, sha256_file, vocabulary_problem
from .safetensors_io import NUMPY_DTYPES, Producer, SafetensorsError, TensorFiles, TensorSpec, write_sharded
from .tokenizer import TokenizerError, load_tokenizer
from .weight_table import WeightInfo, checkpoint_weights, stored_out_major, swap_last

Progress = Callable[[int, int, str], None]  # (tensors done, tensors in all, current tensor)


class ConversionError(UserError):
    """The source cannot be converted, or the destination is in the way; the message says why."""


class _Source:
    """Reads one HF checkpoint's tensors as numpy arrays in our layout (weight_table.py): by the table's
    HF names (Mixtral as the hub has it), or transformers' fused experts, or a dense model's MLP as
    every expert with a zero router (`upcycled`)."""

    def __init__(self, files: TensorFiles, config: MixtralConfig, upcycled: bool):
        self.files, self.config, self.upcycled = files, config, upcycled
        self.fused = "model.layers.0.mlp.experts.gate_up_proj" in files

    def _get(self, name: str) -> np.ndarray:
        if name not in self.files:
            raise ConversionError(f"the source has no tensor {name!r}: is it a complete {self._kind} checkpoint?")
        return self.files.read(name)

    @property
    def _kind(self) -> str:
        return "Llama/Mistral" if self.upcycled else "Mixtral"

    def whole(self, info: WeightInfo, layer: int | None) -> np.ndarray:
        """A weight that is not a stack of experts."""
        if info.kind == "router" and self.upcycled:
            return np.zeros(info.shape, np.float32)
        name = f"model.layers.{layer}.mlp.gate.weight" if info.kind == "router" and self.fused else info.hf(layer)
        tensor = self._get(name)
        return tensor.T if info.hf_transposed else tensor

    def expert(self, info: WeightInfo, layer: int, e: int) -> np.ndarray:
        """Expert e of a stack: w1/w3 [D, I] or w2 [I, D]."""
        prefix = f"model.layers.{layer}"
        if self.upcycled:
            proj = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}[info.kind]
            return self._get(f"{prefix}.mlp.{proj}.weight").T
        if self.fused:
            I = self.config.intermediate_size
            if info.kind == "w2":
                return self.files.read_rows(f"{prefix}.mlp.experts.down_proj", e, e + 1)[0].T
            gate_up = self.files.read_rows(f"{prefix}.mlp.experts.gate_up_proj", e, e + 1)[0]  # [2I, D]
            return (gate_up[:I] if info.kind == "w1" else gate_up[I:]).T
        return self._get(info.hf(layer, e)).T


def _plan(source: _Source, config: MixtralConfig) -> list[tuple[TensorSpec, Producer]]:
    """Every output tensor, in file order (weight_table.checkpoint_weights), with the function that
    produces its bytes: stacked experts one expert at a time, quantizable weights quantized when asked."""
    c = config
    dtype = NUMPY_DTYPES[c.dtype]
    plan: list[tuple[TensorSpec, Producer]] = []

    def add(name: str, info: WeightInfo, read_parts: Callable[[], Iterator[np.ndarray]]):
        """A weight produced part by part (experts stack on the first dim), its tensors of its rank
        stored out-major where the table says so."""
        swapped = stored_out_major(info, c)

        def stored(shape: tuple[int, ...]) -> tuple[int, ...]:
            return swap_last(shape) if swapped and len(shape) == len(info.shape) else shape

        def laid_out(part: np.ndarray) -> np.ndarray:
            return np.ascontiguousarray(part.swapaxes(-1, -2)) if swapped and part.ndim == len(info.shape) else part

        if c.quantization is None or not info.quantizable:
            plan.append((TensorSpec(name, dtype, stored(info.shape)),
                         lambda: (laid_out(p.astype(dtype)) for p in read_parts())))
            return
        mode, group = c.quantization, c.quant_group_size
        if mode == "int4" and info.shape[-2] % group:
            raise ConversionError(f"int4: {name} has {info.shape[-2]} input rows, not a multiple of the group size {group}")
        names = quantize.PARAMS[mode]
        params: list[list[np.ndarray]] = [[] for _ in names]  # filled while the values are written

        def value_parts():
            for part in read_parts():
                q, part_params = quantize.quantize(part, mode, group)
                for collected, p in zip(params, part_params):
                    collected.append(laid_out(p))
                yield laid_out(q)

        values_dtype, values_shape = quantize.stored_values(info.shape, mode)
        plan.append((TensorSpec(name, values_dtype, stored(values_shape)), value_parts))
        param_shape = stored(quantize.param_shape(info.shape, mode, group))
        for param, collected in zip(names, params):  # written right after the values that fill them
            plan.append((TensorSpec(f"{name}.{param}", quantize.PARAM_DTYPES[mode], param_shape), lambda parts=collected: parts))

    for layer, info in checkpoint_weights(c):
        if info.stacked_experts:
            parts = lambda info=info, layer=layer: (source.expert(info, layer, e)[None] for e in range(c.num_experts))  # noqa: E731
        else:
            parts = lambda info=info, layer=layer: iter([source.whole(info, layer)])  # noqa: E731
        add(info.name(layer), info, parts)
    return plan


def _hub_origin(hf_dir: Path) -> dict:
    """repo id and commit when the folder is a snapshot in the Hugging Face cache."""
    m = re.search(r"models--([^/]+)--([^/]+)/snapshots/([0-9a-f]{40})", str(hf_dir.resolve()))
    return {"repo_id": f"{m[1]}/{m[2]}", "commit": m[3]} if m else {}


def _finish(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Move the complete conversion into place; an existing checkpoint is replaced only when asked."""
    if out_dir.exists():
        if not overwrite:
            raise ConversionError(f"{out_dir} already exists; choose another destination or remove it first")
        old = out_dir.with_name(f".{out_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old)
    else:
        tmp.rename(out_dir)


def _write_checkpoint(out_dir: Path, config: MixtralConfig, plan: list[tuple[TensorSpec, Producer]],
                      extra_files: list[Path], manifest: dict, overwrite: bool, on_progress: Progress | None,
                      max_file_bytes: int) -> Path:
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ConversionError(f"{out_dir} already exists; choose another destination or remove it first")
    try:
        disk.make_folder(out_dir.parent)
    except disk.DiskError as e:
        raise ConversionError(str(e)) from None
    tmp = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)  # a conversion that was interrupted earlier
    needed = sum(spec.nbytes for spec, _ in plan) + sum(f.stat().st_size for f in extra_files)
    if needed > disk.free_bytes(out_dir.parent):  # an old checkpoint being replaced stays until the end
        raise ConversionError(f"not enough space for {out_dir}: the checkpoint needs {disk.format_bytes(needed)}, "
                              f"the disk has {disk.format_bytes(disk.free_bytes(out_dir.parent))} free; free "
                              "some space or choose another destination")
    try:
        tmp.mkdir()
        hashes = write_sharded(tmp, plan, max_file_bytes=max_file_bytes, on_tensor=on_progress,
                               metadata={"format": "mixtral-chat"})
        for f in extra_files:
            shutil.copyfile(f, tmp / f.name)
        config.save(tmp / CONFIG)
        listed = {name: {"bytes": (tmp / name).stat().st_size, "sha256": h} for name, h in hashes.items()}
        for f in sorted(tmp.iterdir()):
            if f.name not in listed and f.name != MANIFEST:
                listed[f.name] = {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
        manifest = {"format": "mixtral-chat", "format_version": FORMAT_VERSIONS[config.weight_layout],
                    "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    **manifest, "files": listed}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _finish(tmp, out_dir, overwrite)
    except OSError as e:  # a full or read-only disk: one line, and no partial checkpoint left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConversionError(f"{disk.describe(e, out_dir, needed)}; the partial output was removed") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def convert_hf(hf_dir: str | Path, out_dir: str | Path, dtype: str = "float32", quantize: str | None = None,
               upcycle_experts: int | None = None, *, overwrite: bool = False, source: str | None = None,
               on_progress: Progress | None = None, max_file_bytes: int = 4 << 30,
               weight_layout: str = "out_major") -> Path:
    """An HF folder (config.json + safetensors) -> our checkpoint at out_dir. Returns out_dir.
    `source` describes where the weights came from, for `mixtral-chat models` (default: the hub repo
    or the folder). `weight_layout` "in_major" writes format 1, as versions before 2 did (tests): linear
    weights [in, out], the LM head not quantized."""
    hf_dir = Path(hf_dir)
    quantization = None if quantize in (None, "none") else quantize
    try:
        hf_config = json.loads((hf_dir / "config.json").read_text())
    except FileNotFoundError:
        raise ConversionError(f"{hf_dir} has no config.json: is it a Hugging Face model folder?") from None
    except (OSError, ValueError) as e:
        raise ConversionError(f"cannot read {hf_dir / 'config.json'}: {e}") from None
    try:
        config = MixtralConfig.from_hf(hf_config, upcycle_experts=upcycle_experts, dtype=dtype, quantization=quantization)
        config = dataclasses.replace(config, weight_layout=weight_layout,
                                     lm_head_quantized=config.lm_head_quantized and weight_layout == "out_major")
        files = TensorFiles(hf_dir)
    except (ConfigError, SafetensorsError) as e:
        raise ConversionError(str(e)) from None
    tokenizer_files = [hf_dir / n for n in TOKENIZER_FILES if (hf_dir / n).is_file()]
    if not any(f.name in ("tokenizer.model", "tokenizer.json") for f in tokenizer_files):
        raise ConversionError(f"{hf_dir} has neither tokenizer.model nor tokenizer.json")
    try:
        vocab = load_tokenizer(hf_dir).vocab_size
    except TokenizerError as e:
        raise ConversionError(str(e)) from None
    if problem := vocabulary_problem(config, vocab, hf_dir):
        raise ConversionError(problem)
    reader = _Source(files, config, upcycled=upcycle_experts is not None)
    manifest = {
        "source": {"path": str(hf_dir.resolve()), "model_type": hf_config.get("model_type"), **_hub_origin(hf_dir),
                   **({"description": source} if source else {}),
                   "files": {f.name: f.stat().st_size for f in files.files()}},
        "dtype": dtype, "quantization": quantization, "upcycled_experts": upcycle_experts,
        "num_params": config.num_params,
    }
    try:
        return _write_checkpoint(Path(out_dir), config, _plan(reader, config), tokenizer_files, manifest,
                                 overwrite, on_progress, max_file_bytes)
    except SafetensorsError as e:
        raise ConversionError(f"{e}; download or copy the model again") from None


def export_hf(ckpt_dir: str | Path, out_dir: str | Path, *, max_file_bytes: int = 4 << 30) -> Path:
    """Our checkpoint -> an HF MixtralForCausalLM folder (classic expert names), streamed the same way.
    Quantized checkpoints are written dequantized, in float32."""
    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    config = read_config(ckpt_dir)
    files = TensorFiles(ckpt_dir)
    c = config
    dtype = np.dtype(np.float32) if c.quantization else NUMPY_DTYPES[c.dtype]

    def ours(info: WeightInfo, layer: int | None, expert: int | None = None) -> np.ndarray:
        """A weight (or one expert of it), dequantized if need be, in the HF layout."""
        name = info.name(layer)

        def read(tensor: str) -> np.ndarray:
            """In the [.., in, out] layout (an out-major tensor of the weight's rank swapped back)."""
            a = files.read(tensor) if expert is None else files.read_rows(tensor, expert, expert + 1)
            if stored_out_major(info, c) and a.ndim == len(info.shape):
                a = a.swapaxes(-1, -2)
            return a if expert is None else a[0]

        if c.quantization and info.quantizable:
            params = tuple(read(f"{name}.{p}") for p in quantize.PARAMS[c.quantization])
            weight = quantize.dequantize_numpy(read(name), params, c.quantization, c.quant_group_size)
        else:
            weight = read(name)
        return weight.T if info.hf_transposed else weight

    plan: list[tuple[TensorSpec, Producer]] = []
    for layer, info in checkpoint_weights(c):
        for expert in range(c.num_experts) if info.stacked_experts else (None,):
            plan.append((TensorSpec(info.hf(layer, expert), dtype, info.hf_shape()),
                         lambda info=info, layer=layer, expert=expert:
                         [np.ascontiguousarray(ours(info, layer, expert)).astype(dtype)]))

    out_dir.mkdir(parents=True, exist_ok=True)
    write_sharded(out_dir, plan, max_file_bytes=max_file_bytes, metadata={"format": "pt"})
    hf_config = c.to_hf()
    if c.quantization:
        hf_config["torch_dtype"] = "float32"
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        if (ckpt_dir / name).is_file():
            shutil.copyfile(ckpt_dir / name, out_dir / name)
    return out_dir

