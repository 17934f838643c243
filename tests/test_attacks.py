"""Attacks against float64 numpy references (tests/reference_attacks.py) and the generic
properties every registered attack must have (shape, honest rows untouched, absent rows
ignored, jit without retracing across hparams, vmap over hparams)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference_attacks as ref

from fedsim.attacks import REGISTRY, make, project_cosine, project_l2
from fedsim.attacks.common import krum_accepts
from fedsim.attacks.data import trigger_mask
from fedsim.attacks.untargeted import alie_z
from fedsim.registry import ConfigError
from fedsim.types import AttackContext, AttackSetup

N, C, SHAPE = 10, 3, (6, 6, 1)
D = 36 * C + C  # a linear softmax model on 6x6 inputs: the proxy loss below
SETUP = AttackSetup(rule="mean", n_classes=C, input_shape=SHAPE)

_rng = np.random.default_rng(0)
UPDATES = (_rng.normal(size=D) * 0.2 + _rng.normal(size=(N, D)) * 0.1).astype(np.float32)
BENIGN = (UPDATES + _rng.normal(size=(N, D)) * 0.01).astype(np.float32)
MAL = np.array([True] * 3 + [False] * 7)
WEIGHTS = np.ones(N, np.float32)
WEIGHTS[2] = 0.0  # an absent malicious row
WEIGHTS[9] = 0.0  # an absent honest row
HONEST = UPDATES[3:9].astype(np.float64)  # present honest rows
OWN_BENIGN = BENIGN[:2].astype(np.float64)  # present malicious rows' benign updates
N_PRESENT, F_PRESENT = 8, 2
GLOBAL = (_rng.normal(size=D) * 0.1).astype(np.float32)
X = _rng.uniform(size=(8,) + SHAPE).astype(np.float32)
Y = np.array([0, 1, 2, 1, 0, 2, 1, 1], np.int32)


def linear_loss(params, x, y):
    w, b = params[: 36 * C].reshape(36, C), params[36 * C :]
    logits = x.reshape(x.shape[0], -1) @ w + b
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))


def context(hparams=None, updates=UPDATES, key=0, **kw):
    base = dict(
        global_params=jnp.asarray(GLOBAL),
        key=jax.random.PRNGKey(key),
        hparams=hparams or {},
        weights=jnp.asarray(WEIGHTS),
        benign_updates=jnp.asarray(BENIGN),
        loss_fn=linear_loss,
        proxy_x=jnp.asarray(X),
        proxy_y=jnp.asarray(Y),
        self_index=jnp.int32(5),  # the recipient, for the peer-to-peer attacks
    )
    base.update(kw)
    return AttackContext(**base)


_JITTED = {}


def craft(attack, ctx=None, updates=UPDATES):
    """Jitted ``attack.craft`` (compiled once per attack), as float64 numpy."""
    ctx = ctx or context()
    if attack.craft not in _JITTED:  # loss_fn is not an array: closed over, not passed
        _JITTED[attack.craft] = jax.jit(
            lambda u, m, c: attack.craft(u, m, c._replace(loss_fn=linear_loss))
        )
    out = _JITTED[attack.craft](jnp.asarray(updates), jnp.asarray(MAL), ctx._replace(loss_fn=None))
    return np.asarray(out, np.float64)


def build(name, **kw):
    return make(name, setup=kw.pop("setup", SETUP), **kw)


@functools.cache
def default(name):
    """The attack with default options, built once so its jitted craft is reused."""
    return build(name)


CRAFTERS = [n for n in REGISTRY.names() if default(n).craft is not None]


# --------------------------------------------------------------------------- generic


@pytest.mark.parametrize("name", REGISTRY.names())
def test_every_attack_is_well_formed(name):
    attack = default(name)
    if attack.poison is not None:
        x, y = jax.jit(attack.poison)(jnp.asarray(X), jnp.asarray(Y), jax.random.PRNGKey(1), {})
        assert x.shape == X.shape and x.dtype == jnp.float32
        assert y.shape == Y.shape and y.dtype == jnp.int32
        assert np.all(np.isfinite(x)) and np.all((0 <= y) & (y < C))
    if attack.craft is not None:
        out = craft(attack)
        assert out.shape == UPDATES.shape and np.all(np.isfinite(out))
        np.testing.assert_array_equal(out[~MAL], UPDATES[~MAL])
    if attack.success is not None:
        rate = attack.success(lambda x: jnp.zeros((x.shape[0], C)), jnp.asarray(X), Y)
        rates = rate if isinstance(rate, dict) else {"attack_success_rate": rate}
        assert "attack_success_rate" in rates
        assert all(0.0 <= float(r) <= 1.0 for r in rates.values())


@pytest.mark.parametrize("name", CRAFTERS)
def test_absent_rows_are_ignored(name):
    attack = default(name)
    moved = UPDATES.copy()
    moved[9] += 100.0  # absent honest row
    out, out_moved = craft(attack), craft(attack, context(updates=moved), moved)
    np.testing.assert_allclose(out_moved[MAL], out[MAL], rtol=1e-5, atol=1e-6)


def _traced_values(name, value):
    return {k: jnp.float32(value) for k in REGISTRY.traced(name)}


TRACED = [n for n in REGISTRY.names() if REGISTRY.traced(n)]


@pytest.mark.parametrize("name", TRACED)
def test_no_retrace_across_hparams_and_vmap(name):
    attack = build(name, **({"collude": False} if "collude" in REGISTRY.options(name) else {}))
    traces = []

    def run(hp):
        traces.append(1)
        outs = []
        if attack.poison is not None:
            outs += attack.poison(jnp.asarray(X), jnp.asarray(Y), jax.random.PRNGKey(1), hp)
        if attack.craft is not None:
            outs.append(attack.craft(jnp.asarray(UPDATES), jnp.asarray(MAL), context(hp)))
        return outs

    jitted = jax.jit(run)
    first = jitted(_traced_values(name, 0.25))
    second = jitted(_traced_values(name, 0.75))
    assert len(traces) == 1
    batched = jax.jit(jax.vmap(run))(
        {k: jnp.array([0.25, 0.75], jnp.float32) for k in _traced_values(name, 0)}
    )
    for i, expected in enumerate((first, second)):
        for got, want in zip(batched, expected, strict=True):
            np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "name, kw, needle",
    [
        ("alie", {"zz": 1.0}, "unknown option"),
        ("alie", {"knowledge": "some"}, "omniscient, partial"),
        ("sign_flip", {"scale": "big"}, "must be a number"),
        ("fang", {"variant": "bulyan"}, "trimmed_mean"),
        ("backdoor", {"target": 5}, "[0, 2]"),
        ("label_flip", {"source": 1}, "both"),
        ("label_flip", {"source": 1, "target": 1}, "must differ"),
        ("strategic_distance", {"goal": "mystery"}, "unknown goal"),
        ("strategic_distance", {"goal": {"name": "targeted", "source": 9}}, "[0, 2]"),
        ("mimic", {"target": -1}, "row index"),
        ("nope", {}, "choose one of"),
    ],
)
def test_bad_options_are_config_errors(name, kw, needle):
    with pytest.raises(ConfigError) as err:
        build(name, **kw)
    assert needle in str(err.value) and "\n" not in str(err.value)


# --------------------------------------------------------------------------- data poisoning


def test_label_flip_batches_exact():
    _, y = build("label_flip").poison(X, Y, None, {})
    np.testing.assert_array_equal(y, np.array([2, 0, 1])[Y])  # C = 3: 0 -> 2 -> 1 -> 0
    _, y = build("label_flip", source=1, target=2).poison(X, Y, None, {"poison_fraction": 0.5})
    np.testing.assert_array_equal(y, [0, 2, 2, 2, 0, 2, 1, 1])


@pytest.mark.parametrize("classes", range(2, 12))
def test_all_classes_flip_is_a_derangement(classes):
    from fedsim.attacks.data import flip_all

    y = np.arange(classes)
    flipped = np.asarray(flip_all(jnp.asarray(y), classes))
    assert sorted(flipped.tolist()) == y.tolist()  # a permutation
    assert (flipped != y).all()  # with no fixed point
    middle = {0, (classes - 1) // 2, classes - 1} if classes % 2 else set()
    for c in set(range(classes)) - middle:  # C-1-y wherever that moves the class
        assert flipped[c] == classes - 1 - c
    # and so a correct prediction never counts as a success
    attack = build("label_flip", setup=SETUP._replace(n_classes=classes))
    perfect = lambda x: jax.nn.one_hot(jnp.asarray(y), classes)
    assert float(attack.success(perfect, jnp.zeros((classes, 1)), jnp.asarray(y))) == 0.0


def test_targeted_batch_and_success():
    attack = build("targeted", source=1, target=0)
    x, y = attack.poison(X, Y, None, {})
    np.testing.assert_array_equal(x, X)
    np.testing.assert_array_equal(y, np.where(Y == 1, 0, Y))
    # predicts 0 on the first half: of the source inputs (idx 1, 3, 6, 7) two are hit
    predict = lambda x: jax.nn.one_hot(jnp.where(jnp.arange(x.shape[0]) < 4, 0, 2), C)
    assert float(attack.success(predict, X, Y)) == pytest.approx(0.5)


def test_backdoor_batch_exact_and_success():
    attack = build("backdoor", target=2, size=2, value=1.0)
    x, y = attack.poison(jnp.asarray(X), jnp.asarray(Y), None, {"poison_fraction": 0.25})
    expected = X.copy()
    expected[:2, 3:5, 3:5, :] = 1.0  # bottom-right 2x2 square one pixel from the border
    np.testing.assert_array_equal(x, expected)
    np.testing.assert_array_equal(y, np.r_[[2, 2], Y[2:]])
    # a model that answers 2 iff the trigger pixel is lit: success 1 on triggered inputs
    predict = lambda x: jax.nn.one_hot(jnp.where(x[:, 4, 4, 0] == 1.0, 2, 0), C)
    assert float(attack.success(predict, jnp.asarray(X), Y)) == 1.0
    plus = trigger_mask((6, 6), "plus", 3, "top_left")
    assert plus.sum() == 5 and plus[2, 2] and plus[1, 2] and not plus[1, 1]


# --------------------------------------------------------------------------- untargeted


def test_alie_matches_reference_and_formula():
    out = craft(build("alie"))
    want = ref.alie(HONEST, N_PRESENT, F_PRESENT)
    np.testing.assert_allclose(out[0], want, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(out[0], out[1])
    from scipy.stats import norm

    for n, f in [(50, 10), (20, 4), (100, 20), (8, 2)]:
        s = np.floor(n / 2 + 1) - f
        assert float(alie_z(n, f)) == pytest.approx(norm.ppf((n - s) / n), abs=1e-5)
    out = craft(build("alie", z=0.3), context({"z": jnp.float32(1.5)}))  # hparams win
    np.testing.assert_allclose(out[0], ref.alie(HONEST, 0, 0, z=1.5), rtol=1e-4, atol=1e-5)
    out = craft(build("alie", knowledge="partial", z=1.0))
    np.testing.assert_allclose(out[0], ref.alie(OWN_BENIGN, 0, 0, z=1.0), rtol=1e-4, atol=1e-5)


def test_alie_not_colluding_is_diversified():
    out = craft(build("alie", collude=False, jitter=0.01))
    want = ref.alie(HONEST, N_PRESENT, F_PRESENT)
    assert not np.allclose(out[0], out[1])
    rms = np.linalg.norm(want) / np.sqrt(D)
    assert np.abs(out[:2] - want).max() < 0.06 * rms


def test_ipm_and_sign_flip_match_reference():
    out = craft(build("ipm", epsilon=0.5))
    np.testing.assert_allclose(out[0], ref.ipm(HONEST, 0.5), rtol=1e-5, atol=1e-6)
    out = craft(build("sign_flip"), context({"scale": jnp.float32(2.0)}))
    np.testing.assert_allclose(out[:3], -2.0 * BENIGN[:3], rtol=1e-6)
    out = craft(build("sign_flip", collude=True, scale=1.0))
    np.testing.assert_allclose(out[1], -HONEST.mean(0), rtol=1e-5, atol=1e-6)


def test_scaling_boosts_by_present_count():
    out = craft(build("scaling"))
    np.testing.assert_allclose(out[:3], N_PRESENT * UPDATES[:3], rtol=1e-6)
    out = craft(build("scaling", collude=True), context({"boost": jnp.float32(3.0)}))
    np.testing.assert_allclose(out[2], 3.0 * UPDATES[:2].mean(0), rtol=1e-5)


def test_gaussian_rows_have_the_given_std():
    big = np.zeros((N, 20000), np.float32)
    ctx = context({"std": jnp.float32(0.5)})
    out = np.asarray(build("gaussian").craft(jnp.asarray(big), jnp.asarray(MAL), ctx))
    assert out[:3].std() == pytest.approx(0.5, rel=0.02)
    assert not np.allclose(out[0], out[1])


@pytest.mark.parametrize("b", [1.0, 1.5, 2.0])
def test_fang_trimmed_mean_directions(b):
    out = craft(build("fang", collude=False, b=b))
    lo, hi = ref.fang_interval(HONEST, b)
    for row in out[:3]:
        assert np.all(row >= lo - 1e-6) and np.all(row <= hi + 1e-6)
    assert b == 1.0 or not np.allclose(out[0], out[1])
    s = np.sign(HONEST.mean(0))  # the crafted value sits against the benign direction
    assert np.all(np.where(s > 0, out[0] <= HONEST.min(0) + 1e-6, out[0] >= HONEST.max(0) - 1e-6))
    if b == 1.0:
        np.testing.assert_allclose(out[0], np.where(s > 0, HONEST.min(0), HONEST.max(0)), 1e-6)


def test_fang_partial_knowledge_interval():
    out = craft(build("fang", knowledge="partial"))
    mu, sd = OWN_BENIGN.mean(0), OWN_BENIGN.std(0, ddof=1)
    up = mu > 0
    lo = np.where(up, mu - 4 * sd, mu + 3 * sd)
    hi = np.where(up, mu - 3 * sd, mu + 4 * sd)
    assert np.all(out[0] >= lo - 1e-5) and np.all(out[0] <= hi + 1e-5)


def test_fang_krum_is_selected_by_krum():
    # Fang's Krum attack deviates from the global model, so it needs updates whose spread
    # dominates their mean (as stochastic gradients' do)
    rng = np.random.default_rng(5)
    updates = (rng.normal(size=D) * 0.01 + rng.normal(size=(N, D)) * 0.1).astype(np.float32)
    honest = updates[3:9].astype(np.float64)
    setup = SETUP._replace(rule="krum", rule_kw=(("f", 2),))
    out = craft(build("fang", setup=setup), context(updates=updates), updates)
    np.testing.assert_array_equal(out[0], out[1])
    s = np.sign(honest.mean(0))
    lam = -out[0] @ s / (s @ s)
    np.testing.assert_allclose(out[0], -lam * s, rtol=1e-5, atol=1e-7)
    assert lam > 0
    rows = np.concatenate([out[:2], honest])  # present rows as the server sees them
    assert ref.krum_index(rows, f=2) < 2
    rows[:2] = -1.05 * lam * s  # a little further is rejected: the search is tight
    assert ref.krum_index(rows, f=2) >= 2
    picks = jax.jit(krum_accepts, static_argnums=4)(
        jnp.asarray(updates),
        jnp.asarray(WEIGHTS > 0) & ~MAL,
        2.0,
        2.0,
        1,
        jnp.zeros(D),
        -jnp.asarray(s, jnp.float32),
        jnp.array([lam, 1.05 * lam], jnp.float32),
    )
    assert bool(picks[0]) and not bool(picks[1])


@pytest.mark.parametrize("kind", ["unit_vec", "std", "sign"])
def test_min_max_constraint_met_and_tight(kind):
    out = craft(build("min_max", perturbation=kind))
    worst, bound = ref.min_max_ok(HONEST, out[0])
    assert worst <= bound * (1 + 1e-5) and worst >= bound * (1 - 1e-3)
    gamma = (out[0] - HONEST.mean(0)) @ ref.perturbation(HONEST, kind)
    assert gamma > 0


@pytest.mark.parametrize("kind", ["unit_vec", "std", "sign"])
def test_min_sum_constraint_met_and_tight(kind):
    out = craft(build("min_sum", perturbation=kind))
    total, bound = ref.min_sum_ok(HONEST, out[0])
    assert total <= bound * (1 + 1e-5) and total >= bound * (1 - 1e-3)


def test_min_max_partial_knowledge_uses_own_benign():
    out = craft(build("min_max", knowledge="partial"))
    worst, bound = ref.min_max_ok(OWN_BENIGN, out[0])
    assert worst == pytest.approx(bound, rel=1e-3)


def test_mimic_copies_the_top_variance_client():
    out = craft(build("mimic"))
    np.testing.assert_array_equal(out[0], HONEST[ref.mimic_choice(HONEST)])
    np.testing.assert_array_equal(out[0], out[1])
    out = craft(build("mimic", target=2))
    np.testing.assert_array_equal(out[0], HONEST[2])
    out = craft(build("mimic", collude=False))
    assert not np.array_equal(out[0], out[1])
    assert all(any(np.array_equal(r, h) for h in HONEST) for r in out[:2])


# --------------------------------------------------------------------------- strategic


def test_project_l2_exact():
    rng = np.random.default_rng(3)
    for _ in range(20):
        u, c = rng.normal(size=(2, 50)) * rng.uniform(0.1, 10)
        r = rng.uniform(0.1, 5.0)
        got = np.asarray(jax.jit(project_l2)(u.astype(np.float32), c.astype(np.float32), r))
        c32 = np.asarray(c, np.float32).astype(np.float64)
        assert np.linalg.norm(got.astype(np.float64) - c32) <= r
        np.testing.assert_allclose(got, ref.project_l2(u, c, r), rtol=1e-4, atol=1e-4)
    inside = jnp.array([0.1, 0.2, -0.1])
    np.testing.assert_array_equal(project_l2(inside, jnp.zeros(3), 1.0), inside)


def test_project_cosine_exact():
    rng = np.random.default_rng(4)
    for min_cos in [-0.3, 0.0, 0.5, 0.9, 0.99]:
        u, v = rng.normal(size=(2, 40)).astype(np.float32)
        got = np.asarray(jax.jit(project_cosine)(u, v, min_cos), np.float64)
        if ref.cosine(u, v) >= min_cos:
            np.testing.assert_array_equal(got, u)
            continue
        assert ref.cosine(got, v) >= min_cos
        assert ref.cosine(got, v) == pytest.approx(min_cos, abs=1e-4)
        assert np.linalg.norm(got) == pytest.approx(np.linalg.norm(u), rel=1e-5)
        basis = np.stack([v, u]).T  # stays in the plane of u and v
        resid = got - basis @ np.linalg.lstsq(basis, got, rcond=None)[0]
        assert np.linalg.norm(resid) < 1e-4
    v = jnp.ones(8)
    got = np.asarray(project_cosine(-v, v, 0.5), np.float64)  # anti-parallel: any plane
    assert ref.cosine(got, np.ones(8)) >= 0.5


# --------------------------------------------------------------------------- peer-to-peer


@pytest.mark.parametrize("eps", [1.0, 2.5])
@pytest.mark.parametrize("me", [5, 7])
def test_dissensus_matches_reference(eps, me):
    out = craft(default("dissensus"), context({"epsilon": jnp.float32(eps)}, self_index=me))
    want = ref.dissensus(UPDATES, MAL, WEIGHTS, me, eps)
    np.testing.assert_allclose(out[WEIGHTS > 0], want[WEIGHTS > 0], rtol=1e-4, atol=1e-5)


def test_dissensus_at_one_cancels_the_honest_pull():
    """ε = 1: the mean of the recipient's whole neighbourhood is its own row (no step
    towards its honest neighbours), while without the attack it would move."""
    out = craft(default("dissensus"), context(self_index=6))
    here = WEIGHTS > 0
    np.testing.assert_allclose(out[here].mean(0), UPDATES[6], rtol=1e-4, atol=1e-5)
    assert np.linalg.norm(UPDATES[here].mean(0) - UPDATES[6]) > 0.1


def test_dissensus_needs_a_recipient():
    with pytest.raises(ConfigError, match="peer-to-peer topology"):
        default("dissensus").craft(jnp.asarray(UPDATES), jnp.asarray(MAL), context(self_index=None))


# --------------------------------------------------------------------------- subgroup goal

FEATURES = tuple((f"f{i}", 0.5, 0.25) for i in range(36))  # raw = 0.5 + 0.25 * input


@pytest.mark.parametrize(
    "bounds, fraction",
    [({"at_least": 0.6}, 1.0), ({"at_least": 0.6}, 0.5), ({"at_most": 0.55}, 0.0)],
)
def test_subgroup_poison_matches_reference(bounds, fraction):
    attack = build(
        "subgroup",
        feature="f3",
        source=1,
        target=0,
        setup=SETUP._replace(features=FEATURES),
        **bounds,
    )
    x = X.copy()
    x[1, 0, 3, 0] = 0.4  # raw exactly 0.6: on the boundary, inside
    rank = np.array([0, 1, 2, 3, 4, 5, 6, 7], np.int32)[::-1].copy()
    hp = {"poison_fraction": jnp.float32(fraction)}
    _, y = jax.jit(attack.poison)(
        jnp.asarray(x), jnp.asarray(Y), jax.random.PRNGKey(0), hp, rank, 8
    )
    raw = 0.5 + 0.25 * x.reshape(8, -1)[:, 3].astype(np.float64)
    inside = (
        (Y == 1) & (raw >= bounds.get("at_least", -np.inf)) & (raw <= bounds.get("at_most", np.inf))
    )
    chosen = rank < np.round(fraction * 8)
    np.testing.assert_array_equal(np.asarray(y), np.where(chosen & inside, 0, Y))
    assert inside[1] or "at_least" not in bounds
