"""What is learned and how it is judged (DESIGN.md, "Seams": the ``Task``).

A task turns a model's outputs into a loss, an error (for error-based rules) and test
metrics, and says how wide the model's output is and what the labels are. Nothing else in
fedsim knows that labels are classes. ``make(n_classes)`` picks the task a dataset needs:
``classification`` for ``n_classes >= 2`` (integer labels, one logit per class),
``regression`` for ``n_classes == 0`` (float targets, one output).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax.numpy as jnp
import optax

Array = object


class Task(NamedTuple):
    """One learning problem.

    kind: ``classification`` | ``regression``; n_outputs: the model's output width;
    label_dtype: of ``y``. ``loss(outputs [b, k], y [b], mask [b]) -> scalar`` (mean over
    the masked rows); ``error(outputs, y) -> scalar`` (1 - accuracy, or the mean squared
    error); ``metrics(outputs [T, k], y [T]) -> dict`` of test metrics, always with
    ``test_loss``; ``main_metric``: the one a summary reports as "best" (higher is
    better).
    """

    kind: str
    n_outputs: int
    label_dtype: object
    loss: Callable
    error: Callable
    metrics: Callable
    main_metric: str


def masked_mean(values, mask):
    """Mean of ``values [b]`` over the rows where ``mask`` (float) is 1; 0 when none."""
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def cross_entropy(logits, labels, mask):
    """Mean softmax cross-entropy over the rows where ``mask`` is 1."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return masked_mean(losses, mask)


def classification(n_classes: int) -> Task:
    """Softmax cross-entropy; accuracy is the share of argmax predictions that are right."""

    def error(logits, y):
        return jnp.mean(jnp.argmax(logits, -1) != y)

    def metrics(logits, y, mask=None):
        right = jnp.argmax(logits, -1) == y
        if mask is None:
            ones = jnp.ones(y.shape[0], jnp.float32)
            return {"test_accuracy": jnp.mean(right), "test_loss": cross_entropy(logits, y, ones)}
        return {
            "test_accuracy": masked_mean(right.astype(jnp.float32), mask),
            "test_loss": cross_entropy(logits, y, mask),
        }

    return Task(
        "classification", n_classes, jnp.int32, cross_entropy, error, metrics, "test_accuracy"
    )


def regression() -> Task:
    """Squared error on one output; test metrics MSE, MAE and R² (1 - MSE / Var(y))."""

    def squared(out, y):
        return (out[:, 0] - y) ** 2

    def loss(out, y, mask):
        return masked_mean(squared(out, y), mask)

    def error(out, y):
        return jnp.mean(squared(out, y))

    def metrics(out, y, mask=None):
        mask = jnp.ones(y.shape[0], jnp.float32) if mask is None else mask
        mse = masked_mean(squared(out, y), mask)
        var = masked_mean((y - masked_mean(y, mask)) ** 2, mask)
        return {
            "test_mse": mse,
            "test_mae": masked_mean(jnp.abs(out[:, 0] - y), mask),
            "test_r2": 1.0 - mse / jnp.maximum(var, 1e-12),
            "test_loss": mse,
        }

    return Task("regression", 1, jnp.float32, loss, error, metrics, "test_r2")


def make(n_classes: int) -> Task:
    """The task of a dataset with ``n_classes`` classes (0 = regression)."""
    return classification(n_classes) if n_classes >= 2 else regression()
