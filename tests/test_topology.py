"""Topologies: the star's server, and one model per node (peer-to-peer): a complete graph
whose nodes average is FedAvg, isolated nodes train alone, and what a peer-to-peer run
refuses."""

import jax
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from fedsim import runner
from fedsim.config import load_config, to_spec
from fedsim.registry import ConfigError
from fedsim.round import make_init, make_round, make_train, round_keys, sample
from fedsim.setup import components, prepare

BASE = [
    "data.name=digits",
    "data.n_clients=8",
    "client.participants=8",
    "model.widths=[16]",
    "client.batch_size=16",
    "rounds=2",
    "eval_every=2",
]


def _setup(*overrides):
    spec, hp = to_spec(load_config(None, [*BASE, *overrides]))
    return prepare(spec), hp


def _two_rounds(setup, hp):
    state = jax.jit(make_init(setup))(jax.random.PRNGKey(0), hp)
    step = jax.jit(make_round(setup))
    for _ in range(2):
        state, _ = step(state, hp, setup.data)
    return state


def test_mean_on_a_complete_graph_is_fedavg():
    star = _two_rounds(*_setup())
    complete = _two_rounds(*_setup("topology.name=complete"))
    for node in range(8):
        for got, want in zip(
            jax.tree.leaves(complete.params), jax.tree.leaves(star.params), strict=True
        ):
            np.testing.assert_allclose(got[node], want, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_isolated_nodes_train_alone():
    """After one round every isolated node's model is the shared start plus its own
    update: exactly what each client sends the star's server in the same first round."""
    setup, hp = _setup("topology.name=isolated")
    state = jax.jit(make_init(setup))(jax.random.PRNGKey(0), hp)
    after, _ = jax.jit(make_round(setup))(state, hp, setup.data)
    star, _ = _setup()
    star_state = jax.jit(make_init(star))(jax.random.PRNGKey(0), hp)
    _, attack = components(star)
    keys = round_keys(star_state)
    who = sample(keys.sample, star_state.malicious, star.data, 8, 8)
    own = jax.jit(make_train(star, attack))(star_state.params, who, keys.train, hp, star.data)
    start, _ = ravel_pytree(star_state.params)
    models = np.stack(
        [ravel_pytree(jax.tree.map(lambda x, i=i: x[i], after.params))[0] for i in range(8)]
    )
    np.testing.assert_allclose(models, start[None] + own.updates, rtol=1e-5, atol=1e-6)
    history = runner.run(setup, hp, seed=0)
    assert history[-1]["consensus_distance"] > 0
    assert history[-1]["worst_test_accuracy"] <= history[-1]["test_accuracy"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["topology.name=complete", "client.participants=4"], "set client.participants"),
        (["topology.name=complete", "attack={name: alie, fraction: 0.25}"], "crafts updates"),
        (["topology={name: complete, exchange: gossip}"], "models or updates"),
    ],
)
def test_peer_to_peer_refuses_what_it_cannot_do(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*BASE, *overrides])
