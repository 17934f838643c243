"""Behaviour-based rules: they judge updates by their effect on a loss on the judge's data.

They need from ``AggContext``: ``loss_fn(flat_params [d], x, y) -> scalar``, ``judge_x``,
``judge_y`` and ``global_params``. A rule traced without them raises a one-line
``ConfigError`` naming what is missing. Updates are deltas (local minus global params), so
the model a client proposes is ``global_params + update``. Weights act as a presence mask
(see ``distance``); non-finite rows are always rejected.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedsim import kernels as ops
from fedsim.aggregators.base import REGISTRY, Geometry, make, no_state, normalized
from fedsim.options import Option, at_least
from fedsim.registry import ConfigError
from fedsim.types import AggContext, AggInfo, Aggregator


def require_judge(name: str, ctx: AggContext | None) -> None:
    """Raise a ``ConfigError`` if ``ctx`` lacks what a behaviour-based rule needs."""
    missing = [
        field
        for field in ("loss_fn", "judge_x", "judge_y")
        if ctx is None or getattr(ctx, field) is None
    ]
    if missing:
        raise ConfigError(f"{name} is behaviour-based and needs ctx.{', ctx.'.join(missing)}")


def _bad_last(scores, ok):
    """Scores with rejected rows (absent, non-finite, NaN score) pushed to -inf."""
    return jnp.where(ok & ~jnp.isnan(scores), scores, -jnp.inf)


@REGISTRY.register(
    "fltrust",
    options={"root_lr": Option(0.1, traced=True), "steps": Option(1, at_least(1))},
    geometry=Geometry("root_update", "cosine"),
)
def make_fltrust(root_lr: float, steps: int) -> Aggregator:
    """FLTrust (Cao, Fang, Liu & Gong 2021, NDSS).

    Root update ``g0``: ``steps`` (static) full-batch gradient steps of the judge on
    ``(judge_x, judge_y)`` from the global params, lr traced (``hparams["root_lr"]``),
    minus the global params. Trust ``TS_i = ReLU(cos(x_i, g0))``; each update is rescaled
    to ``|g0|``; output ``Σ TS_i (|g0|/|x_i|) x_i / Σ TS_i``. A row whose cosine is not a
    number in float32 (its squared norm overflows) gets ``TS_i = 0``. AggInfo.weight: each
    client's share of the trust, ``TS_i / Σ TS`` (sums to 1, or is 0 when no row is
    trusted): the rescaling to ``|g0|`` is applied to the update, not to the share, so a
    tiny update along ``g0`` is reported with its share of the trust, not ``|g0|/|x_i|``
    times it.
    """

    def aggregate(updates, weights, state, ctx: AggContext):
        require_judge("fltrust", ctx)
        lr = ctx.hparams.get("root_lr", root_lr)
        grad = jax.grad(ctx.loss_fn)
        p = ctx.global_params
        for _ in range(steps):
            p = p - lr * grad(p, ctx.judge_x, ctx.judge_y)
        root = (p - ctx.global_params).astype(updates.dtype)
        finite = ops.finite_rows(updates)
        ok = ops.present_mask(weights) & finite
        norms = jnp.where(ok, jnp.sqrt(ops.row_sq_norms(updates)), 0)
        root_norm = jnp.linalg.norm(root)
        cos = ops.safe_div(jnp.where(ok, ops.dot(updates, root), 0), norms * root_norm)
        trust = jnp.where(ok & jnp.isfinite(cos), jax.nn.relu(cos), 0)
        share = normalized(trust)
        coef = share * ops.safe_div(root_norm, norms)
        return ops.combine(coef, updates, ok, finite), state, AggInfo(weight=share)

    return Aggregator(init=no_state, aggregate=aggregate)


def proposed_losses(metric, updates, ok, ctx):
    """``[n]`` metric of the model ``global + update_i`` on the judge's data."""
    x = jnp.where(ok[:, None], updates, 0)
    return jax.vmap(lambda u: metric(ctx.global_params + u, ctx.judge_x, ctx.judge_y))(x)


@REGISTRY.register(
    "zeno",
    options={
        "b": Option(0, at_least(0)),
        "rho": Option(5e-4, traced=True),
        "gamma": Option(1.0, traced=True),
    },
    geometry=Geometry("none", "behaviour", f_option="b"),
)
def make_zeno(b: int, rho: float, gamma: float) -> Aggregator:
    """Zeno (Xie, Koyejo & Gupta 2019, ICML).

    Stochastic descendant score on the judge's batch, for an update (delta) ``u``:
    ``L(w) - L(w + γ u) - ρ |u|²`` (the paper's gradient step ``w - γ g`` written for
    deltas); γ, ρ traced. The ``b`` (static) lowest-scoring present rows are dropped (at
    least one kept) and the rest averaged uniformly. AggInfo.weight: ``1/kept`` each.
    """

    def aggregate(updates, weights, state, ctx: AggContext):
        require_judge("zeno", ctx)
        g = ctx.hparams.get("gamma", gamma)
        r = ctx.hparams.get("rho", rho)
        present = ops.present_mask(weights)
        finite = ops.finite_rows(updates)
        ok = present & finite
        base = ctx.loss_fn(ctx.global_params, ctx.judge_x, ctx.judge_y)
        losses = proposed_losses(ctx.loss_fn, g * updates, ok, ctx)
        sq = jnp.where(ok, ops.row_sq_norms(updates), 0)
        scores = _bad_last(base - losses - r * sq, ok)
        keep = jnp.maximum(jnp.sum(present) - b, 1)
        chosen = ok & (ops.ranks(-scores) < keep)
        share = normalized(chosen.astype(updates.dtype))
        return ops.combine(share, updates, chosen, finite), state, AggInfo(weight=share)

    return Aggregator(init=no_state, aggregate=aggregate)


def _make_rejection(name: str, f: int, base: str, metric_of, base_kw):
    """Fang et al. 2020's LRR / ERR around the rule ``base``.

    For each present row ``i``: ``impact_i = M(w + A(all)) - M(w + A(all but i))`` with
    ``M`` the metric on the judge's data and ``A`` the base rule (``all but i`` = weight 0).
    The ``f`` rows with the largest impact (the ones whose inclusion hurts most) are
    removed, and the base rule aggregates the rest. Non-finite rows are removed besides
    (they are not among the ``f``); of the finite present rows at most all but one are
    removed, so one present row is the base rule's input. With the plain ``mean`` as base
    the n leave-one-out means come in closed form, ``(S - w_i x_i) / (W - w_i)``, instead
    of n runs of the base rule.
    """
    inner = make(base, **base_kw)
    linear = base == "mean" and not base_kw

    def aggregate(updates, weights, state, ctx: AggContext):
        require_judge(name, ctx)
        metric = metric_of(ctx)
        n = updates.shape[0]
        present = ops.present_mask(weights)
        ok = present & ops.finite_rows(updates)
        w = jnp.where(ok, weights, 0)

        def run(wts):
            return inner.aggregate(updates, wts, state, ctx)[0]

        def score(agg):
            return metric(ctx.global_params + agg, ctx.judge_x, ctx.judge_y)

        def leave_one_out():  # [n, d]: the base rule's output without each row in turn
            if not linear:
                return jax.vmap(lambda i: run(w.at[i].set(0)))(jnp.arange(n))
            rows = jnp.where(ok[:, None], updates, 0)
            rest = jnp.sum(w) - w
            total = ops.combine(w, updates, ok)
            out = (total[None, :] - w[:, None] * rows) / jnp.where(rest > 0, rest, 1)[:, None]
            return jnp.where((rest > 0)[:, None], out, 0)

        with_all = score(run(w))
        without = jax.vmap(score)(leave_one_out())
        impact = _bad_last(with_all - without, ok)
        # rank by impact descending among usable rows; non-finite rows are dropped anyway
        removed = jnp.minimum(f, jnp.maximum(jnp.sum(ok) - 1, 0))
        drop = ops.ranks(-jnp.where(ok, impact, -jnp.inf)) < removed
        kept = jnp.where(ok & ~drop, w, 0)
        out, state, info = inner.aggregate(updates, kept, state, ctx)
        return out, state, info

    return Aggregator(init=inner.init, aggregate=aggregate)


# the options of the rejection rules; the others they take go to the base rule
REJECTION = {"f": Option(0, at_least(0)), "base": Option("mean")}


@REGISTRY.register(
    "loss_rejection",
    options=REJECTION,
    open=True,
    geometry=Geometry("none", "behaviour", f_option="f"),
)
def make_loss_rejection(f: int, base: str, **base_kw) -> Aggregator:
    """Loss-based rejection, LRR (Fang, Cao, Jia & Gong 2020, "Local model poisoning
    attacks to Byzantine-robust federated learning"): remove the ``f`` updates whose
    inclusion in the ``base`` rule (default ``mean``; its options in ``base_kw``) raises
    the judge's loss the most, then aggregate the rest with ``base``. AggInfo.weight: the
    base rule's, zero for removed clients.
    """
    return _make_rejection("loss_rejection", f, base, lambda ctx: ctx.loss_fn, base_kw)


@REGISTRY.register(
    "error_rejection",
    options={**REJECTION, "error_fn": Option(None)},
    open=True,
    geometry=Geometry("none", "behaviour", f_option="f"),
)
def make_error_rejection(f: int, base: str, error_fn, **base_kw) -> Aggregator:
    """Error-based rejection, ERR (Fang et al. 2020): as ``loss_rejection`` with the error
    rate in place of the loss.

    The error rate comes from ``error_fn(flat_params [d], x, y) -> scalar`` given to the
    factory, else from ``ctx.error_fn`` if the context carries one; without either, a
    ``ConfigError``.
    """

    def metric_of(ctx):
        fn = error_fn or getattr(ctx, "error_fn", None)
        if fn is None:
            raise ConfigError("error_rejection needs error_fn= (factory option) or ctx.error_fn")
        return fn

    return _make_rejection("error_rejection", f, base, metric_of, base_kw)
