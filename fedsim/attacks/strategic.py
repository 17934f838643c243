"""Strategic adversaries (our reading of Raynal & Troncoso, arXiv 2402.13700; PAPER.md).

A strategic adversary is an optimiser, not a filter: of every update the rule would
accept this round, it sends the one that makes the most progress on its targeted
``goal`` (``label_flip`` | ``targeted`` | ``backdoor`` | ``subgroup`` | ``dataset_goal``, a
name or ``{name: ..., **options}``; default ``backdoor``). Each round it

1. finds the goal's own direction ``g`` (``direction``):
   - ``difference`` (default): the mean over its present clients of (goal-trained update
     minus the same client's clean-trained update): what local training on the goal adds,
     without the ordinary learning both updates share;
   - ``gradient``: ``-∇ L_goal(global)``, the loss on the goal samples of its own
     clients' data (``ctx.goal_x``: only the rows the goal changes, e.g. the source class
     relabelled, or triggered inputs); one gradient misses what several local steps
     learn (a trigger's feature), so it is the weaker choice on MNIST;
   - ``trained``: its mean goal-trained update minus the pool mean (the earlier,
     weaker choice: that update is mostly ordinary learning);
2. places the crafted update at the point of the rule's acceptance region farthest along
   ``g`` (``fedsim.attacks.regions``): on a ball's boundary, at a box's corner, or at the
   largest step the rule still accepts;
3. optionally refines it by ``steps`` (static) projected gradient steps on the goal loss
   at ``global + update`` (``step_size``, traced, relative to the region's size), each
   projected back onto a ball or box region.

Colluding rows (``collude``, default True) send one identical update; otherwise each row
is placed along its own goal-trained update (minus its benign update, or the pool mean).
The adversary keeps no state across rounds: it re-estimates the goal direction every
round, so its small accepted steps add up as long as the goal keeps pointing the same way.

Both attacks take ``knowledge`` (omniscient: the present honest rows; partial: only its
own clients' benign updates, which the engine then also computes) and ``knows_rule``
(the region of ``setup.rule``; otherwise the honest-spread ball around the mean).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedsim.attacks.base import REGISTRY
from fedsim.attacks.common import (
    MODEL_POISONING_OPTS,
    count,
    emit,
    largest_accepted,
    masked_mean,
    pool,
    present,
    rule_geometry,
)
from fedsim.attacks.data import make_goal
from fedsim.attacks.regions import (
    SIMULATED,
    Region,
    extreme,
    project,
    rule_region,
    unit,
)
from fedsim.kernels import dot, row_sq_norms
from fedsim.options import Option, anything, boolean, choice, integer, number
from fedsim.registry import ConfigError
from fedsim.types import Attack

DIRECTIONS = ("gradient", "difference", "trained")

BASE_OPTIONS = {
    **MODEL_POISONING_OPTS,
    "collude": Option(True, boolean),
    "goal": Option("backdoor", anything),
    "direction": Option("difference", choice(*DIRECTIONS)),
    "steps": Option(0, integer(0)),
    "step_size": Option(0.25, number(0.0), traced=True),
    "goal_batch": Option(256, integer(1)),
}
DISTANCE_OPTIONS = {
    **BASE_OPTIONS,
    "radius_scale": Option(1.0, number(0.0), traced=True),
    "spread": Option("median", choice("median", "mean", "max")),
}
BEHAVIOR_OPTIONS = {
    **BASE_OPTIONS,
    "tolerance": Option(None, number(allow_none=True), traced=True),
}


def goal_loss(ctx, u, goal_rows_only=True):
    """Mean loss of ``global + u`` on the goal rows of ``ctx.goal_x`` (0 without any), or
    on the whole poisoned batch (goal rows and the clean rows beside them)."""
    mask = ctx.goal_mask if goal_rows_only else None
    return ctx.loss_fn(ctx.global_params + u, ctx.goal_x, ctx.goal_y, mask)


def goal_direction(kind, updates, is_malicious, ctx, rows, mask):
    """``[d]`` the direction of goal progress (module docstring, step 1)."""
    crafted = present(ctx) & is_malicious
    if kind == "gradient":
        return -jax.grad(lambda u: goal_loss(ctx, u))(jnp.zeros_like(ctx.global_params))
    if kind == "difference":
        return masked_mean(updates - ctx.benign_updates, crafted)
    return masked_mean(updates, crafted) - masked_mean(rows, mask)


def descend(x, region: Region, ctx, steps: int, step_size):
    """``steps`` projected normalised-gradient steps from ``x`` [d] on the loss of the
    whole poisoned batch (as the attackers' local training sees it: the clean rows keep
    the goal specific, e.g. a trigger rather than "always 7")."""
    size = jnp.linalg.norm(x - region.center)
    grad = jax.grad(lambda u: goal_loss(ctx, u, goal_rows_only=False))

    def step(_, u):
        return project(region, u - step_size * size * unit(grad(u)))

    return jax.lax.fori_loop(0, steps, step, x)


def proxy_gradient(ctx):
    """``∇ L_proxy(global)``: what the judge's loss sees, by the adversary's proxy data."""
    if ctx.loss_fn is None or ctx.proxy_x is None:
        raise ConfigError(
            "this attack needs the adversary's proxy of the judge's data: set judge.size "
            "(the proxy then defaults to as many held-out samples) or proxy.size"
        )
    return jax.grad(ctx.loss_fn)(ctx.global_params, ctx.proxy_x, ctx.proxy_y)


def fltrust_point(g, rows, mask, n_crafted, ctx, n_present):
    """The crafted update against FLTrust (Cao et al. 2021), which gives each row the trust
    ``ReLU(cos(x, g0))`` and rescales it to the root update's norm: only the direction
    counts. In the plane of the proxy root direction ``e0 = -∇L_proxy`` and the goal's
    part orthogonal to it ``e1``, the angle ``θ`` maximises the crafted rows' trust share
    times their goal progress, ``c cos θ / (S + c cos θ) · (a cos θ + b sin θ)`` (``S``:
    the honest trust, estimated from the pool; ``a``, ``b``: the goal's components).
    """
    e0 = unit(-proxy_gradient(ctx))
    e1 = unit(g - dot(g, e0) * e0)
    a, b = dot(unit(g), e0), dot(unit(g), e1)
    norms = jnp.sqrt(row_sq_norms(rows))
    trust = jnp.maximum(dot(rows, e0) / jnp.where(norms > 0, norms, 1.0), 0.0)
    mean_trust = masked_mean(trust[:, None], mask)[0]
    honest = jnp.maximum(n_present - n_crafted, 0.0) * mean_trust
    theta = jnp.linspace(0.0, jnp.pi / 2, 181)
    share = n_crafted * jnp.cos(theta) / jnp.maximum(honest + n_crafted * jnp.cos(theta), 1e-12)
    best = theta[jnp.argmax(share * (a * jnp.cos(theta) + b * jnp.sin(theta)))]
    scale = jnp.linalg.norm(masked_mean(rows, mask))
    return scale * (jnp.cos(best) * e0 + jnp.sin(best) * e1)


def foolsgold_rows(g, is_malicious, ctx, rows, mask, scale):
    """Crafted rows against FoolsGold (Fung et al. 2020), which zeroes clients whose
    update histories are too alike. Each attacker sends its own benign update plus a
    shared goal step ``γ |b_i| ĝ``, with the largest ``γ`` (up to ``4 × scale``) at which
    the attackers' pairwise cosines stay at or below the largest pairwise cosine among
    the pool's rows this round. FoolsGold judges cumulative histories; matching this
    round's similarity is our stand-in for that (stated as an approximation)."""
    crafted = present(ctx) & is_malicious
    benign = ctx.benign_updates
    norms = jnp.sqrt(row_sq_norms(benign))
    step = norms[:, None] * unit(g)[None, :]
    n = rows.shape[0]
    off = ~jnp.eye(n, dtype=bool)

    def max_cos(x, sel):
        gram = dot(x, x.T)
        nrm = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 1e-30))
        cos = gram / (nrm[:, None] * nrm[None, :])
        return jnp.max(jnp.where(sel[:, None] & sel[None, :] & off, cos, -1.0))

    limit = max_cos(rows, mask)

    def accepts(gammas):
        return jax.vmap(lambda gm: max_cos(benign + gm * step, crafted) <= limit)(gammas)

    gamma = largest_accepted(accepts, 4.0 * scale)
    return jnp.where(accepts(gamma[None])[0], gamma, 0.0) * step + benign


def _make_strategic(setup, o: dict, behaviour: bool) -> Attack:
    goal = make_goal(o["goal"], setup)
    geometry = rule_geometry(setup, o["knows_rule"])
    needs_benign = (
        o["knowledge"] == "partial"
        or o["direction"] == "difference"
        or geometry.constraint == "similarity"
        or not o["collude"]
    )
    needs_goal = o["direction"] == "gradient" or o["steps"] > 0

    def craft(updates, is_malicious, ctx):
        rows, mask = pool(updates, is_malicious, ctx, o["knowledge"])
        crafted = present(ctx) & is_malicious
        c = count(crafted)
        scale = ctx.hparams.get("radius_scale", o.get("radius_scale", 1.0))
        if o["collude"]:
            g = goal_direction(o["direction"], updates, is_malicious, ctx, rows, mask)
        else:  # each row pursues its own goal-trained update
            own = ctx.benign_updates if ctx.benign_updates is not None else masked_mean(rows, mask)
            g = updates - own
        if behaviour:  # move where the judge's loss does not look (first order)
            seen = unit(proxy_gradient(ctx))
            g = g - (g @ seen)[..., None] * seen
        if geometry.constraint == "similarity":  # FoolsGold
            g = g if g.ndim == 1 else masked_mean(g, crafted)
            out = foolsgold_rows(g, is_malicious, ctx, rows, mask, scale)
            return emit(updates, is_malicious, out)
        if geometry.constraint == "cosine":  # FLTrust
            place = lambda d: fltrust_point(d, rows, mask, c, ctx, count(present(ctx)))
        else:
            if behaviour and geometry.constraint not in SIMULATED:
                region = tolerance_region(rows, mask, ctx, o["tolerance"])
            else:
                spread = o.get("spread", "median")
                region = rule_region(
                    setup, rows, mask, c, crafted, ctx, scale, spread, o["knows_rule"]
                )

            def place(d):
                x = extreme(region, d)
                if o["steps"] and region.kind in ("ball", "box"):
                    size = ctx.hparams.get("step_size", o["step_size"])
                    x = descend(x, region, ctx, o["steps"], size)
                return x

        x = place(g) if g.ndim == 1 else jax.vmap(place)(g)
        return emit(updates, is_malicious, x)

    return Attack(
        poison=goal.poison,
        craft=craft,
        needs_benign=needs_benign,
        success=goal.success,
        goal_batch=o["goal_batch"] if needs_goal else 0,
    )


def tolerance_region(rows, mask, ctx, tolerance):
    """A search region for an unknown behaviour check: from the pool mean along the goal
    while the proxy loss stays within ``tolerance`` of the mean's; with ``tolerance``
    None, within the largest rise an honest row of the pool itself causes."""
    center = masked_mean(rows, mask)

    def loss(u):
        return ctx.loss_fn(ctx.global_params + u, ctx.proxy_x, ctx.proxy_y)

    base = loss(center)
    if tolerance is None:
        rises = jax.vmap(loss)(rows) - base
        tol = jnp.max(jnp.where(mask, rises, 0.0))
    else:
        tol = ctx.hparams.get("tolerance", tolerance)
    reach = 4.0 * jnp.max(jnp.where(mask, jnp.sqrt(row_sq_norms(rows, center)), 0.0))

    def accepts(v, lams):
        return jax.vmap(lambda lam: loss(center + lam * v) <= base + tol)(lams)

    return Region("search", center, ray=lambda g: reach * unit(g), accepts=accepts)


@REGISTRY.register("strategic_distance", options=DISTANCE_OPTIONS)
def make_strategic_distance(setup, **o) -> Attack:
    """Strategic adversary against distance-based rules (module docstring).

    Region by the rule's geometry (``fedsim.attacks.regions``): ball around the honest
    mean with the honest spread (mean, geometric median, and rules it does not know),
    around the previous aggregate with radius τ (centred clipping), of radius ``max_norm``
    around 0 (norm bound); the order-statistic box (median, trimmed mean); the largest
    step still selected (Krum, Multi-Krum, MeaMed, Bulyan, DnC, SignGuard); a direction in
    the cone of a cosine rule (FLTrust, :func:`fltrust_point`); diversified rows against a
    similarity rule (FoolsGold, :func:`foolsgold_rows`).

    Options: ``goal``, ``knowledge``, ``knows_rule``, ``collude`` (false: each row
    places its own goal-trained update's direction instead of a shared one), ``direction``
    (gradient | difference | trained), ``steps``, ``step_size`` (traced, default 0.25),
    ``goal_batch`` (goal samples drawn from its clients' data each round, default 256),
    ``radius_scale`` (traced, default 1: scales every ball radius and search length; above
    1 the adversary leaves the region on purpose), ``spread`` (median | mean | max: the
    honest-spread statistic of ball radii). Success is the goal's.
    """
    return _make_strategic(setup, o, behaviour=False)


@REGISTRY.register("strategic_behavior", options=BEHAVIOR_OPTIONS)
def make_strategic_behavior(setup, **o) -> Attack:
    """Strategic adversary against behaviour-based rules (FLTrust's root set, Zeno,
    Fang's loss and error rejection), judging with its proxy of the judge's data
    (``proxy:`` in the config; by default held-out samples of the judge's size and
    classes).

    The goal direction is taken orthogonal to the proxy loss's gradient (to first order
    the judge's loss does not see it). Against FLTrust it picks the angle to the proxy
    root update maximising trust × goal progress (:func:`fltrust_point`); against Zeno,
    LRR and ERR the largest step along the goal that the rule itself, run on the proxy
    data, still accepts; against any other rule (or without ``knows_rule``) the largest
    step whose proxy loss rises by at most ``tolerance`` (traced; default null = the
    largest rise an honest row of the pool causes, i.e. what the rule lets through for
    honest clients). Options as ``strategic_distance`` plus ``tolerance``.
    """
    return _make_strategic(setup, o, behaviour=True)
