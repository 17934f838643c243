"""The attacks' registry, ``make`` and the ``none`` attack. The attack modules import from
here, never from the package's ``__init__``, which only re-exports and imports them so that
they register.

An attack declares its options as ``fedsim.options.Option`` records at registration; its
factory receives every option (defaults filled in, checked) and the engine's ``setup``
(``AttackSetup``: the rule it faces, the task's classes and input shape)::

    @REGISTRY.register("ipm", options={"epsilon": Option(0.1, number(0.0), traced=True)})
    def make_ipm(setup, **o) -> Attack: ...
"""

from __future__ import annotations

from fedsim.options import Components
from fedsim.types import Attack, AttackSetup

REGISTRY = Components(
    "attack",
    label="attack {name!r}",
    option_label="option {option!r}",
    context={"setup": AttackSetup},
)


def make(name: str, **kw) -> Attack:
    """Build the attack registered as ``name`` with options ``kw`` (and ``setup=``)."""
    return REGISTRY.make(name, **kw)


@REGISTRY.register("none", options={})
def make_none(setup: AttackSetup) -> Attack:
    """No adversary: every client is honest. Takes no option (besides the engine's setup)."""
    return Attack()
