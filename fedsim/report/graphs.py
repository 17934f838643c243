"""Pictures of the peer-to-peer topologies: one small panel per graph, nodes on a circle
(a torus on its grid), edges as lines. ``fedsim topology`` draws them."""

from __future__ import annotations

import math
from pathlib import Path

import jax
import numpy as np

from fedsim import topology as topologies
from fedsim.report.figures import _figure, save_figure

# (title, topology name, options) of the gallery
GALLERY = (
    ("ring", "ring", {}),
    ("torus 4 x 4 (wrapping)", "torus", {"rows": 4}),
    ("k_regular k=3", "k_regular", {"k": 3}),
    ("erdos_renyi p=0.2", "erdos_renyi", {"p": 0.2}),
    ("two_worlds, 2 bridges", "two_worlds", {"bridges": 2}),
    ("epidemic s=2 (one round)", "epidemic", {"s": 2}),
)


def edges_of(name: str, n_nodes: int, options: dict, seed: int = 0) -> np.ndarray:
    """``[n, n]`` bool: who aggregates whom (a fixed graph's adjacency; for a graph drawn
    every round, one round's pulls from ``seed``), self-loops removed."""
    topo = topologies.make(name, n_nodes=n_nodes, **options)
    if topo.adjacency is not None:
        links = np.array(topo.adjacency, bool)
    else:
        w = jax.numpy.ones(n_nodes)
        rows = topo.neighbourhoods(jax.random.PRNGKey(seed), jax.numpy.arange(n_nodes), w)
        links = np.asarray(rows) > 0
    np.fill_diagonal(links, False)
    return links


def layout(name: str, n_nodes: int, options: dict) -> np.ndarray:
    """``[n, 2]`` positions: a torus on its grid (``options["rows"]`` rows), two worlds as
    two circles, else a circle."""
    if name == "torus":
        cols = n_nodes // options["rows"]
        return np.array([(i % cols, -(i // cols)) for i in range(n_nodes)], float)
    angle = 2 * math.pi * np.arange(n_nodes) / n_nodes
    if name == "two_worlds":
        half = n_nodes // 2
        side = np.where(np.arange(n_nodes) < half, -1.6, 1.6)
        k = np.where(np.arange(n_nodes) < half, np.arange(n_nodes), np.arange(n_nodes) - half)
        size = np.where(np.arange(n_nodes) < half, half, n_nodes - half)
        a = 2 * math.pi * k / size
        return np.stack([side + np.cos(a), np.sin(a)], axis=1)
    return np.stack([np.cos(angle), np.sin(angle)], axis=1)


def gallery_figure(n_nodes: int = 16, malicious: tuple[int, ...] = (3,)):
    """A Figure with one panel per topology of ``GALLERY`` over ``n_nodes`` nodes; the
    ``malicious`` nodes drawn in red."""
    fig = _figure(9.0, 6.0)
    axes = fig.subplots(2, 3)
    for ax, (title, name, options) in zip(axes.ravel(), GALLERY, strict=True):
        links = edges_of(name, n_nodes, options)
        pos = layout(name, n_nodes, options)
        directed = not (links == links.T).all()
        for i, j in np.argwhere(links if directed else np.triu(links)):
            ax.plot(*pos[[i, j]].T, color="0.6", lw=0.8, zorder=1)
        colour = ["tab:red" if i in malicious else "tab:blue" for i in range(n_nodes)]
        ax.scatter(*pos.T, s=30, c=colour, zorder=2)
        ax.set_title(
            f"{title}\n{n_nodes} nodes, {int(links.sum()) // (1 if directed else 2)} "
            f"{'pulls' if directed else 'edges'}",
            fontsize=9,
        )
        ax.set_aspect("equal")
        ax.axis("off")
    return fig


def draw_gallery(path: Path, n_nodes: int = 16) -> Path:
    """Write the gallery as a PNG at ``path``."""
    return save_figure(gallery_figure(n_nodes), Path(path))
