"""End-to-end batch scoring (manymodels.score) on the session's local Ray and small synthetic data.

One module-scoped training (8 stations × 7 days, with the global fallback model) is shared by most
tests; each test scores into its own output folder. Predictions are checked against plain LightGBM
driven the way a user would (the job's prepare, the registry's feature list, string columns as pandas
categoricals), and the output is read back with pyarrow, DuckDB and polars.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import importlib.util
import json
import os
import shutil
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import fsspec
import lightgbm as lgb
import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.dataset as ds
import pytest
from typer.testing import CliRunner

import manymodels
from manymodels import Registry, RunSummary
from manymodels.cli import app
from manymodels.fallback import global_champion
from manymodels.registry import GLOBAL_PID
from manymodels.score import ScoreSummary, _exchange, score
from manymodels.spec import FrozenMap, JobSpec
from manymodels.synth import make_transit, score_frame, write_transit
from manymodels.trees import COMPACT_SUFFIX

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]
JOB = "transit-delays"
N = 8  # trained stations
HIST = 24 * 7  # training window (hours)
AHEAD = 24  # scored hours per station
STATIONS = [f"stn-{i:05d}" for i in range(N)]
OUTPUT_COLUMNS = {"station", "trip_id", "ts", "prediction", "model_version", "model_run_id",
                  "score_run_id", "scored_at"}
SCORE_KEYS = {"run_id", "job", "status", "rows", "partitions_scored", "unscored", "output", "cost"}

runner = CliRunner()


# ----------------------------------------------------------------------------- helpers


def _plain_table(df: pd.DataFrame) -> pa.Table:
    """``df`` as Arrow with plain ``string`` columns (no pandas metadata)."""
    table = pa.Table.from_pandas(df, preserve_index=False)
    fields = [pa.field(f.name, pa.string()) if pa.types.is_large_string(f.type) else f
              for f in table.schema]
    return table.cast(pa.schema(fields)).replace_schema_metadata(None)


def _write_flat(df: pd.DataFrame, path: Path) -> Path:
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(_plain_table(df), path)
    return path


def _user_prepare() -> Callable[[pd.DataFrame], pd.DataFrame]:
    """jobs/transit.py's prepare, imported as a user would (no manymodels involved)."""
    spec = importlib.util.spec_from_file_location("transit_job_for_tests", ROOT / "jobs" / "transit.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fn: Callable[[pd.DataFrame], pd.DataFrame] = module.prepare
    return fn


def _plain_predict(model_uri: str, features: list[str], rows: pd.DataFrame) -> np.ndarray:
    """Plain LightGBM on the user-built feature frame: prepare, feature columns, strings → category."""
    with fsspec.open(model_uri, "r") as f:
        booster = lgb.Booster(model_str=f.read())
    X = _user_prepare()(rows.reset_index(drop=True))[features].copy()
    for col in X.columns:
        if pd.api.types.is_string_dtype(X[col]) or X[col].dtype == object:
            X[col] = X[col].astype("category")
    return np.asarray(booster.predict(X), dtype=np.float64)


def _read(out: Path) -> pa.Table:
    """The job's scored output as one table (pyarrow dataset, hive partitioning)."""
    return ds.dataset(str(out / JOB), partitioning="hive").to_table()


def _run_rows(out: Path, run_id: str) -> pd.DataFrame:
    df = _read(out).to_pandas()
    return df[df["score_run_id"] == run_id].reset_index(drop=True)


def _unscored(s: ScoreSummary) -> dict[str, tuple[int, str]]:
    return {u["partition"]["station"]: (u["rows"], u["reason"]) for u in s.unscored}


def _files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _scored(s: ScoreSummary, rows: int, partitions: int) -> None:
    assert (s.status, s.exit_code) == ("succeeded", 0), s.unscored
    assert (s.input_rows, s.scored_rows, s.unscored_rows, s.partitions_scored) == (rows, rows, 0,
                                                                                   partitions)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """History (8 stations), the next 24 h of those 8, of 10 stations (2 never trained), and of the 8
    without the ``wind_kph`` feature; all Hive layout."""
    root = tmp_path_factory.mktemp("score-data")
    paths = {name: root / name for name in ("history", "next", "next10", "no_wind")}
    write_transit(make_transit(N, HIST), str(paths["history"]))
    write_transit(score_frame(N, AHEAD, after_hours=HIST), str(paths["next"]))
    write_transit(score_frame(N + 2, AHEAD, after_hours=HIST), str(paths["next10"]))
    write_transit(score_frame(N, AHEAD, after_hours=HIST).drop(columns=["wind_kph"]),
                  str(paths["no_wind"]))
    return paths


@pytest.fixture(scope="module")
def trained(ray_session: None, make_spec: Any, data: dict[str, Path],
            tmp_path_factory: pytest.TempPathFactory) -> tuple[JobSpec, RunSummary]:
    """The demo job trained once with ``[score] fallback = "global"`` (so the global model exists
    too). Returns the plain spec (fallback ``none``) on the same registry, and the train summary."""
    registry = tmp_path_factory.mktemp("score-trained") / "registry"
    with_global = make_spec(data["history"], registry, score={"fallback": "global"})
    summary = manymodels.train(with_global)
    assert (summary.total, summary.trained, summary.failed) == (N, N, 0), summary.failures
    return make_spec(data["history"], registry), summary


@pytest.fixture(scope="module")
def main_scores(trained: tuple[JobSpec, RunSummary], data: dict[str, Path],
                tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ScoreSummary, dt.datetime,
                                                                   dt.datetime]:
    """One score run of the 8 trained stations' next day (read-only for the tests using it)."""
    spec, _ = trained
    out = tmp_path_factory.mktemp("main-scores") / "scores"
    before = dt.datetime.now(dt.UTC)
    s = score(spec, data=str(data["next"]), output=str(out))
    after = dt.datetime.now(dt.UTC)
    return out, s, before, after


# ----------------------------------------------------------------------------- 1. exact predictions


def test_predictions_equal_plain_lightgbm(trained: tuple[JobSpec, RunSummary],
                                          main_scores: tuple[Path, ScoreSummary, Any, Any]) -> None:
    spec, train_summary = trained
    out, s, _, _ = main_scores
    _scored(s, N * AHEAD, N)
    got = _run_rows(out, s.run_id).set_index("trip_id")
    assert got.index.is_unique and len(got) == N * AHEAD
    reg = Registry(spec.output.registry)
    rows = score_frame(N, AHEAD, after_hours=HIST)
    checked = 0
    for station, part in rows.groupby("station"):
        mv = reg.get(JOB, {"station": station})
        assert mv.version == 1 and mv.run_id == train_summary.run_id
        expected = _plain_predict(mv.model_uri, mv.features, part)
        mine = got.loc[part["trip_id"].to_numpy()]
        assert (mine["station"] == station).all()
        assert (mine["model_version"] == 1).all() and (mine["model_run_id"] == mv.run_id).all()
        # Bitwise: scoring reads the compact form and predicts with manymodels.trees, not LightGBM.
        assert np.array_equal(mine["prediction"].to_numpy().view(np.int64), expected.view(np.int64))
        assert np.unique(expected).size > 1  # a real model, not a constant
        checked += len(part)
    assert checked == N * AHEAD


def _champion_keys(reg: Registry) -> list[str]:
    live = reg.live(JOB).to_pylist()
    return sorted(r["model_key"] for r in live if r["status"] == "champion" and r["pid"] != GLOBAL_PID)


def test_compact_models_score_exactly_as_boosters(trained: tuple[JobSpec, RunSummary],
                                                  main_scores: tuple[Path, ScoreSummary, Any, Any],
                                                  data: dict[str, Path], tmp_path: Path) -> None:
    """Training writes each model's compact form beside its text; scoring without them (removed, or
    not whole: a torn write) parses the texts instead, and every prediction is bitwise the same."""
    spec, _ = trained
    out, s, _, _ = main_scores
    keys = _champion_keys(Registry(spec.output.registry))
    assert len(keys) == N
    assert all(Registry(spec.output.registry).store.exists(k + COMPACT_SUFFIX) for k in keys)
    expected = _run_rows(out, s.run_id).set_index("trip_id")["prediction"]

    for variant in ("removed", "torn"):
        registry = tmp_path / variant / "registry"
        shutil.copytree(spec.output.registry, registry)
        forests = [registry / (k + COMPACT_SUFFIX) for k in keys]
        if variant == "removed":
            for f in forests:
                f.unlink()
        else:
            for f in forests:
                f.write_bytes(f.read_bytes()[:-100])
        moved = dataclasses.replace(spec, output=dataclasses.replace(spec.output, registry=str(registry)))
        other = score(moved, data=str(data["next"]), output=str(tmp_path / variant / "scores"))
        _scored(other, N * AHEAD, N)
        got = _run_rows(tmp_path / variant / "scores", other.run_id).set_index("trip_id")["prediction"]
        got = got.loc[expected.index]
        assert np.array_equal(got.to_numpy().view(np.int64), expected.to_numpy().view(np.int64)), variant


def test_large_partitions_and_multiclass_use_lightgbm(trained: tuple[JobSpec, RunSummary], make_spec: Any,
                                                      tmp_path: Path) -> None:
    """Partitions over COMPACT_MAX_ROWS rows, and models manymodels.trees does not reproduce
    (multiclass), are scored by LightGBM's Booster: the same predictions as plain LightGBM."""
    from manymodels.score import COMPACT_MAX_ROWS

    spec, _ = trained
    hours = COMPACT_MAX_ROWS + 50
    write_transit(score_frame(2, hours, after_hours=HIST), str(tmp_path / "long"))
    s = score(spec, data=str(tmp_path / "long"), output=str(tmp_path / "scores"))
    _scored(s, 2 * hours, 2)
    got = _run_rows(tmp_path / "scores", s.run_id).set_index("trip_id")
    reg = Registry(spec.output.registry)
    for station, part in score_frame(2, hours, after_hours=HIST).groupby("station"):
        mv = reg.get(JOB, {"station": station})
        expected = _plain_predict(mv.model_uri, mv.features, part)
        mine = got.loc[part["trip_id"].to_numpy(), "prediction"].to_numpy()
        assert np.array_equal(mine.view(np.int64), expected.view(np.int64))

    history = make_transit(3, HIST)
    history["delay_min"] = np.digitize(history["delay_min"], np.quantile(history["delay_min"], [0.33, 0.66]))
    write_transit(history, str(tmp_path / "classes"))
    multi = make_spec(tmp_path / "classes", tmp_path / "registry",
                      model={"objective": "multiclass", "params": {"num_class": 3, "n_estimators": 10}},
                      validation={"metric": "logloss", "max_metric": None})
    assert manymodels.train(multi).trained == 3
    write_transit(score_frame(3, AHEAD, after_hours=HIST), str(tmp_path / "classes-next"))
    s = score(multi, data=str(tmp_path / "classes-next"), output=str(tmp_path / "multi-scores"))
    _scored(s, 3 * AHEAD, 3)
    got = _run_rows(tmp_path / "multi-scores", s.run_id).set_index("trip_id")
    reg = Registry(multi.output.registry)
    for station, part in score_frame(3, AHEAD, after_hours=HIST).groupby("station"):
        mv = reg.get(JOB, {"station": station})
        expected = _plain_predict(mv.model_uri, mv.features, part)
        assert expected.ndim == 2 and expected.shape[1] == 3
        mine = got.loc[part["trip_id"].to_numpy(), "prediction"].to_numpy()
        assert np.array_equal(mine, expected.argmax(axis=1).astype(np.float64))


def test_gc_removes_a_compact_form_with_its_text(trained: tuple[JobSpec, RunSummary], tmp_path: Path) -> None:
    spec, _ = trained
    registry = tmp_path / "registry"
    shutil.copytree(spec.output.registry, registry)
    reg = Registry(str(registry))
    keys = _champion_keys(reg)
    orphan = keys[0].rsplit("/", 1)[0] + "/20200101T000000Z-train-gone.txt"
    for key in (orphan, orphan + COMPACT_SUFFIX):
        reg.store.write_bytes(key, b"x")
    report = reg.gc(JOB, keep=1)
    assert report.orphan_files_removed == 2
    assert not reg.store.exists(orphan) and not reg.store.exists(orphan + COMPACT_SUFFIX)
    assert all(reg.store.exists(k) and reg.store.exists(k + COMPACT_SUFFIX) for k in keys)


# ----------------------------------------------------------------------------- 2. output contract


def _check_arrow_schema(schema: pa.Schema, key: str, key_type: pa.DataType) -> None:
    assert set(schema.names) == (OUTPUT_COLUMNS - {"station"}) | {key}
    assert schema.field(key).type == key_type
    assert schema.field("trip_id").type == pa.string()
    assert schema.field("ts").type == pa.timestamp("us", tz="UTC")
    assert schema.field("prediction").type == pa.float64()
    assert schema.field("model_version").type == pa.int64()
    assert schema.field("model_run_id").type == pa.string()
    assert schema.field("score_run_id").type == pa.string()
    scored_at = schema.field("scored_at").type
    assert pa.types.is_timestamp(scored_at) and scored_at.tz == "UTC"


def test_output_contract_pyarrow_duckdb_polars(trained: tuple[JobSpec, RunSummary],
                                               main_scores: tuple[Path, ScoreSummary, dt.datetime,
                                                                  dt.datetime]) -> None:
    _, train_summary = trained
    out, s, before, after = main_scores
    job_dir = out / JOB
    # Layout: one hive folder per score run; files hold no score_run_id column of their own.
    assert [p.name for p in job_dir.iterdir()] == [f"score_run_id={s.run_id}"]
    files = _files_under(job_dir)
    assert files and all(f.suffix == ".parquet" for f in files)
    for f in files:
        inside = ds.dataset(str(f)).schema.names
        assert "score_run_id" not in inside and "station" in inside

    table = _read(out)
    _check_arrow_schema(table.schema, "station", pa.string())
    assert table.num_rows == s.scored_rows == N * AHEAD
    df = table.to_pandas()
    assert set(df["station"]) == set(STATIONS)
    assert set(df["score_run_id"]) == {s.run_id}
    assert set(df["model_run_id"]) == {train_summary.run_id}
    assert (df["model_version"] >= 1).all()
    assert df["prediction"].notna().all()
    scored_at = set(df["scored_at"])
    assert len(scored_at) == 1
    assert before <= next(iter(scored_at)).to_pydatetime() <= after
    expected = score_frame(N, AHEAD, after_hours=HIST)
    merged = df.merge(expected[["trip_id", "ts", "station"]], on="trip_id", suffixes=("", "_in"))
    assert len(merged) == N * AHEAD
    assert (merged["ts"] == merged["ts_in"]).all() and (merged["station"] == merged["station_in"]).all()

    # DuckDB
    glob = f"{job_dir}/*/*.parquet"
    con = duckdb.connect()
    rel = con.sql(f"SELECT * FROM read_parquet('{glob}', hive_partitioning=true)")
    types = dict(zip(rel.columns, [str(t) for t in rel.types], strict=True))
    assert set(types) == OUTPUT_COLUMNS
    assert types["station"] == "VARCHAR" and types["trip_id"] == "VARCHAR"
    assert types["prediction"] == "DOUBLE" and types["model_version"] == "BIGINT"
    assert types["model_run_id"] == "VARCHAR" and types["score_run_id"] == "VARCHAR"
    assert types["ts"] == "TIMESTAMP WITH TIME ZONE" and types["scored_at"] == "TIMESTAMP WITH TIME ZONE"
    [(count, runs, preds)] = con.sql(
        f"SELECT count(*), count(DISTINCT score_run_id), sum(prediction) "
        f"FROM read_parquet('{glob}', hive_partitioning=true)").fetchall()
    assert (count, runs) == (N * AHEAD, 1)
    assert preds == pytest.approx(float(df["prediction"].sum()), rel=1e-12)

    # polars, eager and lazy
    for frame in (pl.read_parquet(f"{job_dir}/**/*.parquet", hive_partitioning=True),
                  pl.scan_parquet(f"{job_dir}/**/*.parquet", hive_partitioning=True).collect()):
        assert frame.height == N * AHEAD
        assert set(frame.columns) == OUTPUT_COLUMNS
        sch = frame.schema
        assert sch["station"] == pl.String and sch["trip_id"] == pl.String
        assert sch["prediction"] == pl.Float64 and sch["model_version"] == pl.Int64
        assert sch["model_run_id"] == pl.String and sch["score_run_id"] == pl.String
        assert sch["scored_at"] == pl.Datetime("us", "UTC") and sch["ts"] == pl.Datetime("us", "UTC")
        assert frame["score_run_id"].unique().to_list() == [s.run_id]


def _int_key(df: pd.DataFrame) -> pd.DataFrame:
    """Stations as an int64 ``stop_id`` key (101, 102, ...); the string station column dropped."""
    stop = df["station"].str.slice(4).astype("int64") + 101
    return df.drop(columns=["station"]).assign(stop_id=stop.astype("int64"))


def test_int64_key_column_stays_int64(ray_session: None, make_spec: Any, tmp_path: Path) -> None:
    hist = _write_flat(_int_key(make_transit(3, HIST)), tmp_path / "hist" / "rows.parquet")
    nxt = _write_flat(_int_key(score_frame(3, AHEAD, after_hours=HIST)), tmp_path / "next" / "rows.parquet")
    spec = make_spec(hist, tmp_path / "registry", data={"partition_by": ["stop_id"]})
    t = manymodels.train(spec)
    assert (t.trained, t.failed) == (3, 0), t.failures
    out = tmp_path / "scores"
    s = score(spec, data=str(nxt), output=str(out))
    _scored(s, 3 * AHEAD, 3)
    table = _read(out)
    _check_arrow_schema(table.schema, "stop_id", pa.int64())
    assert sorted(set(table.column("stop_id").to_pylist())) == [101, 102, 103]
    con = duckdb.connect()
    rel = con.sql(f"SELECT stop_id FROM read_parquet('{out / JOB}/*/*.parquet', hive_partitioning=true)")
    assert [str(t) for t in rel.types] == ["BIGINT"] and len(rel.fetchall()) == 3 * AHEAD
    frame = pl.read_parquet(f"{out / JOB}/**/*.parquet", hive_partitioning=True)
    assert frame.schema["stop_id"] == pl.Int64 and frame.height == 3 * AHEAD
    _, parts = Registry(spec.output.registry).run(s.run_id)
    assert parts is not None
    assert sorted(json.loads(p)["stop_id"] for p in parts["partition"]) == [101, 102, 103]


# ----------------------------------------------------------------------------- 3. no silent drops


def test_partitions_without_champion_are_reported(trained: tuple[JobSpec, RunSummary],
                                                  data: dict[str, Path], tmp_path: Path) -> None:
    spec, _ = trained
    out = tmp_path / "scores"
    s = score(spec, data=str(data["next10"]), output=str(out))
    assert s.input_rows == (N + 2) * AHEAD
    assert s.input_rows == s.scored_rows + s.unscored_rows
    assert (s.scored_rows, s.partitions_scored) == (N * AHEAD, N)
    assert _unscored(s) == {"stn-00008": (AHEAD, "no champion"), "stn-00009": (AHEAD, "no champion")}
    assert (s.status, s.exit_code) == ("failed", 1)  # 2 of 10 > max_failure_fraction 0.05
    assert _read(out).num_rows == s.scored_rows
    assert set(_read(out).column("station").to_pylist()) == set(STATIONS)

    record, parts = Registry(spec.output.registry).run(s.run_id)
    assert record["kind"] == "score" and record["status"] == "failed"
    assert record["rows"] == {"input": (N + 2) * AHEAD, "scored": N * AHEAD, "unscored": 2 * AHEAD}
    assert record["unscored"] == s.unscored
    assert parts is not None and len(parts) == N + 2
    by_station = {json.loads(r["partition"])["station"]: r for r in parts.to_dict("records")}
    assert Counter(r["status"] for r in by_station.values()) == {"scored": N, "unscored": 2}
    assert all(r["rows"] == AHEAD for r in by_station.values())
    assert by_station["stn-00009"]["reason"] == "no champion"
    assert by_station["stn-00001"]["model_version"] == 1 and by_station["stn-00001"]["reason"] == ""


def test_prepare_failing_for_one_partition_is_reported(trained: tuple[JobSpec, RunSummary],
                                                       make_spec: Any, data: dict[str, Path],
                                                       tmp_path: Path) -> None:
    trained_spec, _ = trained
    prep = tmp_path / "prep.py"
    prep.write_text((ROOT / "jobs" / "transit.py").read_text() + (
        "\n\n_base_prepare = prepare\n\n\n"
        "def prepare(df):  # noqa: F811\n"
        "    if 'delay_min' not in df.columns and (df['station'] == 'stn-00003').any():\n"
        "        raise ValueError('station closed for scoring')\n"
        "    return _base_prepare(df)\n"))
    spec = make_spec(data["history"], trained_spec.output.registry, pipeline={"prepare": f"{prep}:prepare"},
                     run={"max_failure_fraction": 0.2})
    out = tmp_path / "scores"
    s = score(spec, data=str(data["next"]), output=str(out))
    assert _unscored(s) == {"stn-00003": (AHEAD, "prepare raised ValueError: station closed for scoring")}
    assert (s.scored_rows, s.unscored_rows, s.input_rows) == ((N - 1) * AHEAD, AHEAD, N * AHEAD)
    assert (s.status, s.exit_code) == ("succeeded", 0)  # 1 of 8 ≤ 0.2: reported, yet a success
    table = _read(out)
    assert table.num_rows == s.scored_rows
    assert "stn-00003" not in set(table.column("station").to_pylist())
    _, parts = Registry(spec.output.registry).run(s.run_id)
    assert parts is not None
    assert Counter(parts["status"]) == {"scored": N - 1, "unscored": 1}


def test_missing_feature_column_unscores_every_partition(trained: tuple[JobSpec, RunSummary],
                                                         data: dict[str, Path], tmp_path: Path) -> None:
    spec, _ = trained
    assert "wind_kph" in Registry(spec.output.registry).get(JOB, {"station": "stn-00000"}).features
    out = tmp_path / "scores"
    s = score(spec, data=str(data["no_wind"]), output=str(out))
    assert (s.status, s.exit_code) == ("failed", 1)
    assert (s.input_rows, s.scored_rows, s.unscored_rows, s.partitions_scored) == (N * AHEAD, 0,
                                                                                   N * AHEAD, 0)
    assert _unscored(s) == {st: (AHEAD, "feature column 'wind_kph' is missing") for st in STATIONS}
    assert _read(out).num_rows == 0
    record, parts = Registry(spec.output.registry).run(s.run_id)
    assert record["status"] == "failed" and record["rows"]["unscored"] == N * AHEAD
    assert parts is not None and set(parts["status"]) == {"unscored"} and parts["rows"].sum() == N * AHEAD

    cli = runner.invoke(app, ["score", "--job", str(_job_toml(tmp_path, data["no_wind"], spec)),
                              "--output", str(tmp_path / "cli-scores"), "--json"])
    assert cli.exit_code == 1, cli.stderr
    assert json.loads(cli.stdout)["status"] == "failed"


# ----------------------------------------------------------------------------- 4. re-runs


def test_rerun_same_run_id_replaces_only_its_rows(trained: tuple[JobSpec, RunSummary],
                                                  data: dict[str, Path], tmp_path: Path) -> None:
    spec, _ = trained
    out = tmp_path / "scores"
    first = score(spec, data=str(data["next"]), output=str(out))
    second = score(spec, data=str(data["next"]), output=str(out))
    assert first.run_id != second.run_id
    assert sorted(p.name for p in (out / JOB).iterdir()) == sorted(
        f"score_run_id={r}" for r in (first.run_id, second.run_id))
    both = _read(out).to_pandas()
    assert Counter(both["score_run_id"]) == {first.run_id: N * AHEAD, second.run_id: N * AHEAD}
    second_files = {f: f.read_bytes() for f in _files_under(out / JOB / f"score_run_id={second.run_id}")}
    old_first = _run_rows(out, first.run_id)

    again = score(spec, data=str(data["next"]), output=str(out), run_id=first.run_id)
    assert again.run_id == first.run_id
    _scored(again, N * AHEAD, N)
    after = _read(out).to_pandas()
    assert Counter(after["score_run_id"]) == {first.run_id: N * AHEAD, second.run_id: N * AHEAD}
    new_first = _run_rows(out, first.run_id)
    assert set(new_first["scored_at"]) != set(old_first["scored_at"])
    assert new_first["scored_at"].min() > old_first["scored_at"].max()
    pd.testing.assert_series_equal(new_first.set_index("trip_id")["prediction"].sort_index(),
                                   old_first.set_index("trip_id")["prediction"].sort_index())
    # The other run is untouched, byte for byte.
    assert {f: f.read_bytes() for f in _files_under(out / JOB / f"score_run_id={second.run_id}")} == \
        second_files
    # No staging or swapped-out leftovers: at most empty folders under .staging.
    assert _files_under(out / ".staging") == []
    assert sorted(p.name for p in (out / JOB).iterdir()) == sorted(
        f"score_run_id={r}" for r in (first.run_id, second.run_id))
    runs = {r["run_id"] for r in Registry(spec.output.registry).runs(JOB) if r.get("kind") == "score"}
    assert {first.run_id, second.run_id} <= runs


def test_bad_run_id_is_refused_before_writing(trained: tuple[JobSpec, RunSummary], data: dict[str, Path],
                                              tmp_path: Path) -> None:
    spec, _ = trained
    out = tmp_path / "scores"
    with pytest.raises(manymodels.SpecError, match="--run-id"):
        score(spec, data=str(data["next"]), output=str(out), run_id="../escape")
    assert not out.exists() and not (tmp_path / "escape").exists()


# ----------------------------------------------------------------------------- 5. readers


def test_readers_never_see_half_a_run(trained: tuple[JobSpec, RunSummary], tmp_path: Path) -> None:
    a, b = tmp_path / "swap-a", tmp_path / "swap-b"
    a.mkdir()
    b.mkdir()
    (a / "from-a").touch()
    exchange_works = _exchange(str(a), str(b))
    if exchange_works:
        assert (b / "from-a").exists() and not (a / "from-a").exists()

    spec, _ = trained
    # Stations big enough (20,000 rows) to get a task and a file each: a run is several files.
    long = tmp_path / "long"
    write_transit(score_frame(4, 20_000, after_hours=HIST), str(long))
    out = tmp_path / "scores"
    run_id = "reader-check"
    first = score(spec, data=str(long), output=str(out), run_id=run_id)
    full = first.scored_rows
    folder = out / JOB / f"score_run_id={run_id}"
    assert ds.dataset(str(folder)).count_rows() == full == 4 * 20_000
    assert len(_files_under(folder)) == 4

    counts: list[int] = []
    errors: list[str] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                counts.append(ds.dataset(str(folder), format="parquet").count_rows())
            except FileNotFoundError:
                counts.append(0)  # the folder was briefly absent
            except Exception as exc:  # any other failure: a half-visible run
                errors.append(f"{type(exc).__name__}: {exc}")

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        for _ in range(3):
            s = score(spec, data=str(long), output=str(out), run_id=run_id)
            assert s.scored_rows == full
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not thread.is_alive()
    assert errors == []
    assert len(counts) > 10
    assert set(counts) <= ({full} if exchange_works else {0, full}), Counter(counts)
    assert counts.count(full) > 10
    assert ds.dataset(str(folder)).count_rows() == full
    assert _files_under(out / ".staging") == []


# ----------------------------------------------------------------------------- 6. pinned models


@pytest.fixture(scope="module")
def retrained(trained: tuple[JobSpec, RunSummary], make_spec: Any, data: dict[str, Path],
              tmp_path_factory: pytest.TempPathFactory) -> tuple[JobSpec, RunSummary, RunSummary]:
    """A copy of the trained registry where stn-00000 and stn-00001 were force-retrained (version 2
    champions); the other stations have version 1 only."""
    spec, first = trained
    registry = tmp_path_factory.mktemp("retrained") / "registry"
    shutil.copytree(spec.output.registry, registry)
    spec2 = make_spec(data["history"], registry)
    forced = manymodels.train(spec2, force=True, only=["station=stn-00000", "station=stn-00001"])
    assert (forced.trained, forced.promoted) == (2, 2), forced.failures
    return spec2, first, forced


def _versions(out: Path, run_id: str) -> dict[str, tuple[int, str]]:
    df = _run_rows(out, run_id)
    per = df.groupby("station").agg(v=("model_version", "unique"), r=("model_run_id", "unique"))
    assert all(len(v) == 1 for v in per["v"]) and all(len(r) == 1 for r in per["r"])
    return {st: (int(row.v[0]), str(row.r[0])) for st, row in per.iterrows()}


def test_pinned_model_version_and_train_run(retrained: tuple[JobSpec, RunSummary, RunSummary],
                                            data: dict[str, Path], tmp_path: Path) -> None:
    spec, first, forced = retrained
    reg = Registry(spec.output.registry)
    assert reg.get(JOB, {"station": "stn-00000"}).version == 2
    out = tmp_path / "scores"
    nxt = str(data["next"])

    champ = score(spec, data=nxt, output=str(out))
    _scored(champ, N * AHEAD, N)
    expect_champ = {st: (2, forced.run_id) if st in ("stn-00000", "stn-00001") else (1, first.run_id)
                    for st in STATIONS}
    assert _versions(out, champ.run_id) == expect_champ

    v1 = score(spec, data=nxt, output=str(out), model_version=1)
    _scored(v1, N * AHEAD, N)
    assert _versions(out, v1.run_id) == {st: (1, first.run_id) for st in STATIONS}
    # Version 1 of a retrained partition predicts with version 1's model file.
    mv1 = reg.get(JOB, {"station": "stn-00000"}, version=1)
    part = score_frame(N, AHEAD, after_hours=HIST).query("station == 'stn-00000'")
    got = _run_rows(out, v1.run_id).set_index("trip_id").loc[part["trip_id"].to_numpy(), "prediction"]
    np.testing.assert_allclose(got.to_numpy(), _plain_predict(mv1.model_uri, mv1.features, part),
                               rtol=0, atol=1e-12)

    by_run = score(spec, data=nxt, output=str(out), train_run=first.run_id)
    _scored(by_run, N * AHEAD, N)
    assert _versions(out, by_run.run_id) == {st: (1, first.run_id) for st in STATIONS}

    v2 = score(spec, data=nxt, output=str(out), model_version=2)
    assert _versions(out, v2.run_id) == {st: (2, forced.run_id) for st in ("stn-00000", "stn-00001")}
    assert _unscored(v2) == {st: (AHEAD, "no version 2") for st in STATIONS[2:]}
    assert (v2.status, v2.exit_code, v2.scored_rows) == ("failed", 1, 2 * AHEAD)

    later = score(spec, data=nxt, output=str(out), train_run=forced.run_id)
    assert _unscored(later) == {st: (AHEAD, f"train run {forced.run_id} has no model for it")
                                for st in STATIONS[2:]}
    assert later.scored_rows == 2 * AHEAD

    with pytest.raises(manymodels.SpecError, match="registered no model"):
        score(spec, data=nxt, output=str(out), train_run="20990101T000000Z-train-000000")
    with pytest.raises(manymodels.SpecError, match="cannot be used together"):
        score(spec, data=nxt, output=str(out), model_version=1, train_run=first.run_id)


# ----------------------------------------------------------------------------- 7. fallback


def test_global_fallback_scores_untrained_partitions(trained: tuple[JobSpec, RunSummary],
                                                     make_spec: Any, data: dict[str, Path],
                                                     tmp_path: Path) -> None:
    spec, train_summary = trained
    registry = Path(spec.output.registry)
    current = global_champion(Registry(str(registry)), JOB)
    assert current is not None and (current["run_id"], current["version"]) == (train_summary.run_id, 1)
    fb_spec = make_spec(data["history"], registry, score={"fallback": "global"})
    out = tmp_path / "scores"
    s = score(fb_spec, data=str(data["next10"]), output=str(out))
    _scored(s, (N + 2) * AHEAD, N + 2)
    versions = _versions(out, s.run_id)
    assert versions == {**{st: (1, train_summary.run_id) for st in STATIONS},
                        "stn-00008": (0, train_summary.run_id), "stn-00009": (0, train_summary.run_id)}
    # The fallback rows are the global model's predictions, station unseen (a missing category).
    rows = score_frame(N + 2, AHEAD, after_hours=HIST)
    unseen = rows[rows["station"].isin(["stn-00008", "stn-00009"])]
    got = _run_rows(out, s.run_id).set_index("trip_id").loc[unseen["trip_id"].to_numpy(), "prediction"]
    uri = str(registry / current["model_key"])
    expected = np.concatenate([_plain_predict(uri, json.loads(current["features"]), part)
                               for _, part in unseen.groupby("station", sort=True)])
    np.testing.assert_allclose(got.to_numpy(), expected, rtol=0, atol=1e-12)
    assert "station" in json.loads(current["features"])
    _, parts = Registry(str(registry)).run(s.run_id)
    assert parts is not None
    by_station = {json.loads(p)["station"]: v for p, v in zip(parts["partition"], parts["model_version"],
                                                                strict=True)}
    assert by_station["stn-00008"] == 0 and by_station["stn-00000"] == 1

    # Pinned runs never use the fallback; neither does a spec without it.
    pinned = score(fb_spec, data=str(data["next10"]), output=str(out), model_version=1)
    assert _unscored(pinned) == {"stn-00008": (AHEAD, "no version 1"), "stn-00009": (AHEAD, "no version 1")}
    plain = score(spec, data=str(data["next10"]), output=str(out))
    assert _unscored(plain) == {"stn-00008": (AHEAD, "no champion"), "stn-00009": (AHEAD, "no champion")}


# ----------------------------------------------------------------------------- 8. CLI


def _job_toml(tmp_path: Path, data_dir: Path, spec: JobSpec) -> Path:
    text = (ROOT / "jobs" / "transit.toml").read_text()
    text = text.replace('source = "partitions/transit"', f'source = "{data_dir}"')
    text = text.replace('prepare = "jobs/transit.py:prepare"', f'prepare = "{ROOT}/jobs/transit.py:prepare"')
    text = text.replace('registry = "registry"', f'registry = "{spec.output.registry}"')
    path = tmp_path / "job.toml"
    path.write_text(text)
    return path


def test_cli_score_json(trained: tuple[JobSpec, RunSummary], data: dict[str, Path], tmp_path: Path) -> None:
    spec, train_summary = trained
    job = _job_toml(tmp_path, data["history"], spec)
    out = tmp_path / "cli-scores"
    result = runner.invoke(app, ["score", "--job", str(job), "--data", str(data["next10"]),
                                 "--registry", spec.output.registry, "--output", str(out), "--json"])
    assert result.exit_code == 1, result.stderr  # two stations never trained: over 0.05
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    summary = json.loads(lines[0])
    assert set(summary) >= SCORE_KEYS
    assert summary["job"] == JOB and summary["status"] == "failed"
    assert summary["rows"] == {"input": (N + 2) * AHEAD, "scored": N * AHEAD, "unscored": 2 * AHEAD}
    assert summary["partitions_scored"] == N
    assert sorted(summary["unscored"], key=lambda u: u["partition"]["station"]) == [
        {"partition": {"station": st}, "rows": AHEAD, "reason": "no champion"}
        for st in ("stn-00008", "stn-00009")]
    assert set(summary["cost"]) >= {"total_usd", "cpu_seconds", "gpu_seconds"}
    assert summary["cost"]["cpu_seconds"] > 0
    assert Path(summary["output"]).is_dir() and Path(summary["output"]).is_relative_to(out)
    table = _read(out)
    assert table.num_rows == N * AHEAD
    assert set(table.column("score_run_id").to_pylist()) == {summary["run_id"]}
    assert set(table.column("model_run_id").to_pylist()) == {train_summary.run_id}
    record, _ = Registry(spec.output.registry).run(summary["run_id"])
    assert record["rows"] == summary["rows"]

    ok = runner.invoke(app, ["score", "--job", str(job), "--data", str(data["next"]), "--output", str(out),
                             "--json"])
    assert ok.exit_code == 0, ok.stderr
    assert json.loads(ok.stdout)["status"] == "succeeded" and len(ok.stdout.splitlines()) == 1


def _assert_usage_error(result: Any, *needles: str) -> None:
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert result.stdout == ""
    err = result.stderr.strip()
    assert err.startswith("error:") and "\n" not in err, err
    for needle in needles:
        assert needle in err, err


def test_cli_score_usage_errors(trained: tuple[JobSpec, RunSummary], data: dict[str, Path],
                                tmp_path: Path) -> None:
    spec, _ = trained
    job = _job_toml(tmp_path, data["history"], spec)
    out = tmp_path / "never-written"
    missing = runner.invoke(app, ["score", "--job", str(job), "--data", str(tmp_path / "nope"),
                                  "--output", str(out), "--json"])
    _assert_usage_error(missing, "does not exist", "nope")
    empty = runner.invoke(app, ["score", "--job", str(job), "--data", str(data["next"]),
                                "--registry", str(tmp_path / "empty-registry"), "--output", str(out),
                                "--json"])
    _assert_usage_error(empty, "no models of job", JOB)
    for pin in (["--model-version", "1"], ["--train-run", "20260101T000000Z-train-000000"]):
        pinned = runner.invoke(app, ["score", "--job", str(job), "--data", str(data["next"]),
                                     "--registry", str(tmp_path / "empty-registry"), "--output", str(out),
                                     "--json", *pin])
        _assert_usage_error(pinned, "no models of job", JOB)
    assert not out.exists() and not (tmp_path / "empty-registry").exists()


# ----------------------------------------------------------------------------- 9. hostile keys


HOSTILE = {"stn-00000": "../x", "stn-00001": "a/b", "stn-00002": "Zürich Hbf 駅 ☃"}


def test_hostile_key_values(ray_session: None, make_spec: Any, tmp_path: Path) -> None:
    base = tmp_path / "deep" / "er"

    def hostile(df: pd.DataFrame) -> pd.DataFrame:
        return df.assign(station=df["station"].map(HOSTILE))

    hist = _write_flat(hostile(make_transit(3, HIST)), base / "hist.parquet")
    nxt = _write_flat(hostile(score_frame(3, AHEAD, after_hours=HIST)), base / "next" / "rows.parquet")
    spec = make_spec(hist, base / "registry")
    t = manymodels.train(spec)
    assert (t.trained, t.failed) == (3, 0), t.failures
    out = base / "scores"
    s = score(spec, data=str(nxt), output=str(out))
    _scored(s, 3 * AHEAD, 3)
    table = _read(out)
    assert table.schema.field("station").type == pa.string()
    assert Counter(table.column("station").to_pylist()) == {v: AHEAD for v in HOSTILE.values()}
    # Predictions are per partition: each hostile station matches its own model.
    df = table.to_pandas().set_index("trip_id")
    reg = Registry(spec.output.registry)
    rows = hostile(score_frame(3, AHEAD, after_hours=HIST))
    for station, part in rows.groupby("station"):
        mv = reg.get(JOB, {"station": station})
        np.testing.assert_allclose(df.loc[part["trip_id"].to_numpy(), "prediction"].to_numpy(),
                                   _plain_predict(mv.model_uri, mv.features, part), rtol=0, atol=1e-12)
    # Nothing written outside the data, registry and scores roots.
    allowed = (base / "next", base / "registry", out)
    for f in _files_under(tmp_path):
        assert f == base / "hist.parquet" or any(f.is_relative_to(r) for r in allowed), f
    for d in (base / "x", base / "a", tmp_path / "deep" / "x", out / "x", out / "a"):
        assert not d.exists(), d
    assert sorted(p.name for p in (out / JOB).iterdir()) == [f"score_run_id={s.run_id}"]
    assert all(os.path.realpath(f).startswith(str(out.resolve())) for f in _files_under(out))


def test_only_scores_selected_partitions(trained: tuple[JobSpec, RunSummary], data: dict[str, Path],
                                         tmp_path: Path) -> None:
    spec, _ = trained
    out = tmp_path / "scores"
    s = score(spec, data=str(data["next10"]), output=str(out),
              only=["station=stn-00001", "station=stn-00009"])
    assert (s.input_rows, s.scored_rows, s.partitions_scored) == (2 * AHEAD, AHEAD, 1)
    assert s.unscored == [{"partition": {"station": "stn-00009"}, "rows": AHEAD, "reason": "no champion"}]
    assert set(_read(out).column("station").to_pylist()) == {"stn-00001"}


# ----------------------------------------------------------------------------- rows reordered by prepare


SORTING_PREPARE = """

_transit_prepare = prepare


def prepare(df):  # noqa: F811
    # The usual way to build a lag: sort by time (scoring input need not be in time order).
    df = _transit_prepare(df).sort_values("ts")
    return df.assign(prev_temp=df["temp_c"].shift(1))
"""


def test_prepare_that_sorts_rows_keeps_each_prediction_on_its_row(ray_session: None, make_spec: Any,
                                                                   data: dict[str, Path],
                                                                   tmp_path: Path) -> None:
    """Scoring input out of time order, a prepare that sorts by time: every output row carries the
    prediction plain LightGBM makes for that row's own (prepared) features, matched by ``trip_id``."""
    prep = tmp_path / "sorting.py"
    prep.write_text((ROOT / "jobs" / "transit.py").read_text() + SORTING_PREPARE)
    spec = make_spec(data["history"], tmp_path / "registry", pipeline={"prepare": f"{prep}:prepare"})
    trained = manymodels.train(spec)
    assert trained.failed == 0 and trained.promoted == N, trained.failures
    rows = score_frame(N, AHEAD, after_hours=HIST).sample(frac=1.0, random_state=7)
    flat = _write_flat(rows, tmp_path / "shuffled" / "rows.parquet")
    out = tmp_path / "scores"
    s = score(spec, data=str(flat), output=str(out))
    _scored(s, N * AHEAD, N)
    got = _run_rows(out, s.run_id).set_index("trip_id")["prediction"]
    reg = Registry(spec.output.registry)
    namespace: dict[str, Any] = {}
    exec(compile(prep.read_text(), str(prep), "exec"), namespace)  # the user's prepare, run by hand
    for station, part in rows.groupby("station"):
        mv = reg.get(JOB, {"station": station})
        assert "prev_temp" in mv.features
        with fsspec.open(mv.model_uri, "r") as f:
            booster = lgb.Booster(model_str=f.read())
        prepared = namespace["prepare"](part.reset_index(drop=True))
        X = prepared[mv.features].copy()
        for col in X.columns:
            if pd.api.types.is_string_dtype(X[col]) or X[col].dtype == object:
                X[col] = X[col].astype("category")
        expected = pd.Series(booster.predict(X), index=prepared["trip_id"].to_numpy())
        mine = got.loc[part["trip_id"].to_numpy()]
        np.testing.assert_allclose(mine.to_numpy(), expected.loc[mine.index].to_numpy(), rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- key types (issue 8, item 6)

DIGIT_IDS = {"stn-00000": "007", "stn-00001": "7", "stn-00002": "00042"}


def _digit_ids(df: pd.DataFrame) -> pd.DataFrame:
    return df.assign(station=df["station"].map(DIGIT_IDS))


@pytest.fixture(scope="module")
def digit_keys(ray_session: None, make_spec: Any, tmp_path_factory: pytest.TempPathFactory
               ) -> tuple[JobSpec, RunSummary, Path]:
    """3 stations named ``007``, ``7`` and ``00042``, trained from Hive folders."""
    base = tmp_path_factory.mktemp("digit-keys")
    write_transit(_digit_ids(make_transit(3, HIST)), str(base / "hive"), layout="hive")
    assert (base / "hive" / "station=007").is_dir() and (base / "hive" / "station=7").is_dir()
    spec = make_spec(base / "hive", base / "registry")
    return spec, manymodels.train(spec), base


def test_hive_digit_keys_stay_text_and_score_from_a_flat_file(
        digit_keys: tuple[JobSpec, RunSummary, Path]) -> None:
    """``007`` and ``7`` are two partitions (not both the integer 7), and a flat file whose ids are
    strings finds each one's champion."""
    spec, t, base = digit_keys
    assert (t.total, t.trained, t.failed) == (3, 3, 0), t.failures
    champions = Registry(spec.output.registry).list(JOB)
    assert sorted(m.partition["station"] for m in champions) == ["00042", "007", "7"]
    flat = _write_flat(_digit_ids(score_frame(3, AHEAD, after_hours=HIST)), base / "flat" / "rows.parquet")
    out = base / "scores-flat"
    s = score(spec, data=str(flat), output=str(out))
    _scored(s, 3 * AHEAD, 3)
    table = _read(out)
    assert table.schema.field("station").type == pa.string()
    assert Counter(table.column("station").to_pylist()) == {"007": AHEAD, "7": AHEAD, "00042": AHEAD}


def test_text_keys_with_leading_zeros_scored_from_integers_is_an_error(
        digit_keys: tuple[JobSpec, RunSummary, Path]) -> None:
    """Integer ids cannot tell "007" from "7": a clear exit-2 error naming the column, both types
    and the fix, before anything is written."""
    spec, _, base = digit_keys
    rows = _digit_ids(score_frame(3, AHEAD, after_hours=HIST))
    ints = _write_flat(rows.assign(station=rows["station"].astype(int)), base / "ints" / "rows.parquet")
    out = base / "scores-ints"
    runs_before = len(Registry(spec.output.registry).runs(JOB))
    with pytest.raises(manymodels.InputError) as info:
        score(spec, data=str(ints), output=str(out))
    message = str(info.value)
    for part in ("'station'", "number (int64)", "text in the registry", "same text as in training"):
        assert part in message, message
    assert "'007'" in message or "'00042'" in message, message  # a value integers cannot give back
    assert not out.exists()
    assert len(Registry(spec.output.registry).runs(JOB)) == runs_before


@pytest.fixture(scope="module")
def int_keys(ray_session: None, make_spec: Any, tmp_path_factory: pytest.TempPathFactory
             ) -> tuple[JobSpec, Path]:
    """3 stations with integer ids 1, 2, 3 in a flat file (the registry holds numbers)."""
    base = tmp_path_factory.mktemp("int-keys")
    ids = {"stn-00000": 1, "stn-00001": 2, "stn-00002": 3}
    hist = make_transit(3, HIST)
    flat = _write_flat(hist.assign(station=hist["station"].map(ids)), base / "hist.parquet")
    spec = make_spec(flat, base / "registry")
    t = manymodels.train(spec)
    assert (t.trained, t.failed) == (3, 0), t.failures
    assert {type(m.partition["station"]) for m in Registry(spec.output.registry).list(JOB)} == {int}
    return spec, base


@pytest.mark.parametrize("layout", ["hive", "flat"])
def test_integer_trained_keys_scored_from_text(int_keys: tuple[JobSpec, Path], layout: str) -> None:
    """Digit strings without leading zeros are exactly the integers: normalised, every row scored,
    the output keeps the scoring data's type."""
    spec, base = int_keys
    rows = score_frame(3, AHEAD, after_hours=HIST)
    rows = rows.assign(station=rows["station"].map({"stn-00000": "1", "stn-00001": "2", "stn-00002": "3"}))
    data = base / f"text-{layout}"
    if layout == "hive":
        write_transit(rows, str(data), layout="hive")
    else:
        _write_flat(rows, data / "rows.parquet")
    out = base / f"scores-{layout}"
    s = score(spec, data=str(data), output=str(out))
    _scored(s, 3 * AHEAD, 3)
    assert Counter(_read(out).column("station").to_pylist()) == {"1": AHEAD, "2": AHEAD, "3": AHEAD}


def test_integer_trained_keys_scored_from_zero_padded_folders_exits_2(int_keys: tuple[JobSpec, Path]
                                                                      ) -> None:
    spec, base = int_keys
    rows = score_frame(3, AHEAD, after_hours=HIST)
    rows = rows.assign(station=rows["station"].map({"stn-00000": "01", "stn-00001": "02", "stn-00002": "3"}))
    write_transit(rows, str(base / "padded"), layout="hive")
    job = base / "job.toml"
    job.write_text(f'[job]\nname = "{JOB}"\n[data]\nsource = "{base / "padded"}"\n'
                   f'partition_by = ["station"]\ntarget = "delay_min"\n'
                   f'[output]\nregistry = "{spec.output.registry}"\nscores = "{base / "scores-padded"}"\n')
    result = runner.invoke(app, ["score", "--job", str(job), "--json"])
    assert result.exit_code == 2, (result.stdout, result.exception)
    err = result.stderr
    assert "'station'" in err and "text (string)" in err and "number in the registry" in err, err
    assert "'01'" in err and 'key_types = { station = "int64" }' in err, err
    assert len(err.strip().splitlines()) == 1 and result.stdout == ""
    assert not (base / "scores-padded").exists()
    with_types = dataclasses.replace(spec, data=dataclasses.replace(
        spec.data, source=str(base / "padded"), key_types=FrozenMap({"station": "int64"})))
    s = score(with_types, output=str(base / "scores-typed"))  # the fix the message names
    _scored(s, 3 * AHEAD, 3)


def testnormalised_keys_rules() -> None:
    """Exact conversions only: canonical digit strings ↔ integers; anything else names the column."""
    from types import SimpleNamespace

    from manymodels.data import InputError, normalised_keys

    def parts(*keys: tuple[Any, ...]) -> list[Any]:
        return [SimpleNamespace(key=k) for k in keys]

    ints = pa.array(['{"s":1,"d":"a"}', '{"s":2,"d":"a"}', '{"s":null,"d":"b"}'])
    names, types = ["s", "d"], [pa.string(), pa.string()]
    assert normalised_keys("j", "u", names, types, parts(("1", "a"), (None, "b")), ints) == [(1, "a"),
                                                                                             (None, "b")]
    assert normalised_keys("j", "u", names, [pa.int64(), pa.string()], parts((1, "a")), ints) is None
    with pytest.raises(InputError, match=r"'s' is text \(string\) in 'u' but number .*'01'.*key_types"):
        normalised_keys("j", "u", names, types, parts(("01", "a")), ints)
    with pytest.raises(InputError, match=r"'s' is text \(date32\[day\]\)"):
        normalised_keys("j", "u", names, [pa.date32(), pa.string()], parts((dt.date(2026, 1, 1), "a")), ints)
    texts = pa.array(['{"s":"7"}', '{"s":"12"}'])
    assert normalised_keys("j", "u", ["s"], [pa.int32()], parts((7,), (12,)), texts) == [("7",), ("12",)]
    with pytest.raises(InputError, match=r"'s' is number \(double\).*1\.5"):
        normalised_keys("j", "u", ["s"], [pa.float64()], parts((1.5,),), texts)
    with pytest.raises(InputError, match=r"'s' is bool \(bool\) in 'u' but text"):
        normalised_keys("j", "u", ["s"], [pa.bool_()], parts((True,),), texts)


def test_run_id_of_another_run_kind_or_job_is_refused(trained: tuple[JobSpec, RunSummary],
                                                      data: dict[str, Path], make_spec: Any,
                                                      tmp_path: Path) -> None:
    """``--run-id`` may re-run a score run of the same job; naming a train run, or a run of another
    job, is exit 2 before anything is written (it would replace that run's record)."""
    spec, train_summary = trained
    reg = Registry(spec.output.registry)
    out = tmp_path / "scores"
    train_record, _ = reg.run(train_summary.run_id)
    with pytest.raises(manymodels.SpecError, match="train run"):
        score(spec, data=str(data["next"]), output=str(out), run_id=train_summary.run_id)
    assert reg.run(train_summary.run_id)[0] == train_record  # untouched
    result = runner.invoke(app, ["score", "--job", str(spec.path), "--data", str(data["next"]),
                                 "--registry", spec.output.registry, "--output", str(out),
                                 "--run-id", train_summary.run_id])
    assert result.exit_code == 2 and "train run" in result.stderr, result.stderr
    assert not out.exists()

    first = score(spec, data=str(data["next"]), output=str(out), run_id="nightly-a")
    again = score(spec, data=str(data["next"]), output=str(out), run_id="nightly-a")  # a re-run: fine
    assert first.run_id == again.run_id == "nightly-a"
    other = dataclasses.replace(spec, job=dataclasses.replace(spec.job, name="other-job"))
    with pytest.raises(manymodels.SpecError, match="job 'transit-delays'"):
        score(other, data=str(data["next"]), output=str(out), run_id="nightly-a")
    assert not (out / "other-job").exists()
    record, _ = reg.run("nightly-a")
    assert (record["job"], record["kind"], record["status"]) == (JOB, "score", "succeeded")


# ----------------------------------------------------------------------------- 9. publishing


def test_s3_publish_copies_server_side(trained: tuple[JobSpec, RunSummary], data: dict[str, Path],
                                       s3_endpoint: str | None) -> None:
    """On an object store the staged files reach the run's folder by server-side copies (S3
    CopyObject): the driver never downloads them. Counted on the driver's own S3 client."""
    if s3_endpoint is None:
        pytest.skip("needs moto[server] and s3fs")
    import uuid

    spec, _ = trained
    fs = fsspec.filesystem("s3")  # the instance the driver's Store gets (fsspec caches it)
    bucket = f"mm-{uuid.uuid4().hex[:12]}"
    fs.mkdir(bucket)
    calls: list[tuple[str, str]] = []

    def record(params: dict[str, Any], model: Any, **_: Any) -> None:
        source = params.get("CopySource")
        key = source["Key"] if isinstance(source, dict) else str(params.get("Key", ""))
        calls.append((model.name, key))

    fs.ls(bucket)  # connects: the client exists from here on
    fs.s3.meta.events.register("provide-client-params.s3.*", record)
    try:
        s = score(spec, data=str(data["next"]), output=f"s3://{bucket}/scores", run_id="on-s3")
        again = score(spec, data=str(data["next"]), output=f"s3://{bucket}/scores", run_id="on-s3")
    finally:
        fs.s3.meta.events.unregister("provide-client-params.s3.*", record)
    _scored(s, N * AHEAD, N)
    _scored(again, N * AHEAD, N)
    staged = [(op, key) for op, key in calls if "/.staging/" in f"/{key}"]
    copies = [key for op, key in staged if op == "CopyObject"]
    assert copies and not [op for op, _ in staged if op == "GetObject"], staged
    fs.invalidate_cache()
    final = fs.find(f"{bucket}/scores/{JOB}/score_run_id=on-s3")
    assert len(copies) == 2 * len(final)  # every staged file copied once per run, none downloaded
    table = ds.dataset(f"{bucket}/scores/{JOB}", filesystem=fs, partitioning="hive").to_table()
    assert table.num_rows == N * AHEAD  # the re-run replaced its rows
    assert fs.find(f"{bucket}/scores/.staging") == []


def test_delta_output_commits_each_run_atomically(trained: tuple[JobSpec, RunSummary],
                                                  data: dict[str, Path], make_spec: Any,
                                                  main_scores: tuple[Path, ScoreSummary, Any, Any],
                                                  tmp_path: Path) -> None:
    """``output.format = "delta"``: each score run is one Delta commit of the job's table; a re-run
    of a run id replaces that run's rows (not doubled), other runs stay; polars, DuckDB (through
    deltalake's Arrow dataset) and pyarrow read the same columns as the Parquet output."""
    deltalake = pytest.importorskip("deltalake")
    spec, _ = trained
    dspec = make_spec(data["history"], spec.output.registry, output={"format": "delta"})
    out = tmp_path / "scores"
    first = score(dspec, data=str(data["next"]), output=str(out), run_id="nightly-delta")
    other = score(dspec, data=str(data["next"]), output=str(out))
    again = score(dspec, data=str(data["next"]), output=str(out), run_id="nightly-delta")
    for s in (first, other, again):
        _scored(s, N * AHEAD, N)
        assert s.output == str(out / JOB)
    table = deltalake.DeltaTable(str(out / JOB))
    assert table.version() == 2  # one commit per run
    rows = table.to_pyarrow_table()
    assert set(rows.column_names) == OUTPUT_COLUMNS
    assert Counter(rows.column("score_run_id").to_pylist()) == {"nightly-delta": N * AHEAD,
                                                                 other.run_id: N * AHEAD}
    # The re-run's rows replaced the first run's (newer scored_at), with the same predictions as the
    # Parquet output of the same rows.
    df = rows.to_pandas()
    nightly = df[df["score_run_id"] == "nightly-delta"].set_index("trip_id").sort_index()
    # A reader reads one table version; no version holds part of a run: each has 0 or all its rows.
    for version in range(table.version() + 1):
        snapshot = deltalake.DeltaTable(str(out / JOB), version=version).to_pyarrow_table()
        assert set(Counter(snapshot.column("score_run_id").to_pylist()).values()) == {N * AHEAD}, version
    v0 = deltalake.DeltaTable(str(out / JOB), version=0).to_pyarrow_table().to_pandas()
    assert len(v0) == N * AHEAD and nightly["scored_at"].min() > v0["scored_at"].max()
    parquet_out, parquet_run, _, _ = main_scores
    reference = _run_rows(parquet_out, parquet_run.run_id).set_index("trip_id").sort_index()
    np.testing.assert_allclose(nightly["prediction"].to_numpy(), reference["prediction"].to_numpy())
    assert pl.read_delta(str(out / JOB)).filter(pl.col("score_run_id") == "nightly-delta").height == N * AHEAD
    con = duckdb.connect()
    con.register("scores", table.to_pyarrow_dataset())
    counts = con.sql("select score_run_id, count(*) from scores group by 1").fetchall()
    assert sorted(counts) == sorted([("nightly-delta", N * AHEAD), (other.run_id, N * AHEAD)])


def test_delta_output_on_s3(trained: tuple[JobSpec, RunSummary], data: dict[str, Path], make_spec: Any,
                            s3_endpoint: str | None) -> None:
    """The Delta output on the S3 server: runs commit and re-runs replace, and delta-rs's commits
    there are put-if-absent (two writers from the same snapshot: the second retries, nothing lost)."""
    deltalake = pytest.importorskip("deltalake")
    if s3_endpoint is None:
        pytest.skip("needs moto[server] and s3fs")
    import uuid

    spec, _ = trained
    bucket = f"mm-{uuid.uuid4().hex[:12]}"
    fsspec.filesystem("s3").mkdir(bucket)
    dspec = make_spec(data["history"], spec.output.registry, output={"format": "delta"})
    out = f"s3://{bucket}/scores"
    for _ in range(2):
        _scored(score(dspec, data=str(data["next"]), output=out, run_id="s3-delta"), N * AHEAD, N)
    options = {"AWS_ALLOW_HTTP": "true"}
    uri = f"{out}/{JOB}"
    table = deltalake.DeltaTable(uri, storage_options=options)
    assert table.version() == 1 and table.to_pyarrow_table().num_rows == N * AHEAD
    assert pl.read_delta(uri, storage_options=options).height == N * AHEAD

    # Two writers holding the same snapshot commit one after the other: the second finds its commit
    # number taken (the server refuses the conditional put) and commits as the next one.
    a, b = (deltalake.DeltaTable(uri, storage_options=options) for _ in range(2))
    extra = table.to_pyarrow_table().slice(0, 3)
    for writer, run in ((a, "writer-a"), (b, "writer-b")):
        rows = extra.set_column(extra.schema.get_field_index("score_run_id"), "score_run_id",
                                pa.array([run] * 3))
        deltalake.write_deltalake(writer, rows, mode="append")
    final = deltalake.DeltaTable(uri, storage_options=options)
    assert final.version() == 3
    assert Counter(final.to_pyarrow_table().column("score_run_id").to_pylist()) == {
        "s3-delta": N * AHEAD, "writer-a": 3, "writer-b": 3}
