"""Partitions of a training set over clients (registry ``PARTITIONS``).

A partition is a host-side function ``(labels [N], n_clients, rng, **options) -> list of
index arrays``; ``pack`` turns it into device-friendly ``idx [n_clients, max_local]``
(padded with 0) and ``count [n_clients]``. Every sample goes to at most one client.
Empty clients are avoided by construction: where a scheme would leave a client empty it
takes one sample from the currently largest client (documented per scheme); a request
that cannot give every client a sample is a ``ConfigError``.
"""

from __future__ import annotations

import numpy as np

from fedsim.registry import ConfigError, Registry

PARTITIONS = Registry("partition")


def _fill_empty(parts: list[np.ndarray]) -> list[np.ndarray]:
    """Give each empty client one sample taken from the currently largest client."""
    parts = [np.asarray(p, np.int64) for p in parts]
    for i, p in enumerate(parts):
        if p.size == 0:
            donor = int(np.argmax([q.size for q in parts]))
            if parts[donor].size < 2:
                raise ConfigError("too few samples to give every client at least one")
            parts[i], parts[donor] = parts[donor][-1:], parts[donor][:-1]
    return parts


def _check_enough(n_samples: int, n_clients: int) -> None:
    if n_samples < n_clients:
        raise ConfigError(
            f"{n_clients} clients but only {n_samples} training samples; "
            f"use at most {n_samples} clients"
        )


@PARTITIONS.register("iid")
def iid(labels: np.ndarray, n_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle, then split into ``n_clients`` parts whose sizes differ by at most one."""
    _check_enough(len(labels), n_clients)
    return np.array_split(rng.permutation(len(labels)), n_clients)


@PARTITIONS.register("dirichlet")
def dirichlet(
    labels: np.ndarray, n_clients: int, rng: np.random.Generator, alpha: float = 0.5
) -> list[np.ndarray]:
    """Label skew of Hsu et al. 2019: for each class c, the shares of its samples given to
    the clients are drawn from Dir(alpha * 1). Small alpha = each client sees few classes.
    Empty clients take one sample from the largest client."""
    if not alpha > 0:
        raise ConfigError(f"partition.alpha must be > 0, got {alpha}")
    _check_enough(len(labels), n_clients)
    parts: list[list[np.ndarray]] = [[] for _ in range(n_clients)]
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        shares = rng.dirichlet(np.full(n_clients, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
        for i, chunk in enumerate(np.split(members, cuts)):
            parts[i].append(chunk)
    return _fill_empty([np.concatenate(p) for p in parts])


@PARTITIONS.register("shards")
def shards(
    labels: np.ndarray, n_clients: int, rng: np.random.Generator, shards_per_client: int = 2
) -> list[np.ndarray]:
    """McMahan et al. 2017: sort by label, cut into ``n_clients * shards_per_client`` equal
    shards, deal ``shards_per_client`` random shards to each client."""
    n_shards = n_clients * shards_per_client
    if shards_per_client < 1 or n_shards > len(labels):
        raise ConfigError(
            f"shards: n_clients * shards_per_client = {n_shards} must be between 1 and the "
            f"{len(labels)} training samples"
        )
    order = np.argsort(labels, kind="stable")
    pieces = np.array_split(order, n_shards)
    dealt = rng.permutation(n_shards).reshape(n_clients, shards_per_client)
    return [np.concatenate([pieces[s] for s in row]) for row in dealt]


@PARTITIONS.register("classes_per_client")
def classes_per_client(
    labels: np.ndarray, n_clients: int, rng: np.random.Generator, classes: int = 2
) -> list[np.ndarray]:
    """Each client holds exactly ``classes`` distinct classes (how representative a
    client's data is). Client i gets classes ``perm[(i*classes + j) % C]``, j < classes,
    so classes are used evenly; each class's samples are split evenly among its holders.
    Classes no client holds are left out."""
    all_classes = np.unique(labels)
    n_cls = len(all_classes)
    if not 1 <= classes <= n_cls:
        raise ConfigError(f"partition.classes must be between 1 and {n_cls}, got {classes}")
    perm = rng.permutation(all_classes)
    held = [[perm[(i * classes + j) % n_cls] for j in range(classes)] for i in range(n_clients)]
    holders = {c: [i for i in range(n_clients) if c in held[i]] for c in all_classes}
    parts: list[list[np.ndarray]] = [[] for _ in range(n_clients)]
    for c, who in holders.items():
        if not who:
            continue
        members = rng.permutation(np.flatnonzero(labels == c))
        if len(members) < len(who):
            raise ConfigError(
                f"class {c} has {len(members)} samples for {len(who)} clients; "
                "use fewer clients or more classes per client"
            )
        for i, chunk in zip(who, np.array_split(members, len(who)), strict=True):
            parts[i].append(chunk)
    return [np.concatenate(p) for p in parts]


QUANTILE_BINS = 10


def label_bins(labels: np.ndarray) -> np.ndarray:
    """Class ids as they are; float regression targets as their decile (0..9), so that
    the label-skew schemes split a regression set by a quantile of its target."""
    labels = np.asarray(labels)
    if np.issubdtype(labels.dtype, np.integer):
        return labels
    edges = np.quantile(labels, np.linspace(0, 1, QUANTILE_BINS + 1)[1:-1])
    return np.searchsorted(edges, labels, side="right").astype(np.int32)


def partition(
    name: str, labels: np.ndarray, n_clients: int, seed: int, groups=None, **options
) -> list[np.ndarray]:
    """Run partition ``name``; options are the scheme's keyword arguments. Group schemes
    (``hospital``, ``car``: ``fedsim.data.group_partition``) split by ``groups``, the
    samples' natural owners; the others by ``label_bins(labels)``."""
    from fedsim.data.group_partition import GROUP_PARTITIONS, partition_groups

    if name in GROUP_PARTITIONS:
        if groups is None:
            raise ConfigError(
                f"partition {name!r} follows the dataset's own groups (hospitals, cars); "
                "this dataset has none: use iid or dirichlet"
            )
        return partition_groups(name, groups, n_clients, seed, **options)
    fn = PARTITIONS.get(name)
    try:
        parts = fn(label_bins(labels), n_clients, np.random.default_rng(seed), **options)
    except TypeError as err:
        raise ConfigError(f"partition {name!r}: {err}") from None
    if any(len(p) == 0 for p in parts):
        raise ConfigError(f"partition {name!r} left a client without data")
    return [np.sort(p) for p in parts]


def pack(parts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Index lists -> ``idx int32 [n_clients, max_local]`` (0-padded) and ``count [n]``."""
    count = np.array([len(p) for p in parts], np.int32)
    idx = np.zeros((len(parts), int(count.max())), np.int32)
    for i, p in enumerate(parts):
        idx[i, : len(p)] = p
    return idx, count
