"""The aggregators' registries and what the rule modules share: ``make``, ``reduce``, the
composition of pre-aggregation stages with a rule, each rule's ``Geometry``, and the
FedAvg mean every other rule is measured against.

A rule is registered with its options (``fedsim.options.Option`` records) and its
geometry, the shape of where it accepts an update, which the attacks read instead of
matching rule names::

    @REGISTRY.register(
        "krum",
        options={"f": Option(0, at_least(0))},
        geometry=Geometry(reference="mean", constraint="score", f_option="f"),
    )
    def make_krum(f: int) -> Aggregator: ...

The rule modules (``distance``, ``behaviour``, ``pre``) import from here, never from the
package's ``__init__``, which only re-exports and imports them so that they register.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fedsim import kernels as ops
from fedsim.options import Components
from fedsim.registry import ConfigError
from fedsim.types import AggContext, AggInfo, Aggregator

REFERENCES = ("mean", "median", "previous_aggregate", "origin", "root_update", "none")
CONSTRAINTS = ("ball", "box", "score", "filter", "behaviour", "cosine", "similarity")


class Geometry(NamedTuple):
    """Where a rule accepts an update, as the attacks model it (``fedsim.attacks.regions``).

    reference: the point the rule measures updates against: ``mean`` (of the honest rows),
        ``median`` (their coordinate-wise median), ``previous_aggregate`` (last round's
        aggregate), ``origin`` (0), ``root_update`` (the server's own update on its data),
        or ``none`` (rows are compared with each other, or judged by their effect).
    constraint: what it checks. ``ball``: an L2 ball around the reference, of radius
        ``radius_option`` (without one, the spread of the honest rows). ``box``: per
        coordinate, order statistics of the honest values: the median, or a trimmed mean
        trimming ``trim_option`` per side. ``score``: selects the rows of lowest Krum score
        (sum of squared distances to the ``m - f - 2`` nearest others), averaging
        ``select_option`` of them (one without). ``filter``: removes rows by a test on the
        updates with no closed form here (spectral, sign clustering, iterated selection):
        an attack can only run the rule itself. ``behaviour``: judges each update by its
        effect on a loss on the server's data (an attack runs the rule on its proxy data).
        ``cosine``: weighs rows by their cosine with the reference. ``similarity``:
        down-weighs rows that look like each other.
    f_option: the option holding ``f``, the Byzantine rows it tolerates (None: none).
    radius_option: the option holding a ``ball``'s radius.
    trim_option: the option holding a ``box``'s trimmed fraction per side (None: median).
    select_option: the option holding how many rows a ``score`` rule averages (None: 1;
        the option's value None: all but ``f`` of the present rows).
    counts_zeros: the rule's test counts exact zero coordinates (SignGuard's sign
        statistics), so an update that makes a zero coordinate nonzero looks different.
    """

    reference: str = "mean"
    constraint: str = "ball"
    f_option: str | None = None
    radius_option: str | None = None
    trim_option: str | None = None
    select_option: str | None = None
    counts_zeros: bool = False


# A name no rule is registered under: the attacks assume the mean.
MEAN_GEOMETRY = Geometry("mean", "ball")


class Rules(Components):
    """Rules: components with option records and a ``Geometry`` each."""

    def register(self, name: str, *, options, geometry: Geometry, **meta):
        if not isinstance(geometry, Geometry):
            raise TypeError(f"aggregator {name!r}: geometry must be a Geometry")
        if geometry.reference not in REFERENCES or geometry.constraint not in CONSTRAINTS:
            raise ValueError(f"aggregator {name!r}: unknown reference or constraint {geometry}")
        named = [geometry.f_option, geometry.radius_option, geometry.trim_option]
        missing = [k for k in [*named, geometry.select_option] if k and k not in options]
        if missing:
            raise ValueError(f"aggregator {name!r}: geometry names unknown option(s) {missing}")
        return super().register(name, options=options, geometry=geometry, **meta)

    def geometry(self, name: str) -> Geometry:
        """The geometry of rule ``name``; the mean's for a name no rule is registered under
        (an attack told of an unknown rule assumes the mean)."""
        return self.meta(name)["geometry"] if name in self else MEAN_GEOMETRY

    def columnwise(self, name: str) -> bool:
        """Whether rule ``name`` (registered with ``columnwise=True``) is stateless,
        deterministic and computes each output column from the same column of its rows
        alone, given which rows are finite (``AggContext.finite``) and, registered with
        ``columnwise="self_distances"``, each row's distance to the node's own row
        (``AggContext.self_distances``): its output on a block of columns is that block
        of its output, and its ``AggInfo.weight`` the block's share of it. Peer-to-peer
        rounds then run it one column block at a time (``fedsim.round.by_column_blocks``)
        instead of gathering every neighbourhood."""
        return bool(name in self and self.meta(name).get("columnwise", False))

    def column_entries(self, name: str) -> int | None:
        """Gathered entries per block rule ``name`` asks for when run by column blocks
        (registered as ``column_entries=``), or None for the round's default
        (``fedsim.round.column_layout``)."""
        return self.meta(name).get("column_entries") if name in self else None

    def matrix_free(self, name: str) -> bool:
        """Whether rule ``name`` (registered with ``matrix_free=True``) reads its ``[m, d]``
        rows once as a weighted sum and holds no other ``[m, d]`` or ``m x m`` matrix, so
        the memory planner (``fedsim.memory``) counts no working set for it."""
        return bool(name in self and self.meta(name).get("matrix_free", False))

    def needs_self_distances(self, name: str) -> bool:
        """Whether columnwise rule ``name`` reads ``AggContext.self_distances``."""
        return name in self and self.meta(name).get("columnwise") == "self_distances"


REGISTRY = Rules("aggregator")
PRE = Components("pre-aggregation stage")


class PreAggregator(NamedTuple):
    """A pre-aggregation stage (see ``fedsim.aggregators.pre``)."""

    init: Callable[[jax.Array, int], Any]
    apply: Callable


def no_state(flat_params, n_clients):
    """``init`` of a stateless rule or stage."""
    return ()


def normalized(weights: jax.Array) -> jax.Array:
    """``weights / sum(weights)``, 0 everywhere when all weights are 0."""
    total = jnp.sum(weights)
    return jnp.where(total > 0, weights / jnp.where(total > 0, total, 1.0), 0.0)


def make(name: str, pre=None, **kw) -> Aggregator:
    """Build the aggregator registered as ``name`` with options ``kw``.

    ``pre``: optional list of pre-aggregation stages run before the rule, each a stage
    name or a mapping ``{"name": ..., **options}`` (see ``fedsim.aggregators.pre``).
    """
    if not pre:
        return REGISTRY.make(name, **kw)
    REGISTRY.get(name)
    stages, used = [], set()
    for entry in pre:
        if isinstance(entry, str):
            stage = entry
            PRE.get(stage)
            opts = {k: v for k, v in kw.items() if PRE.accepts(stage, k)}
        elif isinstance(entry, dict) and "name" in entry:
            stage = entry["name"]
            PRE.get(stage)
            opts = {k: v for k, v in entry.items() if k != "name"}
        else:
            raise ConfigError(f"pre entries are stage names or {{name: ..., ...}}, got {entry!r}")
        used.update(opts)
        stages.append(_call(PRE, stage, opts))
    rule_kw = {k: v for k, v in kw.items() if REGISTRY.accepts(name, k)}
    unused = set(kw) - set(rule_kw) - used
    if unused:
        raise ConfigError(f"aggregator {name!r}: unknown option(s) {', '.join(sorted(unused))}")
    return _compose(stages, _call(REGISTRY, name, rule_kw))


def _call(registry, name, opts):
    try:
        return registry.make(name, **opts)
    except TypeError as err:
        raise ConfigError(f"{name}: {err}") from None


def _compose(stages, rule: Aggregator) -> Aggregator:
    """Run ``stages`` (``PreAggregator``s) in order, then ``rule``.

    State: ``{"pre": (stage states...), "rule": rule state}``. AggInfo.weight is the rule's
    weight carried back through each stage's mixing matrix.
    """

    def init(flat_params, n_clients):
        return {
            "pre": tuple(s.init(flat_params, n_clients) for s in stages),
            "rule": rule.init(flat_params, n_clients),
        }

    def aggregate(updates, weights, state, ctx: AggContext):
        keys = jax.random.split(ctx.key, len(stages) + 1)
        rows, w, mixes, pre_states = updates, weights, [], []
        for stage, st, key in zip(stages, state["pre"], keys[1:], strict=True):
            rows, w, st, mix = stage.apply(rows, w, st, ctx._replace(key=key))
            mixes.append(mix)
            pre_states.append(st)
        out, rule_state, info = rule.aggregate(rows, w, state["rule"], ctx._replace(key=keys[0]))
        weight = info.weight
        for mix in reversed(mixes):
            weight = ops.dot(weight, mix)
        return out, {"pre": tuple(pre_states), "rule": rule_state}, AggInfo(weight=weight)

    return Aggregator(init=init, aggregate=aggregate)


def reduce(name: str, updates, weights=None, *, ctx: AggContext | None = None, **kw):
    """Apply rule ``name`` once to ``updates`` (``[n, d]`` array or client-stacked pytree).

    Returns the aggregate in the same structure as one row of ``updates``.
    """
    leaves, treedef = jax.tree_util.tree_flatten(updates)
    n = leaves[0].shape[0]
    flat = jnp.concatenate([jnp.reshape(x, (n, -1)) for x in leaves], axis=1)
    if weights is None:
        weights = jnp.ones((n,), flat.dtype)
    agg = make(name, **kw)
    if ctx is None:
        ctx = AggContext(
            global_params=jnp.zeros(flat.shape[1], flat.dtype),
            key=jax.random.PRNGKey(0),
            hparams={},
        )
    out, _, _ = agg.aggregate(flat, jnp.asarray(weights), agg.init(ctx.global_params, n), ctx)
    sizes = [x[0].size for x in leaves]
    parts = jnp.split(out, list(jnp.cumsum(jnp.array(sizes))[:-1]))
    return jax.tree_util.tree_unflatten(
        treedef, [p.reshape(x.shape[1:]) for p, x in zip(parts, leaves, strict=True)]
    )


@REGISTRY.register("mean", options={}, geometry=MEAN_GEOMETRY, columnwise=True, matrix_free=True)
def make_mean() -> Aggregator:
    """Weighted mean (FedAvg, McMahan et al. 2017): ``sum_i w_i u_i / sum_i w_i``.

    Not robust: one non-finite or huge row poisons it (the run then reports divergence);
    absent rows (weight 0) are ignored even if non-finite. AggInfo.weight = normalised
    weights.
    """

    def aggregate(updates, weights, state, ctx: AggContext):
        share = normalized(weights.astype(updates.dtype))
        return ops.combine(share, updates, weights > 0), state, AggInfo(weight=share)

    return Aggregator(init=no_state, aggregate=aggregate)
