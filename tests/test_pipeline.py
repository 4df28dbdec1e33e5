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
    _category_codes,
    compute_metric,
    holdout_split,
    lgb_params,
    load_prepare,
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
    a, b = train_partition(frame, spec), train_partition(frame, spec)
    assert a.model_str == b.model_str  # seeded
    k = int(a.metrics["holdout_rows"])
    # Each row's side is its own draw: about a quarter of the rows (within 4 standard deviations).
    assert abs(k - n * 0.25) < 4 * math.sqrt(n * 0.25 * 0.75)
    assert a.metrics["train_rows"] + k == n
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


# ----------------------------------------------------------------------------- rows reordered by prepare


def _sort_with_lag(df: pd.DataFrame) -> pd.DataFrame:
    df = df.sort_values("ts")
    return df.assign(prev_temp=df["temp_c"].shift(1))


def test_predictions_follow_rows_that_prepare_reorders(frame: pd.DataFrame) -> None:
    """Rows out of time order and a prepare that sorts them: each prediction lands on its own row."""
    spec = make_spec()
    result = train_partition(frame, spec, prepare=_sort_with_lag)
    booster = lgb.Booster(model_str=result.model_str)
    rows = frame.drop(columns="delay_min").sample(frac=1.0, random_state=4)
    pred = pd.Series(predict_partition(rows, spec, booster, prepare=_sort_with_lag),
                     index=rows["trip_id"].to_numpy())
    in_order = frame.drop(columns="delay_min").sort_values("ts")
    expected = pd.Series(predict_partition(in_order, spec, booster, prepare=_sort_with_lag),
                         index=in_order["trip_id"].to_numpy())
    assert not rows["ts"].is_monotonic_increasing
    np.testing.assert_allclose(pred.loc[expected.index].to_numpy(), expected.to_numpy(), rtol=0, atol=0)
    # The reference itself: plain LightGBM on the prepared rows, matched by trip_id.
    prepared = _sort_with_lag(in_order)
    X = prepared[list(result.features)].astype({"line": "category", "event": "category"})
    plain = pd.Series(booster.predict(X), index=prepared["trip_id"].to_numpy())
    np.testing.assert_allclose(pred.loc[plain.index].to_numpy(), plain.to_numpy(), rtol=0, atol=1e-12)


def test_prepare_that_loses_row_identity_fails_the_partition(frame: pd.DataFrame) -> None:
    spec = make_spec()
    booster = lgb.Booster(model_str=train_partition(frame, spec, prepare=_sort_with_lag).model_str)
    rows = frame.drop(columns="delay_min").sample(frac=1.0, random_state=4)
    with pytest.raises(PartitionError, match=r"^prepare replaced the row index \(reset_index"):
        predict_partition(rows, spec, booster,
                          prepare=lambda df: _sort_with_lag(df).reset_index(drop=True))
    with pytest.raises(PartitionError, match="replaced the row index"):
        predict_partition(rows, spec, booster, prepare=lambda df: _sort_with_lag(df).merge(
            pd.DataFrame({"event": ["none"], "extra": [1]}), on="event", how="left"))
    with pytest.raises(PartitionError, match=r"^prepare returned 335 rows for 336: .*keep every row"):
        predict_partition(rows, spec, booster, prepare=lambda df: _sort_with_lag(df).iloc[1:])
    with pytest.raises(PartitionError, match="some rows twice"):
        predict_partition(rows, spec, booster,
                          prepare=lambda df: _sort_with_lag(pd.concat([df.iloc[:1], df.iloc[:-1]])))
    # At training time a prepare may add, drop or renumber rows.
    assert train_partition(rows.assign(delay_min=frame["delay_min"].to_numpy()), spec,
                           prepare=lambda df: _sort_with_lag(df).reset_index(drop=True).iloc[5:]).rows == 331


# ----------------------------------------------------------------------------- champion rule


def test_champion_rule_with_a_feature_name_lightgbm_alters(frame: pd.DataFrame) -> None:
    """LightGBM stores ``trip_distance`` for ``trip distance``: the champion is still judged."""
    df = frame.rename(columns={"temp_c": "trip distance"})
    champion = train_partition(df, make_spec(model={"params": {"n_estimators": 200}}))
    assert "trip_distance" in lgb.Booster(model_str=champion.model_str).feature_name()
    weak = make_spec(model={"params": {"n_estimators": 2}})
    for registered in (None, champion.features):
        result = train_partition(df, weak, champion=champion.model_str, champion_features=registered)
        assert result.comparison == "same features"
        assert not result.promote
        assert "worse than the champion" in result.reason
        assert result.metrics["champion_mae"] < result.metric
    assert train_partition(df, weak).comparison == "no champion"


def test_champion_with_other_features_is_judged_on_its_own(frame: pd.DataFrame) -> None:
    spec = make_spec()
    champion = train_partition(frame, make_spec(model={"params": {"n_estimators": 200}}))
    # The new spec drops a feature the champion used; the column is still in the data.
    fewer = make_spec(data={"exclude": ["trip_id", "wind_kph"]}, model={"params": {"n_estimators": 2}})
    result = train_partition(frame, fewer, champion=champion.model_str,
                             champion_features=champion.features)
    assert "wind_kph" not in result.features
    assert result.comparison == "champion on its own features"
    assert not result.promote and "worse than the champion" in result.reason
    # The champion's column is gone from the data: promoted, and the record says why not compared.
    gone = train_partition(frame.drop(columns="wind_kph"), spec, champion=champion.model_str,
                           champion_features=champion.features)
    assert gone.promote
    assert gone.comparison == "not compared: the champion's feature 'wind_kph' is not in the prepared data"
    assert "champion_mae" not in gone.metrics
    unreadable = train_partition(frame, spec, champion="not a model")
    assert unreadable.promote and unreadable.comparison.startswith("not compared: the champion model "
                                                                   "cannot be read")


# ----------------------------------------------------------------------------- stable holdout


def test_rows_keep_their_holdout_side_when_rows_are_added(frame: pd.DataFrame) -> None:
    """Train on 100 rows, add 10 % more of the same distribution, retrain: the new holdout holds
    none of the rows the champion trained on, so the champion rule compares out of sample."""
    spec = make_spec(time_column=None)
    first = frame.iloc[:100]
    more = frame.iloc[:110].sample(frac=1.0, random_state=2)  # 10 new rows, and a new row order
    champ_train, champ_holdout = holdout_split(first, spec)
    new_train, new_holdout = holdout_split(more, spec)
    assert set(new_holdout["trip_id"]).isdisjoint(champ_train["trip_id"])
    assert set(champ_holdout["trip_id"]) <= set(new_holdout["trip_id"])
    assert set(new_train["trip_id"]) >= set(champ_train["trip_id"])
    # The split is the one training uses: its holdout metric is the model's error on those rows.
    result = train_partition(more, spec)
    assert result.metrics["holdout_rows"] == len(new_holdout)
    assert result.metric == pytest.approx(_mae_on(result.model_str, new_holdout, spec), rel=1e-12)
    # Through a prepare that reorders rows, each row still keeps its side (carried by the index).
    _, sorted_holdout = holdout_split(more, spec, prepare=lambda df: df.sort_values("temp_c"))
    assert set(sorted_holdout["trip_id"]) == set(new_holdout["trip_id"])


def test_tiny_partitions_get_a_row_on_each_side(frame: pd.DataFrame) -> None:
    for fraction in (0.01, 0.99):
        spec = make_spec(time_column=None, validation={"min_rows": 2, "holdout_fraction": fraction})
        for n in (2, 3, 5):
            train, holdout = holdout_split(frame.iloc[:n], spec)
            assert len(train) >= 1 and len(holdout) >= 1 and len(train) + len(holdout) == n


# ----------------------------------------------------------------------------- time column


@pytest.mark.parametrize("tz", ["Europe/Paris", None])
def test_time_holdout_with_missing_times(tz: str | None) -> None:
    """20 daily rows, 2 without a time, shuffled: the holdout is the 5 latest dated rows; the rows
    without a time train (they are never "the latest")."""
    days = pd.date_range("2026-01-01", periods=20, freq="D", tz=tz)
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"station": "a", "ts": days, "day": np.arange(1, 21), "x": rng.normal(size=20),
                       "y": rng.normal(size=20)})
    df.loc[df["day"].isin([11, 17]), "ts"] = pd.NaT
    df = df.sample(frac=1.0, random_state=0).reset_index(drop=True)  # an order old code sorted wrong
    spec = spec_from_dict({"data": {"source": "unused", "partition_by": ["station"], "target": "y",
                                    "time_column": "ts", "exclude": ["day"]},
                           "validation": {"min_rows": 10, "holdout_fraction": 0.25},
                           "model": {"params": {"min_data_in_leaf": 2, "n_estimators": 3}}})
    train, holdout = holdout_split(df, spec)
    assert sorted(holdout["day"]) == [15, 16, 18, 19, 20]
    assert {11, 17} <= set(train["day"])
    result = train_partition(df, spec)
    assert result.metrics["holdout_rows"] == 5
    assert result.time_max is not None and result.time_max.startswith("2026-01-20")
    # Training judged its model on exactly those rows.
    latest = df[df["day"].isin([15, 16, 18, 19, 20])]
    pred = predict_partition(latest, spec, lgb.Booster(model_str=result.model_str))
    assert result.metric == pytest.approx(compute_metric("mae", latest["y"].to_numpy(), pred), rel=1e-12)


def test_time_column_must_be_a_time_or_a_number(frame: pd.DataFrame) -> None:
    with pytest.raises(PartitionError, match=r"^time column 'ts' must hold dates/times or numbers, not "):
        train_partition(frame.assign(ts=frame["ts"].astype(str)), make_spec())
    numeric = frame.assign(ts=np.arange(len(frame), dtype=np.float64)[::-1])
    _, holdout = holdout_split(numeric, make_spec())
    assert sorted(holdout["ts"]) == list(range(336 - 84, 336))  # the 84 largest numbers
    dates = frame.assign(ts=frame["ts"].dt.date)  # how Arrow's date32 reaches pandas: date objects
    assert dates["ts"].dtype == object
    _, holdout = holdout_split(dates, make_spec())
    assert sorted(holdout["trip_id"]) == sorted(frame["trip_id"].iloc[-84:])


# ----------------------------------------------------------------------------- prepare modules


def _prepare_spec(path: Any, func: str = "prepare") -> JobSpec:
    return spec_from_dict({"data": {"source": "unused", "partition_by": ["station"], "target": "delay_min"},
                           "pipeline": {"prepare": f"{path}:{func}"}})


def test_prepare_module_can_define_dataclasses_and_import_siblings(tmp_path: Any,
                                                                   frame: pd.DataFrame) -> None:
    folder = tmp_path / "job_code"
    folder.mkdir()
    (folder / "mm_sibling_helpers.py").write_text("OFFSET = 7\n")
    (folder / "prep.py").write_text(
        "from dataclasses import dataclass\n"
        "import mm_sibling_helpers\n\n\n"
        "@dataclass(frozen=True)\n"
        "class Shift:\n"
        "    hours: int\n\n\n"
        "def prepare(df):\n"
        "    return df.assign(later=df['temp_c'] + Shift(mm_sibling_helpers.OFFSET).hours)\n")
    prepare = load_prepare(_prepare_spec(folder / "prep.py"))
    assert prepare is not None
    assert (prepare(frame)["later"] == frame["temp_c"] + 7).all()
    import sys

    module = sys.modules[prepare.__module__]
    assert module.__dict__["prepare"] is prepare


# ----------------------------------------------------------------------------- stray strings


@pytest.mark.parametrize("dtype", [object, "str"])  # the general path and pandas' Arrow strings
def test_numeric_column_with_a_stray_string_is_named_in_a_warning(frame: pd.DataFrame, dtype: Any) -> None:
    fare = frame["temp_c"].astype(str).astype(object)
    fare.iloc[7] = "n/a"
    df = frame.assign(fare=fare.astype(dtype))
    result = train_partition(df, make_spec())
    assert len(result.warnings) == 1
    assert result.warnings[0].startswith("feature column 'fare' is text but nearly all of its values are "
                                         "numbers")
    assert train_partition(frame, make_spec()).warnings == ()  # 'line' and 'event' are plain text
    coded = make_spec(data={"categorical": ["fare"], "exclude": ["trip_id"]})
    assert train_partition(df, coded).warnings == ()  # listed as a code on purpose


# ----------------------------------------------------------------------------- categorical codes


def test_arrow_text_codes_match_the_general_path() -> None:
    """pandas' Arrow-backed text takes a faster path: same codes, same category order, as the general
    (object) path, with missing values, non-ASCII text, digits and unknown values at scoring."""
    values = ["b", None, "é", "Z", "10", "9", "b", "a", None, "ß", "Zz"]
    arrow, plain = pd.Series(values, dtype="str"), pd.Series(values, dtype=object)
    fast, known = _category_codes(arrow, None)
    slow, known_slow = _category_codes(plain, None)
    assert known == known_slow == sorted(v for v in set(values) if v is not None)
    np.testing.assert_array_equal(fast, slow)
    assert np.isnan(fast[[1, 8]]).all()
    seen = ["9", "a", "b", "q", "é"]  # a model's categories: "q" unseen here, others unknown to it
    fast, _ = _category_codes(arrow, seen)
    slow, _ = _category_codes(plain, seen)
    np.testing.assert_array_equal(fast, slow)
    assert fast.tolist()[:3] == [2.0, pytest.approx(math.nan, nan_ok=True), 4.0]
    empty, known_empty = _category_codes(pd.Series([None, None], dtype="str"), None)
    assert known_empty == [] and np.isnan(empty).all()


def test_champion_is_judged_with_its_own_categories(frame: pd.DataFrame) -> None:
    """The champion's holdout matrix is reused only when its categories are the new model's; a line
    that appears after the champion was trained shifts the codes, and the champion is scored with
    its own coding (as plain LightGBM would score it)."""
    spec = make_spec()
    old_rows = frame[frame["line"] != "green"]
    champion = train_partition(old_rows, spec).model_str
    for rows in (old_rows, frame):  # same categories (reused), then one more line (coded again)
        result = train_partition(rows, spec, champion=champion)
        _, holdout = holdout_split(rows, spec)
        assert result.metrics["champion_mae"] == pytest.approx(_mae_on(champion, holdout, spec), rel=1e-12)
