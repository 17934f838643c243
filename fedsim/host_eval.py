"""Host-side evaluations a dataset asks for at every evaluation (Python, not JAX).

Most metrics are computed on the device inside the compiled chunk (``round.make_evaluate``).
A dataset may also name a host evaluator: a function of one run's global model, called on
the host after each chunk of ``eval_every`` rounds, whose numbers join that evaluation's
record. ``driving`` has one: it drives the model on the track (``fedsim.data.closed_loop``)
and reports its missed turns. The config's ``closed_loop`` section sets it up::

    closed_loop: {enabled: true, episodes: 4, max_steps: 200, repeats: 1, seed: 0}

``episodes`` drives from random starts of ``max_steps`` 5 Hz steps each, and a turn test of
``repeats`` perturbed starts per curve and lane (12 per repeat); ``seed`` seeds both, so
every evaluation of every run drives the same starts. Datasets without a host evaluator
ignore the section. It needs one global model: a peer-to-peer run of ``driving`` is refused
unless ``closed_loop.enabled`` is false.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np

from fedsim.registry import ConfigError
from fedsim.spec import Spec, freeze, thaw

CLOSED_LOOP_DATASETS = ("driving",)
CLOSED_LOOP_KEYS = ("enabled", "episodes", "max_steps", "repeats", "seed")
PAD = 16  # cars a padded policy batch holds (a multiple of it past 16)


def check_closed_loop(options: dict, dataset: str, peer_to_peer: bool) -> None:
    """One-line ``ConfigError`` for a bad ``closed_loop`` section (see the module
    docstring): ``enabled`` a boolean, ``episodes``/``max_steps``/``repeats`` integers
    >= 1, ``seed`` an integer >= 0; a peer-to-peer run of a dataset that has a closed loop
    must turn it off."""
    if not isinstance(options["enabled"], bool):
        raise ConfigError(f"closed_loop.enabled must be true or false, got {options['enabled']!r}")
    for key, low in (("episodes", 1), ("max_steps", 1), ("repeats", 1), ("seed", 0)):
        value = options[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"closed_loop.{key} must be an integer >= {low}, got {value!r}")
    if options["enabled"] and dataset in CLOSED_LOOP_DATASETS and peer_to_peer:
        raise ConfigError(
            f"closed_loop drives one global model, but a peer-to-peer topology gives every "
            f"node its own: set closed_loop.enabled=false to run {dataset} peer-to-peer"
        )


def closed_loop_spec(options: dict, dataset: str) -> tuple:
    """The ``Spec.closed_loop`` of a checked config: its options frozen when the dataset
    has a closed loop and it is enabled, else ``()``."""
    if dataset not in CLOSED_LOOP_DATASETS or not options["enabled"]:
        return ()
    return freeze({k: options[k] for k in CLOSED_LOOP_KEYS if k != "enabled"})


def host_evaluator(setup) -> Callable[[object], dict] | None:
    """``evaluate(params) -> {name: number}`` for one run's global params pytree, or None
    when the Setup's dataset has no host evaluation (or it is off)."""
    spec: Spec = setup.spec
    if not spec.closed_loop:
        return None
    return closed_loop_evaluator(setup, **thaw(spec.closed_loop))


def _policy_inputs(meta: dict) -> tuple[np.ndarray, np.ndarray, str]:
    tabular = meta["tabular"]
    return tabular.meta["x_mean"], tabular.meta["x_std"], tabular.meta["config"]["observation"]


def closed_loop_evaluator(setup, episodes: int, max_steps: int, repeats: int, seed: int):
    """Drive a model of ``setup`` on the track: ``evaluate(params)`` returns
    ``fedsim.data.closed_loop.evaluate``'s counts (``missed_turns_left``/``_right``,
    ``turns_*``, ``turn_test_missed_*``, ``turn_test_*``, ...).

    The model sees observations standardised as its training data was; its output
    ``[B, 1]`` is the steering. Batches of cars are padded to a multiple of ``PAD`` so the
    jitted forward pass compiles once for the default sizes (at most 12 cars a batch)."""
    from fedsim.data import closed_loop

    mean, std, observation = _policy_inputs(setup.meta)
    forward = jax.jit(lambda params, x: setup.module.apply({"params": params}, x)[:, 0])

    def evaluate(params) -> dict:
        def steer(z):  # standardised float32 [B, F] -> steering [B]
            b = z.shape[0]
            padded = np.zeros((-(-b // PAD) * PAD, *z.shape[1:]), np.float32)
            padded[:b] = z
            return np.asarray(forward(params, padded))[:b]

        policy = closed_loop.standardised(steer, mean, std)
        return closed_loop.evaluate(
            policy,
            episodes=episodes,
            max_steps=max_steps,
            seed=seed,
            repeats=repeats,
            observation=observation,
        )

    return evaluate


def host_metrics(evaluate, params, n_runs: int, over_runs: bool) -> list[dict]:
    """``evaluate`` on each of the first ``n_runs`` runs' params (a leading run axis when
    ``over_runs``): one dict per run, empty ones without an evaluator."""
    if evaluate is None:
        return [{} for _ in range(n_runs)]
    params = jax.device_get(params)
    if not over_runs:
        return [evaluate(params)]
    return [evaluate(jax.tree.map(lambda p, j=j: p[j], params)) for j in range(n_runs)]
