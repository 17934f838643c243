"""The strategic adversaries against each rule (issue 11's proof), on a small linear softmax
model whose clients train for real: the crafted update lies in the rule's acceptance
region and on its boundary, the rule still gives the attackers weight, and the goal loss
after the aggregated step is lower than with the earlier projection and than at random
points of the region's boundary."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedsim import aggregators
from fedsim.attacks import make, project_l2
from fedsim.attacks.regions import extreme, rule_region
from fedsim.kernels import masked_median
from fedsim.types import AggContext, AttackContext, AttackSetup

C, F = 3, 12  # classes, input features
D = F * C + C
N, N_MAL = 16, 3  # rows 0..2 malicious, all present
SOURCE, TARGET = 1, 0  # the goal: class 1 predicted as 0
LR = 1.0

_rng = np.random.default_rng(0)
W_TRUE = _rng.normal(size=(F, C))
GLOBAL = (_rng.normal(size=D) * 0.05).astype(np.float32)


def loss_fn(params, x, y, mask=None):
    w, b = params[: F * C].reshape(F, C), params[F * C :]
    per = -jnp.take_along_axis(jax.nn.log_softmax(x @ w + b), y[:, None], 1)[:, 0]
    mask = jnp.ones_like(per) if mask is None else mask.astype(per.dtype)
    return jnp.sum(per * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def error_fn(params, x, y):
    w, b = params[: F * C].reshape(F, C), params[F * C :]
    return jnp.mean(jnp.argmax(x @ w + b, -1) != y)


def _client_data(i, size=40):
    rng = np.random.default_rng(100 + i)
    x = rng.normal(size=(size, F)).astype(np.float32)
    x[:, i % F] += 1.5  # heterogeneous clients
    return x, np.argmax(x @ W_TRUE, 1).astype(np.int32)


def _poisoned(y):
    return np.where(y == SOURCE, TARGET, y).astype(np.int32)


def _train(x, y):
    """Five full-batch gradient steps from the global model: an update."""
    p = jnp.asarray(GLOBAL)
    for _ in range(5):
        p = p - LR * jax.grad(loss_fn)(p, x, y)
    return np.asarray(p - GLOBAL)


DATA = [_client_data(i) for i in range(N)]
BENIGN = np.stack([_train(x, y) for x, y in DATA])
UPDATES = BENIGN.copy()
UPDATES[:N_MAL] = np.stack([_train(x, _poisoned(y)) for x, y in DATA[:N_MAL]])
IS_MAL = np.arange(N) < N_MAL
GOAL_X = np.concatenate([x for x, _ in DATA[:N_MAL]])
GOAL_CLEAN = np.concatenate([y for _, y in DATA[:N_MAL]])
GOAL_Y = _poisoned(GOAL_CLEAN)
GOAL_MASK = GOAL_Y != GOAL_CLEAN
PROXY_X, PROXY_Y = _client_data(50, size=60)  # the judge's data and its proxy
# held-out inputs of the source class: the goal's success is measured there
TEST_X = np.random.default_rng(7).normal(size=(400, F)).astype(np.float32)
TEST_X = TEST_X[np.argmax(TEST_X @ W_TRUE, 1) == SOURCE]
PREVIOUS = (BENIGN[N_MAL:].mean(0) * 0.5).astype(np.float32)

RULES = {
    "mean": {},
    "geometric_median": {},
    "centered_clipping": {"tau": 0.3},
    "norm_bound": {"max_norm": 0.5},
    "median": {},
    "trimmed_mean": {"beta": 0.2},  # trims 3 per side: as many as attack
    "meamed": {"f": 3},
    "krum": {"f": 3},
    "multi_krum": {"f": 3},
    "bulyan": {"f": 3},
    "dnc": {"f": 3, "sub_dim": D},
    "signguard": {},
}
TRACED = {"tau", "max_norm", "beta"}


def _setup(rule):
    kw = RULES.get(rule, {})
    static = tuple(sorted((k, v) for k, v in kw.items() if k not in TRACED))
    return AttackSetup(rule=rule, rule_kw=static, n_classes=C, input_shape=(F,))


def _rule_hparams(rule):
    return {k: jnp.float32(v) for k, v in RULES.get(rule, {}).items() if k in TRACED}


def attack_context(rule, updates=UPDATES, key=0):
    return AttackContext(
        global_params=jnp.asarray(GLOBAL),
        key=jax.random.PRNGKey(key),
        hparams={},
        weights=jnp.ones(N, jnp.float32),
        benign_updates=jnp.asarray(BENIGN),
        previous_aggregate=jnp.asarray(PREVIOUS),
        loss_fn=loss_fn,
        proxy_x=jnp.asarray(PROXY_X),
        proxy_y=jnp.asarray(PROXY_Y),
        error_fn=error_fn,
        goal_x=jnp.asarray(GOAL_X),
        goal_y=jnp.asarray(GOAL_Y),
        goal_mask=jnp.asarray(GOAL_MASK),
        rule_hparams=_rule_hparams(rule),
    )


@functools.cache
def crafted(rule, name="strategic_distance", **kw):
    """Rows sent by the attack ``name`` against ``rule`` (float32 numpy ``[N, D]``)."""
    attack = make(
        name, setup=_setup(rule), goal={"name": "targeted", "source": 1, "target": 0}, **kw
    )
    fn = jax.jit(lambda u, m: attack.craft(u, m, attack_context(rule)))
    return np.asarray(fn(jnp.asarray(UPDATES), jnp.asarray(IS_MAL)))


@functools.cache
def _aggregate_fn(rule):
    agg = aggregators.make(rule, **{k: v for k, v in RULES.get(rule, {}).items()})
    ctx = AggContext(
        global_params=jnp.asarray(GLOBAL),
        key=jax.random.PRNGKey(0),
        hparams=_rule_hparams(rule),
        loss_fn=loss_fn,
        judge_x=jnp.asarray(PROXY_X),
        judge_y=jnp.asarray(PROXY_Y),
        error_fn=error_fn,
    )
    state = agg.init(jnp.asarray(GLOBAL), N)
    if rule == "centered_clipping":
        state = jnp.asarray(PREVIOUS)
    target = jnp.full(TEST_X.shape[0], TARGET)

    def run(rows):
        out, _, info = agg.aggregate(rows, jnp.ones(N, jnp.float32), state, ctx)
        return out, info.weight, loss_fn(jnp.asarray(GLOBAL) + out, jnp.asarray(TEST_X), target)

    return jax.jit(run)


def aggregate(rule, rows):
    """The rule's output and per-client weights on ``rows`` (every row present)."""
    out, weight, _ = _aggregate_fn(rule)(jnp.asarray(rows))
    return np.asarray(out), np.asarray(weight)


def goal_loss_after(rule, rows):
    """The goal loss (source inputs labelled as the target) after the aggregated step."""
    return float(_aggregate_fn(rule)(jnp.asarray(rows))[2])


def with_malicious(x):
    rows = UPDATES.copy()
    rows[:N_MAL] = x
    return rows


def region_of(rule):
    rows, mask = jnp.asarray(UPDATES), jnp.asarray(~IS_MAL)
    return rule_region(
        _setup(rule),
        rows,
        mask,
        jnp.float32(N_MAL),
        jnp.asarray(IS_MAL),
        attack_context(rule),
        jnp.float32(1.0),
    )


def box_edges_of(rule):
    from fedsim.attacks.regions import box_edges

    lo, hi = box_edges(
        rule,
        dict(_setup(rule).rule_kw),
        _rule_hparams(rule),
        jnp.asarray(UPDATES),
        jnp.asarray(~IS_MAL),
        jnp.float32(N_MAL),
    )
    return np.asarray(lo), np.asarray(hi)


def earlier_projection(rule):
    """What the attack sent before issue 11: the attackers' mean goal-trained update
    projected into the ball of median honest distance around the rule's reference."""
    honest = UPDATES[N_MAL:]
    if rule in ("median", "trimmed_mean", "meamed", "bulyan"):
        ref = np.asarray(masked_median(jnp.asarray(honest), jnp.ones(len(honest), bool)))
    elif rule == "centered_clipping":
        ref = PREVIOUS
    else:
        ref = honest.mean(0)
    radius = np.median(np.linalg.norm(honest - ref, axis=1))
    return np.asarray(project_l2(jnp.asarray(UPDATES[:N_MAL].mean(0)), ref, radius))


SHARE = N_MAL / N


@pytest.mark.parametrize("rule", list(RULES))
def test_crafted_update_is_accepted_on_the_region_boundary(rule):
    x = crafted(rule)[0]
    np.testing.assert_array_equal(crafted(rule)[N_MAL:], UPDATES[N_MAL:])
    region = region_of(rule)
    if region.kind == "ball":
        dist = np.linalg.norm(x - np.asarray(region.center))
        np.testing.assert_allclose(dist, float(region.radius), rtol=1e-4)
    elif region.kind == "box":  # the honest-spread ball's point along the goal, clipped
        goal = (UPDATES[:N_MAL] - BENIGN[:N_MAL]).mean(0)  # the default direction
        center, lo, hi = (np.asarray(v) for v in (region.center, region.lo, region.hi))
        want = np.clip(center + float(region.radius) * goal / np.linalg.norm(goal), lo, hi)
        np.testing.assert_allclose(x, want, rtol=1e-4, atol=1e-6)
        assert np.isclose(x, lo).any() or np.isclose(x, hi).any()  # on some of its faces
    _, weight = aggregate(rule, with_malicious(x))
    if rule == "krum":
        assert weight[:N_MAL].sum() == pytest.approx(1.0)  # Krum's weight is 0 or 1: selected
    else:
        assert weight[:N_MAL].sum() >= 0.8 * SHARE - 1e-6
    if region.kind == "search":  # on the boundary: a little farther is no longer accepted
        center = np.asarray(region.center)
        farther = center + 1.1 * (x - center)
        _, weight = aggregate(rule, with_malicious(farther))
        if rule == "bulyan":  # or, for Bulyan, at the corner of its order-statistic box
            lo, hi = box_edges_of("bulyan")
            at_corner = np.all(np.isclose(x, lo, rtol=1e-4) | np.isclose(x, hi, rtol=1e-4))
            assert at_corner or weight[:N_MAL].sum() < 0.8 * SHARE
        else:
            assert weight[:N_MAL].sum() < 0.8 * SHARE


TRIMMED_TRADE_OFF = pytest.mark.xfail(
    strict=True,
    reason="a finding, not a bug: the trimmed mean keeps the crafted values only below "
    "its cut, and keeping 0.8 of their share there moves the mean less than the earlier "
    "projection, whose values beyond the cut are trimmed (weight ~0) yet displace honest ones",
)


SIMULATED = ("meamed", "bulyan", "dnc", "signguard")  # each check runs the whole rule


def _goal_loss_case(rule):
    if rule == "trimmed_mean":
        return pytest.param(rule, marks=TRIMMED_TRADE_OFF)
    if rule in SIMULATED:
        return pytest.param(rule, marks=pytest.mark.slow)
    return rule


@pytest.mark.parametrize("rule", [_goal_loss_case(r) for r in RULES])
def test_goal_loss_beats_the_earlier_projection_and_random_boundary_points(rule):
    ours = goal_loss_after(rule, crafted(rule))
    assert ours < goal_loss_after(rule, with_malicious(earlier_projection(rule)))
    directions = np.random.default_rng(1).normal(size=(4, D)).astype(np.float32)
    points = jax.jit(jax.vmap(lambda g: extreme(region_of(rule), g)))(jnp.asarray(directions))
    for point in np.asarray(points):
        assert ours < goal_loss_after(rule, with_malicious(point))


def test_fltrust_trusts_the_crafted_update_and_the_goal_loss_falls():
    for name in ("strategic_distance", "strategic_behavior"):
        rows = crafted("fltrust", name)
        _, weight = aggregate("fltrust", rows)
        assert weight[:N_MAL].sum() > 0  # a positive trust score
        assert goal_loss_after("fltrust", rows) < goal_loss_after("fltrust", BENIGN)


@pytest.mark.parametrize("rule, kw", [("zeno", {"b": 3}), ("loss_rejection", {"f": 3})])
def test_behaviour_rules_accept_the_crafted_update_and_the_goal_loss_falls(rule, kw):
    RULES[rule] = kw
    try:
        rows = crafted(rule, "strategic_behavior")
        _, weight = aggregate(rule, rows)
        assert weight[:N_MAL].sum() >= 0.8 * SHARE - 1e-6
        assert goal_loss_after(rule, rows) < goal_loss_after(rule, BENIGN)
    finally:
        del RULES[rule]


def test_strategic_behavior_simulates_ubar_at_its_recipient_node():
    """Crafting for one recipient node (row 3), the behaviour-aware adversary runs that
    node's UBAR on its proxy (here the node's own data): UBAR then accepts the crafted
    rows (at least 0.8 of their share) and the goal loss falls."""
    setup = AttackSetup(rule="ubar", rule_kw=(), n_classes=C, input_shape=(F,))
    attack = make(
        "strategic_behavior", setup=setup, goal={"name": "targeted", "source": 1, "target": 0}
    )
    me = N_MAL
    ctx = attack_context("ubar")._replace(self_index=jnp.int32(me))
    rows = np.asarray(jax.jit(lambda u, m: attack.craft(u, m, ctx))(UPDATES, IS_MAL))
    agg = aggregators.make("ubar")
    node = AggContext(
        global_params=jnp.asarray(GLOBAL),
        key=jax.random.PRNGKey(0),
        hparams={},
        loss_fn=loss_fn,
        judge_x=jnp.asarray(PROXY_X),
        judge_y=jnp.asarray(PROXY_Y),
        self_index=jnp.int32(me),
        degrees=jnp.full(N, N - 1.0),
    )
    target = jnp.full(TEST_X.shape[0], TARGET)

    def run(r):
        out, _, info = agg.aggregate(jnp.asarray(r), jnp.ones(N), (), node)
        return info.weight, loss_fn(jnp.asarray(GLOBAL) + out, jnp.asarray(TEST_X), target)

    weight, goal_loss = run(rows)
    assert float(weight[:N_MAL].sum()) >= 0.8 * SHARE - 1e-6
    assert float(goal_loss) < float(run(BENIGN)[1])
