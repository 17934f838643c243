"""The round as five stages (DESIGN.md, "The round, as data flows"):
**sample → train → craft → aggregate → apply**, each a pure function with typed input and
output, composed by ``make_round`` through the topology.

- ``sample``: which clients take part (``Participants``);
- ``train``: their local training, vmapped (``Trained``: the ``[m, d]`` updates, and the
  malicious clients' benign updates when the attack asks for them);
- ``craft``: the adversary rewrites the malicious rows;
- ``aggregate``: each model's rule over the rows its neighbourhood holds;
- ``apply``: the server optimizer steps the model with the aggregate.

``make_chunk`` scans ``eval_every`` rounds and evaluates on the device.

Randomness: one root key per run, split by purpose (init, malicious set, rounds); the key
of round r is ``fold_in(rounds_key, r)``, split again by purpose (sampling, training,
attack, aggregation); client c trains with ``fold_in(train_key, c)``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from fedsim.aggregators.base import REGISTRY as RULES
from fedsim.client import LocalSpec, make_local_train, make_optimizer, n_local_steps
from fedsim.kernels import block_width, finite_rows, row_sq_norms
from fedsim.layout import shard_clients
from fedsim.setup import Data, Setup, components, flat_unravel, is_peer_to_peer, topology_of
from fedsim.spec import HParams
from fedsim.types import AggContext, AggInfo, AttackContext

TRACE_COUNT = {"round": 0}  # incremented each time a round is traced (tests check reuse)


class RunState(NamedTuple):
    params: Any
    server_opt_state: Any
    agg_state: Any
    malicious: jax.Array  # bool [n_clients], fixed per run
    rounds_key: jax.Array
    round: jax.Array  # int32 scalar
    # The last round's aggregate, ravelled [d]: public to every participant (the change of
    # the global model), so attacks may read it; zeros before the first round.
    previous_aggregate: jax.Array


class RoundMetrics(NamedTuple):
    malicious_weight: jax.Array  # share of the aggregate from malicious clients
    honest_weight: jax.Array  # share of the aggregate from honest clients
    honest_accepted: jax.Array  # fraction of present honest clients the rule used
    malicious_participants: jax.Array
    update_norm: jax.Array
    finite: jax.Array  # False once the aggregate or the model is NaN/Inf (divergence)
    malicious_distance: jax.Array  # mean L2 distance of malicious updates to the aggregate
    honest_distance: jax.Array  # mean L2 distance of honest updates to the aggregate


class RoundKeys(NamedTuple):
    sample: jax.Array
    train: jax.Array
    attack: jax.Array
    aggregate: jax.Array


class Participants(NamedTuple):
    """The round's rows: clients ``[m]`` (ids), count ``[m]`` (samples), weights ``[m]``
    (float sample counts, what the rules are given), is_malicious ``[m]`` (never shown to
    a rule)."""

    clients: jax.Array
    count: jax.Array
    weights: jax.Array
    is_malicious: jax.Array


class Trained(NamedTuple):
    """updates ``[m, d]`` (local minus global params, ravelled); benign ``[m, d]`` or None:
    what every row would send trained on clean data (for attacks that ask)."""

    updates: jax.Array
    benign: jax.Array | None


class Aggregated(NamedTuple):
    """delta ``[d]``: the rule's output; agg_state: its new state; info: its AggInfo."""

    delta: jax.Array
    agg_state: Any
    info: AggInfo


def round_keys(state: RunState) -> RoundKeys:
    key = jax.random.fold_in(state.rounds_key, state.round)
    return RoundKeys(*jax.random.split(key, 4))


def sample(key, malicious, data: Data, n_clients: int, participants: int) -> Participants:
    """``participants`` of ``n_clients`` clients, uniformly without replacement (all of
    them, in order, when every client takes part)."""
    if participants == n_clients:
        clients = jnp.arange(n_clients)
    else:
        clients = jax.random.choice(key, n_clients, (participants,), replace=False)
    count = data.count[clients]
    return Participants(clients, count, count.astype(jnp.float32), malicious[clients])


def local_spec(setup: Setup) -> LocalSpec:
    spec = setup.spec
    return LocalSpec(
        spec.batch_size,
        spec.local_epochs,
        spec.local_steps,
        spec.client_optimizer,
        min_count=setup.min_count,
        x_scale=setup.x_scale,
    )


def make_train(setup: Setup, attack):
    """``train(params, who, key, hparams, data) -> Trained``: every participant's local
    training (vmapped, or in chunks of ``setup.client_chunk``); malicious clients train on
    the attack's poisoned batches."""
    local = local_spec(setup)
    apply_fn, loss = setup.module.apply, setup.task.loss
    train_poisoned = make_local_train(apply_fn, local, poison=attack.poison, loss=loss)
    train_clean = make_local_train(apply_fn, local, loss=loss)
    wants_benign = attack.craft is not None and attack.needs_benign

    def train(
        params, who: Participants, key, hparams: HParams, data: Data, own: bool = False
    ) -> Trained:
        """``own``: ``params`` has a leading ``[m]`` axis, each client's own model."""
        n_steps = jnp.max(n_local_steps(local, who.count))
        client_keys = jax.vmap(lambda c: jax.random.fold_in(key, c))(who.clients)
        hp = {
            "lr": hparams.client_lr,
            "momentum": hparams.client_momentum,
            "attack": hparams.attack,
        }
        start = params if own else jnp.zeros(who.clients.shape[0])  # (a placeholder row)
        rows = (data.idx[who.clients], who.count, client_keys, who.is_malicious, start)
        per_client = shard_clients(setup.mesh, rows)

        def train_all(train_fn):  # -> [m, d] updates, rows in the order of ``clients``
            def one(row):
                idx_row, cnt, k, mal, own_params = row
                p = own_params if own else params
                out = train_fn(p, data.x, data.y, idx_row, cnt, n_steps, k, hp, mal, data.goal)
                return ravel_pytree(out)[0]  # a chunk's rows go straight into [m, d]

            if setup.client_chunk is None:
                trained = jax.vmap(one)(per_client)
            else:  # bounds the training working set to client_chunk clients at a time
                trained = jax.lax.map(one, per_client, batch_size=setup.client_chunk)
            return shard_clients(setup.mesh, trained)

        updates = train_all(train_poisoned)
        return Trained(updates, train_all(train_clean) if wants_benign else None)

    return train


def model_functions(setup: Setup):
    """``(loss_fn, error_fn)`` of flat params: ``loss_fn(flat [d], x, y, mask=None)``, the
    task's mean loss, and ``error_fn(flat, x, y)``, its error (for behaviour rules)."""
    unravel, _ = flat_unravel(setup)
    apply_fn, task = setup.module.apply, setup.task

    def loss_fn(flat, x, y, mask=None):
        outputs = apply_fn({"params": unravel(flat)}, x)
        mask = jnp.ones(y.shape[0], jnp.float32) if mask is None else mask.astype(jnp.float32)
        return task.loss(outputs, y, mask)

    def error_fn(flat, x, y):
        return task.error(apply_fn({"params": unravel(flat)}, x), y)

    return loss_fn, error_fn


def make_craft(setup: Setup, attack):
    """``craft(trained, who, state, key, hparams, data) -> updates [m, d]``: the attack's
    rewrite of the malicious rows, with what its knowledge allows (``AttackContext``)."""
    context = make_attack_context(setup, attack)

    def craft(trained: Trained, who: Participants, state: RunState, key, hparams, data: Data):
        if attack.craft is None:
            return trained.updates
        global_flat, _ = ravel_pytree(state.params)
        ctx = context(
            key, hparams, data, who, global_flat, trained.benign, state.previous_aggregate
        )
        return attack.craft(trained.updates, who.is_malicious, ctx)

    return craft


def make_attack_context(setup: Setup, attack):
    """``context(key, hparams, data, who, global_flat [d], benign [m, d] | None, previous
    [d], weights=None, self_index=None) -> AttackContext``: what the adversary may use
    when crafting against one model (peer-to-peer: one recipient node, ``self_index``,
    whose neighbourhood ``weights`` and model ``global_flat`` it sees)."""
    loss_fn, error_fn = model_functions(setup)

    def context(key, hparams, data, who, global_flat, benign, previous, weights=None, **peer):
        goal = {}
        if attack.goal_batch:
            key, k_goal = jax.random.split(key)
            goal = goal_samples(k_goal, setup, data, who, attack, hparams.attack)
        has_proxy = data.proxy_x.shape[0] > 0
        return AttackContext(
            global_params=global_flat,
            key=key,
            hparams=hparams.attack,
            weights=who.weights if weights is None else weights,
            benign_updates=benign,
            previous_aggregate=previous,
            loss_fn=loss_fn,
            proxy_x=data.proxy_x if has_proxy else None,
            proxy_y=data.proxy_y if has_proxy else None,
            error_fn=error_fn,
            rule_hparams=hparams.agg,
            **goal,
            **peer,
        )

    return context


def goal_samples(key, setup: Setup, data: Data, who: Participants, attack, attack_hp) -> dict:
    """``attack.goal_batch`` samples of the present malicious clients' own data, passed
    through the goal's poison as their local training is (the goal's own
    ``poison_fraction``): ``{"goal_x", "goal_y", "goal_mask"}``, the mask marking the rows
    the poison changed. A client is drawn in proportion to its sample count, then one of
    its samples uniformly; with no malicious client present the rows are unused."""
    k_client, k_pos, k_poison = jax.random.split(key, 3)
    size = attack.goal_batch
    share = jnp.where(who.is_malicious, who.count, 0).astype(jnp.float32)
    share = jnp.where(jnp.sum(share) > 0, share, 1.0)
    pick = jax.random.categorical(k_client, jnp.log(share), shape=(size,))
    count = who.count[pick]
    pos = jnp.floor(jax.random.uniform(k_pos, (size,)) * count).astype(jnp.int32)
    rows = data.idx[who.clients[pick], jnp.minimum(pos, count - 1)]
    x, y = data.x[rows].astype(jnp.float32) * setup.x_scale, data.y[rows]
    px, py = attack.poison(x, y, k_poison, attack_hp, in_goal=data.goal[rows])
    changed = (py != y) | jnp.any((px != x).reshape(size, -1), axis=1)
    return {"goal_x": px, "goal_y": py, "goal_mask": changed}


def make_aggregate(setup: Setup, agg):
    """``aggregate(updates [m, d], weights [m], clients [m], state, key, hparams, data,
    global_flat [d], peer=None) -> Aggregated``: one rule over the rows ``weights`` keeps,
    judging with the judge's data when it is behaviour-based. ``peer``: a ``PeerView``
    (peer-to-peer: the node's own row, the rows' degrees, its own judging batch)."""
    loss_fn, error_fn = model_functions(setup)

    def aggregate(
        updates, weights, clients, agg_state, key, hparams, data: Data, global_flat, peer=None
    ):
        if peer is not None:
            judge = {"judge_x": peer.judge_x, "judge_y": peer.judge_y}
            judge |= {"self_index": peer.self_index, "degrees": peer.degrees}
            judge |= {"finite": peer.finite, "self_distances": peer.self_distances}
        elif data.judge_x.shape[0] > 0:
            judge = {"judge_x": data.judge_x, "judge_y": data.judge_y}
        else:
            judge = {}
        ctx = AggContext(
            global_params=global_flat,
            key=key,
            hparams=hparams.agg,
            client_ids=clients,
            loss_fn=loss_fn,
            error_fn=error_fn,
            **judge,
        )
        return Aggregated(*agg.aggregate(updates, weights, agg_state, ctx))

    return aggregate


class PeerView(NamedTuple):
    """What a node's rule knows besides the rows: self_index (its own row), degrees
    ``[m]`` (each row's node's neighbour count), judge_x ``[J, ...]``, judge_y ``[J]``
    (J samples of its own training data, drawn afresh each round; J = 0 without
    ``judge.size``), and when the rule sees a block of columns (else None) finite
    ``[m]`` (which rows are finite in every column) and self_distances ``[m]`` (each
    row's distance to its own row over every column)."""

    self_index: jax.Array
    degrees: jax.Array
    judge_x: jax.Array | None
    judge_y: jax.Array | None
    finite: jax.Array | None = None
    self_distances: jax.Array | None = None


def own_samples(key, setup: Setup, data: Data, client, size: int):
    """``size`` samples of ``client``'s training data, uniformly with replacement:
    ``(x [size, ...] float32, y [size])``."""
    pos = jax.random.randint(key, (size,), 0, jnp.maximum(data.count[client], 1))
    rows = data.idx[client, pos]
    return data.x[rows].astype(jnp.float32) * setup.x_scale, data.y[rows]


def make_apply(setup: Setup):
    """``apply(params, opt_state, delta [d], hparams) -> (params, opt_state)``: the
    server optimizer (optax; ``sgd`` with lr 1 is FedAvg) stepping along the aggregate."""
    spec = setup.spec
    unravel, _ = flat_unravel(setup)

    def apply(params, opt_state, delta, hparams: HParams):
        opt = make_optimizer(spec.server_optimizer, hparams.server_lr, hparams.server_momentum)
        grad = jax.tree.map(jnp.negative, unravel(delta))
        step, opt_state = opt.update(grad, opt_state, params)
        return jax.tree.map(jnp.add, params, step), opt_state

    return apply


def make_init(setup: Setup):
    """``init(key, hparams) -> RunState`` for one run."""
    spec = setup.spec
    agg, _ = components(setup)

    per_client = is_peer_to_peer(spec)

    def init(key, hparams: HParams) -> RunState:
        k_init, k_mal, k_rounds = jax.random.split(key, 3)
        params = setup.init_params(k_init)
        if per_client:  # one model per node, all from the same initialisation
            one = init_state(params, hparams, agg, spec)
            tile = lambda x: jnp.broadcast_to(x, (spec.n_clients, *jnp.shape(x)))
            models = jax.tree.map(tile, one)
        else:
            models = init_state(params, hparams, agg, spec)
        n_mal = jnp.round(hparams.attack_fraction * spec.n_clients).astype(jnp.int32)
        order = jax.random.permutation(k_mal, spec.n_clients)
        malicious = (
            jnp.zeros(spec.n_clients, bool).at[order].set(jnp.arange(spec.n_clients) < n_mal)
        )
        return RunState(
            params=models.params,
            server_opt_state=models.opt_state,
            agg_state=models.agg_state,
            malicious=malicious,
            rounds_key=k_rounds,
            round=jnp.zeros((), jnp.int32),
            previous_aggregate=models.previous_aggregate,
        )

    return init


class ModelState(NamedTuple):
    params: Any
    opt_state: Any
    agg_state: Any
    previous_aggregate: jax.Array


def init_state(params, hparams: HParams, agg, spec) -> ModelState:
    """One model's optimizer and rule state around ``params``."""
    flat, _ = ravel_pytree(params)
    opt = make_optimizer(spec.server_optimizer, hparams.server_lr, hparams.server_momentum)
    return ModelState(
        params, opt.init(params), agg.init(flat, spec.n_clients), jnp.zeros_like(flat)
    )


def make_round(setup: Setup):
    """``round_step(state, hparams, data) -> (state, RoundMetrics)``: the five stages,
    composed by the topology: ``star``, one rule over every participant into the global
    model; peer-to-peer, every node's rule over its neighbourhood (``peer_round``)."""
    spec = setup.spec
    agg, attack = components(setup)
    topo = topology_of(spec)
    train = make_train(setup, attack)
    craft = make_craft(setup, attack)
    aggregate = make_aggregate(setup, agg)
    apply = make_apply(setup)
    if is_peer_to_peer(spec):
        return peer_round(setup, topo, train, aggregate, apply, attack)

    def round_step(state: RunState, hparams: HParams, data: Data):
        TRACE_COUNT["round"] += 1
        keys = round_keys(state)
        who = sample(keys.sample, state.malicious, data, spec.n_clients, spec.participants)
        trained = train(state.params, who, keys.train, hparams, data)
        updates = craft(trained, who, state, keys.attack, hparams, data)
        weights = topo.neighbourhoods(keys.aggregate, who.clients, who.weights)[0]
        global_flat, _ = ravel_pytree(state.params)
        out = aggregate(
            updates,
            weights,
            who.clients,
            state.agg_state,
            keys.aggregate,
            hparams,
            data,
            global_flat,
        )
        params, opt_state = apply(state.params, state.server_opt_state, out.delta, hparams)
        metrics = round_metrics(out.info.weight, out.delta, out.delta, updates, params, who)
        return advanced(state, params, opt_state, out.agg_state, out.delta), metrics

    return round_step


class Exchange(NamedTuple):
    """What a peer-to-peer round's nodes share, in node order: who (every node, present),
    own ``[n, d]`` (the models before training), sent ``[n, d]`` (each node's message
    before crafting: its trained model, or its update), benign ``[n, d]`` or None (the
    malicious nodes' clean updates, when the attack asks), previous ``[n, d]`` (each
    node's last step) and targets ``[n]`` bool (the recipients malicious neighbours craft
    for: the honest nodes, only the named victims when ``attack.victims`` is set)."""

    who: Participants
    own: jax.Array
    sent: jax.Array
    benign: jax.Array | None
    previous: jax.Array
    targets: jax.Array


def make_messages(setup: Setup, topo, attack):
    """``messages(k, me, index [K], weights [K], key, exchange, hparams, data) -> (rows
    [K, d], local Participants)``: what node ``k`` receives from its neighbourhood
    ``index`` (itself at row ``me``), relative to its own model before training
    (exchanging models: ``model_j - own_k``; updates: ``update_j``). When ``k`` is a
    target, its malicious neighbours' rows are crafted against it (its model, its
    neighbourhood, its rule; ``AttackContext.self_index = me``); every other row, and
    every row a non-target receives, is the sender's own message: only
    malicious -> target edges carry crafted messages."""
    context = make_attack_context(setup, attack)
    models = topo.exchange == "models"

    def messages(k, me, index, weights, key, ex: Exchange, hparams, data):
        who, flat = ex.who, ex.own[k]
        local = Participants(who.clients[index], who.count[index], weights, who.is_malicious[index])
        rows = ex.sent[index] - flat if models else ex.sent[index]
        if attack.craft is None:
            return rows, local
        mine = None if ex.benign is None else ex.benign[index]
        if mine is not None and models:
            mine = ex.own[index] + mine - flat
        ctx = context(key, hparams, data, local, flat, mine, ex.previous[k], weights, self_index=me)
        crafted = attack.craft(rows, local.is_malicious, ctx)
        return jnp.where(ex.targets[k], crafted, rows), local

    return messages


def victims_mask(spec) -> jax.Array:
    """``[n]`` bool: the nodes ``attack.victims`` names (every node when it names none)."""
    if not spec.victims:
        return jnp.ones(spec.n_clients, bool)
    return jnp.zeros(spec.n_clients, bool).at[jnp.asarray(spec.victims)].set(True)


def over_nodes(fn, args, chunk: int | None):
    """``fn`` over the leading (node) axis of every leaf of ``args``: one vmap, or
    ``lax.map`` over chunks of ``chunk`` nodes (the memory planner's bound on how many
    neighbourhoods are held at once)."""
    if chunk is None:
        return jax.vmap(fn)(*args)
    return jax.lax.map(lambda xs: fn(*xs), args, batch_size=chunk)


# gathered entries (nodes x rows x columns) a block of a columnwise peer-to-peer rule holds,
# unless the rule asks for another size (``Rules.column_entries``): 128 columns at 1,000
# nodes of nine rows
COLUMN_ENTRIES = 1 << 20
COLUMN_WIDTHS = (16, 4096)  # the narrowest and widest block
# Blocks narrower than this take their columns for fewer nodes at a time instead: the
# order statistics' eighth of the entries at 1,000 nodes of nine rows is 128 columns of
# about 113 nodes rather than 16 columns of all of them (bench/peer.py, README).
NODE_CHUNK_WIDTH = 128


def column_layout(nodes: int, rows: int, aggregator: str | None = None):
    """``(width, nodes_at_once)`` of rule ``aggregator`` run ``by_column_blocks`` over
    ``nodes`` neighbourhoods of ``rows`` rows: blocks of about the entries the rule asks
    for (``Rules.column_entries``, else ``COLUMN_ENTRIES``) of ``nodes_at_once x rows x
    width``. The width is a power of two within ``COLUMN_WIDTHS`` for all nodes at once
    (``nodes_at_once`` None) unless that is below ``NODE_CHUNK_WIDTH``: then blocks of
    ``NODE_CHUNK_WIDTH`` columns for as many nodes as the entries allow. A block is one
    loop iteration: fewer nodes take wider blocks, whose fixed cost is repaid, and rows of
    a few dozen bytes cost more per entry to slice and reduce than wider ones."""
    entries = (RULES.column_entries(aggregator) if aggregator else None) or COLUMN_ENTRIES
    width = block_width(nodes * rows, entries, *COLUMN_WIDTHS)
    if width >= NODE_CHUNK_WIDTH:
        return width, None
    at_once = max(1, entries // (rows * NODE_CHUNK_WIDTH))
    return NODE_CHUNK_WIDTH, (at_once if at_once < nodes else None)


def runs_by_columns(spec, topo, attack) -> bool:
    """Whether a peer-to-peer round runs its rule ``by_column_blocks``: a sparse graph, a
    columnwise rule (``Rules.columnwise``) without pre-aggregation stages, no crafted
    messages (crafting needs whole rows per recipient) and no judge's data."""
    return (
        topo.gather is not None
        and attack.craft is None
        and not spec.judge_size
        and not spec.has_pre_stages
        and RULES.columnwise(spec.aggregator)
    )


def over_column_blocks(step, carry, d: int, width: int):
    """``carry = step(carry, lo, c)`` for every block of ``width`` columns of ``d`` (``lo``
    traced), then for the narrower last block (``lo``, ``c`` static). With fewer than
    ``width`` columns that block is the only one: a loop of no blocks would still trace
    its body, slicing more columns than there are."""
    full = d // width
    if full:
        carry = jax.lax.fori_loop(0, full, lambda b, acc: step(acc, b * width, width), carry)
    return step(carry, full * width, d - full * width) if d % width else carry


def by_column_blocks(
    node_rule, sent, own, index, per_node, relative: bool, width: int, nodes_at_once=None
):
    """Every node's rule over its neighbourhood, ``width`` columns at a time for
    ``nodes_at_once`` nodes at a time (all when None; ``column_layout``), for a columnwise
    rule: ``node_rule(rows [K, c], own [c], *args) -> (step [c], weight [K])``, one node's
    rule on the rows ``sent[index[k]] - own[k]`` (``relative``; else ``sent[index[k]]``)
    of one block, ``args`` that node's entries of ``per_node`` (a tuple of ``[n, ...]``
    pytrees). Returns the steps ``[n, d]``, the weights ``[n, K]`` (each block's, by its
    share of the columns) and each row's squared distance to its node's step ``[n, K]``.
    Only one block of the gathered rows (``[nodes_at_once, K, c]``) is ever held, not
    ``[n, K, d]``: each row is read once per neighbourhood it belongs to, from cache,
    instead of being copied into a gathered matrix and read again by every stage of the
    rule."""
    d = sent.shape[1]
    width = min(width, d)

    def node(idx, mine_all, *args):
        def step(carry, lo, c):
            steps, weight, sq = carry
            mine = jax.lax.dynamic_slice_in_dim(mine_all, lo, c)
            rows = jax.lax.dynamic_slice_in_dim(sent, lo, c, 1)[idx]
            rows = rows - mine[None] if relative else rows
            block, w = node_rule(rows, mine, *args)
            diff = rows - block[None]
            steps = jax.lax.dynamic_update_slice_in_dim(steps, block, lo, 0)
            # squares summed lane by lane, across the lanes once at the end
            sq = sq + diff * diff if c == width else sq.at[:, :c].add(diff * diff)
            return steps, weight + w * c, sq

        zeros = jnp.zeros(idx.shape, jnp.float32)
        init = (jnp.zeros_like(mine_all), zeros, jnp.zeros((*idx.shape, width), jnp.float32))
        steps, weight, sq = over_column_blocks(step, init, d, width)
        return steps, weight / d, jnp.sum(sq, axis=-1)

    return over_nodes(node, (index, own, *per_node), nodes_at_once)


def edge_sq_distances(sent, index, width: int):
    """``[n, K]`` squared L2 distance of each neighbourhood row ``sent[index[k, j]]`` to
    the node's own row ``sent[index[k, 0]]`` (itself first), summed over column blocks
    as ``by_column_blocks`` reads them (NaN where either row is non-finite)."""

    def step(sq, lo, c):
        rows = jax.lax.dynamic_slice_in_dim(sent, lo, c, 1)[index]
        diff = rows - rows[:, :1]
        return sq + jnp.sum(diff * diff, axis=-1)

    return over_column_blocks(step, jnp.zeros(index.shape, jnp.float32), sent.shape[1], width)


def peer_round(setup: Setup, topo, train, aggregate, apply, attack):
    """The round with one model per node: every node trains from its own model, then each
    node's rule (the same ``Aggregator``, vmapped over nodes, its own state and key)
    aggregates the rows its neighbourhood weights keep, as ``make_messages`` delivers
    them (relative to the node's model before training, malicious rows crafted for it
    when it is a target). So a rule's reference point (the origin, its own row) is the
    node's own model, and its output is the node's step. Behaviour-based rules judge
    with ``judge.size`` samples of the node's own data. The adversary's goal samples are
    drawn once per recipient.
    Sparse graphs (``topology.gather``) hand each node's rule its K neighbourhood rows,
    gathered (``[n, K, d]`` in all, itself first); dense ones all n rows with weight 0
    for non-neighbours. Nodes are aggregated ``setup.client_chunk`` at a time when the
    memory planner sets one. A columnwise rule on a sparse graph (``runs_by_columns``)
    runs instead ``by_column_blocks``, with the same result. Metrics are the honest
    nodes' means over their neighbourhoods."""
    spec = setup.spec
    _, ravel_rows = flat_unravel(setup)
    n = spec.n_clients
    nodes = jnp.arange(n)
    messages = make_messages(setup, topo, attack)
    victims = victims_mask(spec)
    dense = topo.gather is None
    columns = runs_by_columns(spec, topo, attack)

    def round_step(state: RunState, hparams: HParams, data: Data):
        TRACE_COUNT["round"] += 1
        keys = round_keys(state)
        who = sample(keys.sample, state.malicious, data, n, n)
        own = ravel_rows(state.params)  # [n, d]: the nodes' models
        trained = train(state.params, who, keys.train, hparams, data, own=True)
        if dense:  # every node's rule over all n rows, weight 0 for non-neighbours
            weights = topo.neighbourhoods(keys.aggregate, who.clients, who.weights)
            valid = weights > 0
            index, me = nodes, nodes  # index unused: every node reads all rows
        else:  # each node's K neighbourhood rows, itself first
            index, valid = topo.gather(keys.aggregate)
            weights = jnp.where(valid, who.weights[index], 0.0)
            me = jnp.zeros(n, jnp.int32)
        degrees = jnp.sum(valid, axis=1).astype(jnp.float32) - 1.0  # [n]
        sent = own + trained.updates if topo.exchange == "models" else trained.updates
        ex = Exchange(
            who, own, sent, trained.benign, state.previous_aggregate, ~who.is_malicious & victims
        )

        if columns:
            steps, weight, distances, local = neighbourhoods_by_columns(
                ex, index, weights, degrees, state.agg_state, keys.aggregate, hparams, data
            )
            agg_state = state.agg_state
        else:
            out, distances, local = neighbourhoods_gathered(
                ex, index, me, weights, degrees, state.agg_state, keys, hparams, data
            )
            steps, weight, agg_state = out.delta, out.info.weight, out.agg_state
        params, opt_state = jax.vmap(apply, in_axes=(0, 0, 0, None))(
            state.params, state.server_opt_state, steps, hparams
        )
        # per node, over its neighbourhood: who is present is who it hears from
        per_node = jax.vmap(round_metrics, in_axes=(0, None, 0, 0, 0, 0))(
            weight, None, steps, distances, params, local
        )
        honest = ~who.is_malicious
        metrics = jax.tree.map(lambda v: _honest_mean(v, honest), per_node)
        return advanced(state, params, opt_state, agg_state, steps), metrics

    def neighbourhoods_by_columns(ex, index, weights, degrees, agg_state, key, hparams, data):
        """Every node's (columnwise) rule ``by_column_blocks``: the steps ``[n, d]``, the
        weights ``[n, K]``, each group's distance per node and each node's Participants."""
        who = ex.who
        finite = finite_rows(ex.sent)[index] & finite_rows(ex.own)[:, None]
        rule_keys = jax.vmap(lambda k: jax.random.split(k)[0])(jax.random.split(key, n))
        width, at_once = column_layout(*index.shape, spec.aggregator)
        far = None
        if RULES.needs_self_distances(spec.aggregator):
            far = jnp.sqrt(edge_sq_distances(ex.sent, index, width=width))

        def one(rows, mine, idx, w, fin, far_k, state_k, k_rule):
            view = PeerView(jnp.int32(0), degrees[idx], None, None, fin, far_k)
            args = (who.clients[idx], state_k, k_rule, hparams, data, mine, view)
            out = aggregate(rows, w, *args)
            return out.delta, out.info.weight

        per_node = (index, weights, finite, far, agg_state, rule_keys)
        models = topo.exchange == "models"
        steps, weight, sq = by_column_blocks(
            one, ex.sent, ex.own, index, per_node, models, width=width, nodes_at_once=at_once
        )
        local = Participants(who.clients[index], who.count[index], weights, who.is_malicious[index])
        present = weights > 0
        distances = jax.vmap(group_distances)(jnp.sqrt(sq), present, local.is_malicious)
        return steps, weight, distances, local

    def neighbourhoods_gathered(ex, index, me, weights, degrees, state, keys, hparams, data):
        """Every node's rule on its gathered rows (all n rows on a dense graph), as
        ``make_messages`` delivers them: the rule's output per node, each group's distance
        per node and each node's Participants."""

        def node(k, me, idx, w, agg_state, key, k_attack):
            k_rule, k_judge = jax.random.split(key)
            idx = nodes if dense else idx
            rows, local = messages(k, me, idx, w, k_attack, ex, hparams, data)
            judge = (None, None)
            if spec.judge_size:
                judge = own_samples(k_judge, setup, data, k, spec.judge_size)
            view = PeerView(me, degrees[idx], *judge)
            args = (local.clients, agg_state, k_rule, hparams, data, ex.own[k], view)
            out = aggregate(rows, w, *args)
            # each group's distance to what the node accepted, as the node received them
            return out, distances_to(out.delta, rows, w > 0, local.is_malicious), local

        per_node = (nodes, me, index, weights, state)
        per_node += (jax.random.split(keys.aggregate, n), jax.random.split(keys.attack, n))
        return over_nodes(node, per_node, setup.client_chunk)

    return round_step


def advanced(state: RunState, params, opt_state, agg_state, step) -> RunState:
    """The state a round leaves: new model(s) and states, the step as the next round's
    previous aggregate, the round counter advanced."""
    previous = step.astype(state.previous_aggregate.dtype)
    return state._replace(
        params=params,
        server_opt_state=opt_state,
        agg_state=agg_state,
        round=state.round + 1,
        previous_aggregate=previous,
    )


def _honest_mean(values, honest):
    """Mean of a per-node metric over the honest nodes (booleans: all of them)."""
    if values.dtype == jnp.bool_:
        return jnp.all(values)
    sel = honest.astype(jnp.float32)
    return jnp.sum(values.astype(jnp.float32) * sel) / jnp.maximum(jnp.sum(sel), 1.0)


def round_metrics(weight, reference, step, rows, params, who: Participants) -> RoundMetrics:
    """What the round did for one model: the weight each group got from its rule
    (``weight [m]``), the step's norm, divergence (the step or the new model non-finite)
    and each group's distance to the rule's output ``reference [d]`` (given instead as a
    dict ``distances_to`` made, when ``rows`` is a mapping)."""
    is_mal, present = who.is_malicious, who.weights > 0
    leaves = jax.tree_util.tree_leaves(params)
    params_finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))
    return RoundMetrics(
        malicious_weight=jnp.sum(jnp.where(is_mal, weight, 0.0)),
        honest_weight=jnp.sum(jnp.where(is_mal, 0.0, weight)),
        honest_accepted=honest_accepted(weight, present, is_mal, who.weights),
        malicious_participants=jnp.sum(is_mal & present),
        update_norm=jnp.linalg.norm(step),
        finite=jnp.all(jnp.isfinite(step)) & params_finite,
        **(rows if isinstance(rows, dict) else distances_to(reference, rows, present, is_mal)),
    )


def honest_accepted(weight, present, is_mal, weights):
    """Fraction of the present honest clients given at least half of a fair share: the
    smaller of ``1 / m`` (m present clients; robust rules count every client once) and
    the client's share of the round's ``weights`` (FedAvg weighs by sample counts). How
    many honest updates the rule still uses: 1 for the mean. Every convex rule's weights
    sum to 1, so the honest *share* cannot show a tightened rule rejecting honest clients
    when no one attacks; this count can."""
    honest = present & ~is_mal
    m = jnp.maximum(jnp.sum(present), 1)
    own = weights / jnp.maximum(jnp.sum(jnp.where(present, weights, 0.0)), 1e-30)
    used = honest & (weight >= 0.5 * jnp.minimum(1.0 / m, own))
    return jnp.sum(used) / jnp.maximum(jnp.sum(honest), 1)


def distances_to(reference, updates, present, is_mal) -> dict:
    """Mean L2 distance of the present malicious and honest rows to ``reference`` [d].

    The reference is the rule's output: how far from what the rule accepted each group
    sent (0 when a group has no present member)."""
    return group_distances(jnp.sqrt(row_sq_norms(updates, reference)), present, is_mal)


def group_distances(dist, present, is_mal) -> dict:
    """``distances_to`` from the rows' distances ``dist [m]`` to the reference."""
    mean_over = lambda sel: jnp.sum(jnp.where(sel, dist, 0.0)) / jnp.maximum(jnp.sum(sel), 1)
    return {
        "malicious_distance": mean_over(present & is_mal),
        "honest_distance": mean_over(present & ~is_mal),
    }


def make_evaluate(setup: Setup, eval_batch: int = 1000):
    """``evaluate(state, data) -> dict``: the task's test metrics (``test_loss`` always),
    the attack success rate for targeted attacks, and with groups (hospitals, cars) the
    main metric on each group's test samples (``group<g>_test_accuracy``, ...).

    With one model per node, each honest node's model is evaluated (one vmapped pass) and
    the metrics are their mean, plus the worst node's and the spread of the main metric
    (``worst_*``, ``spread_*``) and the consensus distance (mean L2 distance of the honest
    models to their mean); a group's metric is that of its own honest nodes on its test
    samples."""
    _, attack = components(setup)
    apply_fn, task = setup.module.apply, setup.task
    main = task.main_metric
    peer = is_peer_to_peer(setup.spec)
    _, ravel_rows = flat_unravel(setup)

    def predict(params, x):  # float32 [T, ...] -> outputs [T, k], in batches
        total = x.shape[0]
        b = min(total, eval_batch)
        k = -(-total // b)
        pad = jnp.concatenate([x, jnp.zeros((k * b - total, *x.shape[1:]), x.dtype)])
        outputs = jax.lax.map(
            lambda xb: apply_fn({"params": params}, xb), pad.reshape(k, b, *x.shape[1:])
        )
        return outputs.reshape(k * b, -1)[:total]

    def one_model(params, data: Data):
        outputs = predict(params, data.x_test)
        out = task.metrics(outputs, data.y_test)
        if attack.success is not None:
            predict_x = lambda x: predict(params, x)
            rate = attack.success(predict_x, data.x_test, data.y_test, in_goal=data.goal_test)
            out.update(rate if isinstance(rate, dict) else {"attack_success_rate": rate})
        for g in range(setup.n_groups if setup.n_groups > 1 else 0):
            mask = (data.test_group == g).astype(jnp.float32)
            out[f"group{g}_{main}"] = task.metrics(outputs, data.y_test, mask)[main]
        return out

    def evaluate(state: RunState, data: Data):
        if not peer:
            return one_model(state.params, data)
        per_node = jax.vmap(one_model, in_axes=(0, None))(state.params, data)
        honest = ~state.malicious
        out = {k: _honest_mean(v, honest) for k, v in per_node.items() if "group" not in k}
        for g in range(setup.n_groups if setup.n_groups > 1 else 0):
            mine = honest & (data.client_group == g)
            out[f"group{g}_{main}"] = _honest_mean(per_node[f"group{g}_{main}"], mine)
        if setup.spec.victims:  # the named victims that are honest
            hit = honest & victims_mask(setup.spec)
            for name in (main, "attack_success_rate"):
                if name in per_node:
                    out[f"victims_{name}"] = _honest_mean(per_node[name], hit)
        scores = jnp.where(honest, per_node[main], jnp.inf)
        out[f"worst_{main}"] = jnp.min(scores)
        mean = out[main]
        var = _honest_mean((per_node[main] - mean) ** 2, honest)
        out[f"spread_{main}"] = jnp.sqrt(var)
        models = ravel_rows(state.params)
        centre = jnp.sum(jnp.where(honest[:, None], models, 0.0), 0) / jnp.maximum(
            jnp.sum(honest), 1
        )
        out["consensus_distance"] = _honest_mean(jnp.sqrt(row_sq_norms(models, centre)), honest)
        return out

    return evaluate


def make_chunk(setup: Setup, n_rounds: int):
    """``chunk(state, hparams, data) -> (state, metrics)``: scan ``n_rounds`` rounds, then
    evaluate. Round metrics are averaged over the chunk (``finite``: all rounds)."""
    round_step = make_round(setup)
    evaluate = make_evaluate(setup)

    def chunk(state, hparams, data):
        body = lambda s, _: round_step(s, hparams, data)
        state, per_round = jax.lax.scan(body, state, None, length=n_rounds)
        metrics = {k: jnp.mean(v.astype(jnp.float32)) for k, v in per_round._asdict().items()}
        metrics.update(evaluate(state, data))
        # a model that evaluates to a non-finite loss has diverged even if its steps looked
        # finite (an overflow inside the forward pass)
        metrics["finite"] = jnp.all(per_round.finite) & jnp.isfinite(metrics["test_loss"])
        return state, metrics

    return chunk
