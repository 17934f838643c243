"""Shared pieces of the attacks: common options, what they know of the rule, masked
statistics, projections, Krum's acceptance test.

Conventions (all attacks):

- ``updates`` is ``[n, d]`` float32, ``is_malicious`` ``[n]`` bool, ``ctx.weights`` ``[n]``;
  a row with weight 0 is absent this round and enters no statistic. Statistics over a set
  of rows are *unweighted* (each present row counts once, whatever its sample count).
- The *pool* is what the adversary knows of benign behaviour: the present honest rows when
  ``knowledge="omniscient"``, the present malicious rows' benign updates when
  ``knowledge="partial"`` (``ctx.benign_updates`` if the engine computed them, else the
  malicious rows of ``updates`` -- which are benign for attacks without a data poison).
- Standard deviations use the unbiased estimate (ddof=1), as the reference
  implementations of ALIE and of Shejwalkar & Houmansadr do; 0 when fewer than 2 rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedsim.aggregators.base import REGISTRY as RULES
from fedsim.aggregators.base import Geometry
from fedsim.kernels import dot, gram_sq_dists, masked_median, sum_smallest_by_sort
from fedsim.options import Option, boolean, choice
from fedsim.types import AttackContext, AttackSetup

Array = jax.Array

# --------------------------------------------------------------------------- options

MODEL_POISONING_OPTS = {
    "knowledge": Option("omniscient", choice("omniscient", "partial")),
    "knows_rule": Option(True, boolean),
}


# --------------------------------------------------------------------------- the rule


def rule_kw(setup: AttackSetup) -> dict:
    """The rule's static options as configured (``setup.rule_kw``)."""
    return dict(setup.rule_kw)


def rule_geometry(setup: AttackSetup, knows_rule: bool = True) -> Geometry:
    """The geometry of the rule the attack faces (``fedsim.aggregators.base.Geometry``),
    read from the rule's registration; the mean's when the adversary does not know the
    rule (or it is no registered rule)."""
    return RULES.geometry(setup.rule if knows_rule else "mean")


def rule_option(rule: str, opts: dict, hparams, option: str):
    """Option ``option`` of rule ``rule`` as the adversary knows it: its traced value
    (``hparams``, the rule's ``ctx.rule_hparams``), else as configured (``opts``, the
    static options), else the rule's declared default."""
    default = RULES.options(rule)[option].default
    return (hparams or {}).get(option, opts.get(option, default))


# --------------------------------------------------------------------------- masks & stats


def present(ctx: AttackContext) -> Array:
    return ctx.weights > 0


def pool(updates: Array, is_malicious: Array, ctx: AttackContext, knowledge: str):
    """(rows [n, d], mask [n]) of the benign updates the adversary may use."""
    here = present(ctx)
    if knowledge == "omniscient":
        return updates, here & ~is_malicious
    benign = ctx.benign_updates if ctx.benign_updates is not None else updates
    return benign, here & is_malicious


def count(mask: Array) -> Array:
    return jnp.sum(mask.astype(jnp.float32))


def masked_mean(x: Array, mask: Array) -> Array:
    """Mean of the rows of ``x`` [n, d] where ``mask``; zeros when none."""
    m = mask.astype(x.dtype)
    return dot(m, x) / jnp.maximum(jnp.sum(m), 1.0)


def masked_std(x: Array, mask: Array) -> Array:
    """Per-coordinate unbiased std of the masked rows; zeros when fewer than 2."""
    m = mask.astype(x.dtype)
    k = jnp.sum(m)
    dev = (x - masked_mean(x, mask)) * m[:, None]
    return jnp.sqrt(jnp.sum(dev * dev, axis=0) / jnp.maximum(k - 1.0, 1.0))


def masked_max(x: Array, mask: Array) -> Array:
    return jnp.max(jnp.where(mask[:, None], x, -jnp.inf), axis=0)


def masked_min(x: Array, mask: Array) -> Array:
    return jnp.min(jnp.where(mask[:, None], x, jnp.inf), axis=0)


def spread(dists: Array, mask: Array, statistic: str) -> Array:
    """``statistic`` (median | mean | max) of ``dists`` [n] over the masked rows."""
    if statistic == "max":
        return jnp.max(jnp.where(mask, dists, 0.0))
    if statistic == "mean":
        return masked_mean(dists[:, None], mask)[0]
    return masked_median(dists[:, None], mask)[0]


# --------------------------------------------------------------------------- outputs


def jitter(key: Array, u: Array, n: int, scale: Array) -> Array:
    """``n`` copies of ``u`` [d], each plus i.i.d. N(0, (scale*|u|/sqrt(d))^2) noise.

    The diversified (``collude=False``) form of attacks whose natural output is a single
    vector: per-coordinate noise ``scale`` times the RMS coordinate of ``u``.
    """
    rms = jnp.linalg.norm(u) / jnp.sqrt(jnp.asarray(u.shape[-1], u.dtype))
    noise = jax.random.normal(key, (n, u.shape[-1]), u.dtype)
    return u[None, :] + scale * rms * noise


def emit(updates: Array, is_malicious: Array, crafted: Array) -> Array:
    """Malicious rows from ``crafted`` ([d] broadcast or [n, d]), honest rows unchanged."""
    crafted = jnp.broadcast_to(crafted, updates.shape).astype(updates.dtype)
    return jnp.where(is_malicious[:, None], crafted, updates)


def single_or_jittered(updates, is_malicious, ctx, u, collude, scale):
    """Send ``u`` from every malicious row, identical or jittered (see :func:`jitter`)."""
    if collude:
        return emit(updates, is_malicious, u)
    return emit(updates, is_malicious, jitter(ctx.key, u, updates.shape[0], scale))


# --------------------------------------------------------------------------- projections


def project_l2(u: Array, center: Array, radius: Array) -> Array:
    """Nearest point to ``u`` in the L2 ball ``|v - center| <= radius`` (``[..., d]``).

    ``u`` is returned unchanged when already inside. Outside, the result lies on the ray
    from ``center`` to ``u``, pulled in by a relative 1e-5 so that it stays inside the
    ball once rounded to float32.
    """
    diff = u - center
    dist = jnp.linalg.norm(diff, axis=-1, keepdims=True)
    radius = jnp.maximum(jnp.asarray(radius, u.dtype), 0.0)
    factor = radius * (1.0 - 1e-5) / jnp.where(dist > 0, dist, 1.0)
    return jnp.where(dist <= radius, u, center + diff * factor)


def _unit(v: Array) -> Array:
    norm = jnp.linalg.norm(v, axis=-1, keepdims=True)
    return v / jnp.where(norm > 0, norm, 1.0)


def project_cosine(u: Array, direction: Array, min_cos: Array) -> Array:
    """Nearest vector of the same norm as ``u`` whose cosine with ``direction`` >= min_cos.

    Shapes ``[d]`` (vmap for batches). When ``cos(u, direction) >= min_cos`` ``u`` is
    returned unchanged; otherwise ``u`` is rotated towards ``direction`` in the plane they
    span until the angle is ``arccos(min_cos)`` (minus a 1e-6 margin so float32 rounding
    keeps it inside). Cosine-judging rules (FLTrust rescales every update to the root
    update's norm) only see the direction, so keeping the norm loses the adversary nothing.
    If ``u`` is (anti)parallel to ``direction`` the rotation plane uses the coordinate axis
    least aligned with ``direction``.
    """
    min_cos = jnp.clip(jnp.asarray(min_cos, u.dtype), -1.0, 1.0)
    e1 = _unit(direction)
    norm_u = jnp.linalg.norm(u)
    cos = dot(u, e1) / jnp.where(norm_u > 0, norm_u, 1.0)
    ortho = u - dot(u, e1) * e1
    axis = jax.nn.one_hot(jnp.argmin(jnp.abs(e1)), u.shape[-1], dtype=u.dtype)
    fallback = axis - dot(axis, e1) * e1
    degenerate = jnp.linalg.norm(ortho) <= 1e-6 * jnp.maximum(norm_u, 1e-30)
    e2 = _unit(jnp.where(degenerate, fallback, ortho))
    angle = jnp.clip(jnp.arccos(min_cos) - 1e-6, 0.0, jnp.pi)
    rotated = norm_u * (jnp.cos(angle) * e1 + jnp.sin(angle) * e2)
    return jnp.where(cos >= min_cos, u, rotated)


# --------------------------------------------------------------------------- Krum


def krum_options(setup: AttackSetup):
    """(f, select) of a rule selecting by Krum score (geometry constraint ``score``): its
    ``f`` (None if not an int, or no such rule) and how many rows it selects (1 without a
    ``select_option``; else that option's value, None meaning present - f)."""
    geometry = rule_geometry(setup)
    if geometry.constraint != "score":
        return None, 1
    kw = rule_kw(setup)
    f = rule_option(setup.rule, kw, None, geometry.f_option) if geometry.f_option else None
    f = f if isinstance(f, int) and not isinstance(f, bool) else None
    select = geometry.select_option
    return f, (1 if select is None else rule_option(setup.rule, kw, None, select))


def krum_acceptor(rows, mask, n_crafted, f, select, base, direction):
    """``accepts(lams) -> bool [K]``: would Krum select the crafted update
    ``base + lams[k] * direction``?

    Krum (Blanchard et al. 2017) scores a row by the sum of squared distances to its
    ``m - f - 2`` nearest others; here ``m`` = the pool rows (``rows`` [n, d] where
    ``mask``, standing for the honest updates) + ``n_crafted`` identical crafted rows.
    Selected when fewer than ``select`` pool rows score strictly lower (``select`` = 1 for
    Krum, Multi-Krum's ``m``; ``None`` = ``m - f``).

    Everything that does not depend on ``lams`` — the pool's ``[n, n]`` distances above
    all — is computed once here: a search calls ``accepts`` many times. The crafted point
    moves along a ray, so its squared distance to pool row i is the quadratic
    ``|b - h_i|^2 + 2 lam (b - h_i).dir + lam^2 |dir|^2`` (b, h centred on the pool mean).
    """
    inf = jnp.inf
    centre = masked_mean(rows, mask)
    h = rows - centre  # distances are translation-free; centring keeps float32 precision
    b = base - centre
    n = rows.shape[0]
    m = count(mask) + n_crafted
    k = jnp.maximum(m - f - 2.0, 1.0)
    pp = gram_sq_dists(h)
    pp = jnp.where(mask[:, None] & mask[None, :] & ~jnp.eye(n, dtype=bool), pp, inf)
    hb = dot(h, b)  # [n]
    h_dir = dot(h, direction)  # [n]
    offset = jnp.sum(h * h, axis=1) - 2.0 * hb + jnp.sum(b * b)  # |b - h_i|^2
    slope = 2.0 * (jnp.dot(b, direction) - h_dir)  # 2 (b - h_i).dir
    curve = jnp.sum(direction * direction)
    chosen = jnp.maximum(m - f, 1.0) if select is None else select
    k_int = k.astype(jnp.int32)
    c_int = jnp.asarray(n_crafted).astype(jnp.int32)
    # Pool row i's k nearest among its pool neighbours and the c identical crafted copies
    # at squared distance v: with r neighbours closer than v, the k nearest are
    # min(r, k) neighbours, then j = min(c, max(k - r, 0)) copies, then neighbours again,
    # so the sum is prefix[k - j] + j v. Sorting each pool row once makes every check a
    # count instead of a sort of the [n, n + c] union.
    near = jnp.sort(pp, axis=1)  # [n, n], inf last
    prefix = jnp.concatenate([jnp.zeros((n, 1)), jnp.cumsum(near, axis=1)], axis=1)

    def accepts(lams):
        lam = lams[:, None]
        hc = offset[None, :] + lam * slope[None, :] + lam * lam * curve
        hc = jnp.where(mask[None, :], jnp.maximum(hc, 0.0), inf)  # [K, n]
        closer = jax.vmap(jax.vmap(jnp.searchsorted), in_axes=(None, 0))(near, hc)  # [K, n]
        copies = jnp.minimum(c_int, jnp.maximum(k_int - closer, 0))
        from_pool = jnp.take_along_axis(prefix[None], (k_int - copies)[..., None], axis=2)[..., 0]
        pool_scores = from_pool + copies * hc
        pool_scores = jnp.where(mask[None, :], pool_scores, inf)
        # The crafted row's own k nearest: its c - 1 identical mates (distance 0) first.
        crafted_scores = sum_smallest_by_sort(hc, k - jnp.maximum(c_int - 1, 0))
        beaten_by = jnp.sum(pool_scores < crafted_scores[:, None], axis=1)
        return beaten_by < chosen

    return accepts


def krum_accepts(rows, mask, n_crafted, f, select, base, direction, lams):
    """``krum_acceptor(...)(lams)``: bool ``[K]``, one check of ``lams`` [K]."""
    return krum_acceptor(rows, mask, n_crafted, f, select, base, direction)(lams)


def largest_accepted(accepts, top, steps: int = 20, refine: int = 8):
    """Largest scale in ``(0, top]`` that ``accepts`` (``[K] -> bool [K]``), in-graph.

    The candidates ``top * 2^-j`` (j < steps) are checked at once; the largest accepted is
    refined by ``refine`` bisection steps towards twice its value (acceptance is assumed
    monotone between the two). If none is accepted the smallest candidate is returned.
    """
    lams = top * 2.0 ** -jnp.arange(steps, dtype=jnp.float32)
    ok = accepts(lams)
    first = jnp.argmax(ok)
    lo = jnp.where(jnp.any(ok), lams[first], lams[-1])
    hi = jnp.where(jnp.any(ok) & (first > 0), 2.0 * lo, lo)

    def bisect(_, bracket):
        lo, hi = bracket
        mid = 0.5 * (lo + hi)
        good = accepts(mid[None])[0]
        return jnp.where(good, mid, lo), jnp.where(good, hi, mid)

    lo, _ = jax.lax.fori_loop(0, refine, bisect, (lo, hi))
    return lo
