"""The fused round (DESIGN.md, "The round, as data flows").

``prepare(spec)`` does the host work once per Spec (load data, partition it, put it on the
device, build the model). ``make_round(setup)`` returns the pure
``round_step(state, hparams, data) -> (state, RoundMetrics)``: sample m of n clients,
train them locally (vmapped), let the adversary craft, aggregate with the configured
rule, apply the server optimizer. ``make_chunk`` scans ``eval_every`` rounds and then
evaluates on the device; ``run`` calls it between progress updates on the host.

Randomness: one root key per run, split by purpose (init, malicious set, rounds); the key
of round r is ``fold_in(rounds_key, r)``, split again by purpose (sampling, training,
attack, aggregation); client c trains with ``fold_in(train_key, c)``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from fedsim import aggregators, attacks, models
from fedsim.aggregators._ops import row_sq_norms
from fedsim.client import LocalSpec, cross_entropy, make_local_train, make_optimizer, n_local_steps
from fedsim.data import load, pack, partition
from fedsim.registry import ConfigError, accepted
from fedsim.spec import HParams, Spec, thaw
from fedsim.types import AggContext, AttackContext, AttackSetup

TRACE_COUNT = {"round": 0}  # incremented each time a round is traced (tests check reuse)


class Data(NamedTuple):
    """Device-resident data, passed to the compiled program as arguments (never copied
    per client). x: uint8 ``[N, ...]``; y: int32 ``[N]``; idx: int32 ``[n_clients, P]``;
    count: int32 ``[n_clients]``; x_test: float32 ``[T, ...]``; y_test: int32 ``[T]``;
    judge_x: float32 ``[J, ...]``; judge_y: int32 ``[J]`` (J = 0 without a judge set);
    proxy_x, proxy_y: the adversary's proxy of the judge's data (the judge's own set
    unless ``proxy.size`` says otherwise)."""

    x: jax.Array
    y: jax.Array
    idx: jax.Array
    count: jax.Array
    x_test: jax.Array
    y_test: jax.Array
    judge_x: jax.Array
    judge_y: jax.Array
    proxy_x: jax.Array
    proxy_y: jax.Array


class Setup(NamedTuple):
    """What ``prepare`` builds once per Spec."""

    spec: Spec
    data: Data
    module: Any
    init_params: Callable  # key -> params pytree
    n_params: int
    n_classes: int
    input_shape: tuple
    min_count: int  # smallest client's sample count
    # How the round lays out its clients (``with_layout``); neither changes results beyond
    # float reassociation. client_chunk: train at most this many clients at once
    # (``lax.map`` over chunks; None = all in one vmap). mesh: a ``jax.sharding.Mesh`` with
    # a ``clients`` axis over which per-client arrays and the update matrix are sharded.
    client_chunk: int | None = None
    mesh: Any = None


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
    honest_accepted: jax.Array  # fraction of present honest clients the rule used (see below)
    malicious_participants: jax.Array
    update_norm: jax.Array
    finite: jax.Array  # False once the aggregate or the model is NaN/Inf (divergence)
    malicious_distance: jax.Array  # mean L2 distance of malicious updates to the aggregate
    honest_distance: jax.Array  # mean L2 distance of honest updates to the aggregate


def carve_held_out(labels: np.ndarray, spec: Spec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(judge, proxy, clients): disjoint index sets of the training set.

    The judge's data (``judge.size`` samples of ``judge.classes``) is drawn first, then the
    adversary's proxy from what is left (``proxy.source: held_out``; its size and classes
    default to the judge's, so it stands for the same distribution), then the clients share
    the rest. With ``proxy.source: judge`` the proxy *is* the judge's set (an omniscient
    adversary). Seeds derive from ``partition_seed``; with no judge and no proxy every
    sample goes to the clients, exactly as before.
    """
    remaining = np.arange(len(labels))
    judge = _draw(
        labels, remaining, spec.judge_size, spec.judge_classes, spec.partition_seed + 1, "judge"
    )
    remaining = np.setdiff1d(remaining, judge)
    if spec.proxy_source == "judge":
        proxy = judge
    else:
        size = spec.judge_size if spec.proxy_size is None else spec.proxy_size
        classes = spec.judge_classes if spec.proxy_classes is None else spec.proxy_classes
        proxy = _draw(labels, remaining, size, classes, spec.partition_seed + 2, "proxy")
        remaining = np.setdiff1d(remaining, proxy)
    return judge, proxy, remaining


def _draw(labels, pool, size: int, classes, seed: int, what: str) -> np.ndarray:
    """``size`` indices of ``pool`` whose label is in ``classes`` (all when None), seeded."""
    if size == 0:
        return np.zeros((0,), np.int64)
    if classes is not None:
        pool = pool[np.isin(labels[pool], classes)]
    if len(pool) < size:
        raise ConfigError(
            f"{what}.size {size} exceeds the {len(pool)} training samples left for it; "
            f"ask for at most {len(pool)}"
        )
    return np.sort(np.random.default_rng(seed).choice(pool, size, replace=False))


def prepare(spec: Spec) -> Setup:
    """Load and partition the data, put it on the device, build the model."""
    ds = load(spec.dataset, spec.data_source, spec.data_dir)
    judge, proxy, rest = carve_held_out(ds.y_train, spec)
    parts = partition(
        spec.partition,
        ds.y_train[rest],
        spec.n_clients,
        spec.partition_seed,
        **thaw(spec.partition_kw),
    )
    idx, count = pack([rest[p] for p in parts])
    to_f = lambda x: models.to_float(jnp.asarray(x))
    data = Data(
        x=jnp.asarray(ds.x_train),
        y=jnp.asarray(ds.y_train),
        idx=jnp.asarray(idx),
        count=jnp.asarray(count),
        x_test=to_f(ds.x_test),
        y_test=jnp.asarray(ds.y_test),
        judge_x=to_f(ds.x_train[judge]),
        judge_y=jnp.asarray(ds.y_train[judge]),
        proxy_x=to_f(ds.x_train[proxy]),
        proxy_y=jnp.asarray(ds.y_train[proxy]),
    )
    module = models.make(spec.model, ds.n_classes, **thaw(spec.model_kw))
    sample = jnp.zeros((1, *ds.x_train.shape[1:]), jnp.float32)
    init_params = lambda key: module.init(key, sample)["params"]
    shapes = jax.eval_shape(init_params, jax.random.PRNGKey(0))
    n_params = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes))
    return Setup(
        spec=spec,
        data=data,
        module=module,
        init_params=init_params,
        n_params=int(n_params),
        n_classes=ds.n_classes,
        input_shape=tuple(ds.x_train.shape[1:]),
        min_count=int(count.min()),
    )


def with_layout(setup: Setup, client_chunk: int | None = None, mesh=None) -> Setup:
    """The same Setup with a client chunk size and/or a device mesh (axis ``clients``);
    with a mesh, the data is replicated over its devices."""
    if client_chunk is not None and client_chunk < 1:
        raise ConfigError(f"client chunk must be >= 1, got {client_chunk}")
    if client_chunk is not None and client_chunk >= setup.spec.participants:
        client_chunk = None
    data = setup.data
    if mesh is not None:
        if "clients" not in mesh.axis_names:
            raise ValueError(f"mesh needs a 'clients' axis, has {mesh.axis_names}")
        data = jax.device_put(data, replicated(mesh))
    return setup._replace(client_chunk=client_chunk, mesh=mesh, data=data)


def client_mesh(n_devices: int | None = None, participants: int | None = None):
    """A 1-D ``Mesh`` named ``clients`` over the first ``n_devices`` devices (default: all).
    With ``participants`` given, uses the largest device count that divides it, so every
    device holds the same number of clients. Returns None for a single device."""
    devices = jax.devices()
    n = len(devices) if n_devices is None else n_devices
    if n > len(devices):
        raise ConfigError(f"asked for {n} devices but only {len(devices)} exist")
    if participants is not None:
        n = max(k for k in range(1, n + 1) if participants % k == 0)
    if n <= 1:
        return None
    return jax.sharding.Mesh(np.asarray(devices[:n]), ("clients",))


def replicated(mesh):
    """A sharding that keeps a full copy on every device of ``mesh``."""
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def _flat_unravel(setup: Setup):
    """``unravel`` that works on traced arrays (ravel_pytree's closes over shapes only)."""
    template = jax.eval_shape(setup.init_params, jax.random.PRNGKey(0))
    leaves, treedef = jax.tree_util.tree_flatten(template)
    sizes = [math.prod(x.shape) for x in leaves]
    offsets = np.cumsum([0] + sizes)

    def unravel(flat):
        parts = [
            flat[..., offsets[i] : offsets[i + 1]].reshape(*flat.shape[:-1], *leaf.shape)
            for i, leaf in enumerate(leaves)
        ]
        return jax.tree_util.tree_unflatten(treedef, parts)

    def ravel_rows(tree):  # client-stacked pytree -> [m, d]
        leaves_m = jax.tree_util.tree_leaves(tree)
        return jnp.concatenate([x.reshape(x.shape[0], -1) for x in leaves_m], axis=1)

    return unravel, ravel_rows


def components(setup: Setup):
    """The aggregator and attack of a Setup's Spec."""
    spec = setup.spec
    agg = aggregators.make(spec.aggregator, **thaw(spec.aggregator_kw))
    attack_setup = AttackSetup(
        rule=spec.aggregator,
        rule_kw=tuple(sorted(thaw(spec.aggregator_kw).items())),
        n_classes=setup.n_classes,
        input_shape=setup.input_shape,
    )
    fixed = accepted(attacks.REGISTRY.get(spec.attack), setup=attack_setup)
    attack = attacks.make(spec.attack, **fixed, **thaw(spec.attack_kw))
    return agg, attack


def make_init(setup: Setup):
    """``init(key, hparams) -> RunState`` for one run."""
    spec = setup.spec
    agg, _ = components(setup)
    server_opt = lambda hp: make_optimizer(spec.server_optimizer, hp.server_lr, hp.server_momentum)

    def init(key, hparams: HParams) -> RunState:
        k_init, k_mal, k_rounds = jax.random.split(key, 3)
        params = setup.init_params(k_init)
        n_mal = jnp.round(hparams.attack_fraction * spec.n_clients).astype(jnp.int32)
        order = jax.random.permutation(k_mal, spec.n_clients)
        malicious = (
            jnp.zeros(spec.n_clients, bool).at[order].set(jnp.arange(spec.n_clients) < n_mal)
        )
        flat, _ = ravel_pytree(params)
        return RunState(
            params=params,
            server_opt_state=server_opt(hparams).init(params),
            agg_state=agg.init(flat, spec.n_clients),
            malicious=malicious,
            rounds_key=k_rounds,
            round=jnp.zeros((), jnp.int32),
            previous_aggregate=jnp.zeros_like(flat),
        )

    return init


def make_round(setup: Setup):
    """``round_step(state, hparams, data) -> (state, RoundMetrics)``: one whole round."""
    spec = setup.spec
    agg, attack = components(setup)
    local = LocalSpec(
        spec.batch_size,
        spec.local_epochs,
        spec.local_steps,
        spec.client_optimizer,
        min_count=setup.min_count,
    )
    unravel, ravel_rows = _flat_unravel(setup)
    apply_fn = setup.module.apply
    train_poisoned = make_local_train(apply_fn, local, poison=attack.poison)
    train_clean = make_local_train(apply_fn, local)

    def shard_clients(tree):
        """Lay the leading (client) axis of every leaf over the mesh's ``clients`` axis."""
        if setup.mesh is None:
            return tree
        P = jax.sharding.PartitionSpec
        spec_of = lambda x: jax.sharding.NamedSharding(
            setup.mesh, P("clients", *[None] * (x.ndim - 1))
        )
        return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, spec_of(x)), tree)

    def flat_loss(flat, x, y, mask=None):
        logits = apply_fn({"params": unravel(flat)}, x)
        mask = jnp.ones(y.shape[0], jnp.float32) if mask is None else mask.astype(jnp.float32)
        return cross_entropy(logits, y, mask)

    def flat_error(flat, x, y):
        logits = apply_fn({"params": unravel(flat)}, x)
        return jnp.mean(jnp.argmax(logits, -1) != y)

    def round_step(state: RunState, hparams: HParams, data: Data):
        TRACE_COUNT["round"] += 1
        key = jax.random.fold_in(state.rounds_key, state.round)
        k_sample, k_train, k_attack, k_agg = jax.random.split(key, 4)
        m, n = spec.participants, spec.n_clients
        clients = jnp.arange(n) if m == n else jax.random.choice(k_sample, n, (m,), replace=False)
        count = data.count[clients]
        weights = count.astype(jnp.float32)
        is_mal = state.malicious[clients]
        n_steps = jnp.max(n_local_steps(local, count))
        client_keys = jax.vmap(lambda c: jax.random.fold_in(k_train, c))(clients)
        hp = {
            "lr": hparams.client_lr,
            "momentum": hparams.client_momentum,
            "attack": hparams.attack,
        }
        per_client = shard_clients((data.idx[clients], count, client_keys, is_mal))

        def train_all(train_fn):  # -> [m, d] updates, rows in the order of ``clients``
            def one(row):
                idx_row, cnt, k, mal = row
                return train_fn(state.params, data.x, data.y, idx_row, cnt, n_steps, k, hp, mal)

            if setup.client_chunk is None:
                trained = jax.vmap(one)(per_client)
            else:  # bounds the training working set to client_chunk clients at a time
                trained = jax.lax.map(one, per_client, batch_size=setup.client_chunk)
            return shard_clients(ravel_rows(trained))

        updates = train_all(train_poisoned)
        global_flat, _ = ravel_pytree(state.params)
        has_judge = data.judge_x.shape[0] > 0
        has_proxy = data.proxy_x.shape[0] > 0
        if attack.craft is not None:
            benign = None
            if attack.needs_benign:
                benign = train_all(train_clean)
            goal = {}
            if attack.goal_batch:
                k_attack, k_goal = jax.random.split(k_attack)
                goal = goal_samples(k_goal, data, clients, count, is_mal, attack, hparams.attack)
            actx = AttackContext(
                global_params=global_flat,
                key=k_attack,
                hparams=hparams.attack,
                weights=weights,
                benign_updates=benign,
                previous_aggregate=state.previous_aggregate,
                loss_fn=flat_loss,
                proxy_x=data.proxy_x if has_proxy else None,
                proxy_y=data.proxy_y if has_proxy else None,
                error_fn=flat_error,
                rule_hparams=hparams.agg,
                **goal,
            )
            updates = attack.craft(updates, is_mal, actx)
        ctx = AggContext(
            global_params=global_flat,
            key=k_agg,
            hparams=hparams.agg,
            client_ids=clients,
            loss_fn=flat_loss,
            judge_x=data.judge_x if has_judge else None,
            judge_y=data.judge_y if has_judge else None,
            error_fn=flat_error,
        )
        delta, agg_state, info = agg.aggregate(updates, weights, state.agg_state, ctx)
        server_opt = make_optimizer(
            spec.server_optimizer, hparams.server_lr, hparams.server_momentum
        )
        grad = jax.tree.map(jnp.negative, unravel(delta))
        step, opt_state = server_opt.update(grad, state.server_opt_state, state.params)
        params = jax.tree.map(jnp.add, state.params, step)
        params_finite = jnp.all(
            jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(params)])
        )
        metrics = RoundMetrics(
            malicious_weight=jnp.sum(jnp.where(is_mal, info.weight, 0.0)),
            honest_weight=jnp.sum(jnp.where(is_mal, 0.0, info.weight)),
            malicious_participants=jnp.sum(is_mal),
            update_norm=jnp.linalg.norm(delta),
            finite=jnp.all(jnp.isfinite(delta)) & params_finite,
            honest_accepted=honest_accepted(info.weight, weights > 0, is_mal),
            **_distances_to(delta, updates, weights > 0, is_mal),
        )
        new_state = RunState(
            params,
            opt_state,
            agg_state,
            state.malicious,
            state.rounds_key,
            state.round + 1,
            delta.astype(state.previous_aggregate.dtype),
        )
        return new_state, metrics

    return round_step


def goal_samples(key, data: Data, clients, count, is_mal, attack, attack_hp) -> dict:
    """``attack.goal_batch`` samples of the present malicious clients' own data, passed
    through the goal's poison as their local training is (the goal's own
    ``poison_fraction``): ``{"goal_x", "goal_y", "goal_mask"}``, the mask marking the rows
    the poison changed. A client is drawn in proportion to its sample count, then one of
    its samples uniformly; with no malicious client present the rows are unused."""
    k_client, k_pos, k_poison = jax.random.split(key, 3)
    size = attack.goal_batch
    share = jnp.where(is_mal, count, 0).astype(jnp.float32)
    share = jnp.where(jnp.sum(share) > 0, share, 1.0)
    who = jax.random.categorical(k_client, jnp.log(share), shape=(size,))
    pos = jnp.floor(jax.random.uniform(k_pos, (size,)) * count[who]).astype(jnp.int32)
    rows = data.idx[clients[who], jnp.minimum(pos, count[who] - 1)]
    x, y = models.to_float(data.x[rows]), data.y[rows]
    px, py = attack.poison(x, y, k_poison, attack_hp)
    changed = (py != y) | jnp.any((px != x).reshape(size, -1), axis=1)
    return {"goal_x": px, "goal_y": py, "goal_mask": changed}


def honest_accepted(weight, present, is_mal):
    """Fraction of the present honest clients given at least half of a uniform share
    (``1 / (2 m)``, m = present clients): how many honest updates the rule still uses.
    Every convex rule's weights sum to 1, so the honest *share* cannot show a tightened
    rule rejecting honest clients when no one attacks; this count can (1 for the mean)."""
    honest = present & ~is_mal
    m = jnp.maximum(jnp.sum(present), 1)
    used = honest & (weight >= 0.5 / m)
    return jnp.sum(used) / jnp.maximum(jnp.sum(honest), 1)


def _distances_to(reference, updates, present, is_mal) -> dict:
    """Mean L2 distance of the present malicious and honest rows to ``reference`` [d].

    The reference is the rule's output: how far from what the rule accepted each group
    sent (0 when a group has no present member)."""
    dist = jnp.sqrt(row_sq_norms(updates, reference))
    mean_over = lambda sel: jnp.sum(jnp.where(sel, dist, 0.0)) / jnp.maximum(jnp.sum(sel), 1)
    return {
        "malicious_distance": mean_over(present & is_mal),
        "honest_distance": mean_over(present & ~is_mal),
    }


def make_evaluate(setup: Setup, eval_batch: int = 1000):
    """``evaluate(params, data) -> dict`` of test accuracy, loss and attack success."""
    _, attack = components(setup)
    apply_fn = setup.module.apply

    def predict(params, x):  # float32 [T, ...] -> logits [T, C], in batches
        total = x.shape[0]
        b = min(total, eval_batch)
        k = -(-total // b)
        pad = jnp.concatenate([x, jnp.zeros((k * b - total, *x.shape[1:]), x.dtype)])
        logits = jax.lax.map(
            lambda xb: apply_fn({"params": params}, xb), pad.reshape(k, b, *x.shape[1:])
        )
        return logits.reshape(k * b, -1)[:total]

    def evaluate(params, data: Data):
        logits = predict(params, data.x_test)
        ones = jnp.ones(data.y_test.shape[0], jnp.float32)
        out = {
            "test_accuracy": jnp.mean(jnp.argmax(logits, -1) == data.y_test),
            "test_loss": cross_entropy(logits, data.y_test, ones),
        }
        if attack.success is not None:
            out["attack_success_rate"] = attack.success(
                lambda x: predict(params, x), data.x_test, data.y_test
            )
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
        metrics.update(evaluate(state.params, data))
        # a model that evaluates to a non-finite loss has diverged even if its steps looked
        # finite (an overflow inside the forward pass)
        metrics["finite"] = jnp.all(per_round.finite) & jnp.isfinite(metrics["test_loss"])
        return state, metrics

    return chunk


def to_host(metrics: dict) -> dict:
    """Device scalars -> JSON-friendly Python numbers (non-finite -> None)."""
    out = {}
    for k, v in metrics.items():
        x = np.asarray(v).item()
        out[k] = x if isinstance(x, bool) or math.isfinite(x) else None
    return out


_PROGRAMS: dict = {}  # (spec, layout, rounds per chunk, over runs) -> jitted program
_MAX_PROGRAMS = 8


def program(setup: Setup, n_rounds: int, over_runs: bool = False):
    """The jitted init (``n_rounds=0``) or chunk of ``n_rounds`` rounds, vmapped over runs
    when ``over_runs`` (sweeps). Cached per Spec and layout: a second run of the same Spec
    in a process does not compile again (the data is an argument, not a constant)."""
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


def run(setup: Setup, hparams: HParams, seed: int, on_eval: Callable | None = None) -> list[dict]:
    """Run one simulation; ``on_eval(record)`` is called on the host after each chunk with
    ``{"round", "seconds", **metrics}``. Returns the list of records."""
    spec = setup.spec
    state = program(setup, 0)(jax.random.PRNGKey(seed), hparams)
    if setup.mesh is not None:
        state = jax.device_put(state, replicated(setup.mesh))
    history, done, start = [], 0, time.perf_counter()
    while done < spec.rounds:
        n = min(spec.eval_every, spec.rounds - done)
        state, metrics = program(setup, n)(state, hparams, setup.data)
        done += n
        record = {"round": done, **to_host(metrics), "seconds": time.perf_counter() - start}
        history.append(record)
        if on_eval is not None:
            on_eval(record)
    return history
