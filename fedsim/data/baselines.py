"""Host-side reference learners for the float-feature tasks (numpy and scikit-learn only).

- ``central_logistic``: scikit-learn's logistic regression trained on the whole training
  split, the yardstick a clean federated logistic model must approach (within 0.03 on
  ``heart``).
- ``fedavg_logistic``: a plain-numpy FedAvg of a softmax-free binary logistic model over a
  partition (every client every round, local minibatch SGD, count-weighted mean: what
  fedsim's engine does with ``aggregator: mean`` and ``server.lr: 1``).
- ``local_logistic``: the same local training with no aggregation, one model per client
  and the same budget: the ``local_only`` baseline of the collaboration gain.
- ``collaboration_gain``: per group, test accuracy of the federated model minus that of
  the group's own local-only model.
- ``cross_validate_heart``: k-fold and leave-one-hospital-out accuracy of a central
  logistic model, preprocessing refitted on every training fold.
"""

from __future__ import annotations

import numpy as np


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def accuracy(w: np.ndarray, b: float, x: np.ndarray, y: np.ndarray) -> float:
    """Accuracy of the binary logistic model ``(w, b)`` on ``(x, y)``."""
    return float(np.mean(((x @ w + b) > 0).astype(np.int64) == y))


def central_logistic(x_train, y_train, x_test, y_test, c: float = 1.0, seed: int = 0):
    """scikit-learn ``LogisticRegression(C=c)`` on the pooled training split.

    Returns ``(test accuracy, fitted estimator)``."""
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=c, max_iter=2000, random_state=seed)
    model.fit(x_train, y_train)
    return float(model.score(x_test, y_test)), model


def _local_sgd(w, b, x, y, rng, epochs, lr, batch_size):
    """Minibatch SGD on the mean log-loss; each epoch shuffles, the last batch is partial."""
    for _ in range(epochs):
        order = rng.permutation(len(y))
        for start in range(0, len(y), batch_size):
            sel = order[start : start + batch_size]
            err = _sigmoid(x[sel] @ w + b) - y[sel]
            w = w - lr * (x[sel].T @ err) / len(sel)
            b = b - lr * float(err.mean())
    return w, b


def fedavg_logistic(
    x: np.ndarray,
    y: np.ndarray,
    parts: list[np.ndarray],
    rounds: int = 100,
    local_epochs: int = 1,
    lr: float = 0.1,
    batch_size: int = 32,
    seed: int = 0,
) -> tuple[np.ndarray, float]:
    """FedAvg of a binary logistic model, float64: every round each client in ``parts``
    (index arrays into ``x``) starts from the global model, runs ``local_epochs`` of SGD,
    and the server averages the models weighted by sample count. Returns ``(w, b)``."""
    rng = np.random.default_rng(seed)
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    w, b = np.zeros(x.shape[1]), 0.0
    sizes = np.array([len(p) for p in parts], np.float64)
    for _ in range(rounds):
        ws, bs = [], []
        for p in parts:
            wi, bi = _local_sgd(w, b, x[p], y[p], rng, local_epochs, lr, batch_size)
            ws.append(wi)
            bs.append(bi)
        w = np.average(np.stack(ws), axis=0, weights=sizes)
        b = float(np.average(bs, weights=sizes))
    return w, b


def local_logistic(
    x: np.ndarray,
    y: np.ndarray,
    parts: list[np.ndarray],
    rounds: int = 100,
    local_epochs: int = 1,
    lr: float = 0.1,
    batch_size: int = 32,
    seed: int = 0,
) -> list[tuple[np.ndarray, float]]:
    """Every client trains alone with the federation's budget: ``rounds * local_epochs``
    epochs of the same SGD on its own data. Returns one ``(w, b)`` per client."""
    rng = np.random.default_rng(seed)
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    models = []
    for p in parts:
        w, b = np.zeros(x.shape[1]), 0.0
        w, b = _local_sgd(w, b, x[p], y[p], rng, rounds * local_epochs, lr, batch_size)
        models.append((w, b))
    return models


def collaboration_gain(
    federated: tuple[np.ndarray, float],
    local: list[tuple[np.ndarray, float]],
    x_test: np.ndarray,
    y_test: np.ndarray,
    groups_test: np.ndarray,
) -> np.ndarray:
    """Per group g: accuracy of the federated model on g's test samples minus that of g's
    local-only model (``local[g]``, one client per group) on the same samples."""
    gains = []
    for g, (w, b) in enumerate(local):
        sel = groups_test == g
        gains.append(
            accuracy(*federated, x_test[sel], y_test[sel])
            - accuracy(w, b, x_test[sel], y_test[sel])
        )
    return np.array(gains)


def cross_validate_heart(folds: int = 5, seed: int = 0, c: float = 1.0) -> dict[str, float]:
    """Central logistic accuracy on ``heart``: stratified ``folds``-fold cross-validation
    over all 920 patients, and leave-one-hospital-out (train on three hospitals, test on
    the fourth). Preprocessing statistics come from each training fold only."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    from fedsim.data.tabular import (
        HOSPITALS,
        apply_heart_preprocessing,
        fit_heart_preprocessing,
        read_heart_csv,
    )

    raw = read_heart_csv()
    y = (raw["num"] > 0).astype(np.int32)
    hospital = np.array([HOSPITALS.index(h) for h in raw["dataset"]])

    def score(tr, te):
        x = apply_heart_preprocessing(raw, fit_heart_preprocessing(raw, tr))
        model = LogisticRegression(C=c, max_iter=2000).fit(x[tr], y[tr])
        return float(model.score(x[te], y[te]))

    kfold = StratifiedKFold(folds, shuffle=True, random_state=seed)
    out = {"kfold": float(np.mean([score(tr, te) for tr, te in kfold.split(y, y)]))}
    for h, name in enumerate(HOSPITALS):
        out[f"without {name}"] = score(np.flatnonzero(hospital != h), np.flatnonzero(hospital == h))
    return out
