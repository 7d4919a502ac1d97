"""Choosing the next token: the greedy choice is numpy's argmax (ties to the first), through XLA and through
our CPU kernel, and the CPU's cond picks what the GPU's select of both choices does."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from model.engine_api import SamplingParams
from model import cpu_matmul
from model.sampling import SamplingArrays, first_largest, native_greedy, penalize_repeats, sample


def test_first_largest_is_argmax_with_ties_to_the_first():
    rng = np.random.default_rng(0)
    logits = rng.integers(-50, 50, (6, 32000)).astype(np.float32)  # many equal values
    logits[2, [7, 31999]] = 1000  # a tie of the largest: the first wins
    logits[3, -1] = 1000  # the largest last
    got = np.asarray(jax.jit(first_largest)(logits))
    assert got.dtype == np.int32 and (got == logits.argmax(-1)).all() and got[2] == 7 and got[3] == 31999


@pytest.mark.skipif(not cpu_matmul.available(), reason="the native CPU kernels did not build")
@pytest.mark.parametrize("devices", [1, 8])
def test_the_native_greedy_choice_is_the_first_largest_penalized_logit(devices):
    rng = np.random.default_rng(2)
    V = 32003  # not a whole number of vector lanes
    logits = rng.integers(-50, 50, (5, V)).astype(np.float32)
    logits[1, [9, 20000]] = 1000  # a tie of the largest: the first wins
    logits[2, -1] = 1000  # the largest in the tail past the last whole vector
    logits[3, 5] = np.nan  # as first_largest: the last token
    logits[4, 17], logits[4, 30] = 60, 55  # the penalty leaves 60 / 1.5 = 40 below 55
    seen = np.zeros((5, V), bool)
    seen[4, 17] = seen[0, rng.integers(0, V, 3000)] = True
    penalty = np.float32(1.5)
    mesh = jax.make_mesh((devices,), ("x",), devices=jax.devices()[:devices])
    got = np.asarray(jax.jit(native_greedy, static_argnums=3)(logits, seen, penalty, mesh))
    penalized = np.asarray(penalize_repeats(logits, seen, penalty))
    expected = np.asarray(first_largest(penalized))
    assert got.dtype == np.int32 and (got == expected).all()
    assert list(got[1:]) == [9, V - 1, V - 1, 30]
    assert got[0] == penalized[0].argmax()


@pytest.mark.parametrize("params", [SamplingParams(temperature=0),
                                    SamplingParams(temperature=0, repetition_penalty=1.3),
                                    SamplingParams(temperature=0.7, top_p=0.9),
                                    SamplingParams(temperature=1.3, top_k=5, repetition_penalty=1.2)],
                         ids=["greedy", "greedy-penalized", "top-p", "top-k"])
def test_the_cond_chooses_as_the_select(params):
    rng = np.random.default_rng(1)
    logits = (3 * rng.standard_normal((2, 32000))).astype(np.float32)
    seen = rng.random((2, 32000)) < 0.01
    s = SamplingArrays.of(params)
    choose = jax.jit(sample, static_argnames=("branchless", "kernel_mesh"))
    kernels = [jax.make_mesh((1,), ("x",), devices=jax.devices()[:1])] if cpu_matmul.available() else []
    for step in range(8):
        key = jax.random.fold_in(jax.random.key(0), step)
        on_gpu, on_cpu, *with_kernels = (np.asarray(choose(logits, seen, key, s, branchless=b, kernel_mesh=m))
                                         for b, m in [(True, None), (False, None)] + [(False, m) for m in kernels])
        assert all((got == on_gpu).all() for got in [on_cpu, *with_kernels])
        if params.temperature == 0:
            assert (on_cpu == np.asarray(penalize_repeats(logits, seen, s.repetition_penalty)).argmax(-1)).all()
