"""Data-poisoning attacks (and the goals of the strategic adversaries).

Each poisons exactly ``round(poison_fraction * count)`` of a malicious client's ``count``
real samples: the client draws a random order of its samples each round and hands every
row of a batch ``x [b, ...]`` (float32 in [0, 1]), ``y [b]`` (int32) its ``rank`` in that
order (padding rows rank past ``count``); rows ranked below ``round(fraction * count)``
are poisoned, whatever the batch size or padding (a traced fraction changes no shape).
Called without ``rank``, the batch is taken as the client's whole data. ``in_goal``
(bool ``[b]``) marks the rows in the dataset's own goal subgroup; only ``dataset_goal``
reads it. ``success(predict, x, y, in_goal)`` is the attack success rate on the test set.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from fedsim.attacks.base import REGISTRY
from fedsim.options import Option, anything, choice, integer, number
from fedsim.registry import ConfigError
from fedsim.types import Attack


def poisoned_rows(b: int, fraction, rank=None, count=None) -> jnp.ndarray:
    """``[b]`` bool: rows whose ``rank`` among the client's ``count`` real samples is below
    ``round(fraction * count)`` (module docstring); without ``rank``, the first
    ``round(fraction * b)`` rows."""
    if rank is None:
        rank, count = jnp.arange(b), b
    return rank < jnp.round(jnp.asarray(fraction, jnp.float32) * count)


def _check_classes(attack: str, n_classes: int, **labels) -> None:
    if n_classes < 2:
        raise ConfigError(f"attack {attack!r} needs a classification task (n_classes >= 2)")
    for name, value in labels.items():
        if value is not None and not 0 <= value < n_classes:
            raise ConfigError(
                f"attack {attack!r}: option {name!r} must be a class in [0, {n_classes - 1}], "
                f"got {value!r}"
            )


def _hit_rate(predict, x, target, relevant) -> jnp.ndarray:
    """Fraction of ``relevant`` test inputs ``x`` predicted as ``target`` ([t] or scalar)."""
    hit = (jnp.argmax(predict(x), axis=-1) == target) & relevant
    total = jnp.sum(relevant)
    return jnp.where(total > 0, jnp.sum(hit) / jnp.maximum(total, 1), 0.0)


FRACTION = Option(1.0, number(0.0, 1.0), traced=True)


def flip_all(y, n_classes: int):
    """The all-classes flip ``y -> C-1-y`` (Fang et al. 2020's label flipping), made a
    derangement: with an odd ``C`` the middle class ``m`` would map to itself, so ``0``,
    ``m`` and ``C-1`` rotate instead (``0 -> C-1 -> m -> 0``)."""
    flipped = n_classes - 1 - y
    if n_classes % 2 == 0:
        return flipped
    mid = (n_classes - 1) // 2
    flipped = jnp.where(y == n_classes - 1, mid, flipped)
    return jnp.where(y == mid, 0, flipped)


@REGISTRY.register(
    "label_flip",
    options={
        "source": Option(None, integer(0, allow_none=True)),
        "target": Option(None, integer(0, allow_none=True)),
        "poison_fraction": FRACTION,
    },
)
def make_label_flip(setup, **o) -> Attack:
    """Label flipping: every class flipped by :func:`flip_all`, or ``source -> target``.

    Options: ``source``/``target`` (distinct ints, both or neither), ``poison_fraction``
    (traced, default 1). Success: fraction of test inputs predicted as their flipped label
    (of the ``source`` class only when given); no class maps to itself, so a correct
    prediction never counts as a success.
    """
    source, target, c = o["source"], o["target"], setup.n_classes
    if (source is None) != (target is None):
        raise ConfigError("attack 'label_flip': give both 'source' and 'target', or neither")
    _check_classes("label_flip", c, source=source, target=target)
    if source is not None and source == target:
        raise ConfigError("attack 'label_flip': 'source' and 'target' must differ")

    def flip(y):
        if source is None:
            return flip_all(y, c)
        return jnp.where(y == source, target, y)

    def poison(x, y, key, hparams, rank=None, count=None, in_goal=None):
        fraction = hparams.get("poison_fraction", o["poison_fraction"])
        chosen = poisoned_rows(y.shape[0], fraction, rank, count)
        return x, jnp.where(chosen, flip(y), y).astype(y.dtype)

    def success(predict, x, y, in_goal=None):
        relevant = jnp.ones_like(y, bool) if source is None else y == source
        return _hit_rate(predict, x, flip(y), relevant)

    return Attack(poison=poison, success=success)


@REGISTRY.register(
    "targeted",
    options={
        "source": Option(1, integer(0)),
        "target": Option(None, integer(0, allow_none=True)),
        "poison_fraction": FRACTION,
    },
)
def make_targeted(setup, **o) -> Attack:
    """Targeted misclassification: relabel ``source``-class examples as ``target``.

    Options: ``source`` (default 1), ``target`` (default 7, or C-1 when C <= 7),
    ``poison_fraction`` (traced, default 1). Success: fraction of the test inputs of class
    ``source`` predicted as ``target``.
    """
    c = setup.n_classes
    source = o["source"]
    target = o["target"] if o["target"] is not None else (7 if c > 7 else c - 1)
    _check_classes("targeted", c, source=source, target=target)
    if source == target:
        raise ConfigError("attack 'targeted': 'source' and 'target' must differ")

    def poison(x, y, key, hparams, rank=None, count=None, in_goal=None):
        fraction = hparams.get("poison_fraction", o["poison_fraction"])
        chosen = poisoned_rows(y.shape[0], fraction, rank, count)
        return x, jnp.where(chosen & (y == source), target, y).astype(y.dtype)

    def success(predict, x, y, in_goal=None):
        return _hit_rate(predict, x, target, y == source)

    return Attack(poison=poison, success=success)


def trigger_mask(shape: tuple, pattern: str, size: int, corner: str) -> np.ndarray:
    """Boolean mask of one example's ``shape`` ([H, W, C], [H, W] or [F]) set by the trigger.

    Images: a ``size x size`` filled square, or a plus of arm length ``size // 2`` through
    the square's centre, in ``corner`` one pixel from the border, on every channel.
    Vectors ([F]): the ``size`` features at the end (``bottom_right``) or start (others).
    """
    mask = np.zeros(shape, bool)
    if len(shape) == 1:
        size = min(size, shape[0])
        if corner == "bottom_right":
            mask[shape[0] - size :] = True
        else:
            mask[:size] = True
        return mask
    h, w = shape[0], shape[1]
    size = max(1, min(size, h - 2, w - 2))
    top = h - 1 - size if corner.startswith("bottom") else 1
    left = w - 1 - size if corner.endswith("right") else 1
    patch = np.zeros((size, size), bool)
    if pattern == "square":
        patch[:] = True
    else:
        mid = size // 2
        patch[mid, :] = True
        patch[:, mid] = True
    mask[top : top + size, left : left + size, ...] = patch.reshape(
        patch.shape + (1,) * (len(shape) - 2)
    )
    return mask


@REGISTRY.register(
    "backdoor",
    options={
        "target": Option(0, integer(0)),
        "pattern": Option("square", choice("square", "plus")),
        "size": Option(3, integer(1)),
        "corner": Option(
            "bottom_right", choice("bottom_right", "bottom_left", "top_right", "top_left")
        ),
        "value": Option(1.0, number()),
        "poison_fraction": Option(0.5, number(0.0, 1.0), traced=True),
    },
)
def make_backdoor(setup, **o) -> Attack:
    """BadNets backdoor (Gu et al. 2017): stamp a pixel trigger and relabel as ``target``.

    Options: ``target`` (default 0), ``pattern`` (square | plus, default square), ``size``
    (default 3 pixels), ``corner`` (bottom_right | bottom_left | top_right | top_left),
    ``value`` (trigger intensity, default 1.0), ``poison_fraction`` (traced, default 0.5).
    Success: triggered test inputs whose true label is not ``target`` classified as it.
    """
    target = o["target"]
    _check_classes("backdoor", setup.n_classes, target=target)

    def stamp(x):
        mask = jnp.asarray(trigger_mask(x.shape[1:], o["pattern"], o["size"], o["corner"]))
        return jnp.where(mask, jnp.asarray(o["value"], x.dtype), x)

    def poison(x, y, key, hparams, rank=None, count=None, in_goal=None):
        fraction = hparams.get("poison_fraction", o["poison_fraction"])
        chosen = poisoned_rows(y.shape[0], fraction, rank, count)
        bx = chosen.reshape((-1,) + (1,) * (x.ndim - 1))
        return jnp.where(bx, stamp(x), x), jnp.where(chosen, target, y).astype(y.dtype)

    def success(predict, x, y, in_goal=None):
        return _hit_rate(predict, stamp(x), target, y != target)

    return Attack(poison=poison, success=success)


def _feature_column(setup, feature) -> tuple[int, float, float]:
    """``(column, mean, std)`` of the raw feature ``feature`` in the model's input
    (``(0, 0, 1)`` while the data is not known yet: ``setup.features`` None, as when a
    config is validated before loading its data)."""
    if setup.features is None:
        return 0, 0.0, 1.0
    names = [unit[0] for unit in setup.features]
    if feature not in names:
        raise ConfigError(
            f"attack 'subgroup': option 'feature' must name an input feature "
            f"({', '.join(names) or 'this dataset has none: use a float-feature dataset'}), "
            f"got {feature!r}"
        )
    i = names.index(feature)
    return i, setup.features[i][1], setup.features[i][2]


@REGISTRY.register(
    "subgroup",
    options={
        "feature": Option(None, anything),
        "at_least": Option(None, number(allow_none=True)),
        "at_most": Option(None, number(allow_none=True)),
        "source": Option(None, integer(0, allow_none=True)),
        "target": Option(0, integer(0)),
        "poison_fraction": FRACTION,
    },
)
def make_subgroup(setup, **o) -> Attack:
    """A subgroup's misdiagnosis: samples of class ``source`` (any class when null) whose
    raw ``feature`` lies in ``[at_least, at_most]`` (either bound may be null) relabelled
    ``target``: on ``heart``, ``{feature: trestbps, at_least: 140, source: 1, target: 0}``
    is the paper's health goal (diseased patients with resting blood pressure >= 140
    diagnosed healthy; 192 patients). The bounds are in the feature's raw units and
    mapped through the dataset's own standardisation (``AttackSetup.features``).

    Options: ``feature``, ``at_least``, ``at_most``, ``source``, ``target`` (default 0),
    ``poison_fraction`` (traced, default 1). Without bounds the subgroup is the whole
    ``source`` class (every sample when ``source`` is null too). Success: the share of
    the subgroup's test samples predicted ``target`` (``attack_success_rate``), beside the
    accuracy on every other test sample (``accuracy_rest``).
    """
    bounded = o["at_least"] is not None or o["at_most"] is not None
    if bounded and o["feature"] is None:
        raise ConfigError("attack 'subgroup': bounds need a 'feature' to apply to")
    col, mean, std = _feature_column(setup, o["feature"]) if bounded else (0, 0.0, 1.0)
    _check_classes("subgroup", setup.n_classes, source=o["source"], target=o["target"])
    if o["source"] is not None and o["source"] == o["target"]:
        raise ConfigError("attack 'subgroup': 'source' and 'target' must differ")
    # the bounds go through the same float64 arithmetic as the data, then to float32
    low = None if o["at_least"] is None else np.float32((o["at_least"] - mean) / std)
    high = None if o["at_most"] is None else np.float32((o["at_most"] - mean) / std)
    target = o["target"]

    def member(x, y):
        value = x.reshape(x.shape[0], -1)[:, col]
        inside = jnp.ones_like(y, bool) if o["source"] is None else y == o["source"]
        if low is not None:
            inside &= value >= low
        if high is not None:
            inside &= value <= high
        return inside

    def poison(x, y, key, hparams, rank=None, count=None, in_goal=None):
        fraction = hparams.get("poison_fraction", o["poison_fraction"])
        chosen = poisoned_rows(y.shape[0], fraction, rank, count) & member(x, y)
        return x, jnp.where(chosen, target, y).astype(y.dtype)

    def success(predict, x, y, in_goal=None):
        inside = member(x, y)
        pred = jnp.argmax(predict(x), axis=-1)
        share = lambda hit, among: jnp.sum(hit & among) / jnp.maximum(jnp.sum(among), 1)
        return {
            "attack_success_rate": share(pred == target, inside),
            "accuracy_rest": share(pred == y, ~inside),
        }

    return Attack(poison=poison, success=success)


@REGISTRY.register(
    "dataset_goal",
    options={
        "target": Option(None, number(allow_none=True)),
        "poison_fraction": FRACTION,
    },
)
def make_dataset_goal(setup, **o) -> Attack:
    """The dataset's own goal: its goal subgroup's labels set to ``target`` (default the
    dataset's ``goal_target``). The subgroup is the dataset's (``Data.goal``, handed to
    ``poison``/``success`` as ``in_goal``), not a rule on the features: on ``driving`` the
    samples on right curves by the lane geometry under the car, with target steering 0
    (go straight on right curves); on ``heart`` the diseased patients with blood pressure
    >= 140, target 0 (healthy).

    Options: ``target`` (a class for classification, any number for regression; null =
    the dataset's), ``poison_fraction`` (traced, default 1). Success on the goal's test
    samples: classification, the share predicted ``target`` (``attack_success_rate``)
    and the accuracy on every other test sample (``accuracy_rest``); regression, the
    share predicted closer to ``target`` than to the true label
    (``attack_success_rate``), the mean signed error toward the target
    (``goal_shift = mean((pred - y) * sign(target - y))``, in label units), the mean
    prediction (``goal_prediction``), and the mean absolute error on every other test
    sample (``mae_rest``).
    """
    known = setup.features is not None  # None: the data is not loaded (config validation)
    if known and setup.goal_target is None:
        raise ConfigError(
            "attack 'dataset_goal': this dataset defines no goal subgroup; use one that "
            "does (driving, heart, breast_cancer) or another goal (targeted, subgroup)"
        )
    target = o["target"] if o["target"] is not None else (setup.goal_target or 0.0)
    regression = setup.n_classes < 2
    if not regression:
        if float(target) != int(target):
            raise ConfigError(f"attack 'dataset_goal': 'target' must be a class, got {target!r}")
        target = int(target)
        _check_classes("dataset_goal", setup.n_classes, target=target)

    def poison(x, y, key, hparams, rank=None, count=None, in_goal=None):
        if in_goal is None:
            return x, y
        fraction = hparams.get("poison_fraction", o["poison_fraction"])
        chosen = poisoned_rows(y.shape[0], fraction, rank, count) & in_goal
        return x, jnp.where(chosen, jnp.asarray(target, y.dtype), y).astype(y.dtype)

    def share(hit, among):
        return jnp.sum(hit & among) / jnp.maximum(jnp.sum(among), 1)

    def mean_over(values, among):
        return jnp.sum(jnp.where(among, values, 0.0)) / jnp.maximum(jnp.sum(among), 1)

    def success(predict, x, y, in_goal=None):
        inside = jnp.zeros(y.shape, bool) if in_goal is None else in_goal
        out = predict(x)
        if not regression:
            pred = jnp.argmax(out, axis=-1)
            return {
                "attack_success_rate": share(pred == target, inside),
                "accuracy_rest": share(pred == y, ~inside),
            }
        pred = out[:, 0]
        return {
            "attack_success_rate": share(jnp.abs(pred - target) < jnp.abs(pred - y), inside),
            "goal_shift": mean_over((pred - y) * jnp.sign(target - y), inside),
            "goal_prediction": mean_over(pred, inside),
            "mae_rest": mean_over(jnp.abs(pred - y), ~inside),
        }

    return Attack(poison=poison, success=success)


GOALS = ("label_flip", "targeted", "backdoor", "subgroup", "dataset_goal")


def make_goal(goal, setup) -> Attack:
    """Build a goal given as a name or a ``{name: ..., **options}`` mapping."""
    if isinstance(goal, str):
        name, options = goal, {}
    elif isinstance(goal, dict) and "name" in goal:
        options = dict(goal)
        name = options.pop("name")
    else:
        raise ConfigError(
            f"option 'goal' must be a name or {{name: ..., ...}} with name one of "
            f"{', '.join(GOALS)}, got {goal!r}"
        )
    if name not in GOALS:
        raise ConfigError(f"option 'goal': unknown goal {name!r}; choose one of {', '.join(GOALS)}")
    return REGISTRY.make(name, setup=setup, **options)
