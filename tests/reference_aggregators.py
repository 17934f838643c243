"""Plain float64 numpy references for the aggregation rules: loops, written for clarity.

Each ``ref_<rule>(x, w, **options)`` returns ``(aggregate [d], weight [n])`` and works on
the present rows only (``w > 0``), then puts the weights back in place, so "absent" means
"removed" by construction. Conventions follow the rules' docstrings.
"""

from __future__ import annotations

import math

import numpy as np


def _present(x, w):
    idx = np.flatnonzero(np.asarray(w) > 0)
    return np.asarray(x, np.float64)[idx], idx


def _scatter(n, idx, values):
    out = np.zeros(n)
    out[idx] = values
    return out


def _sort_key(v):
    return (1, 0.0) if math.isnan(v) else (0, v)  # NaN after everything, +inf included


def _shares(values, picked):
    """Split each picked value's share equally among the rows holding that value."""
    out = np.zeros(len(values))
    for value, share in picked:
        tied = [i for i, v in enumerate(values) if v == value]
        for i in tied:
            out[i] += share / len(tied)
    return out


def median_1d(values):
    s = sorted(values, key=_sort_key)
    m = len(s)
    lo, hi = s[(m - 1) // 2], s[m // 2]
    value = lo if lo == hi else (lo + hi) / 2
    return value, _shares(values, [(lo, 0.5), (hi, 0.5)])


def trimmed_1d(values, k):
    s = sorted(values, key=_sort_key)
    kept = s[k : len(s) - k]
    counts = {}
    for v in kept:
        counts[v] = counts.get(v, 0) + 1
    return sum(kept) / len(kept), _shares(values, [(v, c / len(kept)) for v, c in counts.items()])


def closest_1d(values, center, q):
    dist = [abs(v - center) for v in values]
    cut = sorted(dist, key=_sort_key)[q - 1]
    inside = [i for i, dd in enumerate(dist) if dd < cut]
    tie = [i for i, dd in enumerate(dist) if dd == cut]
    left = q - len(inside)
    total = sum(values[i] for i in inside)
    if left > 0:
        total += left * sum(values[i] for i in tie) / len(tie)
    weight = np.zeros(len(values))
    for i in inside:
        weight[i] = 1 / q
    for i in tie:
        weight[i] = left / len(tie) / q
    return total / q, weight


def _coordinatewise(x, w, fn):
    xp, idx = _present(x, w)
    d = xp.shape[1]
    out, weight = np.zeros(d), np.zeros(len(idx))
    for j in range(d):
        value, share = fn(list(xp[:, j]))
        out[j] = value
        weight += share
    return out, _scatter(len(w), idx, weight / d)


def ref_mean(x, w):
    w = np.asarray(w, np.float64)
    if w.sum() == 0:  # no present row: no update
        return np.zeros(np.shape(x)[1]), np.zeros(len(w))
    share = w / w.sum()
    return sum(share[i] * np.asarray(x[i], np.float64) for i in range(len(w)) if w[i] > 0), share


def ref_median(x, w):
    return _coordinatewise(x, w, median_1d)


def ref_trimmed_mean(x, w, beta=0.1):
    m = int(np.sum(np.asarray(w) > 0))
    k = min(int(math.floor(beta * m)), (m - 1) // 2)
    return _coordinatewise(x, w, lambda v: trimmed_1d(v, k))


def ref_meamed(x, w, f=0):
    m = int(np.sum(np.asarray(w) > 0))
    return _coordinatewise(x, w, lambda v: closest_1d(v, median_1d(v)[0], max(m - f, 1)))


def _sq_dist(a, b):
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return math.inf
    return float(np.sum((a - b) ** 2))


def _finite(row):
    return bool(np.all(np.isfinite(row)))


def krum_scores(xp, f, among=None):
    """Blanchard et al.: the sum of squared distances to the ``k = max(m - f - 2, 1)``
    nearest others; with fewer others (a lone row) the sum is over those there are."""
    m = len(xp) if among is None else len(among)
    among = list(range(len(xp))) if among is None else among
    k = max(m - f - 2, 1)
    scores = {}
    for i in among:
        if not np.all(np.isfinite(xp[i])):
            scores[i] = math.inf
            continue
        dists = sorted(_sq_dist(xp[i], xp[j]) for j in among if j != i)
        scores[i] = sum(dists[:k])
    return scores


def ref_krum(x, w, f=0):
    """The lowest-scoring finite row (ties to the lowest index); 0 if there is none."""
    xp, idx = _present(x, w)
    scores = krum_scores(xp, f)
    candidates = [i for i in scores if _finite(xp[i])]
    weight = np.zeros(len(idx))
    if not candidates:
        return np.zeros(xp.shape[1]), _scatter(len(w), idx, weight)
    best = min(candidates, key=lambda i: (scores[i], i))
    weight[best] = 1
    return xp[best], _scatter(len(w), idx, weight)


def ref_multi_krum(x, w, f=0, m=None):
    """The mean of the ``q`` lowest-scoring finite rows (fewer if fewer are finite)."""
    xp, idx = _present(x, w)
    scores = krum_scores(xp, f)
    q = max(len(xp) - f, 1) if m is None else min(m, len(xp))
    candidates = [i for i in scores if _finite(xp[i])]
    chosen = sorted(candidates, key=lambda i: (scores[i], i))[:q]
    weight = np.zeros(len(idx))
    if not chosen:
        return np.zeros(xp.shape[1]), _scatter(len(w), idx, weight)
    weight[chosen] = 1 / len(chosen)
    return np.mean(xp[chosen], axis=0), _scatter(len(w), idx, weight)


def ref_bulyan(x, w, f=0):
    xp, idx = _present(x, w)
    left, chosen = list(range(len(xp))), []
    for _ in range(max(len(xp) - 2 * f, 1)):
        scores = krum_scores(xp, f, among=left)
        candidates = [i for i in left if _finite(xp[i])]
        if not candidates:
            break
        best = min(candidates, key=lambda i: (scores[i], i))
        chosen.append(best)
        left.remove(best)
    chosen.sort()
    beta = max(len(chosen) - 2 * f, 1)
    sub = xp[chosen]
    out, wsub = _coordinatewise(
        sub, np.ones(len(chosen)), lambda v: closest_1d(v, median_1d(v)[0], beta)
    )
    weight = np.zeros(len(idx))
    weight[chosen] = wsub
    return out, _scatter(len(w), idx, weight)


def ref_geometric_median(x, w, iters=10, nu=1e-6):
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    ok = [i for i in range(len(w)) if w[i] > 0 and np.all(np.isfinite(x[i]))]
    alpha = np.zeros(len(w))
    alpha[ok] = w[ok] / w[ok].sum()
    v = sum(alpha[i] * x[i] for i in ok)
    beta = alpha.copy()
    for _ in range(iters):
        beta = np.zeros(len(w))
        for i in ok:
            beta[i] = alpha[i] / max(nu, np.linalg.norm(v - x[i]))
        beta /= beta.sum()
        v = sum(beta[i] * x[i] for i in ok)
    return v, beta


def _clip(norm, tau):
    return min(1.0, tau / norm) if math.isfinite(norm) and norm > 0 else (1.0 if norm == 0 else 0)


def ref_centered_clipping(x, w, tau=1.0, iters=1, prev=None):
    x = np.asarray(x, np.float64)
    n, d = x.shape
    present = [i for i in range(n) if w[i] > 0]
    v = np.zeros(d) if prev is None else np.asarray(prev, np.float64)
    coef = np.zeros(n)  # coefficient of each row in v
    for _ in range(iters):
        c = np.zeros(n)
        for i in present:
            if np.all(np.isfinite(x[i])):
                c[i] = _clip(np.linalg.norm(x[i] - v), tau) / len(present)
        v = v + sum(c[i] * (x[i] - v) for i in present if c[i] > 0)
        coef = (1 - c.sum()) * coef + c
    return v, coef


def ref_norm_bound(x, w, max_norm=1.0):
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    coef = np.zeros(len(w))
    for i in range(len(w)):
        if w[i] > 0 and np.all(np.isfinite(x[i])):
            coef[i] = w[i] / w.sum() * _clip(np.linalg.norm(x[i]), max_norm)
    return sum(coef[i] * x[i] for i in range(len(w)) if coef[i] > 0), coef


def ref_dnc(x, w, f=0, c=1.0, cols_per_iter=()):
    x = np.asarray(x, np.float64)
    n = len(w)
    present = [i for i in range(n) if w[i] > 0]
    removed = min(int(c * f), len(present) - 1)  # one present row always stays
    good = set(present)
    for cols in cols_per_iter:
        ok = [i for i in present if np.all(np.isfinite(x[i]))]
        sub = x[ok][:, cols]
        centred = sub - sub.mean(axis=0)
        top = np.linalg.svd(centred, full_matrices=False)[2][0]
        score = {i: math.inf for i in present}
        for row, i in enumerate(ok):
            score[i] = float(centred[row] @ top) ** 2
        worst = sorted(present, key=lambda i: (-score[i], i))[:removed]
        good -= set(worst)
    good = sorted(good)
    weight = np.zeros(n)
    if not good:  # the iterations removed every row between them
        return np.zeros(x.shape[1]), weight
    weight[good] = 1 / len(good)
    return x[good].mean(axis=0), weight


def ref_foolsgold(x, w, kappa=1.0, history=None):
    x = np.asarray(x, np.float64)
    n = len(w)
    hist = np.zeros_like(x) if history is None else np.array(history, np.float64)
    ok = [i for i in range(n) if w[i] > 0 and np.all(np.isfinite(x[i]))]
    for i in ok:
        hist[i] += x[i]
    cs = np.full((n, n), -np.inf)
    for i in ok:
        for j in ok:
            if i == j:
                cs[i, j] = 0.0
            else:
                ni, nj = np.linalg.norm(hist[i]), np.linalg.norm(hist[j])
                cs[i, j] = hist[i] @ hist[j] / (ni * nj) if ni > 0 and nj > 0 else 0.0
    v = cs.max(axis=1)
    for i in ok:
        for j in ok:
            if i != j and v[j] > v[i]:
                cs[i, j] *= v[i] / v[j]
    alpha = np.zeros(n)
    for i in ok:
        alpha[i] = min(max(1 - cs[i].max(), 0.0), 1.0)
    if alpha.max() > 0:
        alpha /= alpha.max()
    for i in ok:
        a = 0.99 if alpha[i] == 1 else alpha[i]
        alpha[i] = 0.0 if a == 0 else min(max(kappa * (math.log(a / (1 - a)) + 0.5), 0.0), 1.0)
    share = alpha / alpha.sum() if alpha.sum() > 0 else alpha
    return sum((share[i] * x[i] for i in ok), np.zeros(x.shape[1])), share


def ref_largest_cluster(feats, ok, iters=20):
    n = len(feats)
    m = len(ok)
    kth = min(max((3 * m) // 10, 1), n) - 1
    dists = {i: sorted(np.linalg.norm(feats[i] - feats[j]) for j in ok) for i in ok}
    width = max(sum(dists[i][kth] if kth < m else math.inf for i in ok) / m, 1e-6)
    z = {i: feats[i].copy() for i in ok}
    for _ in range(iters):
        for i in ok:
            near = [j for j in ok if np.linalg.norm(z[i] - feats[j]) <= width]
            if near:
                z[i] = np.mean([feats[j] for j in near], axis=0)
    counts = {i: sum(np.linalg.norm(z[i] - z[j]) <= width for j in ok) for i in ok}
    best = min(ok, key=lambda i: (-counts[i], i))
    return {j for j in ok if np.linalg.norm(z[best] - z[j]) <= width}


def ref_signguard(x, w, lower=0.1, upper=3.0, cols=None, shift_iters=20):
    x = np.asarray(x, np.float64)
    n = len(w)
    ok = [i for i in range(n) if w[i] > 0 and np.all(np.isfinite(x[i]))]
    norms = {i: np.linalg.norm(x[i]) for i in ok}
    med = float(np.median([norms[i] for i in ok]))
    by_norm = {i for i in ok if lower <= norms[i] / med <= upper}
    sub = x[:, cols]
    feats = np.stack([(sub > 0).mean(1), (sub == 0).mean(1), (sub < 0).mean(1)], 1)
    chosen = sorted(by_norm & ref_largest_cluster(feats, ok, shift_iters))
    coef = np.zeros(n)
    for i in chosen:
        coef[i] = _clip(norms[i], med) / len(chosen)
    return sum((coef[i] * x[i] for i in chosen), np.zeros(x.shape[1])), coef


# --- behaviour-based, with the linear least-squares judge of the tests ---------------------


def linear_loss(p, x, y):
    return float(np.mean((x @ p - y) ** 2))


def linear_grad(p, x, y):
    return 2 * x.T @ (x @ p - y) / len(y)


def ref_fltrust(x, w, glob, jx, jy, root_lr=0.1, steps=1):
    """Output Σ TS_i (|g0|/|x_i|) x_i / Σ TS; weight: the share of trust TS_i / Σ TS."""
    x = np.asarray(x, np.float64)
    p = np.asarray(glob, np.float64)
    for _ in range(steps):
        p = p - root_lr * linear_grad(p, jx, jy)
    root = p - glob
    rn = np.linalg.norm(root)
    coef = np.zeros(len(w))
    trust = np.zeros(len(w))
    for i in range(len(w)):
        if w[i] > 0 and np.all(np.isfinite(x[i])):
            ni = np.linalg.norm(x[i])
            trust[i] = max(0.0, x[i] @ root / (ni * rn)) if ni > 0 and rn > 0 else 0.0
    share = trust / trust.sum() if trust.sum() > 0 else trust
    for i in range(len(w)):
        if trust[i] > 0:
            coef[i] = share[i] * rn / np.linalg.norm(x[i])
    out = sum((coef[i] * x[i] for i in range(len(w)) if coef[i] > 0), np.zeros(x.shape[1]))
    return out, share


def ref_zeno(x, w, glob, jx, jy, b=0, rho=5e-4, gamma=1.0):
    x = np.asarray(x, np.float64)
    present = [i for i in range(len(w)) if w[i] > 0]
    base = linear_loss(glob, jx, jy)
    score = {
        i: base - linear_loss(glob + gamma * x[i], jx, jy) - rho * float(x[i] @ x[i])
        if _finite(x[i])
        else -math.inf  # a non-finite row ranks last, and is never kept
        for i in present
    }
    keep = sorted(present, key=lambda i: (-score[i], i))[: max(len(present) - b, 1)]
    keep = [i for i in keep if _finite(x[i])]
    weight = np.zeros(len(w))
    if not keep:
        return np.zeros(x.shape[1]), weight
    weight[keep] = 1 / len(keep)
    return x[keep].mean(axis=0), weight


def ref_loss_rejection(x, w, glob, jx, jy, f=0, metric=linear_loss):
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    w = np.where([_finite(r) for r in x], w, 0)  # non-finite rows are removed besides the f
    present = [i for i in range(len(w)) if w[i] > 0]
    with_all = metric(glob + ref_mean(x, w)[0], jx, jy)
    impact = {}
    for i in present:
        w2 = w.copy()
        w2[i] = 0
        impact[i] = with_all - metric(glob + ref_mean(x, w2)[0], jx, jy)
    drop = sorted(present, key=lambda i: (-impact[i], i))[: min(f, len(present) - 1)]
    w3 = w.copy()
    w3[drop] = 0
    return ref_mean(x, w3)


# --- pre-aggregation: (rows, weights, mix) -----------------------------------------------


def ref_nnm(x, w, f=0):
    x = np.asarray(x, np.float64)
    n = len(w)
    present = [i for i in range(n) if w[i] > 0]
    q = max(len(present) - f, 1)
    rows, mix = x.copy(), np.eye(n)  # non-finite rows pass unchanged
    for i in present:
        if not _finite(x[i]):
            continue
        near = sorted(present, key=lambda j: (_sq_dist(x[i], x[j]), j))[:q]
        near = [j for j in near if _finite(x[j])]  # fewer than q finite: those there are
        mix[i] = 0
        mix[i, near] = 1 / len(near)
        rows[i] = x[near].mean(axis=0)
    return rows, np.asarray(w, np.float64), mix


def ref_clip(x, w, clip_norm=1.0):
    x = np.asarray(x, np.float64)
    scale = np.array([_clip(np.linalg.norm(r), clip_norm) for r in x])
    return x * scale[:, None], np.asarray(w, np.float64), np.diag(scale)


# --- peer-to-peer: the judging node's own row ``me`` and each row's degree ``deg`` ----------


def peer_view(x, w):
    """The test harness's node: the present finite row of largest weight (else the
    present row of largest weight), and degrees ``floor(3 w) + 1`` (both follow a
    permutation of the rows)."""
    w = np.asarray(w, np.float64)
    usable = [i for i in range(len(w)) if w[i] > 0 and _finite(np.asarray(x[i]))]
    usable = usable or [i for i in range(len(w)) if w[i] > 0]
    me = max(usable, key=lambda i: (w[i], -i))
    return me, np.floor(3 * np.asarray(w, np.float32)).astype(np.float64) + 1


def metropolis(x, w, me, deg):
    """Metropolis–Hastings weights of node ``me``: ``1 / (1 + max(deg_me, deg_j))`` for each
    present finite neighbour, the rest on ``me``; ``deg_me`` is its count of present
    neighbours."""
    mix = np.zeros(len(w))
    deg_me = sum(1 for j in range(len(w)) if j != me and w[j] > 0)
    for j in range(len(w)):
        if j != me and w[j] > 0 and _finite(np.asarray(x[j])):
            mix[j] = 1 / (1 + max(deg_me, deg[j]))
    mix[me] = 1 - mix.sum()
    return mix


def _combination(x, coef):
    x = np.asarray(x, np.float64)
    return sum((coef[j] * x[j] for j in range(len(coef)) if coef[j] != 0), np.zeros(x.shape[1]))


def ref_gossip(x, w, me, deg):
    mix = metropolis(x, w, me, deg)
    return _combination(x, mix), mix


def ref_self_centered_clipping(x, w, me, deg, tau=1.0):
    x = np.asarray(x, np.float64)
    mix = metropolis(x, w, me, deg)
    coef = np.zeros(len(w))
    for j in range(len(w)):
        if j != me and mix[j] > 0:
            coef[j] = mix[j] * _clip(np.linalg.norm(x[j] - x[me]), tau)
    coef[me] = 1 - coef.sum()
    return _combination(x, coef), coef


def _mix_accepted(x, accepted, me, alpha):
    coef = np.zeros(len(x))
    if accepted:
        coef[accepted] = (1 - alpha) / len(accepted)
        coef[me] += alpha
    else:
        coef[me] = 1.0
    return _combination(x, coef), coef


def _neighbours(x, w, me):
    return [j for j in range(len(w)) if j != me and w[j] > 0 and _finite(np.asarray(x[j]))]


def ref_balance(x, w, me, glob, gamma=0.5, kappa=1.0, alpha=0.5, horizon=0, t=0):
    x = np.asarray(x, np.float64)
    decay = math.exp(-kappa * t / horizon) if horizon else 1.0
    limit = gamma * decay * np.linalg.norm(np.asarray(glob, np.float64) + x[me])
    accepted = [j for j in _neighbours(x, w, me) if np.linalg.norm(x[j] - x[me]) <= limit]
    return _mix_accepted(x, accepted, me, alpha)


def ref_ubar(x, w, me, glob, jx, jy, rho=0.5, alpha=0.5):
    x = np.asarray(x, np.float64)
    glob = np.asarray(glob, np.float64)
    others = _neighbours(x, w, me)
    keep = max(math.ceil(rho * len(others)), 1)
    near = sorted(others, key=lambda j: (np.linalg.norm(x[j] - x[me]), j))[:keep]
    loss = {j: linear_loss(glob + x[j], jx, jy) for j in near}
    own = linear_loss(glob + x[me], jx, jy)
    accepted = [j for j in near if loss[j] <= own]
    if not accepted and near:
        accepted = [min(near, key=lambda j: (loss[j], j))]
    return _mix_accepted(x, accepted, me, alpha)
