"""Tests of the pure per-partition pipeline (manymodels.pipeline): no Ray, no storage."""

from __future__ import annotations

import json
import math
from typing import Any

import lightgbm as lgb
import numpy as np
import pandas as pd
import pytest

from manymodels.pipeline import (
    PartitionError,
    compute_metric,
    lgb_params,
    predict_partition,
    train_partition,
)
from manymodels.spec import JobSpec, spec_from_dict
from manymodels.synth import make_transit

LINE_EFFECT = {"red": 0.0, "blue": 12.0, "green": 25.0}
FEATURES = ("line", "temp_c", "precip_mm", "wind_kph", "event")


def make_spec(*, time_column: str | None = "ts", **sections: dict[str, Any]) -> JobSpec:
    table: dict[str, Any] = {
        "job": {"name": "unit"},
        "data": {"source": "unused", "partition_by": ["station"], "target": "delay_min",
                 "exclude": ["trip_id"]},
        "model": {"params": {"n_estimators": 40, "num_leaves": 15, "min_data_in_leaf": 5}},
        "validation": {"min_rows": 30, "holdout_fraction": 0.25},
    }
    if time_column:
        table["data"]["time_column"] = time_column
    for section, values in sections.items():
        table.setdefault(section, {}).update(values)
    return spec_from_dict(table)


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    """One station, 14 days hourly (unique, increasing ts); ``line`` varies and drives the target."""
    df = make_transit(1, 24 * 14, seed=11)
    rng = np.random.default_rng(5)
    lines = np.array(list(LINE_EFFECT))[rng.integers(0, len(LINE_EFFECT), len(df))]
    df["line"] = pd.array(lines, dtype=df["line"].dtype)
    df["delay_min"] = df["delay_min"] + np.vectorize(LINE_EFFECT.get)(lines)
    return df


def _mae_on(result_model: str, rows: pd.DataFrame, spec: JobSpec) -> float:
    booster = lgb.Booster(model_str=result_model)
    pred = predict_partition(rows, spec, booster)
    return compute_metric("mae", rows["delay_min"].to_numpy(), pred)


def test_same_inputs_same_model(frame: pd.DataFrame) -> None:
    spec = make_spec()
    a, b = train_partition(frame, spec), train_partition(frame.copy(), spec)
    assert a.model_str == b.model_str
    assert a.metrics == b.metrics
    assert a.features == FEATURES
    assert a.promote and a.reason == ""


def test_time_holdout_is_latest_rows(frame: pd.DataFrame) -> None:
    spec = make_spec()
    n = len(frame)
    k = round(n * 0.25)
    result = train_partition(frame, spec)
    assert result.metrics["holdout_rows"] == k and result.metrics["train_rows"] == n - k
    assert result.rows == n
    assert result.time_min == str(frame["ts"].min()) and result.time_max == str(frame["ts"].max())
    latest = frame.sort_values("ts").iloc[n - k:]
    assert result.metric == pytest.approx(_mae_on(result.model_str, latest, spec), rel=1e-12)
    shuffled = frame.sample(frac=1.0, random_state=3)
    again = train_partition(shuffled, spec)
    assert again.model_str == result.model_str
    assert again.metric == result.metric


def test_random_holdout_without_time_column(frame: pd.DataFrame) -> None:
    spec = make_spec(time_column=None)
    n = len(frame)
    k = round(n * 0.25)
    a, b = train_partition(frame, spec), train_partition(frame, spec)
    assert a.model_str == b.model_str  # seeded
    assert a.metrics["holdout_rows"] == k
    assert "ts" not in a.features  # a datetime column is never a default feature
    assert a.time_min is None
    timed = train_partition(frame, make_spec())
    assert a.model_str != timed.model_str  # a different training sample than the latest-rows split
    latest_mae = _mae_on(a.model_str, frame.iloc[n - k:], spec)
    assert a.metric != pytest.approx(latest_mae)
    other_seed = train_partition(frame, make_spec(time_column=None, validation={"seed": 1}))
    assert other_seed.model_str != a.model_str


def test_nan_target_rows_dropped(frame: pd.DataFrame) -> None:
    df = frame.copy()
    df.loc[df.index[::10], "delay_min"] = np.nan
    dropped = int(df["delay_min"].isna().sum())
    result = train_partition(df, make_spec())
    assert result.rows == len(df) - dropped
    assert result.metrics["train_rows"] + result.metrics["holdout_rows"] == len(df) - dropped
    assert math.isfinite(result.metric)


def test_min_rows_gate(frame: pd.DataFrame) -> None:
    with pytest.raises(PartitionError, match=r"^only 20 usable rows \(min_rows = 30\)$"):
        train_partition(frame.iloc[:20], make_spec())
    df = frame.iloc[:40].copy()
    df.loc[df.index[:15], "delay_min"] = np.nan
    with pytest.raises(PartitionError, match=r"only 25 usable rows"):
        train_partition(df, make_spec())


def test_max_metric_gate(frame: pd.DataFrame) -> None:
    result = train_partition(frame, make_spec(validation={"max_metric": 0.01}))
    assert not result.promote
    assert "max_metric" in result.reason and "mae" in result.reason
    assert result.model_str  # a rejected model is still produced (registered as rejected)
    assert train_partition(frame, make_spec(validation={"max_metric": 1000.0})).promote


def test_champion_rule(frame: pd.DataFrame) -> None:
    spec = make_spec()
    # Trained on (almost) every row, so it has seen this spec's holdout: far better on it.
    better = train_partition(frame, make_spec(
        validation={"holdout_fraction": 0.01},
        model={"params": {"n_estimators": 400, "num_leaves": 63, "min_data_in_leaf": 2}})).model_str
    # Two trees at a tiny learning rate: close to a constant, far worse.
    worse = train_partition(frame, make_spec(
        model={"params": {"n_estimators": 2, "learning_rate": 0.01}})).model_str
    plain = train_partition(frame, spec)

    blocked = train_partition(frame, spec, champion=better)
    assert blocked.model_str == plain.model_str
    assert not blocked.promote
    assert "worse than the champion" in blocked.reason
    assert blocked.metrics["champion_mae"] < 0.5 * blocked.metric

    allowed = train_partition(frame, spec, champion=worse)
    assert allowed.promote and allowed.reason == ""
    assert allowed.metrics["champion_mae"] > allowed.metric

    same = train_partition(frame, spec, champion=plain.model_str)
    assert same.promote  # not worse: an equal model does not block itself


def _pandas_categorical(model_str: str) -> Any:
    """The category lists LightGBM keeps in the model text for pandas category columns."""
    line = next(x for x in model_str.splitlines() if x.startswith("pandas_categorical:"))
    return json.loads(line.split(":", 1)[1])


def test_strings_become_categoricals(frame: pd.DataFrame) -> None:
    spec = make_spec()
    result = train_partition(frame, spec)
    assert _pandas_categorical(result.model_str) == [sorted(LINE_EFFECT), sorted(set(frame["event"]))]
    booster = lgb.Booster(model_str=result.model_str)
    plain = frame[list(FEATURES)].copy()
    for c in ("line", "event"):
        plain[c] = plain[c].astype(str).astype("category")
    direct = booster.predict(plain)
    np.testing.assert_allclose(direct, predict_partition(frame, spec, booster), rtol=1e-12)
    # A frame holding only some of the categories still maps them as at training time.
    green = frame[frame["line"] == "green"]
    only_green = green[list(FEATURES)].astype({"line": "category", "event": "category"})
    assert list(only_green["line"].cat.categories) == ["green"]
    np.testing.assert_allclose(booster.predict(only_green), predict_partition(green, spec, booster),
                               rtol=1e-12)
    # The category matters: the same row on another line predicts differently.
    row = plain.iloc[[0, 0, 0]].copy()
    row["line"] = pd.Categorical(list(LINE_EFFECT))
    by_line = booster.predict(row)
    assert by_line[2] - by_line[0] > 10


def test_categorical_option_for_numeric_column(frame: pd.DataFrame) -> None:
    df = frame.assign(zone=np.arange(len(frame)) % 3)
    as_category = train_partition(df, make_spec(data={"categorical": ["zone"], "exclude": ["trip_id"]}))
    assert "zone" in as_category.features
    assert [0, 1, 2] in _pandas_categorical(as_category.model_str)
    as_number = train_partition(df, make_spec())
    assert "zone" in as_number.features
    assert [0, 1, 2] not in _pandas_categorical(as_number.model_str)


def test_prepare_failures_are_one_line(frame: pd.DataFrame) -> None:
    def boom(df: pd.DataFrame) -> pd.DataFrame:
        raise ValueError("bad input\nsecond line\nthird")

    with pytest.raises(PartitionError) as info:
        train_partition(frame, make_spec(), prepare=boom)
    assert str(info.value) == "prepare raised ValueError: bad input"

    with pytest.raises(PartitionError, match=r"^prepare returned list, not a pandas DataFrame$"):
        train_partition(frame, make_spec(), prepare=lambda df: [1, 2])  # type: ignore[arg-type,return-value]


def test_prepare_is_applied(frame: pd.DataFrame) -> None:
    def add_hour(df: pd.DataFrame) -> pd.DataFrame:
        return df.assign(hour=df["ts"].dt.hour)

    result = train_partition(frame, make_spec(), prepare=add_hour)
    assert result.features == (*FEATURES, "hour")
    booster = lgb.Booster(model_str=result.model_str)
    with pytest.raises(PartitionError, match="feature column 'hour' is missing"):
        predict_partition(frame, make_spec(), booster)
    assert len(predict_partition(frame, make_spec(), booster, prepare=add_hour)) == len(frame)
    with pytest.raises(PartitionError, match="must keep every row"):
        predict_partition(frame, make_spec(), booster, prepare=lambda df: add_hour(df).iloc[:5])


def test_num_threads(frame: pd.DataFrame) -> None:
    spec = make_spec(model={"params": {"num_threads": 8, "n_estimators": 5}})
    assert lgb_params(spec, 3)["num_threads"] == 3
    assert lgb_params(spec, 0)["num_threads"] == 1
    assert lgb_params(spec, 1)["deterministic"] is True
    result = train_partition(frame, spec, num_threads=2)
    assert "[num_threads: 2]" in result.model_str.splitlines()


def test_binary_objective(frame: pd.DataFrame) -> None:
    df = frame.assign(late=(frame["delay_min"] > frame["delay_min"].median()).astype(np.int64))
    for metric in ("auc", "logloss"):
        spec = make_spec(data={"target": "late", "exclude": ["trip_id", "delay_min"]},
                         model={"objective": "binary"}, validation={"metric": metric})
        result = train_partition(df, spec)
        assert math.isfinite(result.metric)
        if metric == "auc":
            assert 0.6 < result.metric <= 1.0
        else:
            assert 0.0 < result.metric < math.log(2)
        pred = predict_partition(df, spec, lgb.Booster(model_str=result.model_str))
        assert ((pred >= 0) & (pred <= 1)).all()
    default = make_spec(data={"target": "late", "exclude": ["trip_id", "delay_min"]},
                        model={"objective": "binary"})
    assert default.metric == "logloss"


def test_binary_target_must_be_01(frame: pd.DataFrame) -> None:
    spec = make_spec(model={"objective": "binary"})
    with pytest.raises(PartitionError, match="binary target must be 0/1"):
        train_partition(frame, spec)


def test_target_problems(frame: pd.DataFrame) -> None:
    with pytest.raises(PartitionError, match="target column 'delay_min' is missing"):
        train_partition(frame.drop(columns="delay_min"), make_spec())
    df = frame.copy()
    df.loc[df.index[3], "delay_min"] = np.inf
    with pytest.raises(PartitionError, match="infinite"):
        train_partition(df, make_spec())


def test_compute_metric_by_hand() -> None:
    y = np.array([1.0, 2.0, 3.0, 4.0])
    p = np.array([1.5, 2.0, 2.0, 5.0])
    assert compute_metric("mae", y, p) == pytest.approx((0.5 + 0 + 1 + 1) / 4)
    assert compute_metric("rmse", y, p) == pytest.approx(math.sqrt((0.25 + 0 + 1 + 1) / 4))
    # r2 = 1 - SSres / SStot = 1 - 2.25 / 5
    assert compute_metric("r2", y, p) == pytest.approx(1 - 2.25 / 5)
    assert compute_metric("mape", y, p) == pytest.approx((0.5 / 1 + 0 + 1 / 3 + 1 / 4) / 4)
    assert math.isnan(compute_metric("r2", np.ones(3), np.ones(3)))

    yb = np.array([0.0, 0.0, 1.0, 1.0])
    pb = np.array([0.1, 0.6, 0.4, 0.8])
    assert compute_metric("accuracy", yb, pb) == pytest.approx(0.5)  # labels 0, 1, 0, 1
    expected_ll = -(math.log(0.9) + math.log(0.4) + math.log(0.4) + math.log(0.8)) / 4
    assert compute_metric("logloss", yb, pb) == pytest.approx(expected_ll)
    # Pairs (pos, neg): (0.4, 0.1) ok, (0.4, 0.6) wrong, (0.8, 0.1) ok, (0.8, 0.6) ok → 3 / 4
    assert compute_metric("auc", yb, pb) == pytest.approx(0.75)
    assert compute_metric("auc", yb, np.array([0.5, 0.5, 0.5, 0.5])) == pytest.approx(0.5)  # ties
    assert math.isnan(compute_metric("auc", np.zeros(3), np.array([0.1, 0.2, 0.3])))

    ym = np.array([0.0, 2.0, 1.0])
    pm = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.5, 0.3, 0.2]])
    assert compute_metric("accuracy", ym, pm) == pytest.approx(2 / 3)
    assert compute_metric("logloss", ym, pm) == pytest.approx(-(math.log(0.7) + math.log(0.8)
                                                                + math.log(0.3)) / 3)
    with pytest.raises(PartitionError, match="unknown metric"):
        compute_metric("f1", y, p)


def test_predict_partition(frame: pd.DataFrame) -> None:
    spec = make_spec()
    booster = lgb.Booster(model_str=train_partition(frame, spec).model_str)
    rows = frame.drop(columns="delay_min").iloc[:17]
    pred = predict_partition(rows, spec, booster)
    assert pred.dtype == np.float64 and pred.shape == (17,)
    assert np.isfinite(pred).all()
    with pytest.raises(PartitionError, match=r"^feature column 'temp_c' is missing$"):
        predict_partition(rows.drop(columns="temp_c"), spec, booster)


def test_numeric_feature_arriving_as_text_is_named_at_scoring() -> None:
    """Categorical features are matched to the model's categories by position in the model, so a
    numeric feature that arrives as text is reported by its own name (never silently mis-coded)."""
    import lightgbm as lgb

    from manymodels.pipeline import PartitionError, predict_partition, train_partition
    from manymodels.spec import spec_from_dict

    rng = np.random.default_rng(3)
    n = 120
    frame = pd.DataFrame({"k": ["a"] * n, "x1": rng.normal(size=n),
                          "x2": rng.choice(["p", "q"], size=n), "y": rng.normal(size=n)})
    spec = spec_from_dict({"data": {"source": "unused", "partition_by": ["k"], "target": "y"}})
    result = train_partition(frame, spec)
    booster = lgb.Booster(model_str=result.model_str)
    text = frame.assign(x1="high")
    with pytest.raises(PartitionError, match="feature column 'x1' is not numeric"):
        predict_partition(text, spec, booster, features=result.features)
    numbers = frame.assign(x2=1.0)
    with pytest.raises(PartitionError, match="feature column 'x2' holds numbers here"):
        predict_partition(numbers, spec, booster, features=result.features)
