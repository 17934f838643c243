"""Timing shared by the benches: median seconds per round of a scanned round function."""

from __future__ import annotations

import statistics
import time

import jax


def seconds_per_round(step, state, hparams, data, rounds: int, repeats: int) -> float:
    """Median over ``repeats`` calls (after one warm-up call, which compiles) of the
    seconds per round of ``rounds`` rounds of ``step(state, hparams, data) -> (state, _)``
    scanned in one jitted call."""

    def many(state, hp, data):
        state, _ = jax.lax.scan(lambda s, _: step(s, hp, data), state, None, length=rounds)
        return state

    run = jax.jit(many, donate_argnums=0)
    state = jax.block_until_ready(run(state, hparams, data))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        state = jax.block_until_ready(run(state, hparams, data))
        times.append((time.perf_counter() - start) / rounds)
    return statistics.median(times)
