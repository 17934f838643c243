"""Every registered aggregator against its float64 numpy reference, plus properties.

A rule is tested by being registered: ``CASES`` gives its example options, reference and
which properties it claims; a registered rule missing from ``CASES`` fails
``test_every_rule_has_a_case``.
"""

from __future__ import annotations

import functools
import math
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference_aggregators as ref

from fedsim import kernels as ops
from fedsim.aggregators import PRE, REGISTRY, make, reduce
from fedsim.aggregators.distance import coordinate_subset
from fedsim.registry import ConfigError
from fedsim.types import AggContext

KEY = jax.random.PRNGKey(7)


def linear_loss(p, x, y):
    return jnp.mean((x @ p - y) ** 2)


def linear_error(p, x, y):
    return jnp.mean(jnp.abs(x @ p - y) > 0.5)


class Env(NamedTuple):
    key: jax.Array
    glob: np.ndarray
    jx: np.ndarray
    jy: np.ndarray


class Case(NamedTuple):
    kw: dict  # factory options (f filled in per test as ``F``)
    ref: object  # (x, w, env, f) -> (out, weight)
    robust: bool = False  # output within the honest range when f rows are ±1e6 / NaN
    equivariant: bool = False  # translation equivariant
    subset: bool = True  # zero-weight rows == removed rows
    judge: bool = False
    exact_ties: bool = True  # equal scores in exact arithmetic are broken like the reference


def _sub_cols(key, d, b, iters):
    return [np.asarray(coordinate_subset(k, d, b)) for k in jax.random.split(key, iters)]


CASES = {
    "mean": Case({}, lambda x, w, e, f: ref.ref_mean(x, w), equivariant=True),
    "median": Case({}, lambda x, w, e, f: ref.ref_median(x, w), robust=True, equivariant=True),
    "trimmed_mean": Case(
        {"beta": 0.2},
        lambda x, w, e, f: ref.ref_trimmed_mean(x, w, 0.2),
        robust=True,
        equivariant=True,
    ),
    "meamed": Case(
        {"f": "F"}, lambda x, w, e, f: ref.ref_meamed(x, w, f), robust=True, equivariant=True
    ),
    "krum": Case(
        {"f": "F"}, lambda x, w, e, f: ref.ref_krum(x, w, f), robust=True, equivariant=True
    ),
    "multi_krum": Case(
        {"f": "F"}, lambda x, w, e, f: ref.ref_multi_krum(x, w, f), robust=True, equivariant=True
    ),
    "bulyan": Case(
        {"f": "F"}, lambda x, w, e, f: ref.ref_bulyan(x, w, f), robust=True, equivariant=True
    ),
    "geometric_median": Case(
        {"iters": 60},
        lambda x, w, e, f: ref.ref_geometric_median(x, w, 60),
        robust=True,
        equivariant=True,
    ),
    "centered_clipping": Case(
        {"tau": 1.5, "iters": 3}, lambda x, w, e, f: ref.ref_centered_clipping(x, w, 1.5, 3)
    ),
    "norm_bound": Case({"max_norm": 2.0}, lambda x, w, e, f: ref.ref_norm_bound(x, w, 2.0)),
    "dnc": Case(
        {"f": "F", "iters": 2, "sub_dim": 4},
        lambda x, w, e, f: ref.ref_dnc(x, w, f, 1.0, _sub_cols(e.key, x.shape[1], 4, 2)),
        robust=True,
        equivariant=True,
        exact_ties=False,
    ),
    "foolsgold": Case({"kappa": 1.0}, lambda x, w, e, f: ref.ref_foolsgold(x, w, 1.0)),
    "signguard": Case(
        {"coord_frac": 0.5},
        lambda x, w, e, f: ref.ref_signguard(
            x, w, cols=np.asarray(coordinate_subset(e.key, x.shape[1], math.ceil(x.shape[1] / 2)))
        ),
    ),
    "fltrust": Case(
        {"root_lr": 0.05, "steps": 2},
        lambda x, w, e, f: ref.ref_fltrust(x, w, e.glob, e.jx, e.jy, 0.05, 2),
        judge=True,
    ),
    "zeno": Case(
        {"b": "F", "rho": 1e-3},
        lambda x, w, e, f: ref.ref_zeno(x, w, e.glob, e.jx, e.jy, f, 1e-3),
        robust=True,
        judge=True,
    ),
    "loss_rejection": Case(
        {"f": "F"},
        lambda x, w, e, f: ref.ref_loss_rejection(x, w, e.glob, e.jx, e.jy, f),
        judge=True,
        exact_ties=False,
    ),
    "error_rejection": Case(
        {"f": "F", "error_fn": linear_error},
        lambda x, w, e, f: ref.ref_loss_rejection(
            x, w, e.glob, e.jx, e.jy, f, lambda p, a, b: float(np.mean(np.abs(a @ p - b) > 0.5))
        ),
        judge=True,
    ),
}


def _peer(name, kw):
    return lambda x, w, e, f: getattr(ref, f"ref_{name}")(x, w, *ref.peer_view(x, w), **kw)


# the peer-to-peer rules (run with the harness's node, ``ref.peer_view``)
CASES |= {
    "gossip": Case({}, _peer("gossip", {}), equivariant=True),
    "self_centered_clipping": Case(
        {"tau": 1.5}, _peer("self_centered_clipping", {"tau": 1.5}), equivariant=True
    ),
    "balance": Case(
        {"gamma": 2.0},
        lambda x, w, e, f: ref.ref_balance(x, w, ref.peer_view(x, w)[0], e.glob, gamma=2.0),
    ),
    "ubar": Case(
        {"rho": 0.5},
        lambda x, w, e, f: ref.ref_ubar(x, w, ref.peer_view(x, w)[0], e.glob, e.jx, e.jy),
        judge=True,
    ),
}


def peer_context(x, w):
    """``(self_index, degrees)`` of the harness's node, as ``ref.peer_view`` picks them;
    rules that are not peer-to-peer ignore both."""
    present = w > 0
    usable = present & jnp.all(jnp.isfinite(x), axis=1)
    usable = jnp.where(jnp.any(usable), usable, present)
    return jnp.argmax(jnp.where(usable, w, -jnp.inf)), jnp.floor(3 * w) + 1


def _context(glob, key, hparams, jx, jy, x, w):
    me, degrees = peer_context(x, w)
    return AggContext(glob, key, hparams, None, linear_loss, jx, jy, self_index=me, degrees=degrees)


def _options(name, f):
    return {k: (f if v == "F" else v) for k, v in CASES[name].kw.items()}


def _uses_f(name):
    return "F" in CASES[name].kw.values()


def _jitted(name, f, n_clients):
    # rules without an f share one compiled function across the tests' values of f; the
    # order statistics' path (``ops.FEW_ROWS``, patched by tests) is part of what is traced
    return _compiled(name, f if _uses_f(name) else None, n_clients, ops.FEW_ROWS)


# Order statistics count pairs up to ``ops.FEW_ROWS`` rows and run the radix select above;
# the kernel tests run both ways, and every rule built on them is checked both ways against
# its reference (``test_order_statistic_rules_by_radix_select``).
BOTH_SELECTS = pytest.mark.parametrize("few_rows", [ops.FEW_ROWS, 0], ids=["counted", "radix"])


@functools.cache
def _compiled(name, f, n_clients, few_rows):
    agg = make(name, **_options(name, f or 0))

    @jax.jit
    def run(x, w, key, glob, jx, jy, hparams):
        ctx = _context(glob, key, hparams, jx, jy, x, w)
        return agg.aggregate(x, w, agg.init(glob, n_clients), ctx)

    return run


def _env(d, seed=0):
    rng = np.random.default_rng(seed + 100)
    jx = rng.standard_normal((8, d)).astype(np.float32)
    return Env(
        KEY, rng.standard_normal(d).astype(np.float32) * 0.1, jx, jx @ np.ones(d, np.float32)
    )


def _run(name, x, w, f, env, hparams=None):
    out, _, info = _jitted(name, f, x.shape[0])(
        jnp.asarray(x, jnp.float32),
        jnp.asarray(w, jnp.float32),
        env.key,
        env.glob,
        env.jx,
        env.jy,
        hparams or {},
    )
    return np.asarray(out, np.float64), np.asarray(info.weight, np.float64)


def _matches_reference(name, x, w, f, env):
    """Assert rule ``name`` gives its reference's output and weights; returns both outputs."""
    out, weight = _run(name, x, w, f, env)
    want_out, want_weight = CASES[name].ref(x, w, env, f)
    _close(out, want_out)
    _close(weight, want_weight)
    return out, want_out


def _apply(agg, x, w, state=None, ctx=None):
    """Jitted ``agg.aggregate`` (eager op-by-op dispatch is slow)."""
    x, w = jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32)
    d = x.shape[1]
    state = agg.init(jnp.zeros(d), x.shape[0]) if state is None else state
    ctx = AggContext(jnp.zeros(d), KEY, {}) if ctx is None else ctx
    return jax.jit(agg.aggregate)(x, w, state, ctx)


def _data(n, d, seed, kind="normal"):
    rng = np.random.default_rng(seed)
    if kind == "ties":
        x = rng.integers(-2, 3, (n, d)).astype(np.float32)
    elif kind == "duplicates":
        x = rng.standard_normal((n, d)).astype(np.float32)
        x[1::3] = x[0]
    elif kind == "equal":
        x = np.tile(rng.standard_normal(d).astype(np.float32), (n, 1))
    elif kind == "zero_rows":  # nothing to clip: shrink factor 1
        x = rng.standard_normal((n, d)).astype(np.float32)
        x[[1, 4]] = 0
    else:
        x = rng.standard_normal((n, d)).astype(np.float32)
    w = rng.uniform(0.5, 2.0, n).astype(np.float32)
    w[rng.choice(n, 2, replace=False)] = 0
    x[w == 0] = np.nan  # absent rows must not matter at all
    return x, w


def test_every_rule_has_a_case():
    assert sorted(CASES) == REGISTRY.names()


SHAPES = [(11, 6, 2, 0), (11, 6, 2, 1), (15, 9, 2, 2), (11, 6, 0, 2)]
EDGES = ["ties", "duplicates", "equal", "zero_rows"]


def _close(a, b, tol=2e-4):
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", REGISTRY.names())
def test_matches_reference(name):
    for n, d, f, seed in SHAPES:
        x, w = _data(n, d, seed)
        env = _env(d, seed)
        _matches_reference(name, x, w, f, env)


@pytest.mark.parametrize("name", REGISTRY.names())
@pytest.mark.parametrize("kind", EDGES)
def test_matches_reference_at_edges(name, kind):
    if kind != "ties" and not CASES[name].exact_ties:
        pytest.skip("scores tie exactly here; float32 noise breaks the tie")
    n, d, f = 11, 6, 2
    x, w = _data(n, d, 3, kind)
    env = _env(d)
    _matches_reference(name, x, w, f, env)


@pytest.mark.parametrize("name", ["krum", "multi_krum", "meamed", "dnc"])
def test_smallest_n_for_f(name):
    n, d, f = 7, 6, 2  # n = 2f + 3
    x, w = _data(n, d, 4)
    w[:] = 1
    x = np.nan_to_num(x)
    env = _env(d)
    _matches_reference(name, x, w, f, env)


@pytest.mark.parametrize(
    "name, f", [(n, f) for n in REGISTRY.names() for f in ((2, 0) if _uses_f(n) else (2,))]
)
def test_permutation_invariance(name, f):
    x, w = _data(11, 6, 5)
    env = _env(6)
    perm = np.random.default_rng(0).permutation(11)
    out, weight = _run(name, x, w, f, env)
    out_p, weight_p = _run(name, x[perm], w[perm], f, env)
    _close(out, out_p, 1e-4)
    _close(weight[perm], weight_p, 1e-4)


@pytest.mark.parametrize("name", [n for n in REGISTRY.names() if CASES[n].equivariant])
def test_translation_equivariance(name):
    x, w = _data(11, 6, 6)
    shift = np.linspace(-3, 3, 6).astype(np.float32)
    env = _env(6)
    out, _ = _run(name, x, w, 2, env)
    out_s, _ = _run(name, x + shift, w, 2, env)
    _close(out_s, out + shift, 1e-3)


@pytest.mark.parametrize("name", REGISTRY.names())
def test_matches_reference_with_non_finite_rows(name):
    # more non-finite rows (NaN, +inf, -inf entries) than f: no rule may select one
    env = _env(6)
    x, w = _adversarial("nan", env)
    _matches_reference(name, x, w, 2, env)


@pytest.mark.parametrize("name", [n for n in REGISTRY.names() if CASES[n].subset])
def test_zero_weight_rows_are_removed_rows(name):
    x, w = _data(15, 9, 7)
    keep = w > 0
    env = _env(9)
    out, weight = _run(name, x, w, 2, env)
    out_s, weight_s = _run(name, x[keep], w[keep], 2, env)
    _close(out, out_s, 1e-4)
    _close(weight[keep], weight_s, 1e-4)
    assert np.all(weight[~keep] == 0)


@pytest.mark.parametrize("name", [n for n in REGISTRY.names() if CASES[n].robust])
@pytest.mark.parametrize("attack", [1e6, -1e6, np.nan])
def test_attackers_stay_outside(name, attack):
    n, d, f = 15, 9, 2
    x, w = _data(n, d, 8)
    w[:] = 1
    x = np.random.default_rng(8).standard_normal((n, d)).astype(np.float32)
    x[:f] = attack
    out, _ = _run(name, x, w, f, _env(d))
    honest = x[f:]
    assert np.all(np.isfinite(out))
    assert np.all(out >= honest.min(0) - 1e-4) and np.all(out <= honest.max(0) + 1e-4)


@pytest.mark.parametrize("name", [n for n in REGISTRY.names() if REGISTRY.traced(n)])
def test_traced_options_do_not_retrace(name):
    traces = []
    agg = make(name, **_options(name, 2))
    env = _env(6)

    @jax.jit
    def run(x, w, hparams):
        traces.append(1)
        ctx = _context(env.glob, env.key, hparams, env.jx, env.jy, x, w)
        return agg.aggregate(x, w, agg.init(env.glob, x.shape[0]), ctx)[0]

    x, w = _data(11, 6, 9)
    for value in (0.1, 0.3):
        hp = {k: jnp.float32(value) for k in REGISTRY.traced(name)}
        run(jnp.asarray(x), jnp.asarray(w), hp)
    assert len(traces) == 1


def test_traced_option_is_used():
    x, w = _data(11, 6, 10)
    env = _env(6)
    a, _ = _run("trimmed_mean", x, w, 2, env, {"beta": jnp.float32(0.0)})
    b, _ = _run("trimmed_mean", x, w, 2, env, {"beta": jnp.float32(0.2)})
    _close(a, ref.ref_trimmed_mean(x, w, 0.0)[0])
    _close(b, ref.ref_trimmed_mean(x, w, 0.2)[0])


def test_centered_clipping_keeps_previous_aggregate():
    x, w = _data(11, 6, 11)
    agg = make("centered_clipping", tau=1.0)
    out1, state, _ = _apply(agg, x, w)
    out2, _, info = _apply(agg, x, w, state)
    want, want_w = ref.ref_centered_clipping(x, w, 1.0, 1, prev=np.asarray(out1))
    _close(np.asarray(out2), want)
    _close(np.asarray(info.weight), want_w)


def test_foolsgold_history_follows_client_ids():
    x, w = _data(11, 6, 12)
    w[:] = 1
    x = np.nan_to_num(x)
    agg = make("foolsgold")
    state = agg.init(jnp.zeros(6), 20)
    ids = jnp.arange(11) + 5
    ctx = AggContext(jnp.zeros(6), KEY, {}, ids)
    _, state, _ = _apply(agg, x, w, state, ctx)
    out, state, info = _apply(agg, x[::-1], w, state, ctx)
    hist = np.asarray(state)[5:16]
    np.testing.assert_allclose(hist, x + x[::-1], rtol=1e-6)
    want, want_w = ref.ref_foolsgold(x[::-1], w, history=x)
    _close(np.asarray(out), want)
    _close(np.asarray(info.weight), want_w)


# --- corners: few present rows, weights as shares, distances near convergence --------------

ORDER_STATISTIC_RULES = ["median", "trimmed_mean", "meamed", "bulyan", "signguard"]


@pytest.mark.parametrize("name", ORDER_STATISTIC_RULES)
def test_order_statistic_rules_by_radix_select(monkeypatch, name):
    # the tests' few rows go through the pair counting; the same cases by radix select
    monkeypatch.setattr(ops, "FEW_ROWS", 0)
    cases = [(_data(n, d, seed), f, _env(d, seed)) for n, d, f, seed in SHAPES]
    cases += [(_data(11, 6, 3, kind), 2, _env(6)) for kind in EDGES]
    cases.append((_adversarial("nan", _env(6)), 2, _env(6)))
    for (x, w), f, env in cases:
        _matches_reference(name, x, w, f, env)


@BOTH_SELECTS
def test_median_of_a_nan_middle_row_is_nan(monkeypatch, few_rows):
    # NaN sorts last: with half the present rows NaN in a column the upper middle value is
    # NaN, so is the median (it was +inf: the value above the lower middle was looked for
    # among the finite values only)
    monkeypatch.setattr(ops, "FEW_ROWS", few_rows)
    x = np.random.default_rng(30).standard_normal((6, 3)).astype(np.float32)
    x[[1, 4, 5], 0] = np.nan
    w = np.ones(6, np.float32)
    out, want_out = _matches_reference("median", x, w, 0, _env(3))
    assert np.isnan(out[0]) and np.isnan(want_out[0])


@pytest.mark.parametrize(
    "name, m, f",
    [
        (n, m, f)
        for n in REGISTRY.names()
        for m in (1, 2, 3)
        for f in ((0, 2) if _uses_f(n) else (0,))
    ],
)
def test_few_present_rows(name, m, f):
    # dropouts or a small peer-to-peer neighbourhood: the counts derived from m meet their
    # clamps (Krum's neighbours, Bulyan's θ and β, DnC's and the rejections' removals)
    if name == "dnc" and m == 2 and f > 0:
        pytest.skip("the two centred rows score exactly alike; float32 noise breaks the tie")
    x = np.random.default_rng(24).standard_normal((11, 6)).astype(np.float32)
    w = np.zeros(11, np.float32)
    w[[3, 7, 9][:m]] = [1.5, 0.7, 1.0][:m]
    x[w == 0] = np.nan
    env = _env(6)
    _matches_reference(name, x, w, f, env)


# With one present row the output is that row, weight one-hot, except where the rule's
# definition says otherwise (then the reference's value is checked instead):
LONE_ROW_EXCEPTIONS = {
    "centered_clipping": "clips around its previous aggregate (zeros at first): τ-steps to x",
    "norm_bound": "scales the row to norm at most max_norm",
    "fltrust": "rescales the row to |g0|, and drops it if its cosine with g0 is <= 0",
}


@pytest.mark.parametrize("name", REGISTRY.names())
def test_one_present_row(name):
    x = np.random.default_rng(25).standard_normal((11, 6)).astype(np.float32)
    w = np.zeros(11, np.float32)
    w[3] = 1.3
    x[w == 0] = np.nan
    env = _env(6)
    lone = np.zeros(11)
    lone[3] = 1
    for f in (0, 2) if _uses_f(name) else (0,):
        out, weight = _run(name, x, w, f, env)
        want_out, want_weight = CASES[name].ref(x, w, env, f)
        if name not in LONE_ROW_EXCEPTIONS:
            _close(want_out, x[3])  # the reference follows the same convention
            _close(want_weight, lone)
        _close(out, want_out)
        _close(weight, want_weight)


def _stage_kw(stage):
    return {"f": 2} if stage == "nnm" else {}


@pytest.mark.parametrize("stage", ["nnm", "bucketing", "clip"])
def test_one_present_row_through_stages(stage):
    x = np.random.default_rng(25).standard_normal((11, 6)).astype(np.float32)
    w = np.zeros(11, np.float32)
    w[3] = 1.3
    x[w == 0] = np.nan
    x[3] *= 3 / np.linalg.norm(x[3])
    out, _, info = _apply(make("mean", pre=[stage], **_stage_kw(stage)), x, w)
    scale = 1 / 3 if stage == "clip" else 1  # clip (clip_norm=1) scales the row to norm 1
    _close(np.asarray(out), x[3] * scale)
    _close(np.asarray(info.weight), np.eye(11)[3] * scale)


def test_bulyan_without_f_is_the_mean():
    # f = 0 (its default): θ = β = m, every present row is selected and kept
    x = np.random.default_rng(26).standard_normal((6, 5)).astype(np.float32)
    w = np.ones(6, np.float32)
    env = _env(5)
    _close(ref.ref_bulyan(x, w, 0)[0], x.mean(0))
    for rows in (x, x[::-1]):
        out, weight = _run("bulyan", rows, w, 0, env)
        _close(out, x.mean(0))
        _close(weight, np.full(6, 1 / 6))


def test_meamed_of_two_rows_is_their_mean():
    # q = m - f = 1 of 2 values: both are equally close to their median, a tie entered
    # through their average; measured from the rounded midpoint, float32 picked one
    x = np.random.default_rng(29).standard_normal((3, 300)).astype(np.float32)
    out, _, info = _apply(make("meamed", f=1), x, np.array([1, 1, 0], np.float32))
    _close(np.asarray(out), (x[0].astype(np.float64) + x[1]) / 2, 1e-6)
    _close(np.asarray(info.weight), [0.5, 0.5, 0], 1e-6)


def _root_update(env, root_lr=0.05, steps=2):
    p = env.glob.astype(np.float64)
    for _ in range(steps):
        p = p - root_lr * ref.linear_grad(p, env.jx, env.jy)
    return p - env.glob


def _adversarial(kind, env):
    """Rows chosen to break weight bookkeeping; 11 rows of 6, rows 0 and 10 absent."""
    rng = np.random.default_rng(27)
    x = rng.standard_normal((11, 6)).astype(np.float32)
    w = rng.uniform(0.5, 2.0, 11).astype(np.float32)
    root = _root_update(env)
    if kind == "tiny":  # tiny norms, along the root update (FLTrust trusts them fully)
        x[4] = 1e-8 * root / np.linalg.norm(root)
        x[5] = 1e-8 * x[5] / np.linalg.norm(x[5])
        x[6] = 0
    elif kind == "huge":  # squared norms overflow float32; row 6's products too
        x[4], x[5], x[6] = 1e20, -1e20 * root / np.linalg.norm(root), 3e38
    elif kind == "nan":
        x[4], x[5, 2], x[6, 0] = np.nan, np.inf, -np.inf
    elif kind == "duplicates":
        x[1:7] = x[1]
    elif kind == "one":
        w[:] = 0
        w[3] = 1.0
    w[[0, 10]] = 0
    x[w == 0] = np.nan
    return x, w


ADVERSARIAL = ["tiny", "huge", "nan", "duplicates", "one"]


def _assert_shares(weight, w):
    assert np.all(np.isfinite(weight)) and np.all(weight >= 0), weight
    assert weight.sum() <= 1 + 1e-6, weight
    assert np.all(weight[w == 0] == 0), weight


@pytest.mark.parametrize("kind", ADVERSARIAL)
@pytest.mark.parametrize("name", REGISTRY.names())
def test_weights_are_shares(name, kind):
    # AggInfo.weight feeds malicious_weight / honest_weight: shares of the aggregate
    env = _env(6)
    x, w = _adversarial(kind, env)
    _, weight = _run(name, x, w, 2, env)
    _assert_shares(weight, w)


@pytest.mark.parametrize("stage", ["nnm", "bucketing", "clip"])
def test_weights_are_shares_through_stages(stage):
    env = _env(6)
    agg = make("median", pre=[stage], **_stage_kw(stage))
    for kind in ADVERSARIAL:
        x, w = _adversarial(kind, env)
        _, _, info = _apply(agg, x, w)
        _assert_shares(np.asarray(info.weight, np.float64), w)


def test_fltrust_gives_no_trust_to_a_row_overflowing_float32():
    # its cosine is inf / inf: a NaN trust made every share 0 and the output 0
    env = _env(6)
    x, w = _adversarial("duplicates", env)
    x[1:7] = np.random.default_rng(30).standard_normal((6, 6))
    out, weight = _run("fltrust", x, w, 2, env)
    x[5] = 3e38
    out_huge, weight_huge = _run("fltrust", x, w, 2, env)
    _close(out_huge, out)
    _close(weight_huge, weight)
    assert weight[5] == 0 and weight.sum() > 0.99


def test_nnm_mixes_only_finite_present_rows():
    # 3 non-finite rows for f = 2: a row's m - f nearest include one at +inf, which was
    # the lowest-index row at +inf, an absent one here (mixed in as 0)
    x, w = _adversarial("nan", _env(6))
    stage = PRE.make("nnm", f=2)
    ctx = AggContext(jnp.zeros(6), KEY, {})
    rows, _, _, mix = jax.jit(stage.apply)(jnp.asarray(x), jnp.asarray(w), (), ctx)
    want_rows, _, want_mix = ref.ref_nnm(x, w, 2)
    finite = np.all(np.isfinite(x), axis=1)
    _close(np.asarray(mix), want_mix)
    _close(np.asarray(rows)[finite], want_rows[finite])


def _near_convergence():
    """8 rows within ~1e-4 of a point of norm 100, where |x|² - 2x·v + |v|² cancels."""
    rng = np.random.default_rng(28)
    v = rng.standard_normal(50)
    v *= 100 / np.linalg.norm(v)
    x = (v + 1e-4 * rng.standard_normal((8, 50))).astype(np.float32)
    return x, np.ones(8, np.float32)


def test_distances_near_convergence():
    from fedsim.aggregators.distance import distances_to

    x, _ = _near_convergence()
    center = x.mean(0) + np.float32(1e-5)
    got = np.asarray(jax.jit(distances_to)(jnp.asarray(x), jnp.asarray(center)))
    want = np.linalg.norm(x.astype(np.float64) - center.astype(np.float64), axis=1)
    np.testing.assert_allclose(got, want, rtol=1e-3)


def test_geometric_median_near_convergence():
    x, w = _near_convergence()
    env = _env(50)
    out, weight = _run("geometric_median", x, w, 0, env)
    want, want_weight = ref.ref_geometric_median(x, w, 60)
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-5)  # the rows spread ~1e-4
    np.testing.assert_allclose(weight, want_weight, rtol=1e-2)


def test_centered_clipping_near_convergence():
    x, w = _near_convergence()
    prev = x.mean(0) + np.float32(1e-5)
    agg = make("centered_clipping", tau=1e-4)
    out, _, info = _apply(agg, x, w, jnp.asarray(prev))
    want, want_weight = ref.ref_centered_clipping(x, w, 1e-4, 1, prev=prev)
    np.testing.assert_allclose(np.asarray(out), want, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(info.weight), want_weight, rtol=1e-2)


# --- static checks -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, kw, n",
    [
        ("krum", {"f": 2}, 6),
        ("multi_krum", {"f": 3}, 8),
        ("bulyan", {"f": 2}, 10),
        ("meamed", {"f": 3}, 6),
    ],
)
def test_bounds_are_config_errors(name, kw, n):
    with pytest.raises(ConfigError, match="needs n"):
        reduce(name, jnp.ones((n, 3)), **kw)


def test_invalid_options_are_config_errors():
    with pytest.raises(ConfigError, match="beta"):
        make("trimmed_mean", beta=0.5)
    with pytest.raises(ConfigError, match="unknown option"):
        make("median", pre=["nnm"], gamma=3)
    with pytest.raises(ConfigError, match="unknown pre-aggregation"):
        make("median", pre=["nope"])


@pytest.mark.parametrize("name", [n for n in REGISTRY.names() if CASES[n].judge])
def test_behaviour_rules_need_a_judge(name):
    with pytest.raises(ConfigError, match="needs ctx.loss_fn"):
        reduce(name, jnp.ones((5, 3)), **_options(name, 1))


def test_error_rejection_needs_error_fn():
    env = _env(3)
    ctx = AggContext(jnp.zeros(3), KEY, {}, None, linear_loss, env.jx[:, :3], env.jy)
    with pytest.raises(ConfigError, match="error_fn"):
        reduce("error_rejection", jnp.ones((5, 3)), ctx=ctx, f=1)


# --- pre-aggregation and composition ------------------------------------------------------


def test_every_stage_composes_with_mean():
    x, w = _data(11, 6, 13)
    for stage in PRE.names():
        agg = make("mean", pre=[stage], **({"f": 2} if stage == "nnm" else {}))
        out, _, info = _apply(agg, x, w)
        assert np.all(np.isfinite(np.asarray(out))), stage
        assert np.all(np.asarray(info.weight)[w == 0] == 0), stage


@pytest.mark.parametrize(
    "stage, reference", [("nnm", lambda x, w: ref.ref_nnm(x, w, 2)), ("clip", ref.ref_clip)]
)
def test_stage_then_trimmed_mean_matches_reference(stage, reference):
    x, w = _data(11, 6, 14)
    agg = make("trimmed_mean", beta=0.2, pre=[stage], **({"f": 2} if stage == "nnm" else {}))
    out, _, info = _apply(agg, x, w)
    rows, w2, mix = reference(np.where(w[:, None] > 0, x, 0), w)
    want, rule_w = ref.ref_trimmed_mean(rows, w2, 0.2)
    _close(np.asarray(out), want)
    _close(np.asarray(info.weight), rule_w @ mix)


def test_stage_options_by_mapping():
    x, w = _data(11, 6, 15)
    x = np.nan_to_num(x)
    a, _, _ = _apply(make("median", pre=[{"name": "nnm", "f": 3}]), x, w)
    rows, w2, _ = ref.ref_nnm(x, w, 3)
    _close(np.asarray(a), ref.ref_median(rows, w2)[0])


def test_bucketing_keeps_the_mean():
    x, w = _data(12, 6, 16)
    w[:] = 1
    x = np.nan_to_num(x)
    agg = make("mean", pre=[{"name": "bucketing", "s": 3}])
    out, _, info = _apply(agg, x, w)
    _close(np.asarray(out), x.mean(0))
    _close(np.asarray(info.weight), np.full(12, 1 / 12))


def test_bucketing_spoils_only_its_bucket():
    x, w = _data(12, 6, 17)
    w[:] = 1
    x = np.nan_to_num(x)
    x[0] = np.nan
    agg = make("median", pre=[{"name": "bucketing", "s": 2}])
    out, _, _ = _apply(agg, x, w)
    assert np.all(np.isfinite(np.asarray(out)))


# --- kernels --------------------------------------------------------------------------------


@BOTH_SELECTS
def test_radix_select_matches_sort_on_special_values(monkeypatch, few_rows):
    monkeypatch.setattr(ops, "FEW_ROWS", few_rows)
    rng = np.random.default_rng(18)
    # no subnormals: XLA on CPU flushes them to zero
    special = np.array(
        [0.0, -0.0, np.inf, -np.inf, 2e-38, -2e-38, 3.4e38, -3.4e38, 1.0], np.float32
    )
    x = rng.choice(special, (9, 700)).astype(np.float32)
    x[:, :50] = rng.standard_normal((9, 50))
    present = jnp.ones(9, bool)
    got = np.asarray(ops.select(jnp.asarray(x), present, jnp.arange(9)))
    np.testing.assert_array_equal(got, np.sort(x, axis=0))


@BOTH_SELECTS
@pytest.mark.parametrize("n", [1, 7, 16, 101, 1000, 9001])
def test_radix_select_any_row_count(monkeypatch, n, few_rows):
    monkeypatch.setattr(ops, "FEW_ROWS", few_rows)
    # row counts that need padding, and one past 127 groups (wider partial counts)
    rng = np.random.default_rng(n)
    x = rng.standard_normal((n, 5)).astype(np.float32)
    x[rng.random((n, 5)) < 0.3] = 1.0  # ties
    present = jnp.asarray(rng.random(n) < 0.9).at[0].set(True)
    want = np.sort(np.where(np.asarray(present)[:, None], x, np.nan), axis=0)
    rank = jnp.asarray(sorted({0, n // 5, n // 2, int(present.sum()) - 1}))
    got = np.asarray(ops.select(jnp.asarray(x), present, rank))
    np.testing.assert_array_equal(got, want[np.asarray(rank)])


@pytest.mark.parametrize("n", range(1, 13))
def test_sorting_network_sorts_every_zero_one_input(n):
    # the zero-one principle: a comparator network that sorts every 0/1 input sorts all
    pairs = ops.sorting_network(n)
    assert all(0 <= a < b < n for a, b in pairs)
    for code in range(2**n):
        wires = [(code >> i) & 1 for i in range(n)]
        for a, b in pairs:
            wires[a], wires[b] = min(wires[a], wires[b]), max(wires[a], wires[b])
        assert wires == sorted(wires), (n, code)


def test_selection_network_keeps_only_what_its_ranks_read():
    full = ops.sorting_network(9)
    pruned = ops.selection_network(9, (4, 5))
    ops_full, ops_pruned = 2 * len(full), sum(lo + hi for _, _, lo, hi in pruned)
    assert ops_pruned < ops_full
    # the kept exchanges are a subsequence of the network's
    rest = iter(full)
    assert all(any(pair == (a, b) for pair in rest) for a, b, _, _ in pruned)
    rng = np.random.default_rng(3)
    for _ in range(200):
        wires = list(rng.integers(0, 4, 9))
        want = sorted(wires)
        for a, b, keep_min, keep_max in pruned:
            wires[a], wires[b] = (
                min(wires[a], wires[b]) if keep_min else wires[a],
                max(wires[a], wires[b]) if keep_max else wires[b],
            )
        assert (wires[4], wires[5]) == (want[4], want[5])


def _middle_reference(x, present):
    """float64 numpy: present values of ranks (m-1)//2 and m//2 per column, NaN last
    (NaN for both when no row is present)."""
    rows = x[present].astype(np.float64)
    m = rows.shape[0]
    if m == 0:
        return np.full(x.shape[1], np.nan), np.full(x.shape[1], np.nan)
    s = np.sort(rows, axis=0)  # numpy sorts NaN last
    return s[(m - 1) // 2], s[m // 2]


@pytest.mark.parametrize("n", [1, 2, 3, 4, 8, 9, 10, 17, 32])
def test_middle_values_of_few_rows_by_network_match_sort(n):
    rng = np.random.default_rng(n)
    middle = jax.jit(ops.middle_values)
    for share in (1.0, 0.8, 0.5, 0.2, 0.0):  # every row present .. none
        x = rng.integers(-3, 4, (n, 60)).astype(np.float32)  # ties
        x[rng.random((n, 60)) < 0.1] = np.nan
        x[0, :3] = [np.inf, -0.0, 0.0]
        x[-1, 2] = -0.0
        present = rng.random(n) < share
        lo, hi = middle(jnp.asarray(x), jnp.asarray(present), jnp.int32(present.sum()))
        want_lo, want_hi = _middle_reference(x, present)
        np.testing.assert_array_equal(np.asarray(lo), want_lo.astype(np.float32))
        np.testing.assert_array_equal(np.asarray(hi), want_hi.astype(np.float32))


def _called(hlo: str, name: str) -> str:
    """The text of computation ``name`` in compiled HLO and of every computation it calls."""
    bodies = dict(re.findall(r"^%(\S+) \(.*?\n(.*?)^}", hlo, re.M | re.S))
    seen, todo, text = set(), [name], ""
    while todo:
        current = todo.pop()
        if current in seen or current not in bodies:
            continue
        seen.add(current)
        text += bodies[current]
        todo += re.findall(r"(?:calls|body|to_apply)=%([\w.\-]+)", bodies[current])
    return text


def test_middle_values_network_runs_inside_its_loop():
    # the one-trip loop exists to materialise the network once; hoisted out of the loop
    # (as XLA does with a loop-invariant body) it would be fused into every consumer
    n = 9
    present = jnp.ones(n, bool)
    hlo = (
        jax.jit(lambda x: ops.middle_values(x, present, jnp.int32(n)))
        .lower(jnp.zeros((n, 128)))
        .compile()
        .as_text()
    )
    bodies = re.findall(r"while\(.*?body=%([\w.\-]+)", hlo)
    assert bodies, "no loop"
    assert any(_called(hlo, body).count("minimum(") >= 5 for body in bodies)


@pytest.mark.parametrize("n", [7, 100])
def test_select_wider_than_a_block_matches_sort(n):
    # more columns than select_width(n), not a multiple of it: blocks, the last one shifted
    d = 3 * ops.select_width(n) + 5
    rng = np.random.default_rng(n + 1)
    x = rng.standard_normal((n, d)).astype(np.float32)
    x[rng.random((n, d)) < 0.2] = 0.5  # ties
    x[1, :40] = np.nan
    present = jnp.asarray(rng.random(n) < 0.8).at[0].set(True).at[1].set(True)
    want = np.sort(np.where(np.asarray(present)[:, None], x, np.nan), axis=0)
    rank = jnp.asarray([0, int(present.sum()) // 2, int(present.sum()) - 1])
    got = np.asarray(jax.jit(ops.select)(jnp.asarray(x), present, rank))
    np.testing.assert_array_equal(got, want[np.asarray(rank)])


def test_select_width_is_a_power_of_two_narrowing_with_rows():
    counts = [1, 2, 9, 50, 100, 1000, 10_000, 10**6]
    widths = [ops.select_width(n) for n in counts]
    assert all(16 <= w <= 8192 and w & (w - 1) == 0 for w in widths)
    assert widths == sorted(widths, reverse=True) and widths[0] > widths[-1]


def test_select_width_off_the_cpu_keeps_the_wide_blocks_measured_there(monkeypatch):
    monkeypatch.setattr(ops, "_on_cpu", lambda: False)
    assert [ops.select_width(n) for n in (20, 1000)] == [ops.block_width(20), 1024]


# block None: the rules' own width (``select_width``); none divides d, so the last block
# is shifted left over columns an earlier block already covered
@pytest.mark.parametrize("n, block", [(7, 512), (7, None), (1000, None)])
def test_order_statistics_by_blocks_cover_every_column(n, block):
    d = 1300
    width = block or ops.select_width(n)
    assert d % width != 0 and d > width
    x, _ = _data(n, d, 19)
    x = np.nan_to_num(x)
    present = jnp.ones(n, bool)
    m, k = jnp.int32(n), jnp.int32(n // 10)
    median = jax.jit(
        lambda a: ops.coordinatewise(lambda b, p: ops.median_block(b, p, m), a, present, block)
    )
    trimmed = jax.jit(
        lambda a: ops.coordinatewise(lambda b, p: ops.trimmed_block(b, p, m, k), a, present, block)
    )
    out, weight = median(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(out), np.median(x, axis=0))
    np.testing.assert_allclose(np.asarray(weight).sum(), 1.0, rtol=1e-5)
    out, weight = trimmed(jnp.asarray(x))
    kept = np.sort(x.astype(np.float64), axis=0)[n // 10 : n - n // 10]
    np.testing.assert_allclose(np.asarray(out), kept.mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(weight).sum(), 1.0, rtol=1e-5)


@pytest.mark.parametrize("entries", [None, 601 * 256])  # one chunk; 3 chunks and a rest
def test_gram_by_upper_blocks_matches_full_product(monkeypatch, entries):
    if entries:
        monkeypatch.setattr(ops, "GRAM_ENTRIES", entries)
    x = np.random.default_rng(20).standard_normal((601, 1000)).astype(np.float32)
    got = np.asarray(jax.jit(lambda a: ops.self_gram(a, parts=4, min_rows=1))(jnp.asarray(x)))
    want = x.astype(np.float64) @ x.T.astype(np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
    np.testing.assert_array_equal(got, got.T)


@pytest.mark.parametrize("f", [4, 0])  # at f = 0 the passes run to the last row left
def test_iterated_krum_matches_direct_passes(f):
    # the incremental masks must pick what Krum recomputed from scratch on the rows left
    from fedsim.aggregators.distance import iterated_krum

    rng = np.random.default_rng(21)
    x = rng.standard_normal((23, 6)).astype(np.float32)
    x[3] = np.nan
    present = np.ones(23, bool)
    present[[5, 17]] = False
    count = 23 - 2 - 2 * f
    passes = jax.jit(iterated_krum, static_argnums=2)
    got = np.asarray(passes(jnp.asarray(x), jnp.asarray(present), f, count))
    ok = present & np.all(np.isfinite(x), axis=1)
    d = ((x[:, None].astype(np.float64) - x[None]) ** 2).sum(-1)
    left, picked = set(np.flatnonzero(present)), set()
    for _ in range(count):
        k = min(max(len(left) - f - 2, 1), len(left) - 1)  # the last row left scores 0
        scores = {}
        for i in left:
            near = sorted(d[i, j] if ok[j] else np.inf for j in left if j != i)
            scores[i] = sum(near[:k]) if ok[i] and len(near) >= k else np.inf
        candidates = [i for i in left if ok[i]]  # a non-finite row is never picked
        if not candidates:
            break
        best = min(candidates, key=lambda i: (scores[i], i))
        picked.add(best)
        left.remove(best)
    assert set(np.flatnonzero(got)) == picked
    assert f > 0 or picked == set(np.flatnonzero(ok))


@pytest.mark.parametrize("entries", [None, 7 * 256])  # one block; blocks of 256 columns
@pytest.mark.parametrize("coef_rows", [None, 3])
def test_combine_ignores_unkept_rows_even_non_finite(monkeypatch, entries, coef_rows):
    if entries:
        monkeypatch.setattr(ops, "PASS_ENTRIES", entries)
    rng = np.random.default_rng(22)
    x = rng.standard_normal((7, 1000)).astype(np.float32)
    x[2, 5], x[4, 999] = np.nan, np.inf
    keep = np.array([1, 1, 0, 1, 0, 1, 1], bool)
    shape = (7,) if coef_rows is None else (coef_rows, 7)
    coef = rng.random(shape).astype(np.float32)
    want = np.where(keep, coef, 0).astype(np.float64) @ np.where(keep[:, None], x, 0)
    # a fresh trace: jax.jit(ops.combine) would reuse an earlier parameter's block width
    fn = jax.jit(lambda *a: ops.combine(*a))
    got = np.asarray(fn(jnp.asarray(coef), jnp.asarray(x), jnp.asarray(keep)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # every row kept or known finite: the plain product, same result
    x_ok = np.where(keep[:, None], x, 1.0)
    finite = jnp.asarray(~keep)
    got = np.asarray(fn(jnp.asarray(coef), jnp.asarray(x_ok), jnp.asarray(keep), finite))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("entries", [None, 5 * 256])
def test_row_sq_norms_count_each_column_once(monkeypatch, entries):
    if entries:
        monkeypatch.setattr(ops, "NORM_ENTRIES", entries)
    rng = np.random.default_rng(23)
    x = rng.standard_normal((5, 1001)).astype(np.float32)  # last block shifted left
    x[3, 17] = np.nan
    x[4, 1000] = np.inf
    x[4, 750] = np.inf  # covered again by the shifted last block, where it must not be NaN
    norms = jax.jit(lambda *a: ops.row_sq_norms(*a))  # a fresh trace, at this block width
    got = np.asarray(norms(jnp.asarray(x)))
    want = (x.astype(np.float64) ** 2).sum(axis=1)
    np.testing.assert_allclose(got[:3], want[:3], rtol=1e-5)
    assert np.isnan(got[3]) and got[4] == np.inf
    # around a center equal to row 0: exactly 0 there, no cancellation
    center = x[0].copy()
    got = np.asarray(norms(jnp.asarray(x), jnp.asarray(center)))
    want = ((x.astype(np.float64) - center) ** 2).sum(axis=1)
    assert got[0] == 0.0
    np.testing.assert_allclose(got[1:3], want[1:3], rtol=1e-5)
    assert np.isnan(got[3]) and got[4] == np.inf


# --- peer-to-peer ---------------------------------------------------------------------------


def test_self_centered_clipping_without_a_radius_is_gossip():
    x, w = _data(11, 6, 31)
    env = _env(6)
    out, weight = _run("self_centered_clipping", x, w, 0, env, {"tau": jnp.float32(1e30)})
    gossip, gossip_weight = _run("gossip", x, w, 0, env)
    _close(out, gossip)
    _close(weight, gossip_weight)


@pytest.mark.parametrize("graph, kw", [("ring", {}), ("k_regular", {"k": 4, "seed": 1})])
def test_gossip_mixes_at_the_spectral_gap_rate(graph, kw):
    """Gossip rounds, every node running the rule on its own neighbourhood, shrink the
    distance to consensus by the Metropolis matrix's second eigenvalue per round."""
    from fedsim import topology as topologies

    n = 16
    adjacency = topologies.make(graph, n_nodes=n, **kw).adjacency
    agg = make("gossip")
    degrees = jnp.asarray(adjacency.sum(axis=1) - 1.0, jnp.float32)
    links = jnp.asarray(adjacency, jnp.float32)

    @jax.jit
    def mix(x):
        def node(k):
            ctx = AggContext(jnp.zeros(1), KEY, {}, self_index=k, degrees=degrees)
            return agg.aggregate(x, links[k], (), ctx)[0]

        return jax.vmap(node)(jnp.arange(n))

    W = np.stack(
        [
            ref.metropolis(np.zeros((n, 1)), adjacency[k] * 1.0, k, adjacency.sum(1) - 1.0)
            for k in range(n)
        ]
    )
    values, vectors = np.linalg.eigh(W)
    order = np.argsort(-np.abs(values))
    second, slowest = abs(values[order[1]]), vectors[:, order[1]]

    def ratios(start, steps):
        x, spread = jnp.asarray(start[:, None], jnp.float32), []
        for _ in range(steps):
            spread.append(float(jnp.linalg.norm(x - x.mean())))
            x = mix(x)
        return np.array(spread[1:]) / np.array(spread[:-1]), spread

    generic, spread = ratios(np.random.default_rng(5).standard_normal(n), 25)
    above_noise = np.array(spread[1:]) > 1e-3 * spread[0]
    assert np.all(generic[above_noise] <= second + 1e-4)  # never slower than the gap
    along, _ = ratios(slowest, 10)  # the slowest mode shrinks by exactly that factor
    np.testing.assert_allclose(along, second, rtol=1e-3)
