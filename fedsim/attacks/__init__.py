"""Adversaries, registered by name (DESIGN.md, "Types"; issue: attacks)."""

from __future__ import annotations

from fedsim.registry import Registry
from fedsim.types import Attack

REGISTRY = Registry("attack")


def make(name: str, **kw) -> Attack:
    """Build the attack registered as ``name`` with options ``kw``."""
    return REGISTRY.make(name, **kw)


@REGISTRY.register("none")
def make_none() -> Attack:
    """No adversary: every client is honest."""
    return Attack()
