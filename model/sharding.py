"""The device mesh and where every array lives on it.

Two mesh axes:
- `model` (tensor parallelism): attention heads, the KV cache's kv heads, each expert's intermediate
  dim, the vocabulary.
- `expert` (expert parallelism, optional): which experts a device holds.

A dim that a mesh axis does not divide is replicated over that axis instead (e.g. 9 heads on 2 devices):
the program stays correct, only less of it is split.
"""

from __future__ import annotations

import math
import re

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from .config import MixtralConfig
from .errors import UserError

EXPERT, MODEL = "expert", "model"


class MeshError(UserError, ValueError):
    """A mesh shape that does not fit the devices or the model, with the reason."""


def parse_mesh_shape(text: str) -> tuple[int, int]:
    """'2x4' -> (2, 4): devices on the expert axis x devices on the model axis."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX*]\s*(\d+)\s*", text)
    if not m or int(m[1]) < 1 or int(m[2]) < 1:
        raise MeshError(f"--mesh must look like AxB with positive integers (e.g. 1x8, 2x4), got {text!r}")
    return int(m[1]), int(m[2])


def make_mesh(shape: tuple[int, int] | None = None, devices=None) -> Mesh:
    """A mesh of shape (expert, model); by default every device on the model axis."""
    devices = list(devices if devices is not None else jax.devices())
    expert, model = shape if shape is not None else (1, len(devices))
    if expert * model > len(devices):
        raise MeshError(f"mesh {expert}x{model} needs {expert * model} devices, but only {len(devices)} "
                        f"{devices[0].platform} device(s) are available")
    return jax.make_mesh((expert, model), (EXPERT, MODEL), axis_types=(AxisType.Auto, AxisType.Auto),
                         devices=devices[: expert * model])


def check_mesh_fits(mesh: Mesh, config: MixtralConfig) -> None:
    experts = mesh.shape[EXPERT]
    if config.num_experts % experts:
        raise MeshError(f"the expert axis ({experts} devices) must divide the number of experts "
                        f"({config.num_experts}); try --mesh 1x{mesh.size}")


def describe(mesh: Mesh) -> str:
    """'8 x cpu, mesh 2x4' for the status bar."""
    platform = mesh.devices.flat[0].platform
    return f"{mesh.size} x {platform}, mesh {mesh.shape[EXPERT]}x{mesh.shape[MODEL]}"


def split_if_divisible(mesh: Mesh, axis: str, count: int) -> str | None:
    """The mesh axis to split `count` things over, or None (replicate) if it does not divide them."""
    return axis if count % mesh.shape[axis] == 0 else None


def sharding(mesh: Mesh, *spec) -> NamedSharding:
    return NamedSharding(mesh, P(*spec))


def weight_specs(config: MixtralConfig, mesh: Mesh) -> dict[str, tuple]:
    """Partition spec (one entry per array dim) of each kind of weight, by our checkpoint name's suffix.

    Experts live in groups of shape [A, D, I] (A = expert-axis size), see docs/architecture.md.
    """
    # int4 scales come per group of input rows: a split input dim (wo, w2) must also split its groups
    group = config.quant_group_size if config.quantization == "int4" else 1
    heads = split_if_divisible(mesh, MODEL, math.gcd(config.num_heads, config.num_heads * config.head_dim // group))
    kv_heads = split_if_divisible(mesh, MODEL, config.num_kv_heads)
    ffn = split_if_divisible(mesh, MODEL, math.gcd(config.intermediate_size, config.intermediate_size // group))
    vocab = split_if_divisible(mesh, MODEL, config.vocab_size)
    return {
        "embed": (vocab, None),
        "attn_norm": (None,), "ffn_norm": (None,), "final_norm": (None,),
        "wq": (None, heads), "wk": (None, kv_heads), "wv": (None, kv_heads), "wo": (heads, None),
        "router": (None, None),
        "w1": (EXPERT, None, ffn), "w3": (EXPERT, None, ffn), "w2": (EXPERT, ffn, None),
        "lm_head": (None, vocab),
    }


def cache_spec(config: MixtralConfig, mesh: Mesh) -> tuple:
    """K [B, KV, Dh, S] and V [B, KV, S, Dh]: split by kv heads."""
    return (None, split_if_divisible(mesh, MODEL, config.num_kv_heads), None, None)
