"""manymodels.trees: a model read from its text, and from its compact form, predicts exactly what
``lightgbm.Booster.predict`` predicts (bitwise), for every kind of split and objective it accepts;
the models it does not reproduce are refused (``None``), so callers use the Booster."""

from __future__ import annotations

from typing import Any

import lightgbm as lgb
import numpy as np
import pandas as pd
import pytest

from manymodels.pipeline import model_categories, predict_partition, train_partition
from manymodels.spec import FrozenMap, JobSpec, spec_from_dict
from manymodels.trees import Forest, compact, load_compact, parse_forest

ROWS = 400


def _data(seed: int, *, nan: float = 0.1, zeros: float = 0.1, cat_levels: int = 0,
          positive: bool = False, binary: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Features with NaN, exact zeros and values inside ±kZeroThreshold, an optional categorical
    column of integer codes (column 0), and a target that depends on them."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(ROWS, 5)) * rng.choice([1.0, 10.0, 1000.0])
    X[rng.random(X.shape) < zeros] = 0.0
    X[rng.random(X.shape) < 0.02] = 1e-37
    if cat_levels:
        X[:, 0] = rng.integers(0, cat_levels, ROWS)
    y = X[:, 1] * 2 + np.where(np.isnan(X[:, 2]), 3.0, 0.0) + rng.normal(size=ROWS)
    if cat_levels:
        y += (X[:, 0] % 7) * 1.5
    X[rng.random(X.shape) < nan] = np.nan
    if cat_levels:
        X[rng.random(ROWS) < 0.05, 0] = np.nan
    y = np.nan_to_num(y)
    if binary:
        y = (y > np.median(y)).astype(float)
    elif positive:
        y = np.abs(y) + 0.5
    return X, y


def _train(params: dict[str, Any], seed: int, **data: Any) -> lgb.Booster:
    X, y = _data(seed, **data)
    categorical = [0] if data.get("cat_levels") else []
    base = {"verbosity": -1, "seed": seed, "num_iterations": 30, "num_leaves": 15, "min_data_in_leaf": 5,
            "deterministic": True, "num_threads": 1}
    ds = lgb.Dataset(X, label=y, categorical_feature=categorical, params={"verbosity": -1})
    return lgb.train({**base, **params}, ds)


def _probe(seed: int, cat_levels: int = 0) -> np.ndarray:
    """Rows that reach every kind of branch: NaN, 0, -0.0, tiny values, huge values, and for a
    categorical column unseen, negative, fractional and very large codes."""
    rng = np.random.default_rng(seed + 1000)
    X, _ = _data(seed + 1, nan=0.15, zeros=0.15, cat_levels=cat_levels)
    X = X[:300].copy()
    X[rng.random(X.shape) < 0.03] = -0.0
    X[rng.random(X.shape) < 0.03] = 5e-36
    X[rng.random(X.shape) < 0.02] = -1e300
    if cat_levels:
        odd = np.array([-1.0, -0.5, 0.5, cat_levels + 3, 1e12, 2.0**31, 31.999, 64.0])
        X[:len(odd), 0] = odd
    return X


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and bool(np.array_equal(a.view(np.int64), b.view(np.int64)))


def _check(booster: lgb.Booster, X: np.ndarray) -> Forest:
    text = booster.model_to_string()
    forest = parse_forest(text)
    assert forest is not None, text[:300]
    expected = np.asarray(booster.predict(X))
    assert _same(forest.predict(X), expected)
    # The compact form: the same arrays, the same predictions, the same categorical metadata.
    loaded = load_compact(compact(text) or b"", text.encode())
    assert loaded is not None
    assert _same(loaded.predict(X), expected)
    reference = lgb.Booster(model_str=text)
    for model in (forest, loaded):
        assert model.params.get("categorical_feature", []) == reference.params.get("categorical_feature", [])
        assert model.pandas_categorical == reference.pandas_categorical
    assert forest.feature_name() == reference.feature_name()
    assert forest.num_trees() == reference.num_trees()
    return forest


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("missing", ["nan", "zero", "none"])
def test_numerical_splits_with_every_missing_type(seed: int, missing: str) -> None:
    params = {"zero_as_missing": missing == "zero", "use_missing": missing != "none"}
    booster = _train(params, seed, nan=0.2 if missing != "zero" else 0.0)
    kinds = {(int(d) >> 2) & 3 for t in booster.dump_model()["tree_info"]
             for d in _decision_types(t["tree_structure"])}
    assert {"none": 0, "zero": 1, "nan": 2}[missing] in kinds
    _check(booster, _probe(seed))


def _decision_types(node: dict[str, Any]) -> list[int]:
    if "split_index" not in node:
        return []
    missing = {"None": 0, "Zero": 1, "NaN": 2}[node["missing_type"]]
    return [missing << 2, *_decision_types(node["left_child"]), *_decision_types(node["right_child"])]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("levels", [5, 40, 100])
def test_categorical_splits_with_one_and_many_bitset_words(seed: int, levels: int) -> None:
    booster = _train({"max_cat_to_onehot": 4, "cat_smooth": 1, "min_data_per_group": 2,
                      "cat_l2": 1}, seed, cat_levels=levels)
    assert "num_cat=0" not in booster.model_to_string().split("Tree=1")[0] or levels == 5
    _check(booster, _probe(seed, cat_levels=levels))


@pytest.mark.parametrize("params", [
    {"objective": "regression"}, {"objective": "regression_l1"}, {"objective": "huber"},
    {"objective": "fair"}, {"objective": "quantile", "alpha": 0.3}, {"objective": "mape"},
    {"objective": "regression", "reg_sqrt": True},
    {"objective": "poisson"}, {"objective": "gamma"}, {"objective": "tweedie"},
    {"objective": "binary"}, {"objective": "cross_entropy"},
    {"boosting": "rf", "bagging_freq": 1, "bagging_fraction": 0.7},
    {"boosting": "dart"}, {"boosting": "goss"},
    {"num_iterations": 300, "learning_rate": 0.05}, {"num_leaves": 64, "min_data_in_leaf": 1},
], ids=lambda p: "-".join(f"{k}={v}" for k, v in p.items()))
def test_objectives_and_boosting(params: dict[str, Any]) -> None:
    objective = params.get("objective", "regression")
    for seed in range(3):
        booster = _train(params, seed, positive=objective in ("poisson", "gamma", "tweedie", "mape"),
                         binary=objective in ("binary", "cross_entropy"), cat_levels=12 if seed == 2 else 0)
        forest = _check(booster, _probe(seed, cat_levels=12 if seed == 2 else 0))
        assert forest.average == (params.get("boosting") == "rf")


def test_one_leaf_trees_and_constant_models() -> None:
    # min_data_in_leaf above the row count: every tree is a single leaf (LightGBM warns, then
    # writes one-leaf trees); mixed with real trees when only some iterations find a split.
    X, y = _data(1)
    constant = lgb.train({"verbosity": -1, "num_iterations": 5, "min_data_in_leaf": ROWS + 1},
                         lgb.Dataset(X, label=y, params={"verbosity": -1}))
    assert "num_leaves=1\n" in constant.model_to_string()
    _check(constant, _probe(1))
    mixed = lgb.train({"verbosity": -1, "num_iterations": 40, "min_data_in_leaf": 5, "learning_rate": 1.0,
                       "min_gain_to_split": 50.0},
                      lgb.Dataset(X, label=X[:, 1] * 0 + (np.arange(ROWS) % 2), params={"verbosity": -1}))
    _check(mixed, _probe(1))


def test_unsupported_models_are_refused() -> None:
    X, y = _data(3)
    multi = lgb.train({"verbosity": -1, "objective": "multiclass", "num_class": 3, "num_iterations": 3},
                      lgb.Dataset(X, label=np.arange(ROWS) % 3, params={"verbosity": -1}))
    linear = lgb.train({"verbosity": -1, "linear_tree": True, "num_iterations": 3},
                       lgb.Dataset(np.nan_to_num(X), label=y, params={"verbosity": -1}))
    lambda_ = _train({"objective": "cross_entropy_lambda"}, 3, binary=True)
    wide = _train({"num_leaves": 100, "min_data_in_leaf": 1}, 3)  # more leaves than one 64-bit word
    assert max(t["num_leaves"] for t in wide.dump_model()["tree_info"]) > 64
    for booster in (multi, linear, lambda_, wide):
        text = booster.model_to_string()
        assert parse_forest(text) is None and compact(text) is None
    for text in ("", "tree\nversion=v4\n", "garbage\nTree=0\nnum_leaves=x\n\nend of trees\n"):
        assert parse_forest(text) is None


def test_compact_form_is_only_used_with_its_own_text() -> None:
    a, b = (_train({}, seed).model_to_string().encode() for seed in (0, 1))
    blob = compact(a)
    assert blob is not None and len(blob) < len(a)
    assert load_compact(blob, a) is not None and load_compact(blob) is not None
    assert load_compact(blob, b) is None  # another model's text
    assert load_compact(blob[:-8], a) is None and load_compact(blob[:-8]) is None  # torn write
    assert load_compact(blob + b"\0" * 8) is None
    assert load_compact(b"not a forest", a) is None


def _spec(**model: Any) -> JobSpec:
    params = FrozenMap({"n_estimators": 40, "num_leaves": 7, "min_data_in_leaf": 3, **model})
    data = {"source": "x", "partition_by": ["k"], "target": "y"}
    return spec_from_dict({"job": {"name": "t"}, "data": data,
                           "model": {"params": params}, "validation": {"min_rows": 10}})


@pytest.mark.parametrize("seed", range(4))
def test_pipeline_categories_text_and_pandas(seed: int) -> None:
    """Through the pipeline: text and pandas-category columns coded by the model's own categories
    (read from the text without a Booster), unseen and missing values, the same predictions."""
    rng = np.random.default_rng(seed)
    n = 300
    frame = pd.DataFrame({
        "k": "a", "x": rng.normal(size=n), "z": np.where(rng.random(n) < 0.2, np.nan, rng.normal(size=n)),
        "color": rng.choice(["red", "green", "blue", "teal", "ochre"], n),
        "size": pd.Categorical(rng.choice(["S", "M", "L"], n)),
    })
    frame["y"] = frame["x"] + frame["color"].map({"red": 3, "green": -2}).fillna(0) + \
        (frame["size"] == "L") * 2.0
    spec = _spec()
    result = train_partition(frame, spec)
    booster = lgb.Booster(model_str=result.model_str)
    forest = parse_forest(result.model_str)
    assert forest is not None
    new = frame.drop(columns="y").sample(frac=1.0, random_state=seed).reset_index(drop=True)
    new.loc[::7, "color"] = "violet"  # unseen
    new.loc[::11, "color"] = None
    new["size"] = new["size"].cat.add_categories(["XL"])
    new.loc[::5, "size"] = "XL"
    expected = predict_partition(new, spec, booster, features=result.features)
    got = predict_partition(new, spec, forest, features=result.features)
    assert _same(got, expected)
    assert model_categories(forest) == model_categories(booster)
