"""Topologies: the star's server, and one model per node (peer-to-peer): a complete graph
whose nodes average is FedAvg, isolated nodes train alone, and what a peer-to-peer run
refuses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference_aggregators as ref
from jax.flatten_util import ravel_pytree

from fedsim import runner
from fedsim import topology as topologies
from fedsim.config import load_config, to_spec
from fedsim.layout import with_layout
from fedsim.registry import ConfigError
from fedsim.round import (
    Exchange,
    make_init,
    make_messages,
    make_round,
    make_train,
    own_samples,
    round_keys,
    sample,
    victims_mask,
)
from fedsim.setup import components, flat_unravel, prepare, topology_of

BASE = [
    "data.name=digits",
    "data.n_clients=8",
    "client.participants=8",
    "model.widths=[16]",
    "client.batch_size=16",
    "rounds=2",
    "eval_every=2",
]

# A 4 x 4 torus, median at every node, an ALIE adversary crafting per recipient.
TORUS_ALIE = [
    "data.n_clients=16",
    "client.participants=16",
    "topology.name=torus",
    "aggregator.name=median",
    "attack={name: alie, fraction: 0.25}",
]


def _setup(*overrides):
    spec, hp = to_spec(load_config(None, [*BASE, *overrides]))
    return prepare(spec), hp


def _assert_same_round(got, want, rtol=1e-5):
    """Two rounds' ``(state, metrics)`` hold the same models and metrics (``rtol``,
    ``atol`` a tenth of it)."""
    (state, metrics), (state_want, metrics_want) = got, want
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(state_want.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol / 10)
    for a, b in zip(metrics, metrics_want, strict=True):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol / 10)


def _first_round_training(setup, hp, state):
    """``(attack, round keys, participants, Trained)`` of the first round of ``state``:
    every node present, each trained from its own model."""
    _, attack = components(setup)
    keys = round_keys(state)
    n = setup.spec.n_clients
    who = sample(keys.sample, state.malicious, setup.data, n, n)
    trained = jax.jit(make_train(setup, attack), static_argnames="own")(
        state.params, who, keys.train, hp, setup.data, own=True
    )
    return attack, keys, who, trained


def _two_rounds(setup, hp):
    state = jax.jit(make_init(setup))(jax.random.PRNGKey(0), hp)
    step = jax.jit(make_round(setup))
    for _ in range(2):
        state, _ = step(state, hp, setup.data)
    return state


@pytest.mark.parametrize(
    "rule, data",
    [
        ("mean", []),
        # gossip weighs its n neighbours 1/n each, FedAvg by sample counts: equal with
        # equal data (three iid clients of 479 samples each)
        ("gossip", ["data.n_clients=3", "client.participants=3", "data.partition.name=iid"]),
    ],
)
def test_averaging_on_a_complete_graph_is_fedavg(rule, data):
    """Full participation on a complete graph: the plain mean, and gossip (Metropolis
    weights, 1/n on a complete graph), give every node FedAvg's model."""
    star_setup, hp = _setup(*data)
    assert rule == "mean" or len(set(np.asarray(star_setup.data.count).tolist())) == 1
    star = _two_rounds(star_setup, hp)
    complete = _two_rounds(*_setup(*data, "topology.name=complete", f"aggregator.name={rule}"))
    for node in range(star_setup.spec.n_clients):
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
        (["topology={name: complete, exchange: gossip}"], "models or updates"),
    ],
)
def test_peer_to_peer_refuses_what_it_cannot_do(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*BASE, *overrides])


# --- graphs --------------------------------------------------------------------------------


def _neighbours(topo):
    a = topo.adjacency
    return [set(np.flatnonzero(a[i])) - {i} for i in range(a.shape[0])]


def test_ring_and_torus_link_their_grid_neighbours():
    ring = _neighbours(topologies.make("ring", n_nodes=7))
    assert ring == [{(i - 1) % 7, (i + 1) % 7} for i in range(7)]
    torus = _neighbours(topologies.make("torus", n_nodes=12, rows=3))
    for i in range(12):
        r, c = divmod(i, 4)
        grid = {((r + dr) % 3) * 4 + (c + dc) % 4 for dr, dc in ((0, 1), (0, -1), (1, 0), (-1, 0))}
        assert torus[i] == grid


def test_random_graphs_are_regular_connected_and_seeded():
    a = topologies.make("k_regular", n_nodes=20, k=3, seed=1).adjacency
    assert (a == a.T).all() and a.diagonal().all()
    assert (a.sum(axis=1) - 1 == 3).all() and topologies.connected(a)
    again = topologies.make("k_regular", n_nodes=20, k=3, seed=1).adjacency
    other = topologies.make("k_regular", n_nodes=20, k=3, seed=2).adjacency
    assert (again == a).all() and (other != a).any()
    er = topologies.make("erdos_renyi", n_nodes=30, p=0.2, seed=3).adjacency
    assert topologies.connected(er) and (er == er.T).all()
    assert (topologies.make("erdos_renyi", n_nodes=30, p=0.2, seed=3).adjacency == er).all()


def test_two_worlds_is_two_cliques_and_its_bridges():
    a = topologies.make("two_worlds", n_nodes=10, bridges=2, seed=0).adjacency
    assert a[:5, :5].all() and a[5:, 5:].all()
    assert a[:5, 5:].sum() == 2 and topologies.connected(a)


def test_epidemic_pulls_s_fresh_peers_each_round():
    topo = topologies.make("epidemic", n_nodes=9, s=3)
    w = jnp.arange(1.0, 10.0)
    first = np.asarray(topo.neighbourhoods(jax.random.PRNGKey(0), jnp.arange(9), w))
    second = np.asarray(topo.neighbourhoods(jax.random.PRNGKey(1), jnp.arange(9), w))
    for m in (first, second):
        assert ((m > 0).sum(axis=1) == 4).all()  # s peers and itself
        assert (np.diagonal(m) == np.arange(1.0, 10.0)).all()
        np.testing.assert_array_equal(m[m > 0], np.broadcast_to(w, (9, 9))[m > 0])
    assert (first != second).any()


def test_edge_list_file(tmp_path):
    path = tmp_path / "g.txt"
    path.write_text("# a path and a chord\n0 1\n1,2\n\n2 3\n0 3\n")
    assert _neighbours(topologies.make("edges", n_nodes=4, path=str(path))) == [
        {1, 3},
        {0, 2},
        {1, 3},
        {0, 2},
    ]


@pytest.mark.parametrize(
    "name, kw, lines, message",
    [
        ("edges", {}, "0 1\n1 7\n", "names node 7; ids must be 0 to 3"),
        ("edges", {}, "0 1\n1 two\n", "line 2 is '1 two'; want two node ids"),
        ("edges", {}, "0 1\n2 3\n", "disconnected"),
        ("edges", {}, "0 1\n1 2\n", "node 3 has no neighbours"),
        ("ring", {"n_nodes": 2}, None, "at least 3 nodes"),
        ("torus", {"n_nodes": 10}, None, "do not make a grid"),
        ("k_regular", {"n_nodes": 5, "k": 3}, None, "n·k must be even"),
        ("k_regular", {"n_nodes": 5, "k": 5}, None, "between 2 and 4"),
        ("erdos_renyi", {"n_nodes": 40, "p": 0.01}, None, "no connected graph"),
        ("erdos_renyi", {"n_nodes": 4, "p": 1.5}, None, "probability"),
        ("epidemic", {"n_nodes": 4, "s": 4}, None, "between 1 and 3"),
    ],
)
def test_bad_graphs_are_one_line_errors(tmp_path, name, kw, lines, message):
    if lines is not None:
        (tmp_path / "g.txt").write_text(lines)
        kw = {"n_nodes": 4, "path": str(tmp_path / "g.txt")}
    with pytest.raises(ConfigError, match=message):
        topologies.make(name, **kw)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["aggregator.name=gossip"], "aggregator 'gossip' is for peer-to-peer learning"),
        (["attack={name: dissensus, fraction: 0.25}"], "attack 'dissensus' is for peer-to"),
        (["topology.name=ring", "aggregator.name=ubar"], "judges updates on its own data"),
        (["topology={name: torus}"], "do not make a grid"),
        (["attack={name: alie, victims: [1]}"], "victims names nodes of a peer-to-peer"),
        (["topology.name=ring", "attack={name: alie, victims: [9]}"], r"must be in \[0, 8\)"),
        (["topology.name=ring", "attack={name: alie, victims: [1, 1]}"], "distinct node ids"),
        (["topology.name=ring", "attack={name: alie, victims: []}"], "non-empty list"),
        (["topology.name=ring", "attack={name: label_flip, victims: [1]}"], "crafts a message"),
    ],
)
def test_peer_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*BASE, *overrides])


def test_behaviour_rules_judge_with_the_nodes_own_data():
    setup, _ = _setup("topology.name=ring", "aggregator={name: zeno, b: 1}", "judge.size=16")
    assert setup.data.judge_x.shape[0] == 0  # no judge's set is carved out peer-to-peer
    data = setup.data
    for node in (0, 5):
        x, y = own_samples(jax.random.PRNGKey(node), setup, data, node, 16)
        mine = np.asarray(data.idx[node, : int(data.count[node])])
        pool = np.asarray(data.x)[mine].reshape(len(mine), -1).astype(np.float32)
        got = np.asarray(x).reshape(16, -1) / setup.x_scale
        for row, label in zip(got, np.asarray(y), strict=True):
            hits = np.flatnonzero(np.all(np.isclose(pool, row), axis=1))
            assert hits.size and label in np.asarray(data.y)[mine][hits]


def test_each_node_runs_its_rule_on_its_neighbourhood():
    """One ring round of self-centred clipping equals the float64 reference applied at
    every node to its neighbours' trained models (relative to its own start)."""
    setup, hp = _setup("topology.name=ring", "aggregator={name: self_centered_clipping, tau: 0.05}")
    state = jax.jit(make_init(setup))(jax.random.PRNGKey(0), hp)
    after, _ = jax.jit(make_round(setup))(state, hp, setup.data)
    attack, keys, who, trained = _first_round_training(setup, hp, state)
    _, ravel_rows = flat_unravel(setup)
    start = np.asarray(ravel_rows(state.params), np.float64)
    models = start + np.asarray(trained.updates, np.float64)
    adjacency = topologies.make("ring", n_nodes=8).adjacency
    degrees = adjacency.sum(axis=1) - 1.0
    got = np.asarray(ravel_rows(after.params), np.float64)
    clipped = 0
    for k in range(8):
        w = np.where(adjacency[k], np.asarray(who.weights), 0.0)
        step, coef = ref.ref_self_centered_clipping(models - start[k], w, k, degrees, tau=0.05)
        clipped += coef[k] > 1 / 3 + 1e-6  # some neighbour was farther than τ
        np.testing.assert_allclose(got[k], start[k] + step, rtol=1e-4, atol=1e-5)
    assert clipped > 0


def test_dissensus_keeps_honest_nodes_apart_and_weighs_per_recipient():
    """Two malicious nodes of eight on a complete graph, gossiping: dissensus (ε = 2,
    crafted for each recipient) leaves the honest models farther apart than without an
    attack, and every honest node still gives the attackers their Metropolis weight."""
    common = ["topology.name=complete", "aggregator.name=gossip", "rounds=3", "eval_every=3"]
    quiet = runner.run(*_setup(*common), seed=0)[-1]
    attacked_setup, hp = _setup(*common, "attack={name: dissensus, epsilon: 2.0, fraction: 0.25}")
    attacked = runner.run(attacked_setup, hp, seed=0)[-1]
    assert attacked["consensus_distance"] > 1.5 * quiet["consensus_distance"]
    assert attacked["malicious_weight"] == pytest.approx(2 / 8, abs=1e-5)


def test_neighbour_lists_hold_exactly_the_graph():
    a = topologies.make("k_regular", n_nodes=12, k=3, seed=4).adjacency
    index, valid = topologies.neighbour_lists(a)
    assert index.shape == (12, 4) and (index[:, 0] == np.arange(12)).all()
    rebuilt = np.zeros_like(a)
    for i in range(12):
        rebuilt[i, index[i][valid[i]]] = True
    assert (rebuilt == a).all()
    assert topologies.make("ring", n_nodes=8).gather is not None  # 3 of 8 rows: gathered
    assert topologies.make("complete", n_nodes=8).gather is None


def test_gathered_neighbourhoods_equal_the_dense_weights(monkeypatch):
    """A 4 x 4 torus round (median at every node, an ALIE adversary crafting per
    recipient) gives the same models whether each node's rule gets its 5 gathered rows or
    all 16 rows with weight 0 for non-neighbours."""
    import fedsim.round as rounds

    setup, hp = _setup(*TORUS_ALIE)
    assert rounds.topology_of(setup.spec).gather is not None
    state = jax.jit(make_init(setup))(jax.random.PRNGKey(0), hp)
    gathered, m_gathered = jax.jit(make_round(setup))(state, hp, setup.data)
    dense_of = lambda spec: topologies.dense(topologies.make("torus", n_nodes=16))
    monkeypatch.setattr(rounds, "topology_of", dense_of)
    dense, m_dense = jax.jit(make_round(setup))(state, hp, setup.data)
    _assert_same_round((gathered, m_gathered), (dense, m_dense))
    assert float(m_dense.malicious_weight) > 0


WIDER = "wider than the model"  # one block, narrower than the width asked
NODE_CHUNKS = "node chunks"


def _at_width(fn, width):
    """``fn`` run at ``width`` columns, whatever width its caller (the rule) asks for."""
    return lambda *args, **kw: fn(*args, **{**kw, "width": width})


@pytest.mark.parametrize(
    "rule, width",
    [
        ("{name: gossip}", 100),
        pytest.param("{name: mean}", 100, marks=pytest.mark.slow),  # as gossip, weights fixed
        ("{name: median}", 100),
        ("{name: median}", None),
        ("{name: median}", NODE_CHUNKS),
        pytest.param("{name: trimmed_mean, beta: 0.25}", 100, marks=pytest.mark.slow),
        ("{name: self_centered_clipping, tau: 0.05}", 100),
        ("{name: self_centered_clipping, tau: 0.05}", WIDER),
    ],
)
def test_columnwise_rules_by_column_blocks_equal_the_gathered_round(monkeypatch, rule, width):
    """A 4 x 4 torus round with a columnwise rule at every node (a quarter of the nodes
    flipping labels) gives the same models and metrics run one block of columns at a
    time (blocks of 100 columns and a narrower last one; blocks wider than the model, as
    a small model has fewer columns than a block; the width the rule asks for; or blocks
    of 100 columns for 5 of the 16 nodes at a time) as on the gathered neighbourhoods."""
    import fedsim.round as rounds

    setup, hp = _setup(
        *TORUS_ALIE[:3], f"aggregator={rule}", "attack={name: label_flip, fraction: 0.25}"
    )
    _, attack = components(setup)
    assert rounds.runs_by_columns(setup.spec, topology_of(setup.spec), attack)
    assert setup.n_params % 100 != 0
    if width == NODE_CHUNKS:  # 100 columns of 5 nodes at a time: 3 chunks and 1 node
        monkeypatch.setattr(rounds, "column_layout", lambda *a: (100, 5))
        width = None
    width = setup.n_params + 28 if width == WIDER else width
    for name in ("by_column_blocks", "edge_sq_distances"):
        if width is not None:  # None: the layout the rule asks for
            monkeypatch.setattr(rounds, name, _at_width(getattr(rounds, name), width))
    state = jax.jit(make_init(setup))(jax.random.PRNGKey(0), hp)
    by_columns, m_columns = jax.jit(make_round(setup))(state, hp, setup.data)
    monkeypatch.setattr(rounds, "runs_by_columns", lambda *a: False)
    gathered, m_gathered = jax.jit(make_round(setup))(state, hp, setup.data)
    _assert_same_round((by_columns, m_columns), (gathered, m_gathered))
    assert float(m_gathered.malicious_weight) > 0


def test_column_layout_holds_about_the_entries_asked():
    """Blocks are powers of two holding about the entries asked (128 columns of 1,000
    nine-row neighbourhoods by default, an eighth for order statistics), wider for fewer
    nodes, within the narrowest and widest width; where all nodes' blocks would be
    narrower than NODE_CHUNK_WIDTH columns, that width for as many nodes as fit."""
    from fedsim.aggregators.base import REGISTRY as RULES
    from fedsim.round import COLUMN_ENTRIES, COLUMN_WIDTHS, NODE_CHUNK_WIDTH, column_layout

    select = RULES.column_entries("median")
    assert column_layout(1000, 9) == column_layout(1000, 9, "gossip") == (128, None)
    at_once = select // (9 * NODE_CHUNK_WIDTH)  # 113 nodes
    assert column_layout(1000, 9, "median") == (NODE_CHUNK_WIDTH, at_once)
    assert column_layout(1000, 9, "trimmed_mean") == (NODE_CHUNK_WIDTH, at_once)
    assert column_layout(100, 9, "median") == (128, None)
    assert RULES.column_entries("trimmed_mean") == select and RULES.column_entries("gossip") is None
    layouts = [column_layout(n, 9) for n in (1, 10, 100, 1000, 10_000, 10**6)]
    widths = [w for w, _ in layouts]
    assert widths == sorted(widths, reverse=True) and widths[0] == COLUMN_WIDTHS[1]
    assert all(w & (w - 1) == 0 and NODE_CHUNK_WIDTH <= w <= COLUMN_WIDTHS[1] for w in widths)
    for n, (w, chunk) in zip((1, 10, 100, 1000, 10_000, 10**6), layouts, strict=True):
        held = (chunk or n) * 9 * w  # gathered entries of one block
        assert held <= 1.5 * COLUMN_ENTRIES or w == COLUMN_WIDTHS[1]
        assert chunk is None or (w == NODE_CHUNK_WIDTH and held > COLUMN_ENTRIES / 2)
    assert layouts[-1] == (NODE_CHUNK_WIDTH, COLUMN_ENTRIES // (9 * NODE_CHUNK_WIDTH))


def test_gossip_by_column_blocks_drops_a_row_non_finite_in_one_block():
    """A neighbour whose row holds a NaN in one column only is dropped from every block
    (its weight stays on the node), as gossip over the whole rows drops it, whether all
    nodes are aggregated at once or a few at a time."""
    from fedsim import aggregators
    from fedsim.round import by_column_blocks
    from fedsim.types import AggContext

    n, d, width = 6, 250, 64
    sent = jax.random.normal(jax.random.PRNGKey(0), (n, d)).at[3, 200].set(jnp.nan)
    own = jax.random.normal(jax.random.PRNGKey(1), (n, d))
    index, valid = topologies.neighbour_lists(topologies.make("ring", n_nodes=n).adjacency)
    index = jnp.asarray(index)
    degrees = jnp.asarray(valid.sum(axis=1) - 1.0, jnp.float32)
    weights = jnp.asarray(valid, jnp.float32)
    gossip = aggregators.make("gossip")

    def rule(rows, mine, w, idx, finite=None):
        ctx = AggContext(mine, jax.random.PRNGKey(2), {}, self_index=0, degrees=degrees[idx])
        delta, _, info = gossip.aggregate(rows, w, (), ctx._replace(finite=finite))
        return delta, info.weight

    finite = jnp.all(jnp.isfinite(sent), axis=1)[index]
    whole, whole_weight = jax.vmap(rule)(sent[index] - own[:, None], own, weights, index)
    rows = np.asarray(sent[index] - own[:, None], np.float64)
    want = np.sum((rows - np.asarray(whole, np.float64)[:, None]) ** 2, -1)
    assert float(whole_weight[2, 2]) == 0.0  # node 2 drops neighbour 3 (its third row)
    for at_once in (None, 4):  # all nodes, or 4 then 2 (lax.map's remainder)
        steps, weight, sq = by_column_blocks(
            rule, sent, own, index, (weights, index, finite), True, width, at_once
        )
        np.testing.assert_allclose(steps, whole, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(weight, whole_weight, rtol=1e-6, atol=1e-7)
        assert np.isfinite(np.asarray(steps)).all()
        np.testing.assert_allclose(sq, want, rtol=1e-5)


def _node_accuracies(rule, rounds=15):
    """Each node's test accuracy after ``rounds`` ring rounds with ``rule``, one node
    sign-flipping (scale 3) for every recipient; and that node's index."""
    over = [
        "data.n_clients=12",
        "client.participants=12",
        "topology.name=ring",
        f"aggregator={rule}",
        "attack={name: sign_flip, scale: 3.0, fraction: 0.0834}",
    ]
    setup, hp = _setup(*over)
    state = jax.jit(make_init(setup))(jax.random.PRNGKey(0), hp)
    step = jax.jit(make_round(setup))
    for _ in range(rounds):
        state, _ = step(state, hp, setup.data)
    x = setup.data.x_test
    logits = jax.vmap(lambda p: setup.module.apply({"params": p}, x))(state.params)
    accuracy = np.asarray(jnp.mean(jnp.argmax(logits, -1) == setup.data.y_test, axis=1))
    (bad,) = np.flatnonzero(np.asarray(state.malicious))
    return accuracy, int(bad)


@pytest.mark.slow
def test_a_sign_flipper_hurts_its_ring_neighbours_most_and_clipping_contains_it():
    """Gossip on a ring of 12 with one node sending each neighbour its flipped model:
    its two neighbours end below the nodes three or more hops away; self-centred
    clipping around each node's own model keeps the neighbours level with them."""
    results = {}
    for rule in ("{name: gossip}", "{name: self_centered_clipping, tau: 0.1}"):
        accuracy, bad = _node_accuracies(rule)
        hops = np.array([min(abs(i - bad), 12 - abs(i - bad)) for i in range(12)])
        results[rule] = (accuracy[hops == 1].mean(), accuracy[hops >= 3].mean())
    near, far = results["{name: gossip}"]
    clipped_near, clipped_far = results["{name: self_centered_clipping, tau: 0.1}"]
    assert near < far - 0.05
    assert clipped_near > near + 0.05 and clipped_near > clipped_far - 0.05


def test_topology_gallery_draws_every_graph_and_refuses_bad_sizes(tmp_path, capsys):
    from fedsim.cli import main
    from fedsim.report.graphs import GALLERY, edges_of, gallery_figure

    fig = gallery_figure(16)
    titles = [ax.get_title() for ax in fig.axes]
    assert len(titles) == len(GALLERY) and all("16 nodes" in t for t in titles)
    assert "16 edges" in titles[0] and "32 pulls" in titles[-1]
    assert edges_of("epidemic", 16, {"s": 2}).sum(axis=1).tolist() == [2] * 16
    out = tmp_path / "g.png"
    assert main(["topology", "--out", str(out)]) == 0 and out.read_bytes()[:4] == b"\x89PNG"
    assert main(["topology", "--nodes", "10", "--out", str(tmp_path / "h.png")]) == 2
    assert "multiple of 4" in capsys.readouterr().err and not (tmp_path / "h.png").exists()


def _with_malicious(setup, hp, nodes):
    """A run's initial state with exactly ``nodes`` malicious."""
    state = jax.jit(make_init(setup))(jax.random.PRNGKey(0), hp)
    malicious = np.zeros(setup.spec.n_clients, bool)
    malicious[list(nodes)] = True
    return state._replace(malicious=jnp.asarray(malicious))


@pytest.mark.parametrize("victims", [None, [2, 5]])
def test_crafted_messages_travel_only_from_malicious_to_target_nodes(victims):
    """On a ring with malicious nodes 1 and 4 (dissensus), the rows each node receives
    differ from what the senders trained exactly on the malicious -> honest edges (only
    those into the named victims when ``attack.victims`` is set), never elsewhere."""
    over = ["topology.name=ring", "attack={name: dissensus, epsilon: 2.0, fraction: 0.25}"]
    if victims:
        over.append(f"attack.victims={victims}")
    setup, hp = _setup(*over)
    state = _with_malicious(setup, hp, (1, 4))
    attack, keys, who, trained = _first_round_training(setup, hp, state)
    _, ravel_rows = flat_unravel(setup)
    own = ravel_rows(state.params)
    topo = topology_of(setup.spec)
    index, valid = topo.gather(keys.aggregate)
    weights = jnp.where(valid, who.weights[index], 0.0)
    targets = ~who.is_malicious & victims_mask(setup.spec)
    ex = Exchange(who, own, own + trained.updates, None, state.previous_aggregate, targets)
    deliver = jax.vmap(make_messages(setup, topo, attack), in_axes=(0,) * 5 + (None,) * 3)
    node_keys = jax.random.split(keys.attack, 8)
    rows, _ = jax.jit(deliver)(
        jnp.arange(8), jnp.zeros(8, jnp.int32), index, weights, node_keys, ex, hp, setup.data
    )
    plain = np.asarray(ex.sent)[np.asarray(index)] - np.asarray(own)[:, None]
    changed = np.any(np.asarray(rows) != plain, axis=-1)  # [n, K]
    malicious_sender = np.asarray(state.malicious)[np.asarray(index)] & np.asarray(valid)
    expected = np.asarray(targets)[:, None] & malicious_sender
    assert expected.sum() == (2 if victims else 4)
    np.testing.assert_array_equal(changed, expected)


def test_an_honest_clique_out_of_the_attackers_reach_never_hears_them(tmp_path):
    """Two 4-cliques joined by the edge 3-4, nodes 6 and 7 malicious (dissensus): after
    one round the far clique's models (nodes 0-3) are bitwise those of a clean run,
    while node 5, a neighbour of both attackers, is not."""
    path = tmp_path / "cliques.txt"
    cliques = [(a, b) for g in (0, 4) for a in range(g, g + 4) for b in range(a + 1, g + 4)]
    path.write_text("".join(f"{a} {b}\n" for a, b in [*cliques, (3, 4)]))
    common = [f"topology={{name: edges, path: {path}}}", "aggregator.name=gossip"]
    after = {}
    for name in ("none", "dissensus"):
        setup, hp = _setup(*common, f"attack={{name: {name}, fraction: 0.25}}")
        state = _with_malicious(setup, hp, (6, 7))
        after[name], _ = jax.jit(make_round(setup))(state, hp, setup.data)
    _, ravel_rows = flat_unravel(setup)
    clean, attacked = (np.asarray(ravel_rows(after[k].params)) for k in ("none", "dissensus"))
    np.testing.assert_array_equal(attacked[:4], clean[:4])
    assert np.abs(attacked[5] - clean[5]).max() > 1e-3


def test_nodes_aggregated_in_chunks_equal_all_at_once():
    """The memory planner's node chunk (here 4 of 16 torus nodes at a time, median, an
    ALIE adversary) changes nothing but how many neighbourhoods are held at once."""
    setup, hp = _setup(*TORUS_ALIE)
    state = jax.jit(make_init(setup))(jax.random.PRNGKey(0), hp)
    whole, m_whole = jax.jit(make_round(setup))(state, hp, setup.data)
    chunked_setup = with_layout(setup, client_chunk=4)
    chunked, m_chunked = jax.jit(make_round(chunked_setup))(state, hp, setup.data)
    _assert_same_round((chunked, m_chunked), (whole, m_whole), rtol=1e-6)


def test_victims_are_named_nodes_and_get_their_own_metrics():
    """``attack.victims``: the evaluation reports the honest victims' own accuracy; bad
    victim lists are one-line errors."""
    setup, hp = _setup(
        "topology.name=ring",
        "attack={name: dissensus, epsilon: 2.0, fraction: 0.25, victims: [0, 3]}",
    )
    assert setup.spec.victims == (0, 3)
    last = runner.run(setup, hp, seed=0)[-1]
    assert 0.0 <= last["victims_test_accuracy"] <= 1.0
