"""Natural partitions that follow a group id per sample (registry ``GROUP_PARTITIONS``).

A group partition is ``(groups [N] int, n_clients, rng, **options) -> list of index
arrays``: the owner of each training sample is known (the hospital that treated the
patient, the car that recorded the frame) and clients are carved out of groups, never
across them. It reads ``TabularData.groups_train``, not the labels, which is why these
are not in ``fedsim.data.partition.PARTITIONS`` (whose schemes take labels).

- ``hospital`` (``clients_per_hospital: k``, default 1) and ``car`` (``clients_per_car:
  k``) are both ``by_group``: each group's samples are shuffled and cut into ``k`` parts
  whose sizes differ by at most one; client ``g * k + j`` is part ``j`` of group ``g``
  (groups in increasing id order). ``n_clients`` must equal ``n_groups * k``.
"""

from __future__ import annotations

import numpy as np

from fedsim.registry import ConfigError, Registry

GROUP_PARTITIONS = Registry("group partition")


def by_group(
    groups: np.ndarray,
    n_clients: int,
    rng: np.random.Generator,
    per_group: int = 1,
    option: str = "per_group",
) -> list[np.ndarray]:
    """Cut every group into ``per_group`` clients of near-equal size (see module doc)."""
    groups = np.asarray(groups)
    if groups.ndim != 1 or not np.issubdtype(groups.dtype, np.integer):
        raise ConfigError("a group partition needs one integer group id per sample")
    ids, sizes = np.unique(groups, return_counts=True)
    if isinstance(per_group, bool) or not isinstance(per_group, (int, np.integer)):
        raise ConfigError(f"partition.{option} must be an integer, got {per_group!r}")
    if per_group < 1:
        raise ConfigError(f"partition.{option} must be >= 1, got {per_group}")
    if n_clients != len(ids) * per_group:
        raise ConfigError(
            f"{len(ids)} groups x {option}={per_group} make {len(ids) * per_group} "
            f"clients, but n_clients is {n_clients}; set data.n_clients: "
            f"{len(ids) * per_group}"
        )
    small = sizes < per_group
    if small.any():
        g = int(np.flatnonzero(small)[0])
        raise ConfigError(
            f"group {ids[g]} has {sizes[g]} training samples, too few for "
            f"{option}={per_group}; use at most {int(sizes.min())}"
        )
    parts: list[np.ndarray] = []
    for g in ids:
        members = rng.permutation(np.flatnonzero(groups == g))
        parts.extend(np.array_split(members, per_group))
    return parts


@GROUP_PARTITIONS.register("hospital")
def hospital(
    groups: np.ndarray, n_clients: int, rng: np.random.Generator, clients_per_hospital: int = 1
) -> list[np.ndarray]:
    """The natural split of ``heart``: each hospital is ``clients_per_hospital`` clients."""
    return by_group(groups, n_clients, rng, clients_per_hospital, "clients_per_hospital")


@GROUP_PARTITIONS.register("car")
def car(
    groups: np.ndarray, n_clients: int, rng: np.random.Generator, clients_per_car: int = 1
) -> list[np.ndarray]:
    """The natural split of ``driving``: each car's recordings are ``clients_per_car``
    clients (1: one client per car)."""
    return by_group(groups, n_clients, rng, clients_per_car, "clients_per_car")


def partition_groups(
    name: str, groups: np.ndarray, n_clients: int, seed: int, **options
) -> list[np.ndarray]:
    """Run group partition ``name`` (like ``fedsim.data.partition.partition``): sorted
    index arrays, one per client, none empty."""
    fn = GROUP_PARTITIONS.get(name)
    try:
        parts = fn(np.asarray(groups), n_clients, np.random.default_rng(seed), **options)
    except TypeError as err:
        raise ConfigError(f"partition {name!r}: {err}") from None
    return [np.sort(p) for p in parts]
