"""Tests of the synthetic transit data (manymodels.synth) and the demo job's prepare step."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from manymodels.synth import COLUMNS, EVENTS, LINES, make_transit, score_frame, write_transit

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return make_transit(40, 24 * 28)


@pytest.fixture(scope="module")
def transit_job() -> ModuleType:
    spec = importlib.util.spec_from_file_location("transit_job", ROOT / "jobs" / "transit.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_deterministic() -> None:
    pd.testing.assert_frame_equal(make_transit(7, 50, seed=3), make_transit(7, 50, seed=3))
    assert not make_transit(7, 50, seed=3)["delay_min"].equals(make_transit(7, 50, seed=4)["delay_min"])


def test_shape_columns_dtypes(frame: pd.DataFrame) -> None:
    assert frame.shape == (40 * 24 * 28, len(COLUMNS))
    assert tuple(frame.columns) == COLUMNS
    for name in ("station", "trip_id", "line", "event"):
        assert pd.api.types.is_string_dtype(frame[name].dtype), name
    assert frame["ts"].dtype == pd.DatetimeTZDtype(unit="us", tz="UTC")
    for name in ("temp_c", "precip_mm", "wind_kph", "delay_min"):
        assert frame[name].dtype == np.float64, name
    assert frame["station"].iloc[0] == "stn-00000" and frame["station"].iloc[-1] == "stn-00039"
    assert frame["ts"].iloc[0] == pd.Timestamp("2026-01-05", tz="UTC")
    assert frame["trip_id"].iloc[1] == "stn-00000-1"
    assert frame["trip_id"].is_unique
    assert frame.groupby("station")["line"].nunique().eq(1).all()
    assert set(frame["line"]) <= set(LINES) and set(frame["event"]) == set(EVENTS)
    assert frame["event"].eq("none").mean() > 0.9
    assert (frame["precip_mm"] >= 0).all() and (frame["wind_kph"] >= 0).all()
    assert 0.5 < frame["precip_mm"].eq(0).mean() < 0.98
    assert (frame["delay_min"] >= 0).all()
    assert not frame.isna().any().any()
    assert list(make_transit(3, 5, with_target=False).columns) == list(COLUMNS[:-1])


def test_sorted_and_hourly(frame: pd.DataFrame) -> None:
    ordered = frame.sort_values(["station", "ts"], kind="stable").reset_index(drop=True)
    pd.testing.assert_frame_equal(frame, ordered)
    steps = frame.groupby("station")["ts"].diff().dropna().unique()
    assert list(steps) == [pd.Timedelta(hours=1)]


def test_empty() -> None:
    for n, h in ((0, 10), (5, 0)):
        empty = make_transit(n, h)
        assert empty.shape == (0, len(COLUMNS))
        assert empty["ts"].dtype == pd.DatetimeTZDtype(unit="us", tz="UTC")


def test_stations_behave_differently(frame: pd.DataFrame) -> None:
    df = frame.assign(hour=frame["ts"].dt.hour, weekend=frame["ts"].dt.day_of_week >= 5)
    weekday = df[~df["weekend"]]
    mean = df.groupby("station")["delay_min"].mean()
    assert mean.max() > 2 * mean.min()

    def uplift(hours: list[int]) -> pd.Series:
        by_station = weekday.groupby("station")
        peak = weekday[weekday["hour"].isin(hours)].groupby("station")["delay_min"].mean()
        return peak - by_station["delay_min"].median()

    morning, evening = uplift([7, 8, 9]), uplift([16, 17, 18, 19])
    assert morning.min() > 0 and morning.max() > 3 * morning.min()
    assert evening.max() > 5 and evening.min() < 1.5  # some stations have no evening peak
    rainy = df["precip_mm"] > 1
    rain_effect = df[rainy].groupby("station")["delay_min"].mean() - mean
    assert rain_effect.max() - rain_effect.min() > 2


def test_station_coefficients_do_not_depend_on_station_count() -> None:
    small, large = make_transit(5, 30), make_transit(50, 30)
    pd.testing.assert_frame_equal(small, large.iloc[: len(small)])


def test_hour_offset(frame: pd.DataFrame) -> None:
    later = make_transit(40, 24, hour_offset=24 * 28)
    assert later["ts"].min() == frame["ts"].max() + pd.Timedelta(hours=1)
    first = frame.groupby("station").head(24).reset_index(drop=True)
    for name in ("temp_c", "wind_kph", "delay_min"):
        assert not np.allclose(first[name], later[name]), name
    # The offset frame continues the longer one exactly.
    tail = frame[frame["ts"] >= frame["ts"].max() - pd.Timedelta(hours=23)].reset_index(drop=True)
    pd.testing.assert_frame_equal(tail, make_transit(40, 24, hour_offset=24 * 28 - 24))


def test_score_frame() -> None:
    scored = score_frame(6, 24, after_hours=48)
    assert "delay_min" not in scored.columns
    expected = make_transit(6, 72).drop(columns="delay_min")
    expected = expected[expected["ts"] >= pd.Timestamp("2026-01-07", tz="UTC")].reset_index(drop=True)
    pd.testing.assert_frame_equal(scored, expected)


def _read(root: Path, hive: bool) -> pd.DataFrame:
    dataset = ds.dataset(root, format="parquet", partitioning="hive" if hive else None)
    frame: pd.DataFrame = dataset.to_table().to_pandas()
    return frame


def test_write_hive_round_trip(tmp_path: Path) -> None:
    df = make_transit(6, 48)
    root = tmp_path / "hive"
    (root / "station=stale").mkdir(parents=True)
    (root / "station=stale" / "part-0.parquet").write_bytes(b"old")
    (root / "old.parquet").write_bytes(b"old")
    (root / "keep.txt").write_text("not parquet")
    paths = write_transit(df, str(root), layout="hive")
    assert paths == sorted(str(root / f"station=stn-{i:05d}" / "part-0.parquet") for i in range(6))
    assert (root / "keep.txt").exists() and not (root / "station=stale").exists()
    (root / "keep.txt").unlink()
    assert "station" not in pq.read_schema(paths[0]).names
    back = _read(root, hive=True)
    assert pa.types.is_string(ds.dataset(root, partitioning="hive").schema.field("station").type)
    back = back[list(df.columns)].sort_values(["station", "ts"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(back, df)


def test_write_flat_round_trip(tmp_path: Path) -> None:
    df = make_transit(10, 48)
    shuffled = df.sample(frac=1.0, random_state=0)
    root = tmp_path / "flat"
    paths = write_transit(shuffled, str(root), layout="flat", files=3, row_group_size=100)
    assert paths == [str(root / f"part-{i:03d}.parquet") for i in range(3)]
    schema = pq.read_schema(paths[0])
    assert schema.field("station").type == pa.string()
    assert schema.field("ts").type == pa.timestamp("us", tz="UTC")
    stations = [pq.read_table(p, columns=["station"]).column("station").to_pylist() for p in paths]
    assert all(s == sorted(s) for s in stations)
    assert max(stations[0]) < min(stations[1]) and max(stations[1]) < min(stations[2])
    assert pq.ParquetFile(paths[0]).metadata.num_row_groups == -(-len(stations[0]) // 100)
    pd.testing.assert_frame_equal(_read(root, hive=False), df)
    # Rewriting replaces the old files.
    again = write_transit(df, str(root), layout="flat", files=2)
    assert len(again) == 2
    assert sorted(p.name for p in root.iterdir()) == ["part-000.parquet", "part-001.parquet"]
    pd.testing.assert_frame_equal(_read(root, hive=False), df)


def test_write_rejects_bad_layout(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="layout"):
        write_transit(make_transit(1, 2), str(tmp_path), layout="delta")


def test_prepare_adds_features(frame: pd.DataFrame, transit_job: ModuleType) -> None:
    station = frame[frame["station"] == "stn-00003"]
    before = station.copy(deep=True)
    out = transit_job.prepare(station)
    pd.testing.assert_frame_equal(station, before)  # input not mutated
    assert list(out.columns) == [*frame.columns, "hour", "dow", "is_weekend", "rush", "rain"]
    assert out.index.equals(station.index)
    ts = station["ts"]
    assert out["hour"].tolist() == ts.dt.hour.tolist()
    assert out["dow"].tolist() == ts.dt.day_of_week.tolist()
    assert out["is_weekend"].tolist() == (ts.dt.day_of_week >= 5).astype(int).tolist()
    expected_rush = ts.dt.hour.isin([7, 8, 9, 16, 17, 18, 19]).astype(int)
    assert out["rush"].tolist() == expected_rush.tolist()
    for name in ("hour", "dow", "is_weekend", "rush"):
        assert pd.api.types.is_integer_dtype(out[name].dtype), name
    assert out["rain"].dtype == np.float64
    assert out["rain"].between(0, 20).all()
    assert out["rain"].tolist() == station["precip_mm"].clip(0, 20).tolist()


def test_prepare_without_target_and_empty(frame: pd.DataFrame, transit_job: ModuleType) -> None:
    scoring = score_frame(2, 24, after_hours=24)
    out = transit_job.prepare(scoring)
    assert "delay_min" not in out.columns and len(out) == 48
    empty = frame.iloc[:0]
    out_empty = transit_job.prepare(empty)
    assert len(out_empty) == 0
    assert {"hour", "dow", "is_weekend", "rush", "rain"} <= set(out_empty.columns)
    assert len(transit_job.prepare(scoring.iloc[:0])) == 0
