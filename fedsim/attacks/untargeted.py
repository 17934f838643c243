"""Untargeted model-poisoning attacks: ``craft(updates [n, d], is_malicious [n], ctx)``.

Every attack here takes ``knowledge`` (omniscient | partial; see ``common.pool``),
``knows_rule`` (bool; only Fang's attack uses it, to pick its Krum variant) and
``collude`` (bool). Attacks whose natural output is one vector (ALIE, IPM, Fang, min-max,
min-sum) send it identically when colluding and, when not, each malicious row adds its
own N(0, (jitter * rms(u))^2) noise (``jitter`` traced, default 0.01). Sign flipping and
scaling without collusion transform each row's own update; with collusion they transform
the mean of the pool (sign flip) or of the malicious rows (scaling).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.special import ndtri

from fedsim.attacks.base import REGISTRY
from fedsim.attacks.common import (
    MODEL_POISONING_OPTS,
    count,
    emit,
    krum_acceptor,
    krum_options,
    largest_accepted,
    masked_max,
    masked_mean,
    masked_min,
    masked_std,
    pool,
    present,
    rule_geometry,
    single_or_jittered,
)
from fedsim.attacks.data import make_goal
from fedsim.kernels import dot, gram_sq_dists, row_sq_norms, sum_smallest_by_sort
from fedsim.options import Option, anything, boolean, choice, number
from fedsim.types import Attack


def _opts(collude: bool, **extra) -> dict:
    return {**MODEL_POISONING_OPTS, "collude": Option(collude, boolean), **extra}


JITTER = Option(0.01, number(0.0), traced=True)


def _own_rows(updates, ctx):
    return ctx.benign_updates if ctx.benign_updates is not None else updates


@REGISTRY.register("sign_flip", options=_opts(False, scale=Option(1.0, number(0.0), traced=True)))
def make_sign_flip(setup, **o) -> Attack:
    """Sign flipping: send ``-scale * benign`` (``scale`` traced, default 1).

    ``collude=False`` (default): each malicious row flips its own benign update.
    ``collude=True``: all send ``-scale *`` the pool mean (honest mean if omniscient).
    """

    def craft(updates, is_malicious, ctx):
        scale = ctx.hparams.get("scale", o["scale"])
        if o["collude"]:
            base = masked_mean(*pool(updates, is_malicious, ctx, o["knowledge"]))
        else:
            base = _own_rows(updates, ctx)
        return emit(updates, is_malicious, -scale * base)

    return Attack(craft=craft)


@REGISTRY.register("gaussian", options=_opts(False, std=Option(1.0, number(0.0), traced=True)))
def make_gaussian(setup, **o) -> Attack:
    """Gaussian noise: malicious rows are N(0, std^2 I) draws (``std`` traced, default 1).

    ``collude=True`` sends one shared draw, ``False`` (default) one draw per row.
    """

    def craft(updates, is_malicious, ctx):
        std = ctx.hparams.get("std", o["std"])
        rows = 1 if o["collude"] else updates.shape[0]
        noise = jax.random.normal(ctx.key, (rows, updates.shape[1]), updates.dtype)
        return emit(updates, is_malicious, std * noise)

    return Attack(craft=craft)


@REGISTRY.register(
    "scaling",
    options=_opts(
        False,
        boost=Option(None, number(0.0, allow_none=True), traced=True),
        goal=Option(None, anything),
    ),
)
def make_scaling(setup, **o) -> Attack:
    """Boosting / model replacement (Bagdasaryan et al. 2020): send ``boost * update``.

    Model replacement solves ``G + eta/n * sum_i u_i = X`` for one attacker's ``u``, giving
    ``u = (n / eta)(X - G)``: ``boost`` (traced) defaults to ``n`` = the number of present
    rows (server learning rate eta = 1). With ``goal`` (a data-poisoning goal, e.g.
    ``backdoor``) malicious clients train on it and the boosted update replaces the model;
    without, the benign update is boosted. ``collude=True``: all send the boosted mean of
    the malicious rows; ``False`` (default): each boosts its own.
    """
    goal = make_goal(o["goal"], setup) if o["goal"] is not None else None

    def craft(updates, is_malicious, ctx):
        here = present(ctx)
        default = count(here) if o["boost"] is None else o["boost"]
        boost = ctx.hparams.get("boost", default)
        base = masked_mean(updates, here & is_malicious) if o["collude"] else updates
        return emit(updates, is_malicious, boost * base)

    return Attack(
        poison=goal.poison if goal else None,
        craft=craft,
        success=goal.success if goal else None,
    )


def alie_z(n, f):
    """Baruch et al. 2019: ``s = floor(n/2 + 1) - f``, ``z = Phi^-1((n - s) / n)``.

    ``n`` clients of which ``f`` malicious (traced counts allowed). The probability is
    clipped into [1e-6, 1 - 1e-6] so ``z`` stays finite when ``f`` is large.
    """
    n = jnp.asarray(n, jnp.float32)
    s = jnp.floor(n / 2.0 + 1.0) - jnp.asarray(f, jnp.float32)
    p = (n - s) / jnp.maximum(n, 1.0)
    return ndtri(jnp.clip(p, 1e-6, 1.0 - 1e-6))


@REGISTRY.register(
    "alie",
    options=_opts(True, z=Option(None, number(allow_none=True), traced=True), jitter=JITTER),
)
def make_alie(setup, **o) -> Attack:
    """A Little Is Enough (Baruch et al. 2019): send ``mean - z * std`` per coordinate.

    Mean and (unbiased) std over the pool. ``z`` (traced) defaults to :func:`alie_z` of the
    round's present rows ``n`` and present malicious rows ``f``. ``collude`` default True.
    """

    def craft(updates, is_malicious, ctx):
        rows, mask = pool(updates, is_malicious, ctx, o["knowledge"])
        z = ctx.hparams.get("z", o["z"])
        if z is None:
            here = present(ctx)
            z = alie_z(count(here), count(here & is_malicious))
        u = masked_mean(rows, mask) - z * masked_std(rows, mask)
        scale = ctx.hparams.get("jitter", o["jitter"])
        return single_or_jittered(updates, is_malicious, ctx, u, o["collude"], scale)

    return Attack(craft=craft)


@REGISTRY.register(
    "ipm", options=_opts(True, epsilon=Option(0.1, number(0.0), traced=True), jitter=JITTER)
)
def make_ipm(setup, **o) -> Attack:
    """Inner-product manipulation (Xie et al. 2020): send ``-epsilon * mean(pool)``.

    ``epsilon`` traced, default 0.1 (the paper's small-epsilon setting; 100 is its large
    one). ``collude`` default True.
    """

    def craft(updates, is_malicious, ctx):
        eps = ctx.hparams.get("epsilon", o["epsilon"])
        u = -eps * masked_mean(*pool(updates, is_malicious, ctx, o["knowledge"]))
        scale = ctx.hparams.get("jitter", o["jitter"])
        return single_or_jittered(updates, is_malicious, ctx, u, o["collude"], scale)

    return Attack(craft=craft)


# --------------------------------------------------------------------------- Fang et al.


def fang_interval(rows, mask, b, knowledge):
    """Per-coordinate interval [lo, hi] of Fang et al.'s (2020) trimmed-mean/median attack.

    ``s = sign(mean(pool))`` estimates where the benign update moves each coordinate; the
    crafted value is pushed the other way. Full knowledge: beyond the benign min (s > 0)
    ``[min/b, min]`` if min > 0 else ``[b*min, min]``, or beyond the benign max (s <= 0)
    ``[max, b*max]`` if max > 0 else ``[max/b, max]``, with ``b >= 1``. Partial knowledge
    (pool = the attackers' own benign updates): ``[mu - 4 sigma, mu - 3 sigma]`` (s > 0) or
    ``[mu + 3 sigma, mu + 4 sigma]``.
    """
    mu = masked_mean(rows, mask)
    up = mu > 0
    if knowledge == "partial":
        sigma = masked_std(rows, mask)
        lo = jnp.where(up, mu - 4.0 * sigma, mu + 3.0 * sigma)
        hi = jnp.where(up, mu - 3.0 * sigma, mu + 4.0 * sigma)
        return lo, hi
    mn, mx = masked_min(rows, mask), masked_max(rows, mask)
    lo = jnp.where(up, jnp.where(mn > 0, mn / b, b * mn), mx)
    hi = jnp.where(up, mn, jnp.where(mx > 0, b * mx, mx / b))
    return lo, hi


def fang_krum_bound(rows, mask, n_crafted):
    """Fang et al.'s (2020) upper bound on lambda for their Krum attack.

    ``1/((m-2c-1) sqrt(d)) * min_i sum_{l in N_i} |h_l - h_i| + 1/sqrt(d) * max_i |h_i|``
    over the pool rows ``h`` (N_i: the m-c-2 nearest pool rows, m = pool + c crafted).
    """
    d = rows.shape[1]
    m = count(mask) + n_crafted
    dist = jnp.sqrt(gram_sq_dists(rows - masked_mean(rows, mask)))
    n = rows.shape[0]
    dist = jnp.where(mask[:, None] & mask[None, :] & ~jnp.eye(n, dtype=bool), dist, jnp.inf)
    nearest = sum_smallest_by_sort(dist, jnp.maximum(count(mask) - 2.0, 1.0))
    nearest = jnp.min(jnp.where(mask, nearest, jnp.inf))
    norms = jnp.max(jnp.where(mask, jnp.sqrt(row_sq_norms(rows)), 0.0))
    root_d = jnp.sqrt(jnp.float32(d))
    bound = nearest / (jnp.maximum(m - 2.0 * n_crafted - 1.0, 1.0) * root_d) + norms / root_d
    return jnp.where(jnp.isfinite(bound), bound, norms / root_d)


@REGISTRY.register(
    "fang",
    options=_opts(
        True,
        variant=Option("auto", choice("auto", "trimmed_mean", "krum")),
        b=Option(2.0, number(1.0), traced=True),
        jitter=JITTER,
    ),
)
def make_fang(setup, **o) -> Attack:
    """Fang et al. 2020, "Local model poisoning attacks to Byzantine-robust FL".

    ``variant``: ``trimmed_mean`` (also their median attack; see :func:`fang_interval`,
    each malicious row draws its own uniform values in the interval unless colluding, then
    all share one draw), ``krum`` (``-lambda * sign(mean(pool))`` with lambda from
    :func:`fang_krum_bound` halved until Krum picks it (:func:`largest_accepted`); Krum's
    ``f`` is the rule's ``f`` option when known, else the number of present malicious
    rows; against multi_krum it must be among the selected), or ``auto`` (default:
    ``krum`` when ``knows_rule`` and the rule selects by Krum score (its geometry's
    constraint is ``score``: krum, multi_krum), else ``trimmed_mean``).
    ``b`` (traced, default 2) is the trimmed-mean attack's scaling in [1, 2]. ``collude``
    default True.
    """
    variant = o["variant"]
    if variant == "auto":
        scored = rule_geometry(setup, o["knows_rule"]).constraint == "score"
        variant = "krum" if o["knows_rule"] and scored else "trimmed_mean"
    rule_f, select = krum_options(setup) if o["knows_rule"] else (None, 1)

    def craft_trimmed(updates, is_malicious, ctx):
        rows, mask = pool(updates, is_malicious, ctx, o["knowledge"])
        lo, hi = fang_interval(rows, mask, ctx.hparams.get("b", o["b"]), o["knowledge"])
        draws = 1 if o["collude"] else updates.shape[0]
        u = jax.random.uniform(ctx.key, (draws, updates.shape[1]), updates.dtype)
        return emit(updates, is_malicious, lo + u * (hi - lo))

    def craft_krum(updates, is_malicious, ctx):
        rows, mask = pool(updates, is_malicious, ctx, o["knowledge"])
        c = count(present(ctx) & is_malicious)
        f = c if rule_f is None else jnp.float32(rule_f)
        s = jnp.sign(masked_mean(rows, mask))
        base = jnp.zeros_like(s)
        accepts = krum_acceptor(rows, mask, c, f, select, base, -s)
        u = -largest_accepted(accepts, fang_krum_bound(rows, mask, c)) * s
        scale = ctx.hparams.get("jitter", o["jitter"])
        return single_or_jittered(updates, is_malicious, ctx, u, o["collude"], scale)

    return Attack(craft=craft_krum if variant == "krum" else craft_trimmed)


# --------------------------------------------------------------------------- Shejwalkar


def perturbation(rows, mask, kind):
    """Shejwalkar & Houmansadr's (2021) directions: ``-mu/|mu|``, ``-std`` or ``-sign(mu)``."""
    mu = masked_mean(rows, mask)
    if kind == "std":
        return -masked_std(rows, mask)
    if kind == "sign":
        return -jnp.sign(mu)
    norm = jnp.linalg.norm(mu)
    return -mu / jnp.where(norm > 0, norm, 1.0)


def min_max_gamma(rows, mask, p):
    """Largest gamma with ``max_i |mu + gamma p - h_i| <= max_{i,j} |h_i - h_j|``.

    ``|mu + gamma p - h_i|^2`` is a convex quadratic in gamma that starts below the bound
    (the mean lies in the pool's hull), so the feasible set is ``[0, gamma*]`` and
    ``gamma*`` = the smallest over ``i`` of each quadratic's larger root: the exact end
    point of the paper's halving search.
    """
    mu = masked_mean(rows, mask)
    dev = (rows - mu) * mask[:, None]  # h_i - mu
    bound = jnp.max(jnp.where(mask[:, None] & mask[None, :], gram_sq_dists(dev), 0.0))
    a = jnp.sum(p * p)
    half_b = -dot(dev, p)
    c = row_sq_norms(dev) - bound
    root = (-half_b + jnp.sqrt(jnp.maximum(half_b**2 - a * c, 0.0))) / jnp.where(a > 0, a, 1.0)
    return jnp.where(a > 0, jnp.min(jnp.where(mask, root, jnp.inf)), 0.0)


def min_sum_gamma(rows, mask, p):
    """Largest gamma with ``sum_i |mu + gamma p - h_i|^2 <= max_i sum_j |h_i - h_j|^2``.

    The cross term vanishes because ``mu`` is the pool mean, so
    ``gamma* = sqrt((bound - sum_i |h_i - mu|^2) / (k |p|^2))``.
    """
    mu = masked_mean(rows, mask)
    dev = (rows - mu) * mask[:, None]
    sums = jnp.sum(jnp.where(mask[None, :], gram_sq_dists(dev), 0.0), axis=1)
    bound = jnp.max(jnp.where(mask, sums, 0.0))
    a = count(mask) * jnp.sum(p * p)
    slack = jnp.maximum(bound - jnp.sum(dev * dev), 0.0)
    return jnp.where(a > 0, jnp.sqrt(slack / jnp.where(a > 0, a, 1.0)), 0.0)


SHEJWALKAR = _opts(
    True, perturbation=Option("unit_vec", choice("unit_vec", "std", "sign")), jitter=JITTER
)


def _make_shejwalkar(gamma_fn, o) -> Attack:
    def craft(updates, is_malicious, ctx):
        rows, mask = pool(updates, is_malicious, ctx, o["knowledge"])
        p = perturbation(rows, mask, o["perturbation"])
        u = masked_mean(rows, mask) + gamma_fn(rows, mask, p) * p
        scale = ctx.hparams.get("jitter", o["jitter"])
        return single_or_jittered(updates, is_malicious, ctx, u, o["collude"], scale)

    return Attack(craft=craft)


@REGISTRY.register("min_max", options=SHEJWALKAR)
def make_min_max(setup, **o) -> Attack:
    """Min-max (Shejwalkar & Houmansadr 2021, AGR-agnostic): ``mu + gamma* p``.

    ``p`` from ``perturbation`` (unit_vec | std | sign, default unit_vec), gamma* from
    :func:`min_max_gamma` over the pool. ``collude`` default True.
    """
    return _make_shejwalkar(min_max_gamma, o)


@REGISTRY.register("min_sum", options=SHEJWALKAR)
def make_min_sum(setup, **o) -> Attack:
    """Min-sum (Shejwalkar & Houmansadr 2021): as min-max with :func:`min_sum_gamma`."""
    return _make_shejwalkar(min_sum_gamma, o)


# --------------------------------------------------------------------------- mimic


def mimic_ranking(rows, mask):
    """Pool rows ranked by |projection| on the pool's top principal direction (desc).

    The top eigenvector of the centred Gram matrix ``D D^T`` gives every row's projection
    on the covariance's top direction up to a constant, without a ``d x d`` matrix.
    Returns int32 ``[n]`` row indices, non-pool rows last.
    """
    dev = (rows - masked_mean(rows, mask)) * mask[:, None]
    _, vecs = jnp.linalg.eigh(dot(dev, dev.T))
    score = jnp.where(mask, jnp.abs(vecs[:, -1]), -1.0)
    return jnp.argsort(-score)


def _mimic_target(v):
    if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
        return None
    return f"must be 'auto' or a row index >= 0, got {v!r}"


@REGISTRY.register("mimic", options=_opts(True, target=Option("auto", _mimic_target)))
def make_mimic(setup, **o) -> Attack:
    """Mimic (Karimireddy, He & Jaggi 2022): copy honest clients' updates.

    ``target="auto"`` (default) copies the pool row with the largest variance along the
    pool's top principal direction (recomputed every round; :func:`mimic_ranking`); an
    integer copies the ``target``-th present pool row (modulo their count).
    ``collude=True`` (default): every malicious row copies that one. ``False``: the j-th
    present malicious row copies the j-th ranked pool row (modulo the pool size), so they
    mimic different clients. With ``knowledge="partial"`` the pool is the attackers' own
    benign updates.
    """

    def craft(updates, is_malicious, ctx):
        rows, mask = pool(updates, is_malicious, ctx, o["knowledge"])
        k = jnp.maximum(jnp.sum(mask.astype(jnp.int32)), 1)
        if o["target"] == "auto":
            ranked = mimic_ranking(rows, mask)
        else:  # present pool rows in index order, then the rest
            in_order = jnp.argsort(~mask, stable=True)
            ranked = in_order[(jnp.arange(mask.shape[0]) + o["target"]) % k]
        if o["collude"]:
            return emit(updates, is_malicious, rows[ranked[0]])
        mal = present(ctx) & is_malicious
        slot = jnp.cumsum(mal.astype(jnp.int32)) - 1
        return emit(updates, is_malicious, rows[ranked[jnp.maximum(slot, 0) % k]])

    return Attack(craft=craft)
