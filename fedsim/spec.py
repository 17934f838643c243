"""The static ``Spec`` and the traced ``HParams`` of a run (DESIGN.md, "Static versus
traced"). ``fedsim.config`` builds them from YAML; every other module reads them from here,
so no component imports the config.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flax import struct


class Items(tuple):
    """A dict frozen into a sorted tuple of (key, value) pairs (hashable, for ``Spec``)."""


def freeze(value):
    """Lists -> tuples, dicts -> ``Items``: hashable, for ``Spec``."""
    if isinstance(value, dict):
        return Items(sorted((k, freeze(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return tuple(freeze(v) for v in value)
    return value


@dataclasses.dataclass(frozen=True)
class Spec:
    """Everything that fixes shapes or code paths; a new Spec is a new compile."""

    dataset: str
    data_source: str
    data_dir: str | None
    n_clients: int
    partition: str
    partition_kw: tuple
    partition_seed: int
    model: str
    model_kw: tuple
    participants: int
    local_epochs: int | None
    local_steps: int | None
    batch_size: int
    client_optimizer: str
    server_optimizer: str
    aggregator: str
    aggregator_kw: tuple
    attack: str
    attack_kw: tuple
    judge_size: int
    judge_classes: tuple | None
    proxy_size: int | None
    proxy_classes: tuple | None
    proxy_source: str
    rounds: int
    eval_every: int
    topology: str = "star"
    topology_kw: tuple = ()
    # Host-side closed-loop evaluation (``fedsim.host_eval``): the config's
    # ``closed_loop`` options, frozen; () when off. Read on the host only.
    closed_loop: tuple = ()
    victims: tuple = ()  # peer-to-peer: the only nodes malicious neighbours craft for

    @property
    def has_pre_stages(self) -> bool:
        """Whether the aggregator runs pre-aggregation stages (``aggregator.pre``) before
        its rule, so that the round is no longer the registered rule alone."""
        return bool(thaw(self.aggregator_kw).get("pre"))


@struct.dataclass
class HParams:
    """Traced numbers: a sweep over them (or seeds) is a vmap, never a recompile."""

    client_lr: Any
    client_momentum: Any
    server_lr: Any
    server_momentum: Any
    attack_fraction: Any
    agg: dict
    attack: dict


def thaw(frozen):
    """Inverse of ``freeze``: ``Items`` -> dict, tuple -> list, recursively."""
    if isinstance(frozen, Items):
        return {k: thaw(v) for k, v in frozen}
    if isinstance(frozen, tuple):
        return [thaw(v) for v in frozen]
    return frozen
