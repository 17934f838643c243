"""Plain float64 numpy references for the attacks, written from the papers' definitions.

Every function takes the benign rows ``h`` [k, d] the adversary knows (absent rows and,
for omniscient attacks, malicious rows already removed) and returns the crafted update.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import norm


def alie(h, n, f, z=None):
    if z is None:
        s = np.floor(n / 2 + 1) - f
        z = norm.ppf((n - s) / n)
    return h.mean(0) - z * h.std(0, ddof=1)


def ipm(h, eps):
    return -eps * h.mean(0)


def fang_interval(h, b):
    s = np.sign(h.mean(0))
    mn, mx = h.min(0), h.max(0)
    lo = np.empty(h.shape[1])
    hi = np.empty(h.shape[1])
    for j in range(h.shape[1]):
        if s[j] > 0:
            lo[j], hi[j] = (mn[j] / b, mn[j]) if mn[j] > 0 else (b * mn[j], mn[j])
        else:
            lo[j], hi[j] = (mx[j], b * mx[j]) if mx[j] > 0 else (mx[j], mx[j] / b)
    return lo, hi


def krum_index(rows, f):
    """Blanchard et al. 2017: argmin of the sum of squared distances to n-f-2 nearest."""
    n = len(rows)
    d2 = ((rows[:, None, :] - rows[None, :, :]) ** 2).sum(-1)
    k = max(n - f - 2, 1)
    scores = [np.sort(np.delete(d2[i], i))[:k].sum() for i in range(n)]
    return int(np.argmin(scores))


def pairwise(h):
    return np.sqrt(((h[:, None, :] - h[None, :, :]) ** 2).sum(-1))


def min_max_ok(h, u):
    """(max distance of u to benign rows, max benign pairwise distance)."""
    return np.linalg.norm(h - u, axis=1).max(), pairwise(h).max()


def min_sum_ok(h, u):
    return (np.linalg.norm(h - u, axis=1) ** 2).sum(), (pairwise(h) ** 2).sum(1).max()


def perturbation(h, kind):
    mu = h.mean(0)
    if kind == "std":
        return -h.std(0, ddof=1)
    if kind == "sign":
        return -np.sign(mu)
    return -mu / np.linalg.norm(mu)


def mimic_choice(h):
    """Index (into h) of the row with the largest |projection| on the top principal axis."""
    dev = h - h.mean(0)
    _, _, vt = np.linalg.svd(dev, full_matrices=False)
    return int(np.argmax(np.abs(dev @ vt[0])))


def project_l2(u, c, r):
    dist = np.linalg.norm(u - c)
    return u if dist <= r else c + (u - c) * r / dist


def cosine(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def dissensus(x, malicious, weights, me, eps):
    """Every present malicious row sends ``x_me - eps * sum_h (x_h - x_me) / #malicious``
    (h: the present honest rows); the honest rows are unchanged."""
    x = np.asarray(x, np.float64)
    here = np.asarray(weights) > 0
    honest = here & ~malicious
    pull = sum((x[h] - x[me] for h in np.flatnonzero(honest)), np.zeros(x.shape[1]))
    crafted = x[me] - eps * pull / max(int(np.sum(here & malicious)), 1)
    out = x.copy()
    out[malicious] = crafted
    return out
