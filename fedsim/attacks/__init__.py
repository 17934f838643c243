"""Adversaries, registered by name (DESIGN.md, "Types"; issue: attacks)."""

from __future__ import annotations

from fedsim.registry import Registry
from fedsim.types import Attack

REGISTRY = Registry("attack")


def make(name: str, **kw) -> Attack:
    """Build the attack registered as ``name`` with options ``kw``."""
    return REGISTRY.make(name, **kw)


@REGISTRY.register("none")
def make_none(**kw) -> Attack:
    """No adversary: every client is honest. Takes no option (besides the engine's setup)."""
    from fedsim.attacks.common import parse

    parse("none", kw, {})
    return Attack()


# Registration happens on import; these modules need REGISTRY defined above.
from fedsim.attacks import data, strategic, untargeted  # noqa: E402, F401
from fedsim.attacks.common import project_cosine, project_l2  # noqa: E402, F401
