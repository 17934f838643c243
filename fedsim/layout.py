"""How a round lays its clients out (DESIGN.md, "Speed, by construction"): at most
``client_chunk`` clients training at once, and the client axis sharded over a device mesh.
Neither changes results beyond float reassociation; ``fedsim.memory`` picks them.
"""

from __future__ import annotations

import jax
import numpy as np

from fedsim.registry import ConfigError
from fedsim.setup import Setup


def with_layout(setup: Setup, client_chunk: int | None = None, mesh=None) -> Setup:
    """The same Setup with a client chunk size and/or a device mesh (axis ``clients``);
    with a mesh, the data is replicated over its devices."""
    if client_chunk is not None and client_chunk < 1:
        raise ConfigError(f"client chunk must be >= 1, got {client_chunk}")
    if client_chunk is not None and client_chunk >= setup.spec.participants:
        client_chunk = None
    data = setup.data
    if mesh is not None:
        if "clients" not in mesh.axis_names:
            raise ValueError(f"mesh needs a 'clients' axis, has {mesh.axis_names}")
        data = jax.device_put(data, replicated(mesh))
    return setup._replace(client_chunk=client_chunk, mesh=mesh, data=data)


def client_mesh(n_devices: int | None = None, participants: int | None = None):
    """A 1-D ``Mesh`` named ``clients`` over the first ``n_devices`` devices (default: all).
    With ``participants`` given, uses the largest device count that divides it, so every
    device holds the same number of clients. Returns None for a single device."""
    devices = jax.devices()
    n = len(devices) if n_devices is None else n_devices
    if n > len(devices):
        raise ConfigError(f"asked for {n} devices but only {len(devices)} exist")
    if participants is not None:
        n = max(k for k in range(1, n + 1) if participants % k == 0)
    if n <= 1:
        return None
    return jax.sharding.Mesh(np.asarray(devices[:n]), ("clients",))


def replicated(mesh):
    """A sharding that keeps a full copy on every device of ``mesh``."""
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def shard_clients(mesh, tree):
    """Lay the leading (client) axis of every leaf of ``tree`` over the ``clients`` axis
    of ``mesh`` (unchanged without a mesh)."""
    if mesh is None:
        return tree
    P = jax.sharding.PartitionSpec
    spec_of = lambda x: jax.sharding.NamedSharding(mesh, P("clients", *[None] * (x.ndim - 1)))
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, spec_of(x)), tree)
