"""Set-up, once per Spec (DESIGN.md, "setup.py"): the data on the device, the model, the
task and the components.

``prepare(spec)`` loads the dataset, carves the judge's and the proxy's samples out of
the training set, partitions the rest over the clients, puts everything on the device
once (clients are index arrays into it) and builds the model for the dataset's task.
``components(setup)`` builds the rule and the attack.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedsim import aggregators, attacks, models
from fedsim import task as tasks
from fedsim import topology as topologies
from fedsim.data import load, pack, partition
from fedsim.data.tabular import input_units
from fedsim.registry import ConfigError, accepted
from fedsim.spec import Spec, thaw
from fedsim.task import Task
from fedsim.types import AttackSetup


class Data(NamedTuple):
    """Device-resident data, passed to the compiled program as arguments (never copied
    per client). x: ``[N, ...]`` uint8 images or float32 features (``Setup.x_scale``
    turns them into model inputs); y: ``[N]`` labels of the task's dtype; idx: int32
    ``[n_clients, P]``; count: int32 ``[n_clients]``; x_test: float32 ``[T, ...]`` (scaled);
    y_test ``[T]``; judge_x, judge_y: the judge's data (J = 0 rows without one);
    proxy_x, proxy_y: the adversary's proxy of it (``carve_held_out``); client_group
    ``[n_clients]`` and test_group ``[T]``: int32 group ids (hospital, car) of each client
    and test sample, all 0 when the dataset has no groups. goal ``[N]`` and goal_test
    ``[T]``: bool, the dataset's own attack-goal subgroup (``TabularData.goal_*``: heart's
    diseased patients with blood pressure >= 140, driving's right-curve samples), all
    False when the dataset defines none; read by the ``dataset_goal`` attack."""

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
    client_group: jax.Array
    test_group: jax.Array
    goal: jax.Array
    goal_test: jax.Array


class Setup(NamedTuple):
    """What ``prepare`` builds once per Spec."""

    spec: Spec
    data: Data
    module: Any
    init_params: Callable  # key -> params pytree
    n_params: int
    n_classes: int  # 0 for regression
    input_shape: tuple
    min_count: int  # smallest client's sample count
    task: Task
    x_scale: float  # model input = x.astype(float32) * x_scale
    meta: dict | None = None  # the dataset's extras (e.g. what a closed-loop check needs)
    n_groups: int = 1  # groups of the dataset (hospitals, cars); 1 when it has none
    # How the round lays out its clients (``layout.with_layout``); neither changes results
    # beyond float reassociation. client_chunk: train at most this many clients at once
    # (``lax.map`` over chunks; None = all in one vmap). mesh: a ``jax.sharding.Mesh`` with
    # a ``clients`` axis over which per-client arrays and the update matrix are sharded.
    client_chunk: int | None = None
    mesh: Any = None


def carve_held_out(labels: np.ndarray, spec: Spec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(judge, proxy, clients): disjoint index sets of the training set.

    The judge's data (``judge.size`` samples of ``judge.classes``) is drawn first, then the
    adversary's proxy from what is left (``proxy.source: held_out``; its size and classes
    default to the judge's, so it stands for the same distribution), then the clients share
    the rest. With ``proxy.source: judge`` the proxy *is* the judge's set (an omniscient
    adversary). Seeds derive from ``partition_seed``; with no judge and no proxy every
    sample goes to the clients, exactly as before. Peer-to-peer, every node judges with
    its own data (``judge.size`` of its samples a round), so no judge's set is carved.
    """
    remaining = np.arange(len(labels))
    held = 0 if is_peer_to_peer(spec) else spec.judge_size
    judge = _draw(labels, remaining, held, spec.judge_classes, spec.partition_seed + 1, "judge")
    remaining = np.setdiff1d(remaining, judge)
    if spec.proxy_source == "judge":
        proxy = judge
    else:
        size = held if spec.proxy_size is None else spec.proxy_size
        classes = spec.judge_classes if spec.proxy_classes is None else spec.proxy_classes
        proxy = _draw(labels, remaining, size, classes, spec.partition_seed + 2, "proxy")
        remaining = np.setdiff1d(remaining, proxy)
    return judge, proxy, remaining


def topology_of(spec: Spec) -> topologies.Topology:
    """The Spec's ``Topology``, over its ``n_clients`` nodes."""
    return topologies.make(spec.topology, n_nodes=spec.n_clients, **thaw(spec.topology_kw))


def is_peer_to_peer(spec: Spec) -> bool:
    """Whether the Spec's topology gives every node its own model."""
    return topology_of(spec).n_models == topologies.PER_CLIENT


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
    groups = None if ds.groups_train is None else ds.groups_train[rest]
    parts = partition(
        spec.partition,
        ds.y_train[rest],
        spec.n_clients,
        spec.partition_seed,
        groups=groups,
        **thaw(spec.partition_kw),
    )
    idx, count = pack([rest[p] for p in parts])
    client_group, test_group, n_groups = _groups_of(ds, parts, groups)
    to_f = lambda x: jnp.asarray(x).astype(jnp.float32) * ds.x_scale
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
        client_group=jnp.asarray(client_group),
        test_group=jnp.asarray(test_group),
        goal=jnp.asarray(_goal_mask(ds, "goal_train", len(ds.y_train))),
        goal_test=jnp.asarray(_goal_mask(ds, "goal_test", len(ds.y_test))),
    )
    task = tasks.make(ds.n_classes)
    module = models.make(spec.model, task.n_outputs, **thaw(spec.model_kw))
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
        task=task,
        x_scale=float(ds.x_scale),
        meta=ds.meta,
        n_groups=n_groups,
    )


def _goal_mask(ds, field: str, n: int) -> np.ndarray:
    """bool ``[n]``: the tabular dataset's goal subgroup (``field`` of its ``TabularData``),
    all False for a dataset without one."""
    tabular = (ds.meta or {}).get("tabular")
    mask = None if tabular is None else getattr(tabular, field)
    return np.zeros(n, bool) if mask is None else np.asarray(mask, bool)


def goal_target_of(meta: dict | None) -> float | None:
    """The dataset's goal target (``TabularData.goal_target``) when it defines a goal
    subgroup, else None."""
    tabular = (meta or {}).get("tabular")
    if tabular is None or not (tabular.goal_train.any() or tabular.goal_test.any()):
        return None
    return float(tabular.goal_target)


def _groups_of(ds, parts, groups):
    """(client_group [n_clients], test_group [T], n_groups): each client's group (that of
    most of its samples) and each test sample's; all 0 without groups."""
    if groups is None or ds.groups_test is None:
        return np.zeros(len(parts), np.int32), np.zeros(len(ds.y_test), np.int32), 1
    n_groups = int(max(groups.max(), ds.groups_test.max())) + 1
    client_group = np.array([np.bincount(groups[p]).argmax() for p in parts], np.int32)
    return client_group, np.asarray(ds.groups_test, np.int32), n_groups


def flat_unravel(setup: Setup):
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
    tabular = (setup.meta or {}).get("tabular")
    attack_setup = AttackSetup(
        rule=spec.aggregator,
        rule_kw=tuple(sorted(thaw(spec.aggregator_kw).items())),
        n_classes=setup.n_classes,
        input_shape=setup.input_shape,
        features=() if tabular is None else input_units(tabular),
        goal_target=goal_target_of(setup.meta),
    )
    fixed = accepted(attacks.REGISTRY.get(spec.attack), setup=attack_setup)
    attack = attacks.make(spec.attack, **fixed, **thaw(spec.attack_kw))
    return agg, attack
