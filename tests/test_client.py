"""Local training against a plain single-client loop (real slices, no masks, no vmap)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedsim import models
from fedsim.client import LocalSpec, epoch_order, make_local_train, per_epoch_padding

N, SHAPE = 64, (8, 8, 1)


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.integers(0, 256, (N, *SHAPE)), jnp.uint8)
    y = jnp.asarray(rng.integers(0, 10, N), jnp.int32)
    module = models.make("mlp", 10, widths=[16])
    params = module.init(jax.random.PRNGKey(1), jnp.zeros((1, *SHAPE)))["params"]
    return x, y, module, params


def plain_loop(module, params, x, y, positions, count, key, spec, lr):
    """Epochs of shuffled data in batches; the last batch of an epoch is partial."""
    opt = optax.sgd(lr)
    state = opt.init(params)
    per_epoch = -(-count // spec.batch_size)
    total = spec.steps if spec.steps is not None else spec.epochs * per_epoch
    length = per_epoch_padding(len(positions), spec.batch_size)

    def loss(p, xb, yb):
        logits = module.apply({"params": p}, xb.astype(jnp.float32) / 255.0)
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    order_key, _ = jax.random.split(key)
    grad = jax.jit(jax.grad(loss))  # compiled per batch shape; the loop stays plain
    orders = {}
    for t in range(total):
        epoch, within = divmod(t, per_epoch)
        if epoch not in orders:
            order = epoch_order(jax.random.fold_in(order_key, epoch), count, length)
            orders[epoch] = np.asarray(order)[:count]
        batch = orders[epoch][within * spec.batch_size : (within + 1) * spec.batch_size]
        rows = positions[batch]
        grads = grad(params, x[rows], y[rows])
        upd, state = opt.update(grads, state, params)
        params = optax.apply_updates(params, upd)
    return params


@pytest.mark.parametrize(
    "spec, count",
    [
        (LocalSpec(batch_size=8, epochs=2, steps=None), 21),  # partial last batch
        (LocalSpec(batch_size=32, epochs=1, steps=None), 5),  # client smaller than a batch
        (LocalSpec(batch_size=4, epochs=None, steps=7), 10),  # step mode crossing epochs
    ],
)
def test_local_training_equals_plain_loop(problem, spec, count):
    x, y, module, params = problem
    positions = np.random.default_rng(2).permutation(N)[:40].astype(np.int32)  # P = 40
    key = jax.random.PRNGKey(7)
    train = jax.jit(make_local_train(module.apply, spec))
    hp = {"lr": jnp.float32(0.3), "momentum": jnp.float32(0.0), "attack": {}}
    n_steps = 20  # loop bound above the client's own steps: the extra ones are no-ops
    update = train(params, x, y, jnp.asarray(positions), jnp.int32(count), n_steps, key, hp, False)
    expected = plain_loop(module, params, x, y, positions, count, key, spec, 0.3)
    for got, want, start in zip(
        jax.tree.leaves(update), jax.tree.leaves(expected), jax.tree.leaves(params), strict=True
    ):
        np.testing.assert_allclose(got, want - start, rtol=2e-5, atol=2e-6)


def test_epoch_order_is_a_permutation_of_the_clients_positions():
    order = np.asarray(epoch_order(jax.random.PRNGKey(0), 13, 16))
    assert sorted(order[:13].tolist()) == list(range(13))
    assert (order[13:] <= 12).all()


def test_single_step_and_oversized_batch_match_the_plain_loop(problem):
    x, y, module, params = problem
    positions = np.arange(6, dtype=np.int32)  # P = 6 < batch 32: the batch shrinks to 6
    key = jax.random.PRNGKey(3)
    hp = {"lr": jnp.float32(0.3), "momentum": jnp.float32(0.0), "attack": {}}
    for spec in (LocalSpec(32, None, 1), LocalSpec(32, None, 3), LocalSpec(32, 2, None)):
        train = jax.jit(make_local_train(module.apply, spec))
        update = train(params, x, y, jnp.asarray(positions), jnp.int32(5), 4, key, hp, False)
        expected = plain_loop(module, params, x, y, positions, 5, key, spec, 0.3)
        for got, want, start in zip(
            jax.tree.leaves(update),
            jax.tree.leaves(expected),
            jax.tree.leaves(params),
            strict=True,
        ):
            np.testing.assert_allclose(got, want - start, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize(
    "count, batch, epochs",
    [(5, 16, 1), pytest.param(21, 8, 2, marks=pytest.mark.slow), (7, 4, 1)],
)
def test_poison_fraction_counts_real_samples_only(problem, count, batch, epochs):
    """Backdoor at fraction 0.5 poisons exactly round(0.5 * count) of the client's real
    samples in every epoch, never padding, whatever the batch size (issue: a client with 5
    samples and batch 16 was poisoned at 100%)."""
    from fedsim.attacks import make as make_attack
    from fedsim.types import AttackSetup

    x, y, module, params = problem
    attack = make_attack("backdoor", target=0, setup=AttackSetup(n_classes=10, input_shape=SHAPE))
    seen = []

    def poison(xb, yb, key, hp, rank, cnt):
        px, py = attack.poison(xb, yb, key, hp, rank, cnt)
        chosen = jnp.any(px != xb, axis=(1, 2, 3))  # the rows the attack stamped
        jax.debug.callback(lambda c, r: seen.append((int(c), np.asarray(r))), chosen.sum(), rank)
        return px, py

    spec = LocalSpec(batch_size=batch, epochs=epochs, steps=None)
    train = make_local_train(module.apply, spec, poison=poison)
    positions = jnp.arange(40, dtype=jnp.int32)
    hp = {"lr": jnp.float32(0.1), "momentum": jnp.float32(0.0), "attack": {}}
    steps = epochs * -(-count // min(batch, 40))
    train(params, x, y, positions, jnp.int32(count), steps, jax.random.PRNGKey(0), hp, True)
    per_epoch = -(-count // batch)
    assert len(seen) == steps
    for e in range(epochs):
        epoch = seen[e * per_epoch : (e + 1) * per_epoch]
        assert sum(c for c, _ in epoch) == int(np.round(0.5 * count))
        ranks = np.concatenate([r for _, r in epoch])
        assert sorted(ranks[ranks < count].tolist()) == list(range(count))
