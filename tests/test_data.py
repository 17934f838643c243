import time

import numpy as np
import pytest

from fedsim.data import load
from fedsim.registry import ConfigError


def test_digits_shapes_and_range():
    ds = load("digits")
    assert ds.x_train.shape[1:] == (8, 8, 1) and ds.x_train.dtype == np.uint8
    assert len(ds.x_train) + len(ds.x_test) == 1797
    assert ds.x_train.max() == 255 and ds.n_classes == 10
    assert set(np.unique(ds.y_train)) == set(range(10))


def test_bundled_mnist_is_the_real_mnist():
    ds = load("mnist")
    assert ds.x_train.shape == (60000, 28, 28, 1) and ds.x_test.shape == (10000, 28, 28, 1)
    assert ds.y_train.shape == (60000,) and ds.y_test.shape == (10000,)
    assert ds.y_train[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]  # MNIST's first labels
    assert np.bincount(ds.y_test).tolist()[:3] == [980, 1135, 1032]


def test_missing_tfds_folder_fails_fast_with_instructions(tmp_path):
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="not prepared.*download_and_prepare"):
        load("fashion_mnist", source="tfds", data_dir=str(tmp_path))
    assert time.perf_counter() - start < 5


def test_unknown_dataset_lists_choices():
    with pytest.raises(
        ConfigError,
        match="choose one of: breast_cancer, diabetes, digits, driving, heart, mnist",
    ):
        load("cifar")
