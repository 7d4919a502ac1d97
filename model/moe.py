"""The sparse MoE block: each token goes to its top-k of E SwiGLU experts, and only chosen experts run.

Routing: softmax over the router logits, top-k, renormalised; the chosen experts' outputs are weighted
and summed in float32. Shapes: N tokens (batch x time), D hidden, I intermediate per expert, E experts,
k experts per token, A devices on the mesh's expert axis, M on its model axis.

Experts are stored in groups of `group_size` stacked experts ([group_size, D, I] for w1/w3), split over
the expert axis (`ExpertLayout`): where XLA:CPU's matmuls multiply them (no CPU kernels) a group is A
experts, one per device (XLA:CPU multiplies by a slice of a stacked array ~10x below memory speed, by a
whole array at memory speed); where kernels read them in place (the CPU's fused call,
`branchless` on a GPU) one group of all E, on a GPU its last two dims swapped where the expert_gemv
kernel reads that layout faster. (Each stored array is an input of every program: a decode step of
int4 mini-mixtral took 701, 0.4 ms a token to hand over, with a group per expert.)

One function per strategy, each with its own routing value and its own `shard_map` (every device runs
its own experts; a psum adds the devices' partial sums):
- `decode_in_place`: batch-1 decode on a GPU; the expert_gemv kernel reads the chosen experts' weights
  in place (no cond: a GPU cond waits for the host).
- `fused_experts`: on the CPU kernels (every weight type): one kernel call takes the router's logits and
  every expert of the device, routes the tokens as `route` does and runs each expert a token chose on
  the tokens that chose it, all of them at once (each expert's weights read once a call).
- `few_tokens_cond`: up to MOE_TILE tokens on the CPU, on XLA's matmuls; each expert under a cond,
  skipped unless a token chose it, run on all the tokens with the others weighted 0 (batch-1 decode
  reads just k experts).
- `sorted_tiles`: more tokens on the CPU, on XLA's matmuls; assignments sorted by expert, and a loop per
  expert over the tiles of tokens routed to it (data-dependent trip count: N * k rows in all instead of
  N * E). XLA:CPU copies an expert's weights into its loop first: ~7% of a 512-token prefill.
- `grouped_rows`: more than one token on a GPU; the rows grouped by expert go through the
  grouped_matmul kernel, every expert in one static grid (no loop, no host round trip).
On a GPU quantized experts are stored out-major ([.., out, in]; int4 packed two per byte along the
inputs, its scales and offsets [.., out, in/group]), as both kernels read them; on a CPU with the native
kernels (cpu_matmul.py) every expert is, for `fused_experts`.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

from . import cpu_matmul, expert_gemv, gpu_linear, grouped_matmul, quantize
from .config import MixtralConfig
from .grouped_matmul import GroupedRows
from .linear import Linear, Matrix, Weights, out_major, out_major_specs
from .sharding import EXPERT, MODEL, sum_over

MOE_TILE = 64  # tokens per expert matmul in prefill; up to this many tokens take the cond path


class ChosenExperts(NamedTuple):
    """`decode_in_place`'s routing: the one token's experts."""
    experts: jax.Array  # int32 [k]
    weights: jax.Array  # float32 [k]


class RouterLogits(NamedTuple):
    """`fused_experts`' routing, which the kernel makes itself (as `route`)."""
    logits: jax.Array  # float32 [N, E]
    live: jax.Array  # bool [N]: real tokens (bucket padding chooses no expert)


class TokenWeights(NamedTuple):
    """`few_tokens_cond`'s routing."""
    weights: jax.Array  # float32 [N, E]: each token's weight for each expert, 0 where not chosen
    counts: jax.Array  # int32 [E]: tokens that chose each expert


class SortedAssignments(NamedTuple):
    """`sorted_tiles`' routing: the N * k (token, expert) assignments sorted by expert."""
    token_of: jax.Array  # int32 [N * k]: the token of each assignment
    weight_of: jax.Array  # float32 [N * k]
    starts: jax.Array  # int32 [E]: each expert's first assignment
    counts: jax.Array  # int32 [E]


def route(logits: jax.Array, live: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Router logits [N, E] -> (weights float32 [N, k], experts int32 [N, k]); tokens not `live` [N]
    (bucket padding) go to expert E, which does not exist."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    top_w, top_e = jax.lax.top_k(probs, k)
    return top_w / top_w.sum(axis=-1, keepdims=True), jnp.where(live[:, None], top_e, logits.shape[-1])


def expert_counts(top_e: jax.Array, num_experts: int) -> jax.Array:
    return jnp.zeros(num_experts + 1, jnp.int32).at[top_e.reshape(-1)].add(1)[:num_experts]


@dataclasses.dataclass(frozen=True)
class ExpertLayout:
    """Where a layer's experts live: static, hashable (an NNX static attribute)."""
    mesh: Mesh
    num_experts: int
    group_size: int  # experts per stored array
    out_major: bool  # kernels stored [.., out, in]
    cpu_kernels: bool  # multiplied through the CPU kernels (out_major)
    ffn_split: bool  # is the intermediate dim split over the model axis?
    quantization: str | None
    quant_group: int
    experts_per_token: int
    specs: tuple[tuple, tuple, tuple]  # w1, w3, w2 partition specs of the on-disk [E, in, out] layout

    @property
    def per_device(self) -> int:
        """Experts of a group on each device."""
        return self.group_size // self.mesh.shape[EXPERT]

    @property
    def num_groups(self) -> int:
        return self.num_experts // self.group_size

    def shard_map(self, local, routing_specs):
        """`local(xs, routing, w1, w3, w2)` on each device over its experts, the partial sums added up."""
        names = quantize.PARAMS.get(self.quantization, ())

        def matrix_specs(spec):
            if self.out_major:
                return [out_major_specs(spec, self.quantization)] * self.num_groups
            return [(P(*spec), tuple(P(*quantize.param_spec(spec, self.quantization)) for _ in names))] * self.num_groups

        sum_axes = (EXPERT, MODEL) if self.ffn_split else (EXPERT,)
        return jax.shard_map(
            lambda *args: sum_over(local(*args), sum_axes, self.mesh), mesh=self.mesh,
            in_specs=(P(), routing_specs) + tuple(matrix_specs(spec) for spec in self.specs),
            out_specs=P(), check_vma=False)

    def ffn(self, x: jax.Array, w1: Matrix, w3: Matrix, w2: Matrix) -> jax.Array:
        """One expert's SwiGLU on x [n, D] -> float32 [n, D]; kernels [D, I] (or stored out-major)."""
        def matmul(h, matrix):
            kernel, params = expert_gemv.as_matmul_operands(*matrix) if self.out_major else matrix
            return quantize.matmul(h, kernel, params, self.quantization, self.quant_group)

        h = jax.nn.silu(matmul(x, w1)) * matmul(x, w3)
        return matmul(h, w2).astype(jnp.float32)

    def local_expert_ids(self) -> list[jax.Array]:
        """The global index of each expert on this device (in shard_map), group by group."""
        a = jax.lax.axis_index(EXPERT)
        return [g * self.group_size + a * self.per_device + i for g in range(self.num_groups) for i in range(self.per_device)]

    def local_experts(self, w1: list[Matrix], w3: list[Matrix], w2: list[Matrix]):
        """(global expert index, (w1, w3, w2) of that expert) for each expert on this device (in shard_map)."""
        ids = iter(self.local_expert_ids())
        for g in range(self.num_groups):
            for i in range(self.per_device):
                mats = tuple((kernel[i], tuple(p[i] for p in params)) for kernel, params in (w1[g], w3[g], w2[g]))
                yield next(ids), mats


def decode_in_place(layout: ExpertLayout, xs: jax.Array, routing: ChosenExperts, w1, w3, w2) -> jax.Array:
    """Batch-1 decode: xs [1, D] through the chosen experts, read in place by the expert_gemv kernel
    (one group of all experts). -> float32 [1, D]."""
    k, D = routing.experts.shape[0], xs.shape[-1]
    interpret = layout.mesh.devices.flat[0].platform == "cpu"  # the kernel's tests run it interpreted

    def local(xs, routing, w1, w3, w2):
        mine = routing.experts - jax.lax.axis_index(EXPERT) * layout.per_device  # among this device's
        here = (mine >= 0) & (mine < layout.per_device)
        mine, weight = jnp.where(here, mine, 0), jnp.where(here, routing.weights, 0.0)

        def gemv(h, matrices):
            (kernel, params), = matrices
            return expert_gemv.expert_gemv(h, mine, kernel, *params, interpret=interpret)

        xk = jnp.broadcast_to(xs, (k, D))
        h = (jax.nn.silu(gemv(xk, w1)) * gemv(xk, w3)).astype(xs.dtype)  # [k, I/M]
        return (gemv(h, w2) * weight[:, None]).sum(axis=0, keepdims=True)

    return layout.shard_map(local, ChosenExperts(P(), P()))(xs, routing, w1, w3, w2)


def few_tokens_cond(layout: ExpertLayout, xs: jax.Array, routing: TokenWeights, w1, w3, w2) -> jax.Array:
    """xs [N, D], N <= MOE_TILE: every expert a token chose, on all N tokens. -> float32 [N, D]."""
    def local(xs, routing, w1, w3, w2):
        out = jnp.zeros(xs.shape, jnp.float32)
        for expert, mats in layout.local_experts(w1, w3, w2):
            weight = jax.lax.dynamic_index_in_dim(routing.weights, expert, axis=1)  # [N, 1]
            out = jax.lax.cond(routing.counts[expert] > 0,
                               lambda o, mats=mats, weight=weight: o + layout.ffn(xs, *mats) * weight,
                               lambda o: o, out)
        return out

    return layout.shard_map(local, TokenWeights(P(), P()))(xs, routing, w1, w3, w2)


def fused_experts(layout: ExpertLayout, xs: jax.Array, routing: RouterLogits, w1, w3, w2) -> jax.Array:
    """xs [N, D] on the CPU kernels: all of a device's experts (one group of all E: the device's are
    experts first .. first + per_device - 1) in one call, which routes the tokens and runs the experts a
    token chose. -> float32 [N, D]."""
    assert layout.num_groups == 1

    def local(xs, routing, w1, w3, w2):
        first = jax.lax.axis_index(EXPERT) * layout.per_device
        return cpu_matmul.moe(xs, routing.logits, routing.live, first, list(zip(w1, w3, w2)), layout.quant_group,
                              layout.experts_per_token)

    return layout.shard_map(local, RouterLogits(P(), P()))(xs, routing, w1, w3, w2)


def sorted_tiles(layout: ExpertLayout, xs: jax.Array, routing: SortedAssignments, w1, w3, w2) -> jax.Array:
    """xs [N, D]: each expert over the tiles of MOE_TILE tokens routed to it. -> float32 [N, D]."""
    assignments = routing.token_of.shape[0]

    def local(xs, routing, w1, w3, w2):
        out = jnp.zeros(xs.shape, jnp.float32)
        for expert, mats in layout.local_experts(w1, w3, w2):
            count, first = routing.counts[expert], routing.starts[expert]

            def tile_step(t, out, mats=mats, count=count, first=first):
                lane = t * MOE_TILE + jnp.arange(MOE_TILE)
                pos = jnp.minimum(first + lane, assignments - 1)
                rows = routing.token_of[pos]
                weight = jnp.where(lane < count, routing.weight_of[pos], 0.0)
                return out.at[rows].add(layout.ffn(xs[rows], *mats) * weight[:, None])

            out = jax.lax.fori_loop(0, (count + MOE_TILE - 1) // MOE_TILE, tile_step, out)
        return out

    return layout.shard_map(local, SortedAssignments(P(), P(), P(), P()))(xs, routing, w1, w3, w2)


def grouped_rows(layout: ExpertLayout, xs: jax.Array, routing: GroupedRows, w1, w3, w2) -> jax.Array:
    """xs [N, D]: the rows of every expert (one group of all E) through the grouped_matmul kernel.
    -> float32 [N, D]."""
    N, D = xs.shape
    block_rows = routing.token_of.shape[0] // routing.tile_expert.shape[0]
    interpret = layout.mesh.devices.flat[0].platform == "cpu"  # the kernel's tests run it interpreted

    def local(xs, routing, w1, w3, w2):
        mine = routing.tile_expert - jax.lax.axis_index(EXPERT) * layout.per_device  # tiles of this device's experts
        mine = jnp.where((routing.tile_expert >= 0) & (mine >= 0) & (mine < layout.per_device), mine, -1)

        def gmm(rows, matrices):
            (kernel, params), = matrices
            return grouped_matmul.grouped_matmul(rows, mine, kernel, *params, block_rows=block_rows,
                                                 interpret=interpret)

        rows = jnp.concatenate([xs, jnp.zeros((1, D), xs.dtype)])[routing.token_of]  # [R, D]; token N: zeros
        h = (jax.nn.silu(gmm(rows, w1)) * gmm(rows, w3)).astype(xs.dtype)  # [R, I/M]
        out = gmm(h, w2) * routing.weight_of[:, None]  # [R, D]
        return jnp.zeros((N + 1, D), jnp.float32).at[routing.token_of].add(out)[:N]

    return layout.shard_map(local, GroupedRows(P(), P(), P()))(xs, routing, w1, w3, w2)


class MoE(nnx.Module, pytree=False):
    """Top-k of E SwiGLU experts per token (see the module docstring for the strategies)."""

    def __init__(self, config: MixtralConfig, weights: Weights, prefix: str, specs: dict, mesh: Mesh, branchless: bool,
                 cpu_kernels: bool):
        self.config, self.branchless = config, branchless
        self.router = nnx.Param(weights.dense(f"{prefix}.router", specs["router"]))
        # the kernels' dtype for the weights (int4: packed two per byte)
        kernel_dtype = gpu_linear.kernel_dtype(config.quantization, config.dtype)
        # one group of every expert where kernels read them in place: the GPU's, and the CPU's fused call
        in_place = branchless or cpu_kernels
        group_size = config.num_experts if in_place else mesh.shape[EXPERT]
        self.layout = ExpertLayout(
            mesh=mesh, num_experts=config.num_experts, group_size=group_size,
            out_major=cpu_kernels or (branchless and expert_gemv.stores_out_major(kernel_dtype)), cpu_kernels=cpu_kernels,
            ffn_split=specs["w1"][-1] is not None, quantization=config.quantization,
            quant_group=config.quant_group_size, experts_per_token=config.experts_per_token,
            specs=(specs["w1"], specs["w3"], specs["w2"]))
        group = config.quant_group_size
        self.in_place_decode = branchless and all(
            expert_gemv.supported(n_in, n_out, kernel_dtype, group) for n_in, n_out in self._expert_dims())
        self.grouped_prefill = branchless and all(
            grouped_matmul.tiling_for(n_in, n_out, kernel_dtype, group) for n_in, n_out in self._expert_dims())

        def stored(name: str) -> nnx.List:
            groups = [slice(g, g + group_size) for g in range(0, config.num_experts, group_size)]
            return nnx.List([Linear(self._stored(weights, f"{prefix}.{name}", specs[name], rows), config)
                             for rows in groups])

        self.w1, self.w3, self.w2 = stored("w1"), stored("w3"), stored("w2")

    def _expert_dims(self) -> list[tuple[int, int]]:
        """(in, out) of w1/w3 and of w2 on one device."""
        c, layout = self.config, self.layout
        ffn = c.intermediate_size // (layout.mesh.shape[MODEL] if layout.ffn_split else 1)
        return [(c.hidden_size, ffn), (ffn, c.hidden_size)]

    def _stored(self, weights: Weights, name: str, spec: tuple, rows: slice) -> Matrix:
        """The experts `rows` of a weight in the layout kept in memory: read out-major for the CPU
        kernels, laid out on the devices for the GPU's."""
        if self.layout.cpu_kernels:
            return weights.linear(name, spec, rows, out_major=True)
        matrix = weights.linear(name, spec, rows)
        return out_major(matrix, self.config.quantization, self.layout.mesh, spec) if self.layout.out_major else matrix

    def __call__(self, x: jax.Array, live: jax.Array) -> jax.Array:
        """x [B, T, D]; live [T] marks real tokens (bucket padding is not routed). -> [B, T, D]."""
        c = self.config
        B, T, D = x.shape
        xs = x.reshape(B * T, D)
        logits, live = xs @ self.router[...], jnp.tile(live, B)
        matrices = tuple([lin.arrays() for lin in linears] for linears in (self.w1, self.w3, self.w2))
        if self.layout.cpu_kernels:  # the kernel routes the tokens itself
            out = fused_experts(self.layout, xs, RouterLogits(logits, live), *matrices)
        else:
            out = self._routed_experts(xs, *route(logits, live, c.experts_per_token), matrices)
        return out.astype(x.dtype).reshape(B, T, D)

    def _routed_experts(self, xs: jax.Array, top_w: jax.Array, top_e: jax.Array, matrices) -> jax.Array:
        """xs [N, D] through the experts `route` chose, on a GPU or XLA:CPU's matmuls. -> float32 [N, D]."""
        N, E, k = xs.shape[0], self.config.num_experts, self.config.experts_per_token
        if N == 1 and self.in_place_decode:
            return decode_in_place(self.layout, xs, ChosenExperts(top_e[0], top_w[0]), *matrices)
        if self.grouped_prefill:
            return grouped_rows(self.layout, xs, GroupedRows.of(top_w, top_e, E, grouped_matmul.block_rows_for(N * k)),
                                *matrices)
        if N <= MOE_TILE:
            weights = jnp.zeros((N, E + 1), jnp.float32).at[jnp.arange(N)[:, None], top_e].add(top_w)[:, :E]
            return few_tokens_cond(self.layout, xs, TokenWeights(weights, expert_counts(top_e, E)), *matrices)
        counts = expert_counts(top_e, E)
        order = jnp.argsort(top_e.reshape(-1), stable=True)
        routing = SortedAssignments((order // k).astype(jnp.int32), top_w.reshape(-1)[order],
                                    jnp.cumsum(counts) - counts, counts)
        return sorted_tiles(self.layout, xs, routing, *matrices)
