"""Rules that only make sense peer-to-peer: a node judging its neighbours from its own model.

In a peer-to-peer round (``fedsim.topology``) each node's rule is given its
neighbourhood's rows *relative to the node's model before local training*
(``ctx.global_params``): the origin is that model, row ``ctx.self_index`` is the node's
own trained model ``x_i`` (its update, exchanging updates), and a neighbour's row ``r_j``
stands for the model ``global_params + r_j``. ``ctx.degrees`` holds each row's node's
neighbour count, and the judge's data (``ctx.judge_x``) is a batch of the node's own
training samples. Every output is relative to the same origin.

Under the star topology (no ``self_index``) these rules are a ``ConfigError``; the config
refuses them earlier (``PEER_ONLY``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedsim import kernels as ops
from fedsim.aggregators.base import REGISTRY, Geometry, no_state, normalized
from fedsim.aggregators.behaviour import require_judge
from fedsim.aggregators.distance import clip_factor, distances_to
from fedsim.options import Option, at_least, holds
from fedsim.registry import ConfigError
from fedsim.types import AggContext, AggInfo, Aggregator

PEER_ONLY = frozenset({"gossip", "self_centered_clipping", "balance", "ubar"})

fraction = holds(lambda v: 0 <= v <= 1, "must be in [0, 1]")


def require_peer(name: str, ctx: AggContext | None) -> None:
    if ctx is None or ctx.self_index is None or ctx.degrees is None:
        raise ConfigError(f"{name} is a peer-to-peer rule: use a peer-to-peer topology")


def own_row(updates, ctx: AggContext):
    """``(index, onehot [n] bool, row [d])`` of the judging node's own row."""
    onehot = jnp.arange(updates.shape[0]) == ctx.self_index
    return ctx.self_index, onehot, updates[ctx.self_index]


def metropolis(weights, ctx: AggContext, usable):
    """``[n]`` Metropolis–Hastings mixing weights of the judging node ``i``: ``1 / (1 +
    max(deg_i, deg_j))`` for each ``usable`` neighbour ``j``, the rest on ``i`` itself.
    ``deg_i`` is the node's own count of present neighbours (so its weight is never
    negative); ``deg_j`` comes from ``ctx.degrees``."""
    _, mine, _ = own_row(weights[:, None], ctx)
    present = ops.present_mask(weights) & ~mine
    deg_i = jnp.sum(present).astype(jnp.float32)
    w = jnp.where(present & usable, 1.0 / (1.0 + jnp.maximum(deg_i, ctx.degrees)), 0.0)
    return jnp.where(mine, 1.0 - jnp.sum(w), w)


@REGISTRY.register("gossip", options={}, geometry=Geometry("mean", "ball"), columnwise=True)
def make_gossip() -> Aggregator:
    """Gossip averaging with Metropolis–Hastings weights (Xiao & Boyd 2004; the non-robust
    baseline of He, Karimireddy & Jaggi 2022): ``Σ_j W_ij r_j`` over the neighbourhood,
    ``W`` doubly stochastic on an undirected graph. Non-finite rows get weight 0 (their
    weight stays on the node; ``ctx.finite`` says which when the rule sees a block of
    columns). AggInfo.weight: ``W_i·``."""

    def aggregate(updates, weights, state, ctx: AggContext):
        require_peer("gossip", ctx)
        finite = ops.finite_rows(updates) if ctx.finite is None else ctx.finite
        w = metropolis(weights, ctx, finite).astype(updates.dtype)
        return ops.combine(w, updates, finite), state, AggInfo(weight=w)

    return Aggregator(init=no_state, aggregate=aggregate)


@REGISTRY.register(
    "self_centered_clipping",
    options={"tau": Option(1.0, at_least(0.0), traced=True)},
    geometry=Geometry("origin", "ball", radius_option="tau"),
    columnwise="self_distances",
)
def make_self_centered_clipping(tau: float) -> Aggregator:
    """Self-centred clipping (He, Karimireddy & Jaggi 2022, "Byzantine-robust
    decentralized learning via ClippedGossip"): ``x_i + Σ_j W_ij clip(x_j - x_i, τ)``
    around the node's own trained model ``x_i``, Metropolis–Hastings ``W``; τ traced (a
    constant here; the paper also derives an adaptive one). Non-finite rows are dropped.
    AggInfo.weight: ``W_ij · min(1, τ / |x_j - x_i|)`` for each neighbour, the rest on
    the node (the output is that convex combination). Given ``ctx.finite`` and
    ``ctx.self_distances`` (a block of columns), it uses them for the whole rows'."""

    def aggregate(updates, weights, state, ctx: AggContext):
        require_peer("self_centered_clipping", ctx)
        t = ctx.hparams.get("tau", tau)
        _, mine, x_i = own_row(updates, ctx)
        finite = ops.finite_rows(updates) if ctx.finite is None else ctx.finite
        mix = metropolis(weights, ctx, finite).astype(updates.dtype)
        far = distances_to(updates, x_i) if ctx.self_distances is None else ctx.self_distances
        shrink = clip_factor(far, t)
        w = jnp.where(finite & ~mine, mix * shrink, 0.0)
        w = jnp.where(mine, 1.0 - jnp.sum(w), w)
        return ops.combine(w, updates, finite | mine), state, AggInfo(weight=w)

    return Aggregator(init=no_state, aggregate=aggregate)


def mix_accepted(updates, accepted, mine, alpha):
    """``α x_i + (1 - α) mean(accepted)`` (``x_i`` alone when none is accepted) and the
    weights ``[n]`` of that convex combination."""
    share = normalized(accepted.astype(updates.dtype))
    some = jnp.any(accepted)
    w = jnp.where(some, (1.0 - alpha) * share, 0.0) + jnp.where(
        mine, jnp.where(some, alpha, 1.0), 0.0
    )
    return ops.combine(w, updates, accepted | mine), w


@REGISTRY.register(
    "balance",
    options={
        "gamma": Option(0.5, at_least(0.0), traced=True),
        "kappa": Option(1.0, at_least(0.0), traced=True),
        "alpha": Option(0.5, fraction, traced=True),
        "horizon": Option(0, at_least(0)),
    },
    geometry=Geometry("origin", "filter"),
)
def make_balance(gamma: float, kappa: float, alpha: float, horizon: int) -> Aggregator:
    """BALANCE (Fang, Yang, Liu, Liu & Gong 2024, "Byzantine-robust decentralized
    federated learning"): node ``i`` accepts neighbour ``j`` when ``|x_j - x_i| ≤ γ
    exp(-κ t / T) |x_i|`` (``x``: models, ``x_i`` its own trained one; ``t`` the round,
    ``T = horizon``, no decay when 0), then moves to ``α x_i + (1 - α) mean(accepted)``.
    γ, κ, α traced. State: the round count. AggInfo.weight: that convex combination's."""

    def aggregate(updates, weights, state, ctx: AggContext):
        require_peer("balance", ctx)
        g = ctx.hparams.get("gamma", gamma)
        k = ctx.hparams.get("kappa", kappa)
        a = ctx.hparams.get("alpha", alpha)
        _, mine, x_i = own_row(updates, ctx)
        decay = jnp.exp(-k * state / horizon) if horizon else 1.0
        own_norm = jnp.linalg.norm(ctx.global_params + x_i)
        dist = distances_to(updates, x_i)
        ok = ops.present_mask(weights) & ops.finite_rows(updates) & ~mine
        accepted = ok & (dist <= g * decay * own_norm)
        out, w = mix_accepted(updates, accepted, mine, a)
        return out, state + 1, AggInfo(weight=w)

    return Aggregator(init=lambda flat, n: jnp.zeros((), jnp.float32), aggregate=aggregate)


@REGISTRY.register(
    "ubar",
    options={
        "rho": Option(0.5, fraction, traced=True),
        "alpha": Option(0.5, fraction, traced=True),
    },
    geometry=Geometry("none", "behaviour"),
)
def make_ubar(rho: float, alpha: float) -> Aggregator:
    """UBAR (Guo, Wang, Zhang, Zhou, Zhou & Zhu 2021, "Towards Byzantine-resilient learning
    in decentralized systems"), two stages at node ``i``:

    1. distance: keep the ``max(1, ⌈ρ · deg_i⌉)`` neighbours nearest to ``x_i``;
    2. behaviour: of those, accept each whose model's loss on the node's own batch is at
       most its own model's; if none is, the one of lowest loss.

    Then ``α x_i + (1 - α) mean(accepted)``. ρ, α traced. AggInfo.weight: that convex
    combination's."""

    def aggregate(updates, weights, state, ctx: AggContext):
        require_judge("ubar", ctx)
        require_peer("ubar", ctx)
        r = ctx.hparams.get("rho", rho)
        a = ctx.hparams.get("alpha", alpha)
        _, mine, x_i = own_row(updates, ctx)
        ok = ops.present_mask(weights) & ops.finite_rows(updates) & ~mine
        dist = jnp.where(ok, distances_to(updates, x_i), jnp.inf)
        keep = jnp.maximum(jnp.ceil(r * jnp.sum(ok)), 1)
        near = ok & (ops.ranks(dist) < keep)
        loss = lambda u: ctx.loss_fn(ctx.global_params + u, ctx.judge_x, ctx.judge_y)
        safe = jnp.where(near[:, None], updates, 0.0)
        losses = jnp.where(near, jax.vmap(loss)(safe), jnp.inf)
        better = near & (losses <= loss(x_i))
        best = near & (jnp.arange(updates.shape[0]) == jnp.argmin(losses))
        accepted = jnp.where(jnp.any(better), better, best & jnp.any(near))
        out, w = mix_accepted(updates, accepted, mine, a)
        return out, state, AggInfo(weight=w)

    return Aggregator(init=no_state, aggregate=aggregate)
