"""Models (registry ``REGISTRY``): flax modules used functionally.

``make(name, n_outputs, **kw)`` returns a flax module; fedsim only ever uses
``module.init(key, x)["params"]`` (a params pytree) and the pure
``module.apply({"params": p}, x) -> outputs [b, n_outputs]`` (logits for classification,
one value for regression: the ``Task`` says). Inputs are float32 ``[b, ...]``: images
``[b, H, W, C]`` in [0, 1] or feature vectors ``[b, F]`` (the dataset scales them).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn

from fedsim.registry import Registry

REGISTRY = Registry("model")


class LogReg(nn.Module):
    """A linear model on the flattened input: multinomial logistic regression under a
    classification task, linear regression under a regression task."""

    n_outputs: int

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.n_outputs)(x.reshape(x.shape[0], -1))


class MLP(nn.Module):
    """Fully connected ReLU network; ``widths`` are the hidden layer sizes."""

    n_outputs: int
    widths: Sequence[int] = (100,)

    @nn.compact
    def __call__(self, x):
        h = x.reshape(x.shape[0], -1)
        for width in self.widths:
            h = nn.relu(nn.Dense(width)(h))
        return nn.Dense(self.n_outputs)(h)


class CNN(nn.Module):
    """The 2-conv MNIST CNN of McMahan et al. 2017: conv5x5(32)-pool-conv5x5(64)-pool-
    dense(512)-dense(n_outputs), ReLU, 'SAME' padding, 2x2 max pooling."""

    n_outputs: int
    channels: Sequence[int] = (32, 64)
    hidden: int = 512

    @nn.compact
    def __call__(self, x):
        h = x
        for ch in self.channels:
            h = nn.relu(nn.Conv(ch, (5, 5), padding="SAME")(h))
            h = nn.max_pool(h, (2, 2), strides=(2, 2), padding="SAME")
        h = h.reshape(h.shape[0], -1)
        h = nn.relu(nn.Dense(self.hidden)(h))
        return nn.Dense(self.n_outputs)(h)


@REGISTRY.register("logreg")
def make_logreg(n_outputs: int) -> nn.Module:
    return LogReg(n_outputs)


@REGISTRY.register("mlp")
def make_mlp(n_outputs: int, widths: Sequence[int] = (100,)) -> nn.Module:
    return MLP(n_outputs, tuple(int(w) for w in widths))


@REGISTRY.register("cnn")
def make_cnn(n_outputs: int, channels: Sequence[int] = (32, 64), hidden: int = 512) -> nn.Module:
    return CNN(n_outputs, tuple(int(c) for c in channels), int(hidden))


def make(name: str, n_outputs: int, **kw) -> nn.Module:
    return REGISTRY.make(name, n_outputs=n_outputs, **kw)
