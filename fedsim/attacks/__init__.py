"""Adversaries, registered by name (DESIGN.md, "Types"; issue: attacks).

The registry, ``make`` and the ``none`` attack live in ``base``; the attacks in ``data``
(data poisoning and the strategic adversaries' goals), ``untargeted`` (model poisoning),
``peer`` (per-recipient attacks, peer-to-peer only) and ``strategic`` (optimising within
a rule's acceptance region, ``regions``); shared option and statistics helpers in
``common``. This module only re-exports.
"""

from __future__ import annotations

from fedsim.attacks import data, peer, strategic, untargeted  # noqa: F401  (they register)
from fedsim.attacks.base import REGISTRY, make
from fedsim.attacks.common import project_cosine, project_l2

__all__ = ["REGISTRY", "make", "project_cosine", "project_l2"]
