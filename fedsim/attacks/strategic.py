"""Strategic adversaries (our reading of Raynal & Troncoso, arXiv 2402.13700; PAPER.md).

A strategic adversary pursues a targeted ``goal`` (``label_flip`` | ``targeted`` |
``backdoor``, a name or ``{name: ..., **options}``; default ``backdoor``): malicious
clients train on the goal's poisoned data, so the malicious rows reaching ``craft`` are
adversarial updates, and ``craft`` moves them into what the rule accepts.

Both attacks take ``knowledge`` (omniscient: statistics of the present honest rows;
partial: of the attackers' own benign updates, which the engine then computes since
``needs_benign`` is set), ``knows_rule`` (use ``setup.rule`` to pick the reference and the
geometry; otherwise assume the mean) and ``collude`` (default True: every malicious row
sends one update built from the mean of their adversarial updates; False: each row
transforms its own).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedsim.aggregators._ops import row_sq_norms
from fedsim.attacks import REGISTRY
from fedsim.attacks.common import (
    COSINE_RULES,
    KRUM_RULES,
    MEDIAN_RULES,
    MODEL_POISONING_OPTS,
    PREVIOUS_AGGREGATE_RULES,
    Opt,
    anything,
    boolean,
    choice,
    count,
    dot,
    emit,
    integer,
    krum_acceptor,
    krum_options,
    largest_accepted,
    masked_mean,
    masked_median,
    number,
    parse,
    pool,
    present,
    project_cosine,
    project_l2,
    spread,
)
from fedsim.attacks.data import make_goal
from fedsim.registry import ConfigError
from fedsim.types import Attack

REFERENCES = ("auto", "mean", "median", "previous", "root")


def _base_opts(collude=True):
    return {
        **MODEL_POISONING_OPTS,
        "collude": Opt(collude, boolean),
        "goal": Opt("backdoor", anything),
    }


def pick_geometry(rule: str, knows_rule: bool, reference: str, constraint: str):
    """(reference, constraint) for ``rule``: the point the rule measures from and l2|cosine.

    ``median`` for coordinate-wise rules (median, trimmed_mean, bulyan, meamed, phocas),
    ``previous`` aggregate for centered_clipping, ``root`` update with a cosine cone for
    fltrust, the honest ``mean`` with a cosine cone for foolsgold, the ``mean`` with an L2
    ball otherwise (mean, krum, multi_krum, norm_bound, clipping, geometric median, ...).
    Explicit ``reference`` / ``constraint`` options override the choice.
    """
    rule = rule if knows_rule else "mean"
    if reference == "auto":
        if rule in MEDIAN_RULES:
            reference = "median"
        elif rule in PREVIOUS_AGGREGATE_RULES:
            reference = "previous"
        elif rule == "fltrust":
            reference = "root"
        else:
            reference = "mean"
    if constraint == "auto":
        constraint = "cosine" if rule in COSINE_RULES else "l2"
    return reference, constraint


def proxy_root_update(ctx):
    """The adversary's guess of the server's root update: ``-grad L_proxy(global)``.

    One gradient on the proxy data has the root update's direction to first order, and
    only the direction matters to a cosine rule. ``None`` without proxy data.
    """
    if ctx.loss_fn is None or ctx.proxy_x is None:
        return None
    return -jax.grad(ctx.loss_fn)(ctx.global_params, ctx.proxy_x, ctx.proxy_y)


def reference_point(kind, rows, mask, ctx):
    ref = None
    if kind == "median":
        ref = masked_median(rows, mask)
    elif kind == "previous":
        ref = ctx.previous_aggregate
    elif kind == "root":
        ref = proxy_root_update(ctx)
    return masked_mean(rows, mask) if ref is None else ref.astype(rows.dtype)


def _cosines(rows, direction):
    norms = jnp.sqrt(row_sq_norms(rows)) * jnp.linalg.norm(direction)
    return dot(rows, direction) / jnp.where(norms > 0, norms, 1.0)


@REGISTRY.register("strategic_distance", traced=("radius_scale",))
def make_strategic_distance(**kw) -> Attack:
    """Distance-constrained strategic adversary against distance-based rules.

    Projects the adversarial update(s) into the region around the rule's reference point
    (:func:`pick_geometry`) that the benign updates themselves occupy:

    - L2: :func:`project_l2` onto the ball of radius ``radius_scale`` (traced, default 1)
      times the ``spread`` statistic (median | mean | max, default median) of the pool's
      distances to the reference;
    - against krum / multi_krum (``knows_rule``, colluding): the L2 ball's radius is the
      largest distance from the reference towards the adversarial update at which the
      rule still selects the crafted rows (in-graph search as in Fang et al.'s attack),
      times ``radius_scale``: Krum accepts points by their density, not by a radius;
    - cosine: :func:`project_cosine` onto the cone around the reference direction whose
      half-angle is ``radius_scale`` times the ``spread`` of the pool's angles to it.

    Options: ``goal``, ``knowledge``, ``knows_rule``, ``collude`` (module docstring),
    ``radius_scale``, ``spread``, ``reference`` (auto | mean | median | previous | root)
    and ``constraint`` (auto | l2 | cosine). Success is the goal's.
    """
    o, setup = parse(
        "strategic_distance",
        kw,
        {
            **_base_opts(),
            "radius_scale": Opt(1.0, number(0.0)),
            "spread": Opt("median", choice("median", "mean", "max")),
            "reference": Opt("auto", choice(*REFERENCES)),
            "constraint": Opt("auto", choice("auto", "l2", "cosine")),
        },
    )
    goal = make_goal(o["goal"], setup)
    reference, constraint = pick_geometry(
        setup.rule, o["knows_rule"], o["reference"], o["constraint"]
    )

    rule_f, select = krum_options(setup)
    krum_search = (
        o["knows_rule"] and setup.rule in KRUM_RULES and constraint == "l2" and o["collude"]
    )

    def krum_radius(rows, mask, adv, ref, c):
        """Largest distance from ``ref`` towards ``adv`` at which Krum still selects the
        ``c`` identical crafted rows (:func:`krum_acceptor`), at most ``|adv - ref|``."""
        f = c if rule_f is None else jnp.float32(rule_f)
        gap = jnp.linalg.norm(adv - ref)
        direction = (adv - ref) / jnp.where(gap > 0, gap, 1.0)
        accepts = krum_acceptor(rows, mask, c, f, select, ref, direction)
        return largest_accepted(accepts, gap)

    def craft(updates, is_malicious, ctx):
        rows, mask = pool(updates, is_malicious, ctx, o["knowledge"])
        ref = reference_point(reference, rows, mask, ctx)
        scale = ctx.hparams.get("radius_scale", o["radius_scale"])
        adv = updates
        if o["collude"]:
            adv = masked_mean(updates, present(ctx) & is_malicious)[None, :]
        if krum_search:
            c = count(present(ctx) & is_malicious)
            out = project_l2(adv, ref, scale * krum_radius(rows, mask, adv[0], ref, c))
        elif constraint == "l2":
            dists = jnp.sqrt(row_sq_norms(rows, ref))
            out = project_l2(adv, ref, scale * spread(dists, mask, o["spread"]))
        else:
            angles = jnp.arccos(jnp.clip(_cosines(rows, ref), -1.0, 1.0))
            angle = jnp.minimum(scale * spread(angles, mask, o["spread"]), jnp.pi)
            out = jax.vmap(project_cosine, in_axes=(0, None, None))(adv, ref, jnp.cos(angle))
        return emit(updates, is_malicious, out)

    return Attack(
        poison=goal.poison,
        craft=craft,
        needs_benign=o["knowledge"] == "partial",
        success=goal.success,
    )


def largest_mix(loss, base, adv, tol, grid: int, refine: int):
    """Largest ``a`` in [0, 1] with ``loss(base + a (adv - base)) <= loss(base) + tol``.

    ``grid`` evenly spaced candidates are evaluated at once; the largest feasible one is
    refined by ``refine`` bisection steps towards the next grid point. 0 if none is
    feasible. ``loss`` maps an update ``[d]`` to a scalar.
    """
    limit = loss(base) + tol
    alphas = jnp.linspace(0.0, 1.0, grid)
    ok = jax.vmap(lambda a: loss(base + a * (adv - base)))(alphas) <= limit
    last = grid - 1 - jnp.argmax(ok[::-1])
    lo = jnp.where(jnp.any(ok), alphas[last], 0.0)
    hi = jnp.where(jnp.any(ok) & (last < grid - 1), lo + 1.0 / (grid - 1), lo)

    def bisect(_, bracket):
        lo, hi = bracket
        mid = 0.5 * (lo + hi)
        good = loss(base + mid * (adv - base)) <= limit
        return jnp.where(good, mid, lo), jnp.where(good, hi, mid)

    lo, _ = jax.lax.fori_loop(0, refine, bisect, (lo, hi))
    return lo


@REGISTRY.register("strategic_behavior", traced=("tolerance",))
def make_strategic_behavior(**kw) -> Attack:
    """Behaviour-aware strategic adversary against behaviour-based rules (FLTrust's root
    set, Zeno, Fang's loss rejection, UBAR...).

    The judge scores an update by the loss on its data; the adversary holds a proxy of it
    (``ctx.loss_fn``, ``ctx.proxy_x``, ``ctx.proxy_y``). It sends the mixture
    ``base + a (adv - base)`` with the largest ``a`` whose proxy loss at
    ``global + mixture`` stays within ``tolerance`` (traced, default 0) of the proxy loss
    of ``base`` (:func:`largest_mix`, ``grid`` candidates then ``refine`` bisection steps,
    in-graph). So behaviour on the proxy data barely moves while the goal, which that data
    does not cover, advances. ``base`` is each row's own benign update, or when
    colluding the pool mean (honest mean if omniscient) against the malicious rows' mean
    adversarial update. The engine must pass the proxy data; crafting without it raises.
    Options: ``goal``, ``knowledge``, ``knows_rule`` (unused), ``collude``, ``tolerance``,
    ``grid`` (default 5), ``refine`` (default 6).
    """
    o, setup = parse(
        "strategic_behavior",
        kw,
        {
            **_base_opts(),
            "tolerance": Opt(0.0, number()),
            "grid": Opt(5, integer(2)),
            "refine": Opt(6, integer(0)),
        },
    )
    goal = make_goal(o["goal"], setup)

    def craft(updates, is_malicious, ctx):
        if ctx.loss_fn is None or ctx.proxy_x is None:
            raise ConfigError(
                "attack 'strategic_behavior' needs the adversary's proxy data "
                "(ctx.loss_fn, ctx.proxy_x, ctx.proxy_y)"
            )
        tol = ctx.hparams.get("tolerance", o["tolerance"])

        def loss(u):
            return ctx.loss_fn(ctx.global_params + u, ctx.proxy_x, ctx.proxy_y)

        def search(base, adv):
            a = largest_mix(loss, base, adv, tol, o["grid"], o["refine"])
            return base + a * (adv - base)

        if o["collude"]:
            base = masked_mean(*pool(updates, is_malicious, ctx, o["knowledge"]))
            adv = masked_mean(updates, present(ctx) & is_malicious)
            return emit(updates, is_malicious, search(base, adv))
        return emit(updates, is_malicious, jax.vmap(search)(ctx.benign_updates, updates))

    needs_benign = o["knowledge"] == "partial" or not o["collude"]
    return Attack(poison=goal.poison, craft=craft, needs_benign=needs_benign, success=goal.success)
