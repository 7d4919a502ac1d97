"""Choosing the next token: the greedy choice is numpy's argmax (ties to the first), and the CPU's cond
picks what the GPU's select of both choices does."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from model.engine_api import SamplingParams
from model.sampling import SamplingArrays, first_largest, sample


def test_first_largest_is_argmax_with_ties_to_the_first():
    rng = np.random.default_rng(0)
    logits = rng.integers(-50, 50, (6, 32000)).astype(np.float32)  # many equal values
    logits[2, [7, 31999]] = 1000  # a tie of the largest: the first wins
    logits[3, -1] = 1000  # the largest last
    got = np.asarray(jax.jit(first_largest)(logits))
    assert got.dtype == np.int32 and (got == logits.argmax(-1)).all() and got[2] == 7 and got[3] == 31999


@pytest.mark.parametrize("params", [SamplingParams(temperature=0), SamplingParams(temperature=0.7, top_p=0.9),
                                    SamplingParams(temperature=1.3, top_k=5, repetition_penalty=1.2)],
                         ids=["greedy", "top-p", "top-k"])
def test_the_cond_chooses_as_the_select(params):
    rng = np.random.default_rng(1)
    logits = (3 * rng.standard_normal((2, 32000))).astype(np.float32)
    seen = rng.random((2, 32000)) < 0.01
    s = SamplingArrays.of(params)
    choose = jax.jit(sample, static_argnames="branchless")
    for step in range(8):
        key = jax.random.fold_in(jax.random.key(0), step)
        on_cpu, on_gpu = (np.asarray(choose(logits, seen, key, s, branchless=b)) for b in (False, True))
        assert (on_cpu == on_gpu).all()
        if params.temperature == 0:  # (no repetition penalty)
            assert (on_cpu == logits.argmax(-1)).all()
