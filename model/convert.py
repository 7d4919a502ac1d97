"""Hugging Face safetensors <-> our checkpoint, streamed tensor by tensor.

Import reads each source tensor (or one expert of it) on its own, transposes it to `[in, out]`, casts or
quantizes it and appends it to the output file, so peak memory is a few tensors, never the model. It
builds no torch model and initialises nothing at random. The output is written to a hidden temp folder
next to the destination and renamed into place only when complete, with a manifest of sha256s.

Source names: Mixtral's `model.layers.{l}.block_sparse_moe.experts.{e}.w1/w2/w3.weight` (the hub's
layout) or transformers' fused `mlp.experts.gate_up_proj` / `down_proj`; dense Llama/Mistral
`mlp.{gate,up,down}_proj` become N identical experts with a zero router (`upcycle_experts=N`): every
expert pair the router picks then sums to the dense MLP.
"""

from __future__ import annotations

import datetime
import json
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from . import disk, quantize
from .manifest import CONFIG, MANIFEST, TOKENIZER_FILES, read_config, sha256_file, vocabulary_problem
from .config import ConfigError, MixtralConfig
from .errors import UserError
from .safetensors_io import NUMPY_DTYPES, Producer, SafetensorsError, TensorFiles, TensorSpec, write_sharded
from .tokenizer import TokenizerError, load_tokenizer

Progress = Callable[[int, int, str], None]  # (tensors done, tensors in all, current tensor)


class ConversionError(UserError):
    """The source cannot be converted, or the destination is in the way; the message says why."""


class _Source:
    """Reads one HF checkpoint's tensors by our names, as float32 `[in, out]` numpy arrays."""

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

    def whole(self, ours: str) -> np.ndarray:
        """A non-expert tensor by our name, in our layout."""
        m = re.fullmatch(r"layers\.(\d+)\.(\w+)", ours)
        if m is None:
            name = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight",
                    "lm_head": "lm_head.weight"}[ours]
            return self._get(name) if ours != "lm_head" else self._get(name).T
        layer, kind = f"model.layers.{m[1]}", m[2]
        if kind in ("attn_norm", "ffn_norm"):
            return self._get(f"{layer}.{'input_layernorm' if kind == 'attn_norm' else 'post_attention_layernorm'}.weight")
        if kind in ("wq", "wk", "wv", "wo"):
            return self._get(f"{layer}.self_attn.{kind[1]}_proj.weight").T
        if kind == "router":
            if self.upcycled:
                return np.zeros((self.config.hidden_size, self.config.num_experts), np.float32)
            return self._get(f"{layer}.{'mlp' if self.fused else 'block_sparse_moe'}.gate.weight").T
        raise KeyError(ours)

    def expert(self, layer: int, kind: str, e: int) -> np.ndarray:
        """Expert e's w1/w3 [D, I] or w2 [I, D]."""
        prefix = f"model.layers.{layer}"
        if self.upcycled:
            proj = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}[kind]
            return self._get(f"{prefix}.mlp.{proj}.weight").T
        if self.fused:
            I = self.config.intermediate_size
            if kind == "w2":
                return self.files.read_rows(f"{prefix}.mlp.experts.down_proj", e, e + 1)[0].T
            gate_up = self.files.read_rows(f"{prefix}.mlp.experts.gate_up_proj", e, e + 1)[0]  # [2I, D]
            return (gate_up[:I] if kind == "w1" else gate_up[I:]).T
        return self._get(f"{prefix}.block_sparse_moe.experts.{e}.{kind}.weight").T


def _plan(source: _Source, config: MixtralConfig) -> list[tuple[TensorSpec, Producer]]:
    """Every output tensor, in file order, with the function that produces its bytes."""
    c = config
    dtype = NUMPY_DTYPES[c.dtype]
    shapes = c.tensor_shapes()
    plan: list[tuple[TensorSpec, Producer]] = []

    def dense(name: str, shape: tuple[int, ...]):
        plan.append((TensorSpec(name, dtype, shape), lambda: [source.whole(name).astype(dtype)]))

    def linear(name: str, shape: tuple[int, ...], read_parts: Callable[[], Iterator[np.ndarray]]):
        """A weight [..., in, out] produced part by part (experts stack on the first dim)."""
        if c.quantization is None:
            plan.append((TensorSpec(name, dtype, shape), lambda: (p.astype(dtype) for p in read_parts())))
            return
        mode, group = c.quantization, c.quant_group_size
        *lead, n_in, n_out = shape
        if mode == "int4" and n_in % group:
            raise ConversionError(f"int4: {name} has {n_in} input rows, not a multiple of the group size {group}")
        names = quantize.PARAMS[mode]
        params: list[list[np.ndarray]] = [[] for _ in names]  # filled while the kernel is written

        def kernel_parts():
            for part in read_parts():
                q, part_params = quantize.quantize(part, mode, group)
                for collected, p in zip(params, part_params):
                    collected.append(p)
                yield q

        if mode == "int8":
            kernel = TensorSpec(name, np.dtype(np.int8), shape)
            param_shape = (*lead, n_out)
        else:
            kernel = TensorSpec(name, np.dtype(np.uint8), (*lead, n_in // 2, n_out))
            param_shape = (*lead, n_in // group, n_out)
        plan.append((kernel, kernel_parts))
        for param, collected in zip(names, params):  # written right after the kernel that fills them
            plan.append((TensorSpec(f"{name}.{param}", np.dtype(np.float32), param_shape), lambda parts=collected: parts))

    dense("embed", shapes["embed"])
    for layer in range(c.num_layers):
        p = f"layers.{layer}"
        dense(f"{p}.attn_norm", shapes["attn_norm"])
        for kind in ("wq", "wk", "wv", "wo"):
            linear(f"{p}.{kind}", shapes[kind], lambda n=f"{p}.{kind}": iter([source.whole(n)]))
        dense(f"{p}.ffn_norm", shapes["ffn_norm"])
        dense(f"{p}.router", shapes["router"])
        for kind in ("w1", "w3", "w2"):
            linear(f"{p}.{kind}", shapes[kind],
                   lambda layer=layer, kind=kind: (source.expert(layer, kind, e)[None] for e in range(c.num_experts)))
    dense("final_norm", shapes["final_norm"])
    if not c.tie_word_embeddings:
        dense("lm_head", shapes["lm_head"])
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
        manifest = {"format": "mixtral-chat", "format_version": 1,
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
               on_progress: Progress | None = None, max_file_bytes: int = 4 << 30) -> Path:
    """An HF folder (config.json + safetensors) -> our checkpoint at out_dir. Returns out_dir.
    `source` describes where the weights came from, for `mixtral-chat models` (default: the hub repo
    or the folder)."""
    hf_dir = Path(hf_dir)
    quantization = None if quantize in (None, "none") else quantize
    try:
        hf_config = json.loads((hf_dir / "config.json").read_text())
    except FileNotFoundError:
        raise ConversionError(f"{hf_dir} has no config.json: is it a Hugging Face model folder?") from None
    except (OSError, ValueError) as e:
        raise ConversionError(f"cannot read {hf_dir / 'config.json'}: {e}") from None
    try:
        config = MixtralConfig.from_hf(hf_config, upcycle_experts=upcycle_experts, dtype=dtype,
                                       quantization=quantization)
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

    def ours(name: str, expert: int | None = None) -> np.ndarray:
        """A weight (or one expert of it), dequantized if need be."""
        def read(tensor: str) -> np.ndarray:
            return files.read(tensor) if expert is None else files.read_rows(tensor, expert, expert + 1)[0]

        if not c.quantization or name.rsplit(".", 1)[-1] not in quantize.QUANTIZED_WEIGHTS:
            return read(name)
        params = tuple(read(f"{name}.{p}") for p in quantize.PARAMS[c.quantization])
        return quantize.dequantize_numpy(read(name), params, c.quantization, c.quant_group_size)

    plan: list[tuple[TensorSpec, Producer]] = []

    def add(hf_name: str, shape: tuple[int, ...], produce: Callable[[], np.ndarray]):
        plan.append((TensorSpec(hf_name, dtype, shape), lambda: [np.ascontiguousarray(produce()).astype(dtype)]))

    D, I, V = c.hidden_size, c.intermediate_size, c.vocab_size
    q_out, kv_out = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    add("model.embed_tokens.weight", (V, D), lambda: ours("embed"))
    for layer in range(c.num_layers):
        p, hf = f"layers.{layer}", f"model.layers.{layer}"
        add(f"{hf}.input_layernorm.weight", (D,), lambda p=p: ours(f"{p}.attn_norm"))
        for kind, shape in (("q", (q_out, D)), ("k", (kv_out, D)), ("v", (kv_out, D)), ("o", (D, q_out))):
            add(f"{hf}.self_attn.{kind}_proj.weight", shape, lambda p=p, kind=kind: ours(f"{p}.w{kind}").T)
        add(f"{hf}.post_attention_layernorm.weight", (D,), lambda p=p: ours(f"{p}.ffn_norm"))
        add(f"{hf}.block_sparse_moe.gate.weight", (c.num_experts, D), lambda p=p: ours(f"{p}.router").T)
        for e in range(c.num_experts):
            for kind, shape in (("w1", (I, D)), ("w2", (D, I)), ("w3", (I, D))):
                add(f"{hf}.block_sparse_moe.experts.{e}.{kind}.weight", shape,
                    lambda p=p, kind=kind, e=e: ours(f"{p}.{kind}", e).T)
    add("model.norm.weight", (D,), lambda: ours("final_norm"))
    if not c.tie_word_embeddings:
        add("lm_head.weight", (V, D), lambda: ours("lm_head").T)

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

