"""Attacks on one recipient at a time: peer-to-peer only.

In a peer-to-peer round (``fedsim.round.peer_round``) an adversary writes each honest
node its own message: ``craft`` runs once per recipient, with ``ctx.self_index`` the
recipient's row, ``ctx.weights`` its neighbourhood and the rows relative to its model
(``fedsim.aggregators.peer``). Every crafting attack works that way there; the ones here
only make sense so, and are refused under the star topology (``PEER_ONLY``).
"""

from __future__ import annotations

import jax.numpy as jnp

from fedsim.attacks.base import REGISTRY
from fedsim.attacks.common import count, emit, present
from fedsim.kernels import dot
from fedsim.options import Option, number
from fedsim.registry import ConfigError
from fedsim.types import Attack

PEER_ONLY = frozenset({"dissensus"})


@REGISTRY.register("dissensus", options={"epsilon": Option(1.0, number(0.0), traced=True)})
def make_dissensus(setup, **o) -> Attack:
    """Dissensus (He, Karimireddy & Jaggi 2022, "Byzantine-robust decentralized learning
    via ClippedGossip", their attack on gossip): the malicious neighbours of node ``i``
    all send ``x_i - ε Σ_{h honest in N_i} (x_h - x_i) / |N_i ∩ malicious|``, so that
    with uniform mixing they cancel ε times the pull of ``i``'s honest neighbours towards
    consensus (ε = 1: none is left; ε > 1: ``i`` is pushed away). The paper weighs by the
    gossip matrix ``W``; this form assumes uniform weights over the neighbourhood (the
    adversary does not need the degrees). Omniscient: it reads the recipient's honest
    neighbours' rows. ε traced (default 1)."""

    def craft(updates, is_malicious, ctx):
        if ctx.self_index is None:
            raise ConfigError(
                "attack 'dissensus' targets one node at a time: use a peer-to-peer topology"
            )
        eps = ctx.hparams.get("epsilon", o["epsilon"])
        here = present(ctx)
        honest = (here & ~is_malicious).astype(updates.dtype)
        x_i = updates[ctx.self_index]
        pull = dot(honest, jnp.where(here[:, None], updates, 0.0)) - jnp.sum(honest) * x_i
        crafted = x_i - eps * pull / jnp.maximum(count(here & is_malicious), 1.0)
        return emit(updates, is_malicious, crafted)

    return Attack(craft=craft)
