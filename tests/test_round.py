"""The round's five stages (fedsim.round), composed by hand, give the engine's round."""

import jax
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from fedsim.config import load_config, to_spec
from fedsim.round import (
    honest_accepted,
    make_aggregate,
    make_apply,
    make_craft,
    make_init,
    make_round,
    make_train,
    round_keys,
    sample,
)
from fedsim.setup import components, prepare

BASE = [
    "data.name=digits",
    "data.n_clients=12",
    "client.participants=8",
    "model.widths=[16]",
    "client.batch_size=16",
    "aggregator={name: trimmed_mean, beta: 0.2}",
    "attack={name: alie, fraction: 0.25}",
]


def test_stages_composed_by_hand_give_the_round():
    spec, hp = to_spec(load_config(None, BASE))
    setup = prepare(spec)
    agg, attack = components(setup)
    state = jax.jit(make_init(setup))(jax.random.PRNGKey(4), hp)
    data = setup.data

    train, craft = make_train(setup, attack), make_craft(setup, attack)
    aggregate, apply = make_aggregate(setup, agg), make_apply(setup)

    @jax.jit
    def by_hand(state):
        keys = round_keys(state)
        who = sample(keys.sample, state.malicious, data, spec.n_clients, spec.participants)
        trained = train(state.params, who, keys.train, hp, data)
        updates = craft(trained, who, state, keys.attack, hp, data)
        flat, _ = ravel_pytree(state.params)
        out = aggregate(
            updates, who.weights, who.clients, state.agg_state, keys.aggregate, hp, data, flat
        )
        params, _ = apply(state.params, state.server_opt_state, out.delta, hp)
        return who, trained, updates, out, params

    who, trained, updates, out, params = by_hand(state)
    assert int(who.is_malicious.sum()) >= 1  # the attack took part
    np.testing.assert_array_equal(
        np.asarray(updates)[~np.asarray(who.is_malicious)],
        np.asarray(trained.updates)[~np.asarray(who.is_malicious)],
    )
    new_state, metrics = jax.jit(make_round(setup))(state, hp, data)
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(new_state.params), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(new_state.previous_aggregate, out.delta, rtol=1e-6, atol=1e-7)
    mal = np.asarray(who.is_malicious)
    assert float(metrics.malicious_weight) == pytest.approx(float(out.info.weight[mal].sum()))


def test_honest_accepted_counts_fair_shares():
    present = np.array([True, True, True, True, False])
    is_mal = np.array([False, False, False, True, False])
    counts = np.array([10.0, 30.0, 60.0, 10.0, 5.0])
    fedavg = counts * present / (counts * present).sum()
    assert float(honest_accepted(fedavg, present, is_mal, counts)) == 1.0  # the mean: all
    uniform = present / present.sum()
    assert float(honest_accepted(uniform, present, is_mal, counts)) == 1.0  # robust, uniform
    krum = np.array([0.0, 1.0, 0.0, 0.0, 0.0])
    assert float(honest_accepted(krum, present, is_mal, counts)) == pytest.approx(1 / 3)


def test_attacks_see_the_previous_aggregate_never_the_rule_state():
    """No attack is handed the rule's state (e.g. FoolsGold's per-client histories); the
    previous aggregate it may read is what the round leaves (checked against the stages
    in the test above)."""
    from fedsim.types import AttackContext

    assert "agg_state" not in AttackContext._fields
    assert "previous_aggregate" in AttackContext._fields
