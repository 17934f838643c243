"""Runs through the runner: FedAvg against numpy, no retrace across HParams or seeds,
determinism, learning, the malicious set, divergence reported as it happens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from digits_runs import SMALL_DIGITS
from jax.flatten_util import ravel_pytree

from fedsim import runner
from fedsim.client import LocalSpec, make_local_train
from fedsim.config import load_config, to_spec
from fedsim.round import TRACE_COUNT, make_chunk, make_init, make_round
from fedsim.runner import program
from fedsim.setup import prepare

BASE = SMALL_DIGITS


@pytest.fixture(scope="module")
def setup():
    spec, hparams = to_spec(load_config(None, BASE))
    return prepare(spec), hparams


def test_fedavg_round_equals_numpy_weighted_mean(setup):
    setup, hparams = setup
    spec = setup.spec
    state = jax.jit(make_init(setup))(jax.random.PRNGKey(3), hparams)
    new_state, metrics = jax.jit(make_round(setup))(state, hparams, setup.data)

    # Rebuild the round by hand: same keys, each client trained on its own, numpy mean.
    key = jax.random.fold_in(state.rounds_key, 0)
    k_sample, k_train, _, _ = jax.random.split(key, 4)
    clients = np.asarray(
        jax.random.choice(k_sample, spec.n_clients, (spec.participants,), replace=False)
    )
    local = LocalSpec(spec.batch_size, spec.local_epochs, spec.local_steps)
    train = jax.jit(make_local_train(setup.module.apply, local))
    counts = np.asarray(setup.data.count)[clients]
    n_steps = int(max(-(-c // spec.batch_size) for c in counts))
    hp = {"lr": hparams.client_lr, "momentum": hparams.client_momentum, "attack": {}}
    rows = []
    for c in clients:
        upd = train(
            state.params,
            setup.data.x,
            setup.data.y,
            setup.data.idx[c],
            setup.data.count[c],
            n_steps,
            jax.random.fold_in(k_train, c),
            hp,
            False,
        )
        rows.append(np.asarray(ravel_pytree(upd)[0], np.float64))
    expected = np.average(np.stack(rows), axis=0, weights=counts.astype(np.float64))
    got = np.asarray(ravel_pytree(new_state.params)[0], np.float64) - np.asarray(
        ravel_pytree(state.params)[0], np.float64
    )
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
    assert float(metrics.honest_weight) == pytest.approx(1.0)
    assert float(metrics.malicious_weight) == 0.0


def test_other_hparams_and_seed_do_not_trace_again(setup):
    setup, hparams = setup
    chunk = jax.jit(make_chunk(setup, 2))
    init = jax.jit(make_init(setup))
    state, m1 = chunk(init(jax.random.PRNGKey(0), hparams), hparams, setup.data)
    traced = TRACE_COUNT["round"]
    other = hparams.replace(client_lr=jnp.float32(0.02), server_lr=jnp.float32(0.5))
    _, m2 = chunk(init(jax.random.PRNGKey(1), other), other, setup.data)
    assert TRACE_COUNT["round"] == traced
    assert float(m1["test_loss"]) != float(m2["test_loss"])


def test_same_seed_gives_identical_metrics(setup):
    setup, hparams = setup
    first = runner.run(setup, hparams, seed=5)
    second = runner.run(setup, hparams, seed=5)
    strip = lambda hist: [{k: v for k, v in r.items() if k != "seconds"} for r in hist]
    assert strip(first) == strip(second)
    assert strip(first) != strip(runner.run(setup, hparams, seed=6))


def test_learning_happens(setup):
    setup, hparams = setup
    spec, hp = to_spec(load_config(None, BASE + ["rounds=30", "eval_every=10"]))
    history = runner.run(prepare(spec), hp, seed=0)
    assert history[-1]["test_accuracy"] > 0.6
    assert history[-1]["test_accuracy"] > history[0]["test_accuracy"]


def test_malicious_set_follows_fraction(setup):
    setup, hparams = setup
    init = jax.jit(make_init(setup))
    for fraction, expected in [(0.0, 0), (0.25, 3), (0.5, 6)]:
        state = init(jax.random.PRNGKey(0), hparams.replace(attack_fraction=jnp.float32(fraction)))
        assert int(state.malicious.sum()) == expected


def _history(*overrides, seed=0):
    spec, hparams = to_spec(load_config(None, [*BASE, *overrides]))
    return runner.run(prepare(spec), hparams, seed=seed)


def test_divergence_is_reported_from_the_first_evaluation():
    """A server step that overflows the model marks the run as diverged at once, even
    when the aggregate itself was finite (issue: finite looked at the aggregate only)."""
    history = _history("server.lr=1.0e+30", "rounds=2", "eval_every=1")
    assert history[0]["finite"] is False
    assert history[0]["test_loss"] is None


def test_a_blow_up_in_the_last_round_is_reported():
    history = _history("rounds=4", "eval_every=2")
    assert all(r["finite"] for r in history)
    # the same run whose last chunk's model overflows in the forward pass only
    spec, hparams = to_spec(load_config(None, [*BASE, "rounds=2", "eval_every=2"]))
    setup = prepare(spec)
    state = program(setup, 0)(jax.random.PRNGKey(0), hparams)
    huge = jax.tree.map(lambda p: p * 1e30, state.params)  # finite, but logits overflow
    _, metrics = jax.jit(make_chunk(setup, 1))(state._replace(params=huge), hparams, setup.data)
    assert not bool(metrics["finite"])
