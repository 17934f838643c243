"""Where a rule accepts an update: the region a strategic adversary stays in.

Our reading of Raynal & Troncoso (arXiv 2402.13700; PAPER.md): a distance-based rule
cannot tell a strategic update from an honest one as long as it stays where the rule
accepts honest updates. Each rule is given a region, built in-graph each round from what
the adversary knows of the benign updates (the *pool*: the present honest rows when
omniscient, its own clients' benign updates when partial; ``common.pool``). The region
follows the rule's ``Geometry`` (``fedsim.aggregators.base``), declared where the rule is
registered, so a rule registered later gets its region without a change here:

- ``ball``: the L2 ball around a reference point. For a ball constraint with a
  ``radius_option``, around the geometry's reference with that radius: the previous
  aggregate with radius τ for ``centered_clipping`` (farther rows are clipped), the
  origin with radius ``max_norm`` for ``norm_bound`` (longer rows are scaled down).
  Otherwise around the honest mean, with the radius the pool spreads over (``spread`` of
  its distances to the mean: median, mean or max): ``mean``, ``geometric_median``, a
  cosine or similarity rule (when not handled by the attack itself) and any name that is
  no registered rule.
- ``box`` (a box constraint: ``median``; ``trimmed_mean`` by its ``trim_option``): per
  coordinate, the pool's order statistics at which the ``c`` crafted copies,
  tied with that pool value, move the rule's output as far as any value could while
  keeping at least ``min_share`` (0.8) of their share of the output. With ``n`` pool rows
  and ``m = n + c`` (0-based ranks of the pool's sorted values): the median, rank
  ``⌊m/2⌋`` (the copies then hold the upper middle place: the median is what it would be
  with the copies at +inf, and they share it); the trimmed mean with ``t = ⌊β m⌋`` per
  side, rank ``m - t - s`` where the tie group keeps the ``s`` places below the cut that
  ``min_share`` needs (values beyond the cut would move the mean a little more, trimmed,
  with no weight: a trade-off we state rather than hide); when the copies outnumber the
  ``t`` it trims, the excess is kept wherever it lies and the box is unbounded. The lower
  edge mirrors the upper.
  The crafted update is the point of the honest-spread ball around the median farthest
  along the goal, clipped into the box: the coordinates the goal pushes hardest sit on
  the box's faces and the others near the median (a corner of the box, every coordinate
  at an edge, would add an order statistic's worth of noise to coordinates the goal does
  not need, and measurably did worse on MNIST).
- ``search``: rules that accept by a test rather than a shape. The crafted point moves
  from a centre along a ray and the largest step still accepted is found in-graph
  (``common.largest_accepted``): a ``score`` constraint (Krum, Multi-Krum) by the Krum
  score itself (``common.krum_acceptor``; with a ``select_option``, as Multi-Krum's,
  every copy must be among the averaged rows); a ``filter`` or ``behaviour`` constraint
  (MeaMed, Bulyan, DnC, SignGuard; Zeno, LRR, ERR) by running the rule itself on the pool
  plus the crafted copies (behaviour-based rules judging with the adversary's proxy data
  in place of the judge's; randomised rules with the adversary's own key, not the rule's)
  and accepting while the crafted rows keep at least ``min_share`` (0.8) of their share
  of the round. For a rule whose reference is the median (MeaMed, Bulyan) the ray runs
  from the pool's median toward the corner of the pool's range; for the others from the
  pool's mean along the goal, except against a rule whose geometry ``counts_zeros``
  (SignGuard's sign statistics): from a typical honest update (the pool's row nearest
  its mean), only in the coordinates where that update is nonzero.

Cosine and similarity rules (FLTrust, FoolsGold) are handled by the attacks themselves
(``strategic``): FLTrust only sees directions (a cone around its root update) and
FoolsGold compares the colluders with each other rather than with a reference point.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedsim.aggregators.base import REGISTRY as RULES
from fedsim.aggregators.base import make as make_rule
from fedsim.attacks.common import (
    count,
    krum_acceptor,
    krum_options,
    largest_accepted,
    masked_mean,
    rule_geometry,
    rule_kw,
    rule_option,
    spread,
)
from fedsim.kernels import masked_median, row_sq_norms, select
from fedsim.types import AggContext, AttackContext, AttackSetup

Array = jax.Array

# constraints an attack can only test by running the rule itself
SIMULATED = frozenset({"filter", "behaviour"})


class Region(NamedTuple):
    """An acceptance region. ``kind`` (static): ``ball`` | ``box`` | ``search``.

    ball: ``center`` [d], ``radius`` scalar. box: ``lo``, ``hi`` [d] (``center`` is the
    pool's median, ``radius`` the pool's spread around it: the box is intersected with
    that ball, so the crafted update is no farther from the median than honest ones). search:
    ``center`` [d]; ``ray(direction [d]) -> v [d]`` the longest
    step considered, ``accepts(v, lams [K]) -> bool [K]`` whether ``center + lam v`` is
    accepted.
    """

    kind: str
    center: Array
    radius: Array | None = None
    lo: Array | None = None
    hi: Array | None = None
    ray: Callable | None = None
    accepts: Callable | None = None


def unit(v: Array) -> Array:
    norm = jnp.linalg.norm(v)
    return v / jnp.where(norm > 0, norm, 1.0)


def extreme(region: Region, direction: Array) -> Array:
    """The point of ``region`` farthest along ``direction`` [d]: on a ball's boundary; for
    a box, the ball's point clipped into the box (on the box's faces in the coordinates
    the goal pushes hardest)."""
    if region.kind == "ball":
        return region.center + region.radius * unit(direction)
    if region.kind == "box":
        return jnp.clip(region.center + region.radius * unit(direction), region.lo, region.hi)
    v = region.ray(direction)
    return region.center + largest_accepted(lambda lams: region.accepts(v, lams), 1.0) * v


def project(region: Region, x: Array) -> Array:
    """Nearest point of a ``ball`` or ``box`` region to ``x`` [d]."""
    if region.kind == "ball":
        diff = x - region.center
        dist = jnp.linalg.norm(diff)
        return jnp.where(dist <= region.radius, x, region.center + diff * region.radius / dist)
    if region.kind == "box":
        ball = project(region._replace(kind="ball"), x)
        return jnp.clip(ball, region.lo, region.hi)
    raise ValueError(f"a {region.kind} region has no projection")


def rule_region(
    setup: AttackSetup,
    rows: Array,
    mask: Array,
    n_crafted: Array,
    crafted: Array,
    ctx: AttackContext,
    scale: Array,
    statistic: str = "median",
    knows_rule: bool = True,
    min_share: float = 0.8,
) -> Region:
    """The region of ``setup.rule`` (module docstring), from the pool ``rows`` [n, d] where
    ``mask``, for ``n_crafted`` identical crafted rows sent from the rows where
    ``crafted`` [n] (bool). ``scale`` multiplies ball radii and search lengths (1 = the
    region itself). Without ``knows_rule`` the adversary assumes the mean."""
    geometry = rule_geometry(setup, knows_rule)
    rule = setup.rule if knows_rule else "mean"
    opts = rule_kw(setup)
    hp = ctx.rule_hparams or {}
    mean = masked_mean(rows, mask)
    if geometry.constraint == "ball" and geometry.radius_option is not None:
        radius = rule_option(rule, opts, hp, geometry.radius_option)
        center = reference_point(geometry.reference, rows, mask, ctx)
        return Region("ball", center, radius=scale * radius)
    if geometry.constraint == "box":
        lo, hi = box_edges(rule, opts, hp, rows, mask, n_crafted, min_share)
        med = masked_median(rows, mask)
        radius = spread(jnp.sqrt(row_sq_norms(rows, med)), mask, statistic)
        return Region("box", med, radius=scale * radius, lo=lo, hi=hi)
    radius = spread(jnp.sqrt(row_sq_norms(rows, mean)), mask, statistic)
    if geometry.constraint == "score":
        f, select_count = krum_options(setup)
        f = n_crafted if f is None else jnp.float32(f)
        if geometry.select_option is not None:  # every crafted copy among the rows averaged
            chosen = count(mask) + n_crafted - f if select_count is None else select_count
            select_count = jnp.maximum(chosen - n_crafted + 1, 1)

        def krum_accepts(v, lams):
            length = jnp.linalg.norm(v)
            accepts = krum_acceptor(rows, mask, n_crafted, f, select_count, mean, unit(v))
            return accepts(lams * length)

        reach = 4.0 * scale * radius
        return Region("search", mean, ray=lambda g: reach * unit(g), accepts=krum_accepts)
    if geometry.constraint in SIMULATED:
        accepts = simulated_acceptor(setup, rows, mask, crafted, ctx, min_share)
        reach = 4.0 * scale * radius
        if geometry.reference == "median":  # toward the corner of the pool's range
            lo, hi = box_edges(rule, opts, hp, rows, mask, n_crafted)
            med = masked_median(rows, mask)
            corner = lambda g: jnp.where(g > 0, hi, jnp.where(g < 0, lo, med)) - med
            ray = lambda g: scale * corner(g)
            return Region("search", med, ray=ray, accepts=_shifted(accepts, med))
        if geometry.counts_zeros:
            # SignGuard-like: an average's sign statistics are not those of any one update,
            # and making an exact zero nonzero is seen; start from a typical honest update
            # (the pool's row nearest its mean) and move only where it is nonzero
            typical = rows[jnp.argmin(jnp.where(mask, row_sq_norms(rows, mean), jnp.inf))]
            ray = lambda g: reach * unit(jnp.where(typical != 0, g, 0.0))
            return Region("search", typical, ray=ray, accepts=_shifted(accepts, typical))
        ray = lambda g: reach * unit(g)
        return Region("search", mean, ray=ray, accepts=_shifted(accepts, mean))
    return Region("ball", mean, radius=scale * radius)


def reference_point(reference: str, rows, mask, ctx: AttackContext) -> Array:
    """``[d]`` the point a geometry's ``reference`` names, as the adversary sees it: the
    previous aggregate, the origin, the pool's median, else the pool's mean."""
    if reference == "previous_aggregate":
        return ctx.previous_aggregate.astype(rows.dtype)
    mean = masked_mean(rows, mask)
    if reference == "origin":
        return jnp.zeros_like(mean)
    if reference == "median":
        return masked_median(rows, mask)
    return mean


def _shifted(accepts, center):
    """``accepts(points [K, d]) -> bool [K]`` as a ray test around ``center``."""
    return lambda v, lams: accepts(center[None, :] + lams[:, None] * v[None, :])


def box_edges(rule, opts, hp, rows, mask, n_crafted, min_share: float = 0.8):
    """(lo [d], hi [d]) for ``n_crafted`` identical values against the rule named ``rule``
    (options ``opts`` as configured, traced ones in ``hp``) if its geometry is a box: per
    coordinate, the pool's order statistics at which the crafted copies, tied with that
    pool value, move the rule's output as far as any value could while keeping at least
    ``min_share`` of their share of the output (module docstring); for any other rule,
    the pool's range (min and max)."""
    geometry = RULES.geometry(rule)
    n = count(mask).astype(jnp.int32)
    c = jnp.asarray(n_crafted).astype(jnp.int32)
    m = n + c
    if geometry.constraint == "box" and geometry.trim_option is None:  # the median
        # tied at the upper middle position the copies give the median of m values its
        # largest value (as if they were +inf) and share the median's weight there
        upper = m // 2
    elif geometry.constraint == "box":  # a trimmed mean
        t = jnp.floor(rule_option(rule, opts, hp, geometry.trim_option) * m).astype(jnp.int32)
        t = jnp.clip(t, 0, (m - 1) // 2)
        # the tie group (the pool value and the c copies) keeps `slots` of the places
        # below the upper cut: as few as still give the copies min_share of their share
        kept = m - 2 * t
        need = min_share * (c + 1).astype(jnp.float32) * kept.astype(jnp.float32) / m
        slots = jnp.clip(jnp.ceil(need - 1e-6).astype(jnp.int32), 1, c + 1)
        upper = m - t - slots
    else:
        upper = n - 1
    upper = jnp.clip(upper, (n - 1) // 2, jnp.maximum(n - 1, 0))
    ranks = jnp.stack([n - 1 - upper, upper])
    lo, hi = select(rows, mask, ranks)
    if rule == "trimmed_mean":  # more copies than it trims: the excess is kept anywhere
        lo = jnp.where(c > t, -jnp.inf, lo)
        hi = jnp.where(c > t, jnp.inf, hi)
    return lo, hi


def simulated_acceptor(setup, rows, mask, crafted, ctx: AttackContext, min_share: float):
    """``accepts(points [K, d]) -> bool [K]``: the rule itself, run on the pool rows plus
    the crafted point sent from every ``crafted`` row, gives the crafted rows at least
    ``min_share`` of their share of the present rows. Behaviour-based rules judge with the
    adversary's proxy data. One candidate at a time (``lax.map``): each run is a whole
    rule on ``[2n, d]``.

    Peer-to-peer (``ctx.self_index``: crafting for one recipient node) the rule is the
    recipient's, run as the recipient would, from its own row among the pool's (its model
    as the origin) and judging with the proxy in place of the recipient's own data. The
    neighbours' degrees are not known to the adversary: they are NaN, which the peer
    rules simulated here (UBAR, BALANCE) never read."""
    agg = make_rule(setup.rule, **rule_kw(setup))
    n, d = rows.shape
    weights = jnp.concatenate([mask, crafted]).astype(rows.dtype)
    share = count(crafted) / jnp.maximum(count(mask) + count(crafted), 1.0)
    peer = {}
    if ctx.self_index is not None:
        peer = {"self_index": ctx.self_index, "degrees": jnp.full(2 * n, jnp.nan, rows.dtype)}
    actx = AggContext(
        global_params=ctx.global_params,
        key=ctx.key,
        hparams=ctx.rule_hparams or {},
        loss_fn=ctx.loss_fn,
        judge_x=ctx.proxy_x,
        judge_y=ctx.proxy_y,
        error_fn=ctx.error_fn,
        **peer,
    )
    state = agg.init(ctx.global_params, 2 * n)

    def one(point):
        matrix = jnp.concatenate([rows, jnp.broadcast_to(point, (n, d))])
        _, _, info = agg.aggregate(matrix, weights, state, actx)
        return jnp.sum(jnp.where(crafted, info.weight[n:], 0.0)) >= min_share * share

    return lambda points: jax.lax.map(one, points)
