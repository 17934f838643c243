"""Local training of one client (the engine vmaps it over the round's participants).

A client holds index positions ``idx_row [P]`` into the device-resident training set, of
which the first ``count`` are real. Training runs epochs of that data: each epoch
shuffles the client's ``count`` samples (a fresh key per epoch) and walks them in
batches of ``batch_size``; the last batch of an epoch is partial and its loss is the mean
over its real samples only. A client smaller than a batch therefore takes one step per
epoch on all its samples. The number of steps is ``epochs * ceil(count / batch_size)``
(epoch mode) or exactly ``steps`` (step mode, epochs continuing as needed).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedsim.registry import ConfigError
from fedsim.task import cross_entropy

OPTIMIZERS = ("sgd", "momentum", "adam")


def make_optimizer(name: str, lr, momentum=0.9) -> optax.GradientTransformation:
    """Client/server optimizer by name; ``lr`` and ``momentum`` may be traced scalars."""
    if name == "sgd":
        return optax.sgd(lr)
    if name == "momentum":
        return optax.sgd(lr, momentum=momentum)
    if name == "adam":
        return optax.adam(lr)
    raise ConfigError(f"unknown optimizer {name!r}; choose one of: {', '.join(OPTIMIZERS)}")


class LocalSpec(NamedTuple):
    """Static shape of local training."""

    batch_size: int
    epochs: int | None  # epoch mode when set
    steps: int | None  # step mode when set
    optimizer: str = "sgd"
    min_count: int = 1  # smallest client's sample count (bounds the epochs step mode needs)
    x_scale: float = 1.0 / 255.0  # the model sees x.astype(float32) * x_scale

    def epochs_bound(self) -> int:
        """Most epochs any client can start: the data orders shuffled up front."""
        if self.steps is None:
            return self.epochs
        return -(-self.steps // (-(-self.min_count // self.batch_size)))


def n_local_steps(spec: LocalSpec, count):
    """Steps a client with ``count`` samples takes (works on ints and arrays)."""
    if spec.steps is not None:
        return jnp.full_like(count, spec.steps) if hasattr(count, "shape") else spec.steps
    return spec.epochs * ((count + spec.batch_size - 1) // spec.batch_size)


def make_local_train(apply_fn, spec: LocalSpec, poison=None, loss=cross_entropy):
    """Build ``local_train(params, data_x, data_y, idx_row, count, n_steps, key, hp,
    is_malicious, data_goal=None) -> update`` for one client.

    params: the global params pytree; data_x ``[N, ...]`` (uint8 images or float features,
    scaled by ``spec.x_scale``), data_y ``[N]``; ``loss(outputs, y, mask)``: the task's;
    idx_row int32 ``[P]``; count, n_steps: int32 scalars (``n_steps`` is the loop bound in
    epoch mode, the same for every client of the round: steps past the client's own are
    no-ops; step mode always runs exactly ``spec.steps``);
    hp: ``{"lr", "momentum", "attack": {...}}`` traced scalars; data_goal: bool ``[N]``,
    the dataset's goal subgroup, handed to ``poison`` as ``in_goal`` of each batch row
    (when given). Returns the update
    (local params - global params), a pytree like ``params``.
    """

    def local_train(
        params, data_x, data_y, idx_row, count, n_steps, key, hp, is_malicious, data_goal=None
    ):
        # No client holds more than P samples: a batch larger than P would be padding only.
        batch = min(spec.batch_size, idx_row.shape[0])
        optimizer = make_optimizer(spec.optimizer, hp["lr"], hp["momentum"])
        per_epoch = (count + batch - 1) // batch
        own_steps = n_local_steps(spec, count)
        padded = per_epoch_padding(idx_row.shape[0], batch)
        order_key, poison_key = jax.random.split(key)
        # One shuffle per epoch, up front: sorting inside the step loop cost more than the
        # step's own matmuls.
        epoch_keys = jax.vmap(lambda e: jax.random.fold_in(order_key, e))(
            jnp.arange(spec.epochs_bound())
        )
        orders = jax.vmap(lambda k: epoch_order(k, count, padded))(epoch_keys)
        if poison is not None:  # each sample's rank in this round's poison order
            rank_key, poison_key = jax.random.split(poison_key)
            poison_rank = sample_ranks(rank_key, count, idx_row.shape[0])

        def loss_fn(p, x, y, mask):
            return loss(apply_fn({"params": p}, x), y, mask)

        def step(t, carry, masked, delta_only=False):
            p, opt_state = carry
            epoch, within = t // per_epoch, t % per_epoch
            pos = jax.lax.dynamic_slice(orders[epoch], (within * batch,), (batch,))
            mask = ((within * batch + jnp.arange(batch)) < count).astype(jnp.float32)
            rows = idx_row[pos]
            x, y = data_x[rows].astype(jnp.float32) * spec.x_scale, data_y[rows]
            if poison is not None:
                rank = jnp.where(mask > 0, poison_rank[pos], idx_row.shape[0])
                in_goal = {} if data_goal is None else {"in_goal": data_goal[rows]}
                k_t = jax.random.fold_in(poison_key, t)
                px, py = poison(x, y, k_t, hp["attack"], rank, count, **in_goal)
                x = jnp.where(is_malicious, px, x)
                y = jnp.where(is_malicious, py, y)
            grads = jax.grad(loss_fn)(p, x, y, mask)
            upd, new_opt = optimizer.update(grads, opt_state, p)
            if delta_only:  # one step: the update is the optimizer's step itself
                return upd
            new_p = optax.apply_updates(p, upd)
            if not masked:
                return new_p, new_opt
            keep = lambda new, old: jnp.where(t < own_steps, new, old)
            return jax.tree.map(keep, new_p, p), jax.tree.map(keep, new_opt, opt_state)

        # Every client takes at least one step, all from the same global params: peeling
        # the first step keeps them shared under vmap (one large matmul for the first
        # layer, no per-client copy of the model until the first update exists).
        if spec.steps == 1:
            return step(0, (params, optimizer.init(params)), masked=False, delta_only=True)
        first = step(0, (params, optimizer.init(params)), masked=False)
        # In step mode every client takes exactly spec.steps steps: a static loop, no mask.
        if spec.steps is not None:
            rest = lambda t, carry: step(t, carry, masked=False)
            final, _ = jax.lax.fori_loop(1, spec.steps, rest, first)
        else:
            rest = lambda t, carry: step(t, carry, masked=True)
            final, _ = jax.lax.fori_loop(1, n_steps, rest, first)
        return jax.tree.map(jnp.subtract, final, params)

    return local_train


def per_epoch_padding(n_positions: int, batch: int) -> int:
    """Length of an epoch's order array: positions rounded up to whole batches."""
    return ((n_positions + batch - 1) // batch) * batch


def _shuffle_scores(key, count, length: int):
    """``[length]`` sort keys: uniform in [0, 1) for the first ``count`` positions (the
    client's samples), then increasing values past 2 (positions past its data, last)."""
    scores = jax.random.uniform(key, (length,))
    return jnp.where(jnp.arange(length) < count, scores, 2.0 + jnp.arange(length))


def sample_ranks(key, count, length: int):
    """int32 ``[length]``: a uniformly random ranking ``0..count-1`` of the first ``count``
    positions; positions past the client's data rank ``count`` and above."""
    return jnp.argsort(jnp.argsort(_shuffle_scores(key, count, length))).astype(jnp.int32)


def epoch_order(key, count, length: int):
    """A random order of positions ``0..count-1`` followed by the invalid positions,
    as int32 ``[length]``; positions past the client's data are never real samples."""
    order = jnp.argsort(_shuffle_scores(key, count, length)).astype(jnp.int32)
    return jnp.minimum(order, jnp.maximum(count - 1, 0))
