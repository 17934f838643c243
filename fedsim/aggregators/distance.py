"""Distance-based rules: they compare updates with each other or with a reference point.

Conventions common to these rules (each docstring adds its own):

- ``weights``: a row with weight 0 is absent and ignored exactly as if removed. Unless a
  docstring says otherwise, a robust rule uses the weights only as a presence mask: every
  present client counts once (the papers assume equal weights, and letting a client's
  claimed sample count weigh in a robust statistic would hand attackers a lever). ``mean``,
  ``norm_bound`` and ``geometric_median`` (RFA's α) use the weight values.
- ``m`` is the number of present rows, computed in-graph; ``f`` (a static factory option)
  is the number of Byzantine clients the defence assumes. Bounds such as Krum's
  ``n > 2f + 2`` are checked statically against the number of rows ``n`` when the rule is
  first traced; counts derived from ``m`` (Krum's ``m - f - 2`` neighbours, ...) are
  clamped to stay at least 1 when fewer clients are present.
- Non-finite rows (any NaN/Inf entry) are treated as infinitely far from everything:
  distance-based selections never pick them while enough finite rows remain, and order
  statistics sort NaN last (±Inf sort at their ends), so up to ``f`` such rows cannot
  poison a rule that tolerates ``f``.
- ``AggInfo.weight``: each client's contribution to the aggregate (see ``fedsim.types``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from fedsim import kernels as ops
from fedsim.aggregators.base import REGISTRY, Geometry, no_state, normalized
from fedsim.options import Option, at_least, holds
from fedsim.types import AggContext, AggInfo, Aggregator

F = Option(0, at_least(0))  # f, the number of Byzantine rows a rule tolerates (static)


def _count(present):
    return jnp.sum(present).astype(jnp.int32)


# --- coordinate-wise order statistics -----------------------------------------------------


# Order statistics over a peer-to-peer neighbourhood (a few rows: the median's selection
# network ``ops.middle_keys_few``, the trimmed mean's counting ``ops.select_few``) take
# blocks an eighth of the default size (128 columns of 113 nodes at a time at 1,000 nodes of
# nine rows, 128 columns of all 100 at 100: ``fedsim.round.column_layout``): a block then
# stays in cache while its rows are compared, where the mean-like columnwise rules gain
# more from fewer loop iterations (bench/peer.py, README).
SELECT_COLUMN_ENTRIES = 1 << 17


@REGISTRY.register(
    "median",
    options={},
    geometry=Geometry("median", "box"),
    columnwise=True,
    column_entries=SELECT_COLUMN_ENTRIES,
)
def make_median() -> Aggregator:
    """Coordinate-wise median (Yin et al. 2018, "Byzantine-robust distributed learning").

    Per coordinate, the median of the present clients' values; for an even count, the mean
    of the two middle values. AggInfo.weight: per coordinate the median's value(s) give
    share 1 (½ each when two middle values differ), split equally among tied clients;
    averaged over coordinates. NaN sorts last.
    """

    def aggregate(updates, weights, state, ctx: AggContext):
        present = ops.present_mask(weights)
        m = _count(present)
        out, w = ops.coordinatewise(lambda xb, p: ops.median_block(xb, p, m), updates, present)
        return out, state, AggInfo(weight=w)

    return Aggregator(init=no_state, aggregate=aggregate)


@REGISTRY.register(
    "trimmed_mean",
    options={
        "beta": Option(0.1, holds(lambda b: 0 <= b < 0.5, "must be in [0, 0.5)"), traced=True)
    },
    geometry=Geometry("median", "box", trim_option="beta"),
    columnwise=True,
    column_entries=SELECT_COLUMN_ENTRIES,
)
def make_trimmed_mean(beta: float) -> Aggregator:
    """Coordinate-wise β-trimmed mean (Yin et al. 2018).

    Per coordinate, drop the ``k = ⌊β m⌋`` largest and ``k`` smallest present values and
    average the ``m - 2k`` left. ``beta`` (per side, traced, ``hparams["beta"]``) must be
    below 1/2; ``k`` is clamped to ``⌊(m-1)/2⌋``. AggInfo.weight: per coordinate ``1/(m-2k)``
    for each kept value (copies tied at a cut share the kept places), averaged over
    coordinates.
    """

    def aggregate(updates, weights, state, ctx: AggContext):
        present = ops.present_mask(weights)
        m = _count(present)
        b = ctx.hparams.get("beta", beta)
        k = jnp.clip(jnp.floor(b * m).astype(jnp.int32), 0, jnp.maximum(m - 1, 0) // 2)
        out, w = ops.coordinatewise(lambda xb, p: ops.trimmed_block(xb, p, m, k), updates, present)
        return out, state, AggInfo(weight=w)

    return Aggregator(init=no_state, aggregate=aggregate)


def _mean_around_median(updates, rows, n_rows, q):
    """Per coordinate, the mean of the ``q`` values of ``rows`` (bool ``[n]``, ``n_rows``
    of them) closest to their median — MeaMed's rule and Bulyan's last step. Returns
    (``[d]``, per-client weight ``[n]``)."""

    def block(xb, p):
        lo, hi = ops.middle_values(xb, p, n_rows)
        return ops.closest_block(xb, p, lo, hi, q)

    return ops.coordinatewise(block, updates, rows)


@REGISTRY.register("meamed", options={"f": F}, geometry=Geometry("median", "filter", f_option="f"))
def make_meamed(f: int) -> Aggregator:
    """Mean around the median, MeaMed (Xie, Koyejo & Gupta 2018, "Generalized
    Byzantine-tolerant SGD").

    Per coordinate, the mean of the ``m - f`` present values closest to the coordinate-wise
    median. Values tied at the cut distance enter through their average (order-free).
    Needs ``n > 2f``. AggInfo.weight: ``1/(m-f)`` per kept value, averaged over coordinates.
    """

    def aggregate(updates, weights, state, ctx: AggContext):
        n = updates.shape[0]
        ops.check(n > 2 * f, f"meamed: needs n > 2f (n={n}, f={f})")
        present = ops.present_mask(weights)
        m = _count(present)
        q = jnp.maximum(m - f, 1)

        out, w = _mean_around_median(updates, present, m, q)
        return out, state, AggInfo(weight=w)

    return Aggregator(init=no_state, aggregate=aggregate)


# --- Krum family --------------------------------------------------------------------------


def krum_scores(updates, present, f):
    """Krum scores (Blanchard et al. 2017) and the candidates, ``(scores [n], ok [n])``.

    A row's score is the sum of squared distances to its ``m - f - 2`` nearest other
    present rows (at least 1, at most the ``m - 1`` others: a lone present row scores 0,
    the empty sum). Candidates (``ok``) are the finite present rows; the others score +inf,
    and so does a candidate whose nearest others include a non-finite row."""
    ok = present & ops.finite_rows(updates)
    dist = ops.pairwise_sq_dists(updates, ok)
    others = jnp.where(jnp.eye(dist.shape[0], dtype=bool), jnp.inf, dist)
    m = _count(present)
    k = jnp.maximum(m - f - 2, 1)
    scores = jnp.where(m > 1, ops.sum_smallest(others, k), 0)
    return jnp.where(ok, scores, jnp.inf), ok


def lowest(scores, candidates):
    """``(index, found)``: the candidate with the lowest score, ties (+inf included) to the
    lowest index; ``found`` is False when there is no candidate. A plain ``argmin`` would
    take row 0 when every score is +inf, candidate or not."""
    least = jnp.min(jnp.where(candidates, scores, jnp.inf))
    return jnp.argmax(candidates & (scores <= least)), jnp.any(candidates)


def candidate_ranks(scores, candidates):
    """``[n]`` rank of each row by score with every candidate before every other row (ties,
    +inf included, by index)."""
    order = jnp.lexsort((scores, ~candidates))
    return jnp.zeros_like(order).at[order].set(jnp.arange(scores.shape[0]))


def _check_krum(name, n, f):
    ops.check(n > 2 * f + 2, f"{name}: needs n > 2f + 2 (n={n}, f={f})")


@REGISTRY.register("krum", options={"f": F}, geometry=Geometry("mean", "score", f_option="f"))
def make_krum(f: int) -> Aggregator:
    """Krum (Blanchard et al. 2017): the present update with the lowest Krum score.

    Score = sum of squared L2 distances to the ``m - f - 2`` nearest other present updates
    (the paper's count; some libraries use ``m - f - 1``). Needs ``n > 2f + 2``. Ties go to
    the lowest row index. Corners: fewer present rows clamp the count to at least 1 and at
    most the ``m - 1`` others, so a lone present row scores 0 (the paper's sum over its
    neighbours, which are none) and is the output. Only finite present rows are
    candidates: when every candidate scores +inf (too many non-finite rows for ``f``) the
    lowest-index candidate is taken; with no finite present row the output is 0 with zero
    weights. AggInfo.weight: one-hot on the selected client.
    """

    def aggregate(updates, weights, state, ctx: AggContext):
        _check_krum("krum", updates.shape[0], f)
        present = ops.present_mask(weights)
        best, found = lowest(*krum_scores(updates, present, f))
        pick = (jnp.arange(updates.shape[0]) == best) & found
        out = jnp.where(found, updates[best], 0)
        return out, state, AggInfo(weight=pick.astype(updates.dtype))

    return Aggregator(init=no_state, aggregate=aggregate)


@REGISTRY.register(
    "multi_krum",
    options={"f": F, "m": Option(None, at_least(1, allow_none=True))},
    geometry=Geometry("mean", "score", f_option="f", select_option="m"),
)
def make_multi_krum(f: int, m: int | None) -> Aggregator:
    """Multi-Krum (Blanchard et al. 2017): the mean of the ``m`` updates with the lowest
    Krum scores (scores as in ``krum``, ``m - f - 2`` neighbours).

    ``m`` (static) defaults to ``present - f`` (computed in-graph); it is clamped to the
    number of present rows. Needs ``n > 2f + 2``. Ties go to the lowest row index. Corners
    as ``krum``: a lone present row scores 0 and is the output; only finite rows are
    selected, so with fewer than ``m`` finite present rows the mean is over those (0 when
    there are none). AggInfo.weight: ``1/|selected|`` on each selected client.
    """

    def aggregate(updates, weights, state, ctx: AggContext):
        _check_krum("multi_krum", updates.shape[0], f)
        present = ops.present_mask(weights)
        count = _count(present)
        scores, ok = krum_scores(updates, present, f)
        q = jnp.maximum(count - f, 1) if m is None else jnp.minimum(m, count)
        chosen = ok & (candidate_ranks(scores, ok) < q)
        share = normalized(chosen.astype(updates.dtype))
        out = ops.combine(share, updates, chosen, ok)
        return out, state, AggInfo(weight=share)

    return Aggregator(init=no_state, aggregate=aggregate)


def iterated_krum(updates, present, f, count):
    """Bulyan's selection: apply Krum ``count`` times, removing each pick (El Mhamdi et al.
    2018). Each Krum runs on the rows left, with ``left - f - 2`` neighbours clamped as in
    ``krum_scores`` (at least 1, at most the ``left - 1`` others: the last row left scores
    0 and is picked). Each pass picks among the finite rows left (lowest score, ties to the
    lowest index); it picks nothing once none is left. Returns the ``[n]`` bool mask of
    picked rows.

    The distances are computed once and each row's neighbours sorted once; a pass then
    costs O(n²): a score is the sum of a row's first ``k`` sorted entries still available,
    and removing a pick updates the availability mask and the running counts in place.
    """
    ok = present & ops.finite_rows(updates)
    dist = ops.pairwise_sq_dists(updates, ok)
    n = updates.shape[0]
    cols = jnp.arange(n)
    others = jnp.where(jnp.eye(n, dtype=bool), jnp.inf, dist)
    order = jnp.argsort(others, axis=1, stable=True)
    srt = jnp.take_along_axis(others, order, axis=1)
    where_is = jnp.zeros_like(order).at[cols[:, None], order].set(cols[None, :])
    # [i, r]: the r-th nearest other row of i is still left (i itself never counts)
    avail = present[order] & (order != cols[:, None])
    seen = jnp.cumsum(avail, axis=1, dtype=jnp.int32)  # rows left among the r nearest

    def body(t, carry):
        picked, avail, seen = carry
        left = present & ~picked
        n_left = _count(left)
        k = jnp.minimum(jnp.maximum(n_left - f - 2, 1), n_left - 1)
        use = avail & (seen <= k)
        total = jnp.sum(jnp.where(use, srt, 0), axis=1)
        total = jnp.where(seen[:, -1] >= k, total, jnp.inf)  # too few others: inf, as Krum
        best, found = lowest(total, left & ok)
        take = (t < count) & found
        at = jnp.where(take, where_is[:, best], n)[:, None]  # best's place in each row
        avail = avail & (cols[None, :] != at)
        seen = seen - (cols[None, :] >= at)
        return picked | ((cols == best) & take), avail, seen

    picked, _, _ = lax.fori_loop(0, n - 2 * f, body, (jnp.zeros(n, bool), avail, seen))
    return picked


@REGISTRY.register("bulyan", options={"f": F}, geometry=Geometry("median", "filter", f_option="f"))
def make_bulyan(f: int) -> Aggregator:
    """Bulyan (El Mhamdi, Guerraoui & Rouhault 2018) over Krum.

    Select ``θ = m - 2f`` updates by iterated Krum (each round removes its pick), then per
    coordinate average the ``β = θ - 2f`` selected values closest to the selected values'
    median (ties at the cut enter through their average). Needs ``n ≥ 4f + 3``; with fewer
    present clients θ and β are clamped to at least 1. Iterated Krum picks only finite
    rows, and the last row left scores 0 (see ``iterated_krum``), so with ``f = 0`` (the
    default) every finite present row is selected and kept: the uniform mean; one present
    row is the output. AggInfo.weight: ``1/β`` per kept value, averaged over coordinates
    (zero for unselected clients).
    """

    def aggregate(updates, weights, state, ctx: AggContext):
        n = updates.shape[0]
        ops.check(n >= 4 * f + 3, f"bulyan: needs n >= 4f + 3 (n={n}, f={f})")
        present = ops.present_mask(weights)
        m = _count(present)
        theta = jnp.maximum(m - 2 * f, 1)
        chosen = iterated_krum(updates, present, f, theta)
        picked = _count(chosen)
        beta = jnp.maximum(picked - 2 * f, 1)

        out, w = _mean_around_median(updates, chosen, picked, beta)
        return out, state, AggInfo(weight=w)

    return Aggregator(init=no_state, aggregate=aggregate)


# --- iterative and clipping rules ---------------------------------------------------------


@REGISTRY.register(
    "geometric_median",
    options={"iters": Option(10, at_least(0)), "nu": Option(1e-6, traced=True)},
    geometry=Geometry("mean", "ball"),
)
def make_geometric_median(iters: int, nu: float) -> Aggregator:
    """Geometric median by smoothed Weiszfeld, RFA (Pillutla, Kakade & Harchaoui 2022).

    Minimises ``sum_i α_i max(ν, |v - x_i|)``, α = normalised weights (RFA weighs by
    sample counts), from ``v = α-mean of the finite rows`` in ``iters`` (static) steps
    ``v ← Σ β_i x_i / Σ β_i``, ``β_i = α_i / max(ν, |v - x_i|)``; ν is traced
    (``hparams["nu"]``). Non-finite rows get β = 0. AggInfo.weight: the final β,
    normalised.
    """

    def aggregate(updates, weights, state, ctx: AggContext):
        eps = ctx.hparams.get("nu", nu)
        ok = ops.finite_rows(updates)
        alpha = normalized(jnp.where(ok, weights, 0).astype(updates.dtype))

        def step(_, carry):
            v, _ = carry
            dist = jnp.where(ok, distances_to(updates, v), jnp.inf)
            beta = normalized(alpha / jnp.maximum(eps, dist))
            return ops.combine(beta, updates, ok), beta

        v0 = ops.combine(alpha, updates, ok)
        v, beta = lax.fori_loop(0, iters, step, (v0, alpha))
        return v, state, AggInfo(weight=beta)

    return Aggregator(init=no_state, aggregate=aggregate)


def distances_to(x, v):
    """``[n]`` L2 distances from the rows of ``x [n, d]`` to ``v [d]`` (NaN for a row
    holding NaN or Inf).

    The squared differences are summed around ``v`` (``ops.row_sq_norms(x, v)``, one pass
    over column blocks; ``norm(x - v, axis=1)`` runs a slow row reduction over a broadcast
    difference on XLA:CPU). The expanded ``|x_i|² - 2 x_i·v + |v|²``, one matrix-vector
    product, ran faster at n=1000, d=1e5 but is not used: near convergence the
    rows are close to ``v`` and its float32 cancellation error, about ``1e-7 |x_i|²``,
    dwarfs the distances (and ν): at ``|v| = 100`` with rows ``1e-4`` apart it returned 0
    or noise. (Computing each new point and its distances in one pass over the rows was
    measured too: no faster than the two passes, the kernels being compute-bound.)
    """
    return jnp.sqrt(ops.row_sq_norms(x, v))


def clip_factor(norms, tau):
    """``min(1, τ / norm)``: 1 for a norm of 0 (nothing to shrink), 0 for an infinite or NaN
    norm."""
    shrink = jnp.where(norms > tau, tau / jnp.where(norms > tau, norms, 1), 1.0)
    return jnp.where(jnp.isfinite(norms), shrink, 0.0)


@REGISTRY.register(
    "centered_clipping",
    options={"tau": Option(1.0, traced=True), "iters": Option(1, at_least(1))},
    geometry=Geometry("previous_aggregate", "ball", radius_option="tau"),
)
def make_centered_clipping(tau: float, iters: int) -> Aggregator:
    """Centred clipping (Karimireddy, He & Jaggi 2021, "Learning from history").

    From the reference ``v`` = the previous round's aggregate (AggState, zeros at first),
    ``iters`` (static) times: ``v ← v + (1/m) Σ_i c_i (x_i - v)``, ``c_i = min(1,
    τ/|x_i - v|)``, over present clients (uniform). τ traced (``hparams["tau"]``).
    Non-finite rows get ``c_i = 0``. State: the aggregate. AggInfo.weight: the coefficient of
    each row in the result (the rest of the weight stays on the previous aggregate).
    """

    def init(flat_params, n_clients):
        return jnp.zeros_like(flat_params)

    def aggregate(updates, weights, state, ctx: AggContext):
        t = ctx.hparams.get("tau", tau)
        ok = ops.finite_rows(updates)
        share = normalized(ops.present_mask(weights).astype(updates.dtype))

        def step(_, carry):
            v, a, w = carry
            c = share * clip_factor(distances_to(updates, v), t)
            c = jnp.where(ok, c, 0)
            keep = 1 - jnp.sum(c)
            return keep * v + ops.combine(c, updates, ok), keep * a, keep * w + c

        v0 = state.astype(updates.dtype)
        v, _, w = lax.fori_loop(0, iters, step, (v0, jnp.ones(()), jnp.zeros_like(share)))
        return v, v, AggInfo(weight=w)

    return Aggregator(init=init, aggregate=aggregate)


@REGISTRY.register(
    "norm_bound",
    options={"max_norm": Option(1.0, traced=True), "noise_std": Option(0.0, traced=True)},
    geometry=Geometry("origin", "ball", radius_option="max_norm"),
)
def make_norm_bound(max_norm: float, noise_std: float) -> Aggregator:
    """Norm bounding (Sun et al. 2019, "Can you really backdoor federated learning?").

    Each update is scaled to norm at most ``max_norm``, then weighted-averaged (the weight
    values count, as in FedAvg); Gaussian noise of std ``noise_std`` (their weak DP,
    default off) is added using ``ctx.key``. Both traced. Non-finite rows are scaled to 0.
    AggInfo.weight: normalised weight × shrink factor.
    """

    def aggregate(updates, weights, state, ctx: AggContext):
        bound = ctx.hparams.get("max_norm", max_norm)
        std = ctx.hparams.get("noise_std", noise_std)
        ok = ops.finite_rows(updates)
        norms = jnp.sqrt(ops.row_sq_norms(updates))
        coef = normalized(weights.astype(updates.dtype)) * clip_factor(norms, bound)
        coef = jnp.where(ok, coef, 0)
        noise = std * jax.random.normal(ctx.key, (updates.shape[1],), updates.dtype)
        return ops.combine(coef, updates, ok) + noise, state, AggInfo(weight=coef)

    return Aggregator(init=no_state, aggregate=aggregate)


# --- spectral and similarity-based rules --------------------------------------------------


def coordinate_subset(key, d, b):
    """``[b]`` distinct coordinates drawn uniformly from ``range(d)``."""
    return jax.random.permutation(key, d)[:b] if b < d else jnp.arange(d)


@REGISTRY.register(
    "dnc",
    options={"f": F, "iters": Option(1), "sub_dim": Option(10_000), "c": Option(1.0)},
    geometry=Geometry("mean", "filter", f_option="f"),
)
def make_dnc(f: int, iters: int, sub_dim: int, c: float) -> Aggregator:
    """Divide-and-Conquer (Shejwalkar & Houmansadr 2021, NDSS).

    ``iters`` (static) times: draw ``sub_dim`` coordinates (``ctx.key``), centre the present
    rows there, and remove the ``⌊c f⌋`` rows with the largest squared projection on the
    top right singular vector. The good set is the intersection over iterations; output =
    its uniform mean. The singular vector comes from an exact eigendecomposition of the
    ``[n, n]`` Gram matrix of the centred rows. Non-finite rows score +inf (removed first).
    Corners: an iteration removes at most ``m - 1`` rows, so one present row is the output;
    an empty intersection gives 0 with zero weights. AggInfo.weight: ``1/|good|`` on each
    kept client.
    """
    removed = int(c * f)
    ops.check(iters >= 1 and sub_dim >= 1, "dnc: iters and sub_dim must be >= 1")

    def aggregate(updates, weights, state, ctx: AggContext):
        n, d = updates.shape
        ops.check(removed < n, f"dnc: removes c*f={removed} rows but n={n}")
        present = ops.present_mask(weights)
        ok = ops.finite_rows(updates)
        drop = jnp.minimum(removed, jnp.maximum(_count(present) - 1, 0))
        good = present
        for key in jax.random.split(ctx.key, iters):
            cols = coordinate_subset(key, d, sub_dim)
            scores = dnc_scores(updates[:, cols], present & ok)
            scores = jnp.where(present, jnp.where(ok, scores, jnp.inf), -jnp.inf)
            good = good & (ops.ranks(-scores) >= drop)
        share = normalized(good.astype(updates.dtype))
        return ops.combine(share, updates, good, ok), state, AggInfo(weight=share)

    return Aggregator(init=no_state, aggregate=aggregate)


def dnc_scores(sub, ok):
    """Squared projections of the centred ``ok`` rows of ``sub [n, b]`` on their top right
    singular vector (via the top eigenvector of the Gram matrix)."""
    share = normalized(ok.astype(sub.dtype))
    x = jnp.where(ok[:, None], sub, 0)
    centred = jnp.where(ok[:, None], x - ops.dot(share, x), 0)
    gram = jnp.matmul(centred, centred.T, precision=lax.Precision.HIGHEST)
    vals, vecs = jnp.linalg.eigh(gram)
    # projection of row i on v1 is σ1 u1[i]; σ1² = top eigenvalue
    return vals[-1] * vecs[:, -1] ** 2


@REGISTRY.register(
    "foolsgold",
    options={"kappa": Option(1.0, traced=True)},
    geometry=Geometry("none", "similarity"),
)
def make_foolsgold(kappa: float) -> Aggregator:
    """FoolsGold (Fung, Yoon & Beschastnikh 2020).

    State: ``[n_clients, d]`` running sums of each client's updates, indexed by
    ``ctx.client_ids`` (default ``arange(n)``). Each round the present clients' histories
    are updated, then from their pairwise cosine similarities (``cs``, diagonal excluded):
    ``v_i = max_j cs_ij``; pardoning ``cs_ij *= v_i / v_j`` where ``v_j > v_i``;
    ``α_i = clip(1 - max_j cs_ij, 0, 1)``; ``α /= max α``; ``α = 1 → 0.99``;
    ``α = clip(κ (ln(α / (1 - α)) + 0.5), 0, 1)`` with κ traced (``hparams["kappa"]``).
    Output = ``Σ α_i x_i / Σ α_i`` (a convex combination; the original scales a learning
    rate instead). Non-finite updates are not added to a history and get α = 0.
    AggInfo.weight: normalised α.
    """

    def init(flat_params, n_clients):
        return jnp.zeros((n_clients, flat_params.shape[0]), flat_params.dtype)

    def aggregate(updates, weights, state, ctx: AggContext):
        n = updates.shape[0]
        ids = jnp.arange(n) if ctx.client_ids is None else ctx.client_ids
        present = ops.present_mask(weights)
        ok = present & ops.finite_rows(updates)
        x = jnp.where(ok[:, None], updates, 0)
        state = state.at[ids].add(x.astype(state.dtype))
        alpha = foolsgold_alpha(state[ids], ok, ctx.hparams.get("kappa", kappa))
        share = normalized(alpha.astype(x.dtype))
        return ops.dot(share, x), state, AggInfo(weight=share)

    return Aggregator(init=init, aggregate=aggregate)


def foolsgold_alpha(history, ok, kappa):
    """FoolsGold's per-client learning-rate weights from the ``[n, d]`` histories."""
    n = history.shape[0]
    gram = ops.self_gram(history)  # cosines from one Gram matrix, no normalised copy
    norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0))
    cs = ops.safe_div(gram, norms[:, None] * norms[None, :])  # 0 for an empty history
    eye = jnp.eye(n, dtype=bool)
    pair = ok[:, None] & ok[None, :]
    cs = jnp.where(pair, jnp.where(eye, 0.0, cs), -jnp.inf)  # as the original: cs - I
    v = jnp.max(cs, axis=1)
    pardon = jnp.where(v[None, :] > v[:, None], ops.safe_div(v[:, None], v[None, :]), 1.0)
    cs = jnp.where(pair & ~eye, cs * pardon, cs)
    alpha = jnp.clip(1 - jnp.max(cs, axis=1), 0, 1)
    alpha = jnp.where(ok, alpha, 0)
    alpha = ops.safe_div(alpha, jnp.max(alpha))
    alpha = jnp.where(alpha == 1, 0.99, alpha)
    logit = jnp.log(alpha / (1 - alpha)) + 0.5  # -inf at 0
    return jnp.where(ok, jnp.clip(kappa * logit, 0, 1), 0)


@REGISTRY.register(
    "signguard",
    options={
        "lower": Option(0.1, traced=True),
        "upper": Option(3.0, traced=True),
        "coord_frac": Option(0.1),
        "shift_iters": Option(20),
    },
    geometry=Geometry("mean", "filter", counts_zeros=True),
)
def make_signguard(lower: float, upper: float, coord_frac: float, shift_iters: int) -> Aggregator:
    """SignGuard (Xu et al. 2022, "Byzantine-robust federated learning through collaborative
    malicious gradient filtering").

    1. Norm filter: keep present rows with ``lower ≤ |x_i| / M ≤ upper`` (M = median norm of
       the present rows; both bounds traced).
    2. Sign filter: on ``⌈coord_frac d⌉`` random coordinates (``ctx.key``), each row's
       fractions of positive, zero and negative entries; cluster them by flat-kernel mean
       shift (``shift_iters`` fixed steps; bandwidth = mean distance to the ``⌊0.3 m⌋``-th
       nearest row counting itself, as scikit-learn's ``estimate_bandwidth``), and keep the
       largest cluster: rows whose mode lies within one bandwidth of the mode shared by the
       most rows. This replaces the paper's scikit-learn MeanShift with a fixed-step one.
    3. Output: uniform mean over rows passing both filters, each clipped to norm M.
    Non-finite rows are dropped. AggInfo.weight: ``1/|S|`` × clip factor on kept rows.
    """

    def aggregate(updates, weights, state, ctx: AggContext):
        n, d = updates.shape
        present = ops.present_mask(weights)
        finite = ops.finite_rows(updates)
        ok = present & finite
        norms = jnp.where(ok, jnp.sqrt(ops.row_sq_norms(updates)), jnp.inf)
        med = ops.median_block(norms[:, None], ok, _count(ok))[0][0]
        ratio = ops.safe_div(norms, med)
        lo, hi = ctx.hparams.get("lower", lower), ctx.hparams.get("upper", upper)
        by_norm = ok & (ratio >= lo) & (ratio <= hi)
        cols = coordinate_subset(ctx.key, d, max(1, math.ceil(coord_frac * d)))
        sub = jnp.where(ok[:, None], updates[:, cols], 0)
        feats = jnp.stack([jnp.mean(sub > 0, 1), jnp.mean(sub == 0, 1), jnp.mean(sub < 0, 1)], 1)
        chosen = by_norm & largest_cluster(feats, ok, shift_iters)
        coef = normalized(chosen.astype(updates.dtype)) * clip_factor(norms, med)
        coef = jnp.where(chosen, coef, 0)
        return ops.combine(coef, updates, chosen, finite), state, AggInfo(weight=coef)

    return Aggregator(init=no_state, aggregate=aggregate)


def largest_cluster(feats, ok, iters):
    """Rows of ``feats [n, k]`` in the largest flat-kernel mean-shift cluster (see signguard)."""
    n = feats.shape[0]
    dist = jnp.sqrt(ops.pairwise_sq_dists(feats, ok))
    m = _count(ok)
    kth = jnp.clip((3 * m) // 10, 1, n) - 1  # scikit-learn: int(0.3 m) neighbours, self first
    kth_dist = jnp.take_along_axis(jnp.sort(dist, axis=1), jnp.full((n, 1), kth), 1)[:, 0]
    width = ops.safe_div(jnp.sum(jnp.where(ok, kth_dist, 0)), m)
    width = jnp.maximum(width, 1e-6)
    pts = jnp.where(ok[:, None], feats, 0)

    def shift(_, z):
        zz = jnp.sum(z * z, 1)[:, None] + jnp.sum(pts * pts, 1)[None] - 2 * ops.dot(z, pts.T)
        near = (jnp.sqrt(jnp.maximum(zz, 0)) <= width) & ok[None, :]
        return jnp.where(near.any(1)[:, None], ops.dot(normalized_rows(near), pts), z)

    z = lax.fori_loop(0, iters, shift, pts)
    zd = jnp.sqrt(jnp.maximum(jnp.sum((z[:, None] - z[None]) ** 2, -1), 0))
    close = (zd <= width) & ok[:, None] & ok[None, :]
    best = jnp.argmax(jnp.where(ok, jnp.sum(close, 1), -1))
    return close[best]


def normalized_rows(mask):
    """Each row of a boolean ``[n, n]`` matrix as a probability vector (0 if empty)."""
    m = mask.astype(jnp.float32)
    return ops.safe_div(m, jnp.sum(m, axis=1, keepdims=True))
