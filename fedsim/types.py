"""The interfaces every component plugs into (DESIGN.md, "Types").

Conventions used throughout:

- ``n`` is the number of participating clients in a round (rows), ``d`` the number of
  model parameters. Updates reach aggregators and attacks ravelled into one ``[n, d]``
  float32 matrix (row ``i`` = client ``i``'s update, local minus global params).
- ``weights`` is an ``[n]`` non-negative vector: a client's sample count, or 0 when the
  client is absent (dropout, not a neighbour in peer-to-peer). Rules must ignore rows
  with weight 0 entirely (as if they were not in the matrix).
- Everything here is a pure function of arrays; static choices are closed over by the
  factory that builds the NamedTuple (in the manner of optax).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax

Array = jax.Array
AggState = Any  # a pytree, whatever a rule needs to carry between rounds
# (flat_params [d], x [b, ...], y [b], mask [b] or None) -> mean loss over the masked rows
LossFn = Callable[..., Array]


class AggInfo(NamedTuple):
    """What a rule did, per client.

    weight: ``[n]`` non-negative share of each client in the aggregate; it sums to at most
        1. For a rule whose output is a convex combination of the rows (mean, Krum,
        Multi-Krum, ...) it sums to 1; for FLTrust it is the share of trust
        ``TS_i / sum TS`` (the rescaling to the root update's norm acts on the update). For
        clipping rules, it is the normalised weight times the shrink factor applied to the
        row (so clipping shows up as lost weight). For coordinate-wise rules (median,
        trimmed mean, Bulyan, ...) it is the fraction of coordinates at which the row's
        value entered the output, times the share that value had there (median of an odd
        count: 1 / d per coordinate where it is the median). Zero for absent clients.
    """

    weight: Array


class AggContext(NamedTuple):
    """What the judging party knows in a round.

    global_params: ``[d]`` the current global model, ravelled.
    key: a PRNG key for randomised rules (never reuse; split it).
    hparams: ``dict[str, scalar]`` traced values of the rule's sweepable options (see
        its ``Option(..., traced=True)`` records); a rule reads ``hparams.get(k, default)``.
    client_ids: ``[n]`` int32 stable identities of the rows (for stateful rules such as
        FoolsGold, which keep a per-client history indexed by identity).
    loss_fn: ``(flat_params [d], x, y) -> scalar`` mean loss, for behaviour-based rules.
    judge_x, judge_y: the data the judge holds (root / validation set), or ``None``.
    error_fn: ``(flat_params [d], x, y) -> scalar`` error rate (1 - accuracy), for
        error-based rules (Fang et al. 2020's ERR).
    self_index: peer-to-peer only (else ``None``): int32 scalar, the row that is the
        judging node's own. Its rows are then relative to the node's model before local
        training (``global_params``), so the origin is that model and row ``self_index``
        is the node's own trained model (or update). judge_x/judge_y are then samples of
        the node's own training data.
    degrees: peer-to-peer only: ``[n]`` float, each row's node's number of neighbours
        (itself excluded) this round, for Metropolis–Hastings mixing weights.
    finite: ``[n]`` bool or ``None``: which rows are finite in every column, when the rule
        is given one block of the rows' columns (a peer-to-peer round of a columnwise
        rule, ``fedsim.round.by_column_blocks``); ``None``: the rule sees whole rows.
    self_distances: ``[n]`` float or ``None``: likewise, each row's L2 distance to row
        ``self_index`` over all columns (for a rule registered
        ``columnwise="self_distances"``).
    """

    global_params: Array
    key: Array
    hparams: dict
    client_ids: Array | None = None
    loss_fn: LossFn | None = None
    judge_x: Array | None = None
    judge_y: Array | None = None
    error_fn: LossFn | None = None
    self_index: Array | None = None
    degrees: Array | None = None
    finite: Array | None = None
    self_distances: Array | None = None


class Aggregator(NamedTuple):
    """A robust aggregation rule.

    init(flat_params [d], n_clients) -> AggState
    aggregate(updates [n, d], weights [n], state, ctx) -> (update [d], state, AggInfo)
    """

    init: Callable[[Array, int], AggState]
    aggregate: Callable[[Array, Array, AggState, AggContext], tuple[Array, AggState, AggInfo]]


class AttackContext(NamedTuple):
    """What the adversary is allowed to know when crafting.

    global_params: ``[d]``; key: PRNG key; hparams: ``dict[str, scalar]`` traced options.
    weights: ``[n]`` participation weights of the round's rows.
    benign_updates: ``[n, d]`` or ``None``: what every row would send if honest (for
        malicious rows: trained on clean data). ``None`` unless the attack asks for it.
    previous_aggregate: ``[d]`` the last round's aggregate (zeros in the first round). Every
        participant can infer it from two consecutive global models, so it is no privileged
        knowledge; the aggregator's own state (e.g. FoolsGold's per-client histories) is
        never passed to an attack.
    loss_fn, proxy_x, proxy_y: the adversary's proxy of the judge's data, for
        behaviour-aware attacks; error_fn: ``(flat_params, x, y) -> error rate``.
    goal_x, goal_y, goal_mask: ``[G, ...]``, ``[G]``, bool ``[G]``: samples drawn from the
        present malicious clients' own data with the goal's poison applied to all of them;
        ``goal_mask`` marks the rows the goal changed (e.g. the source class relabelled,
        or stamped with the trigger). Only for attacks with ``goal_batch > 0``.
    rule_hparams: the traced options of the rule (its configuration, public to whoever
        knows the rule), e.g. ``{"beta": ...}`` for the trimmed mean.
    self_index: peer-to-peer only (else ``None``): the recipient node's row. The rows,
        ``weights`` (its neighbourhood) and ``global_params`` (its model) are then the
        recipient's view (``AggContext.self_index``); ``craft`` runs once per recipient.
    """

    global_params: Array
    key: Array
    hparams: dict
    weights: Array
    benign_updates: Array | None = None
    previous_aggregate: Array | None = None
    loss_fn: LossFn | None = None
    proxy_x: Array | None = None
    proxy_y: Array | None = None
    error_fn: LossFn | None = None
    goal_x: Array | None = None
    goal_y: Array | None = None
    goal_mask: Array | None = None
    rule_hparams: dict | None = None
    self_index: Array | None = None


class AttackSetup(NamedTuple):
    """Static facts the engine hands every attack factory (as ``setup=``).

    rule: the aggregator's registered name; rule_kw: its options as written in the config
    (lists and mappings, not frozen), a sorted tuple of (key, value) pairs; an attack that
    "knows the rule" reads them (Krum's f); traced ones arrive in ``ctx.rule_hparams``.
    n_classes: number of classes (0 for regression); input_shape: one example's shape.
    features: float-feature datasets: one ``(name, mean, std)`` per input column, how a
        raw value becomes the model's input (``(raw - mean) / std``; ``()`` for images;
        None while the data is not loaded, as when a config is validated).
    goal_target: the dataset's own goal target (``TabularData.goal_target``: driving's
        steering 0, heart's class 0) when it defines a goal subgroup (``Data.goal``);
        None when it defines none or is not loaded yet.
    """

    rule: str = "mean"
    rule_kw: tuple = ()
    n_classes: int = 10
    input_shape: tuple = (28, 28, 1)
    features: tuple | None = None
    goal_target: float | None = None


class Attack(NamedTuple):
    """An adversary.

    poison(x [b, ...], y [b], key, hparams, rank [b], count, in_goal [b]) -> (x, y):
        applied to malicious clients' batches during local training (data poisoning);
        ``rank`` is each row's rank in the client's random poison order of its ``count``
        samples (``fedsim.attacks.data``); ``in_goal`` (bool, keyword) marks the rows in
        the dataset's own goal subgroup (``Data.goal``); ``None`` for none.
    craft(updates [n, d], is_malicious [n] bool, ctx) -> updates [n, d]: rewrites the
        malicious rows in-graph (model poisoning); ``None`` for none. Honest rows must be
        returned unchanged.
    needs_benign: if True the engine also trains malicious clients on clean data and
        passes the result as ``ctx.benign_updates``.
    success(predict, x [t, ...], y [t], in_goal [t]) -> scalar in [0, 1]: the attack
        success rate on the test set (or a dict of metrics holding
        ``attack_success_rate``), with ``predict(x) -> outputs [t, k]`` (targeted,
        backdoor, ...) and ``in_goal`` (keyword) the test samples of the dataset's goal
        subgroup (``Data.goal_test``); ``None`` for untargeted attacks (their effect is
        the accuracy drop).
    goal_batch: how many goal samples ``craft`` needs in ``ctx.goal_x`` (0: none).
    """

    poison: Callable | None = None
    craft: Callable | None = None
    needs_benign: bool = False
    success: Callable | None = None
    goal_batch: int = 0
