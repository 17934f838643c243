import numpy as np
import pytest

from fedsim.data import PARTITIONS, pack, partition
from fedsim.registry import ConfigError

LABELS = np.repeat(np.arange(10), 100)  # 1000 samples, 10 balanced classes
OPTIONS = {
    "iid": {},
    "dirichlet": {"alpha": 0.3},
    "shards": {"shards_per_client": 2},
    "classes_per_client": {"classes": 3},
}


@pytest.mark.parametrize("name", PARTITIONS.names())
@pytest.mark.parametrize("n_clients", [7, 50])
def test_every_sample_at_most_once_and_no_empty_client(name, n_clients):
    parts = partition(name, LABELS, n_clients, seed=3, **OPTIONS[name])
    assert len(parts) == n_clients
    flat = np.concatenate(parts)
    assert len(np.unique(flat)) == len(flat)
    assert flat.min() >= 0 and flat.max() < len(LABELS)
    assert min(len(p) for p in parts) >= 1


@pytest.mark.parametrize("name", PARTITIONS.names())
def test_deterministic_per_seed(name):
    a = partition(name, LABELS, 20, seed=1, **OPTIONS[name])
    b = partition(name, LABELS, 20, seed=1, **OPTIONS[name])
    c = partition(name, LABELS, 20, seed=2, **OPTIONS[name])
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_iid_sizes_differ_by_at_most_one():
    sizes = [len(p) for p in partition("iid", LABELS, 30, seed=0)]
    assert sum(sizes) == len(LABELS) and max(sizes) - min(sizes) <= 1


def test_classes_per_client_holds_exactly_c_classes():
    for c in (1, 2, 5):
        parts = partition("classes_per_client", LABELS, 40, seed=0, classes=c)
        assert all(len(np.unique(LABELS[p])) == c for p in parts)


def test_shards_are_label_sorted_pieces():
    parts = partition("shards", LABELS, 50, seed=0, shards_per_client=2)
    assert sum(len(p) for p in parts) == len(LABELS)
    # 100 shards of 10 samples from label-sorted data: each client sees at most 2 labels
    assert all(len(np.unique(LABELS[p])) <= 2 for p in parts)


def test_dirichlet_skew_grows_as_alpha_shrinks():
    def mean_classes(alpha):
        parts = partition("dirichlet", LABELS, 20, seed=0, alpha=alpha)
        return np.mean([len(np.unique(LABELS[p])) for p in parts])

    assert mean_classes(0.05) < mean_classes(100.0)
    assert mean_classes(100.0) == 10


def test_dirichlet_fills_empty_clients():
    parts = partition("dirichlet", LABELS[:60], 50, seed=0, alpha=0.01)
    assert min(len(p) for p in parts) >= 1 and sum(len(p) for p in parts) == 60


def test_pack_pads_and_counts():
    idx, count = pack([np.array([3, 5]), np.array([7]), np.array([1, 2, 4])])
    assert idx.shape == (3, 3) and idx.dtype == np.int32
    assert count.tolist() == [2, 1, 3]
    assert idx[0, :2].tolist() == [3, 5] and idx[1, 0] == 7


@pytest.mark.parametrize(
    "name, n_clients, options, message",
    [
        ("iid", 2000, {}, "training samples"),
        ("dirichlet", 10, {"alpha": 0.0}, "alpha"),
        ("shards", 600, {"shards_per_client": 2}, "shards_per_client"),
        ("classes_per_client", 10, {"classes": 11}, "between 1 and 10"),
        ("dirichlet", 10, {"beta": 1.0}, "beta"),
        ("nope", 10, {}, "choose one of"),
    ],
)
def test_bad_partitions_are_config_errors(name, n_clients, options, message):
    with pytest.raises(ConfigError, match=message):
        partition(name, LABELS, n_clients, seed=0, **options)
