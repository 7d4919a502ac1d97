"""The device mesh and where every array lives on it.

Two mesh axes:
- `model` (tensor parallelism): attention heads, the KV cache's kv heads, each expert's intermediate
  dim, the vocabulary.
- `expert` (expert parallelism, optional): which experts a device holds.

A dim that a mesh axis does not divide is replicated over that axis instead (e.g. 9 heads on 2 devices):
the program stays correct, only less of it is split.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from . import weight_table
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
    """A mesh of shape (expert, model); by default every device on the model axis, or with several
    processes (multihost.py) the expert axis across processes and the model axis within each, which
    then must use every device of every process (jax.devices() lists them process by process)."""
    devices = list(devices if devices is not None else jax.devices())
    processes = jax.process_count()
    if shape is None:
        shape = (processes, len(devices) // processes) if processes > 1 else (1, len(devices))
    expert, model = shape
    if expert * model > len(devices):
        raise MeshError(f"mesh {expert}x{model} needs {expert * model} devices, but only {len(devices)} "
                        f"{devices[0].platform} device(s) are available")
    if processes > 1 and expert * model != len(devices):
        raise MeshError(f"mesh {expert}x{model} uses {expert * model} devices, but the {processes} processes "
                        f"have {len(devices)}: with several processes the mesh must use them all")
    return jax.make_mesh((expert, model), (EXPERT, MODEL), axis_types=(AxisType.Auto, AxisType.Auto),
                         devices=devices[: expert * model])


def check_mesh_fits(mesh: Mesh, config: MixtralConfig) -> None:
    experts = mesh.shape[EXPERT]
    if config.num_experts % experts:
        raise MeshError(f"the expert axis ({experts} devices) must divide the number of experts "
                        f"({config.num_experts}); try --mesh 1x{mesh.size}")


def describe(mesh: Mesh) -> str:
    """'8 x cpu, mesh 2x4' for the status bar ('8 x cpu in 2 processes, mesh 2x4' across processes)."""
    platform = mesh.devices.flat[0].platform
    processes = len({d.process_index for d in mesh.devices.flat})
    where = f" in {processes} processes" if processes > 1 else ""
    return f"{mesh.size} x {platform}{where}, mesh {mesh.shape[EXPERT]}x{mesh.shape[MODEL]}"


def split_if_divisible(mesh: Mesh | MeshShape, axis: str, count: int) -> str | None:
    """The mesh axis to split `count` things over, or None (replicate) if it does not divide them."""
    return axis if count % mesh.shape[axis] == 0 else None


def sum_over(x, axes, mesh: Mesh):
    """Inside shard_map: x (a pytree) summed over the devices along `axes` (a mesh axis name, a tuple of
    them, or None), skipping axes of one device (XLA:CPU keeps a psum over one device as an all-reduce
    operation in the program)."""
    many = tuple(a for a in jax.tree.leaves(axes) if mesh.shape[a] > 1)
    return jax.lax.psum(x, many) if many else x


def sharding(mesh: Mesh, *spec) -> NamedSharding:
    return NamedSharding(mesh, P(*spec))


def sharding_rules(config: MixtralConfig, mesh: Mesh | MeshShape) -> dict[str, str | None]:
    """The mesh axis each named weight axis (weight_table.AXES) is split over; None: replicated."""
    # int4 scales come per group of input rows: a split input dim (wo, w2) must also split its groups
    group = config.quant_group_size if config.quantization == "int4" else 1
    return {
        weight_table.VOCAB: split_if_divisible(mesh, MODEL, config.vocab_size),
        weight_table.HIDDEN: None,
        weight_table.Q: split_if_divisible(
            mesh, MODEL, math.gcd(config.num_heads, config.num_heads * config.head_dim // group)),  # whole heads
        weight_table.KV: split_if_divisible(mesh, MODEL, config.num_kv_heads),
        weight_table.EXPERTS: EXPERT,  # check_mesh_fits: the expert axis divides the experts
        weight_table.FFN: split_if_divisible(
            mesh, MODEL, math.gcd(config.intermediate_size, config.intermediate_size // group)),
        weight_table.ROUTES: None,
    }


def weight_specs(config: MixtralConfig, mesh: Mesh) -> dict[str, tuple]:
    """Partition spec (one entry per array dim) of each kind of weight (weight_table's kinds), from
    its named axes and `sharding_rules`. Experts are handed out in groups of stacked experts (moe.py)
    whose first dim splits over the expert axis."""
    rules = sharding_rules(config, mesh)
    return {kind: tuple(rules[axis] for axis in info.axes) for kind, info in weight_table.weight_table(config).items()}


def cache_spec(config: MixtralConfig, mesh: Mesh) -> tuple:
    """K [B, KV, Dh, S] and V [B, KV, S, Dh]: split by kv heads."""
    return (None, split_if_divisible(mesh, MODEL, config.num_kv_heads), None, None)


@dataclasses.dataclass(frozen=True)
class MeshShape:
    """A mesh's axis sizes alone, which is all `sharding_rules` and what follows read: for planning on
    devices that are not in use yet (the set-up plan)."""

    expert: int
    model: int

    @property
    def shape(self) -> dict[str, int]:
        return {EXPERT: self.expert, MODEL: self.model}


def replicated(config: MixtralConfig, mesh: Mesh | MeshShape) -> list[str]:
    """What the model axis cannot split (a dim it does not divide) and so every device of it holds
    whole, e.g. ["attention replicated on 8 devices"] for 6 kv heads on 8 devices."""
    devices = mesh.shape[MODEL]
    if devices == 1:
        return []
    rules = sharding_rules(config, mesh)
    whole = {"attention": rules[weight_table.Q] is None or rules[weight_table.KV] is None,
             "the experts' intermediate dim": rules[weight_table.FFN] is None,
             "the vocabulary": rules[weight_table.VOCAB] is None}
    return [f"{what} replicated on {devices} devices" for what, is_whole in whole.items() if is_whole]


def weight_bytes_per_device(config: MixtralConfig, mesh: Mesh | MeshShape) -> int:
    """The weights one device holds, as `sharding_rules` really split them (a quantized weight's values:
    its scales add a few percent)."""
    rules = sharding_rules(config, mesh)
    itemsize = {None: jnp.dtype(config.dtype).itemsize, "int8": 1, "int4": 0.5}
    total = 0.0
    for info in weight_table.weight_table(config).values():
        split = math.prod(mesh.shape[rules[axis]] for axis in info.axes if rules[axis] is not None)
        size = itemsize[config.quantization if info.quantizable else None]
        total += math.prod(info.shape) * size / split * (config.num_layers if info.per_layer else 1)
    return int(total)


def device_share(config: MixtralConfig, mesh: Mesh | MeshShape, cache_bytes: int) -> int:
    """The bytes one device holds: its weights (`weight_bytes_per_device`) and its part of `cache_bytes`
    of KV cache, split by kv heads (whole where the model axis does not divide them)."""
    kv_split = mesh.shape[MODEL] if split_if_divisible(mesh, MODEL, config.num_kv_heads) else 1
    return weight_bytes_per_device(config, mesh) + cache_bytes // kv_split


def memory_problem(config: MixtralConfig, mesh: Mesh, cache_bytes: int) -> str | None:
    """Why this process's accelerators cannot hold their share of the model (its weights as the mesh
    splits them + `cache_bytes` of KV cache split by kv heads), or None. CPU devices share the RAM, which
    the set-up plan checks (the page cache makes "free now" meaningless here): None."""
    device = next(d for d in mesh.devices.flat if d.process_index == jax.process_index())
    limit = (device.memory_stats() or {}).get("bytes_limit") if device.platform != "cpu" else None
    share = device_share(config, mesh, cache_bytes)
    if limit is None or share <= limit:
        return None
    notes = "".join(f"; {note}" for note in replicated(config, mesh))
    return (f"mesh {mesh.shape[EXPERT]}x{mesh.shape[MODEL]} does not fit: each device would hold "
            f"{share / 1e9:.1f} GB (weights and one conversation's KV cache{notes}), but has {limit / 1e9:.1f} GB; "
            "try a mesh over more devices, a smaller --context-length or a quantized model")
