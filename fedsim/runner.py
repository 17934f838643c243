"""Running compiled rounds from the host (DESIGN.md, "runner.py"): the program cache and
the one host loop that ``fedsim run`` and ``fedsim sweep`` share.

``program(setup, n)`` is the jitted init (``n = 0``) or chunk of ``n`` rounds, cached per
Spec and layout, so a second run of a Spec in a process does not compile again.
``run_batches`` runs any number of (hparams, seed) runs of one Setup, ``batch`` at a time
(one program vmapped over runs, or the unbatched program for one at a time), reporting
each evaluation and each finished batch to the host. ``summarize`` is the one summary of
a run's history.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fedsim.host_eval import host_evaluator, host_metrics
from fedsim.layout import replicated
from fedsim.round import make_chunk, make_init
from fedsim.setup import Setup
from fedsim.spec import HParams

_PROGRAMS: dict = {}  # (spec, layout, rounds per chunk, over runs) -> jitted program
_MAX_PROGRAMS = 8


def program(setup: Setup, n_rounds: int, over_runs: bool = False):
    """The jitted init (``n_rounds=0``) or chunk of ``n_rounds`` rounds, vmapped over runs
    when ``over_runs``. Cached per Spec and layout (the data is an argument, not a
    constant)."""
    key = (setup.spec, setup.client_chunk, setup.mesh, n_rounds, over_runs)
    if key not in _PROGRAMS:
        if len(_PROGRAMS) >= _MAX_PROGRAMS:
            _PROGRAMS.pop(next(iter(_PROGRAMS)))
        if n_rounds == 0:
            init = make_init(setup)
            _PROGRAMS[key] = jax.jit(jax.vmap(init) if over_runs else init)
        else:
            chunk = make_chunk(setup, n_rounds)
            if over_runs:
                chunk = jax.vmap(chunk, in_axes=(0, 0, None))
            _PROGRAMS[key] = jax.jit(chunk, donate_argnums=0)
    return _PROGRAMS[key]


def to_host(metrics: dict) -> dict:
    """Device scalars -> JSON-friendly Python numbers (non-finite -> None)."""
    out = {}
    for k, v in metrics.items():
        x = np.asarray(v).item()
        out[k] = x if isinstance(x, bool) or math.isfinite(x) else None
    return out


def balanced(n: int, cap: int) -> int:
    """Batch size <= cap that splits n runs into ceil(n/cap) near-equal batches."""
    n_batches = -(-n // cap)
    return -(-n // n_batches)


def _stack(trees):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def run_batches(
    setup: Setup,
    hparams: list[HParams],
    seeds: list[int],
    batch: int = 1,
    on_eval: Callable | None = None,
    on_batch: Callable | None = None,
    checkpoints=None,
) -> list[list[dict]]:
    """Run every (hparams[i], seeds[i]); ``batch`` runs at a time as one vmapped program
    (the last batch is padded by repeating its last run, so one compile serves all; one
    run at a time uses the unbatched program, whose ``lax.cond`` fast paths a vmap would
    turn into selects that run both branches).

    ``on_eval(i, record)`` receives each evaluation of run ``i`` as it comes
    (``{"round", **metrics, "seconds"}``); ``on_batch(first, histories, seconds)`` each
    finished batch (so a kill loses only the batch in flight). ``checkpoints``
    (``fedsim.checkpoint.Checkpoints``) resumes each batch from its latest checkpoint and
    saves it at evaluations. Returns every history."""
    spec = setup.spec
    batch = balanced(len(seeds), batch)
    over_runs = batch > 1
    init = program(setup, 0, over_runs=over_runs)
    host_eval = host_evaluator(setup)  # the dataset's host-side metrics (driving: turns)
    histories: list[list[dict]] = []
    for start in range(0, len(seeds), batch):
        real = len(seeds[start : start + batch])
        idx = [min(start + j, len(seeds) - 1) for j in range(batch)]
        if over_runs:
            hp = _stack([hparams[i] for i in idx])
            keys = jnp.stack([jax.random.PRNGKey(seeds[i]) for i in idx])
        else:
            hp, keys = hparams[idx[0]], jax.random.PRNGKey(seeds[idx[0]])
        state = init(keys, hp)
        part: list[list[dict]] = [[] for _ in range(real)]
        done, t0 = 0, time.perf_counter()
        saver = None if checkpoints is None else checkpoints.batch(idx)
        if saver is not None:
            state, part, done, t0 = saver.resume(state, part, done, t0)
        if setup.mesh is not None:
            state = jax.device_put(state, replicated(setup.mesh))
        while done < spec.rounds:
            n = min(spec.eval_every, spec.rounds - done)
            state, metrics = program(setup, n, over_runs=over_runs)(state, hp, setup.data)
            metrics = jax.device_get(metrics)
            on_host = host_metrics(host_eval, state.params, real, over_runs)
            if not over_runs:
                metrics = {k: [v] for k, v in metrics.items()}
            done += n
            seconds = time.perf_counter() - t0
            for j in range(real):
                record = {"round": done, **to_host({k: v[j] for k, v in metrics.items()})}
                record.update(on_host[j])
                record["seconds"] = seconds
                part[j].append(record)
                if on_eval is not None:
                    on_eval(start + j, record)
            if saver is not None:
                saver.after_eval(state, part, done, seconds)
        if on_batch is not None:
            on_batch(start, part, time.perf_counter() - t0)
        histories.extend(part)
    return histories


def run(
    setup: Setup, hparams: HParams, seed: int, on_eval: Callable | None = None, checkpoints=None
) -> list[dict]:
    """One run's history; ``on_eval(record)`` is called on the host after each chunk;
    ``checkpoints`` as in ``run_batches``."""
    report = None if on_eval is None else (lambda _, record: on_eval(record))
    return run_batches(setup, [hparams], [seed], 1, report, checkpoints=checkpoints)[0]


def summarize(history: list[dict], main_metric: str = "test_accuracy") -> dict:
    """Final and best metrics of a run: ``final`` (the last evaluation), ``diverged``,
    ``best_<main_metric>`` (the highest; e.g. ``best_test_accuracy``), ``best_test_loss``
    (the lowest), ``peak_attack_success_rate`` (targeted attacks), ``seconds``."""

    def pick(name, fn):
        values = [r[name] for r in history if r.get(name) is not None]
        return fn(values) if values else None

    out = {
        "final": history[-1],
        "diverged": not all(r.get("finite", True) for r in history),
        f"best_{main_metric}": pick(main_metric, max),
        "best_test_loss": pick("test_loss", min),
        "seconds": history[-1].get("seconds"),
    }
    if any("attack_success_rate" in r for r in history):
        out["peak_attack_success_rate"] = pick("attack_success_rate", max)
    return out
