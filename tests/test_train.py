"""End-to-end training (manymodels.train) on the session's local Ray and small synthetic data."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import fsspec
import lightgbm as lgb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import manymodels
from manymodels import InputError, Registry, RunSummary
from manymodels.spec import JobSpec
from manymodels.synth import make_transit

pytestmark = pytest.mark.ray

JOB = "transit-delays"
N = 12
STATIONS = [f"stn-{i:05d}" for i in range(N)]


@pytest.fixture(scope="module")
def trained(ray_session: None, make_spec: Any, transit_dir: Path,
            tmp_path_factory: pytest.TempPathFactory) -> tuple[JobSpec, RunSummary]:
    """One run of the demo job on the transit data, shared by the read-only tests below."""
    spec = make_spec(transit_dir, tmp_path_factory.mktemp("trained") / "registry")
    return spec, manymodels.train(spec)


def _counts(s: RunSummary) -> tuple[int, int, int, int, int]:
    return s.total, s.trained, s.promoted, s.skipped, s.failed


def _failures(s: RunSummary) -> dict[str, str]:
    return {f["partition"]["station"]: f["reason"] for f in s.failures}


def test_first_run_trains_and_promotes_all(trained: tuple[JobSpec, RunSummary]) -> None:
    spec, s = trained
    assert _counts(s) == (N, N, N, 0, 0)
    assert s.status == "succeeded" and s.exit_code == 0 and s.failures == []
    assert s.job == JOB and s.registry == spec.output.registry
    assert sorted(s.versions.values()) == [1] * N
    reg = Registry(spec.output.registry)
    champions = reg.list(JOB)
    assert sorted(m.partition["station"] for m in champions) == STATIONS
    assert {m.status for m in champions} == {"champion"}
    assert all(m.version == 1 and m.run_id == s.run_id and m.rows == 24 * 7 for m in champions)
    assert reg.list(JOB, all_versions=True) == champions


def test_model_uri_loads_with_plain_lightgbm(trained: tuple[JobSpec, RunSummary], transit_dir: Path
                                            ) -> None:
    spec, _ = trained
    reg = Registry(spec.output.registry)
    mv = reg.get(JOB, {"station": "stn-00004"})
    with fsspec.open(mv.model_uri, "r") as f:
        booster = lgb.Booster(model_str=f.read())
    assert booster.feature_name() == mv.features
    assert {"hour", "dow", "rush", "rain"} <= set(mv.features)  # the prepare step ran
    assert not {"trip_id", "precip_mm", "ts", "station", "delay_min"} & set(mv.features)
    assert set(mv.metrics) >= {"mae", "train_rows", "holdout_rows"} and mv.metric == "mae"
    assert mv.metric_value == pytest.approx(mv.metrics["mae"]) and mv.metric_value < 15.0
    assert mv.time_min is not None and mv.time_max is not None and mv.time_min < mv.time_max
    # The same model through the registry API predicts identically.
    from manymodels.pipeline import load_prepare, predict_partition

    rows = pd.read_parquet(transit_dir / "station=stn-00004" / "part-0.parquet")
    via_registry = predict_partition(rows, spec, reg.load_model(JOB, {"station": "stn-00004"}),
                                     prepare=load_prepare(spec))
    plain = predict_partition(rows, spec, booster, prepare=load_prepare(spec))
    np.testing.assert_array_equal(via_registry, plain)


def test_run_record(trained: tuple[JobSpec, RunSummary]) -> None:
    spec, s = trained
    reg = Registry(spec.output.registry)
    assert s.run_id in [r["run_id"] for r in reg.runs(JOB)]
    assert s.run_id in [r["run_id"] for r in reg.runs()]
    record, parts = reg.run(s.run_id)
    assert record["status"] == "succeeded" and record["kind"] == "train"
    assert record["partitions"] == {"total": N, "trained": N, "promoted": N, "skipped": 0, "failed": 0}
    assert record["finished_at"] >= record["started_at"]
    assert parts is not None and len(parts) == N
    assert Counter(parts["status"]) == {"trained": N}
    assert parts["promoted"].all() and (parts["version"] == 1).all()
    assert sorted(json.loads(p)["station"] for p in parts["partition"]) == STATIONS
    assert (parts["wall_s"] > 0).all() and (parts["cost_usd"] >= 0).all()
    cost = record["cost"]
    assert cost["cpu_seconds"] > 0 and cost["total_usd"] > 0  # demo spec has a cpu rate
    assert cost["attributed_usd"] == pytest.approx(parts["cost_usd"].sum(), abs=1e-9)  # rounded to 1e-9
    assert cost["overhead_usd"] == pytest.approx(cost["total_usd"] - cost["attributed_usd"], abs=2e-9)
    with pytest.raises(manymodels.RegistryError):
        reg.run("no-such-run")


def test_rerun_skips_then_force_makes_version_2(ray_session: None, make_spec: Any, transit_dir: Path,
                                                tmp_path: Path) -> None:
    spec = make_spec(transit_dir, tmp_path / "registry")
    first = manymodels.train(spec)
    assert _counts(first) == (N, N, N, 0, 0)
    second = manymodels.train(spec)
    assert _counts(second) == (N, 0, 0, N, 0)
    assert second.exit_code == 0
    reg = Registry(spec.output.registry)
    assert len(reg.list(JOB, all_versions=True)) == N  # no new versions
    _, parts = reg.run(second.run_id)
    assert parts is not None and set(parts["status"]) == {"skipped"}

    forced = manymodels.train(spec, force=True)
    assert _counts(forced) == (N, N, N, 0, 0), forced.failures
    assert sorted(forced.versions.values()) == [2] * N
    every = reg.list(JOB, all_versions=True)
    assert Counter((m.version, m.status) for m in every) == {(1, "archived"): N, (2, "champion"): N}
    for m in reg.list(JOB):
        # The champion rule ran: the old champion was judged on the new holdout (same data: equal).
        assert m.version == 2 and m.previous_version == 1 and m.run_id == forced.run_id
        assert m.metrics["champion_mae"] == pytest.approx(m.metrics["mae"])


def _rewrite_station(root: Path, station: str, change: float) -> None:
    path = root / f"station={station}" / "part-0.parquet"
    table = pq.read_table(path)
    delay = table.column("delay_min").to_numpy() + change
    table = table.set_column(table.schema.get_field_index("delay_min"), "delay_min", pa.array(delay))
    pq.write_table(table, path)


def test_changed_data_retrains_only_that_partition(ray_session: None, make_spec: Any, transit_dir: Path,
                                                   tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(transit_dir, data)
    spec = make_spec(data, tmp_path / "registry")
    assert _counts(manymodels.train(spec)) == (N, N, N, 0, 0)
    _rewrite_station(data, "stn-00003", 2.5)
    again = manymodels.train(spec)
    assert (again.total, again.trained, again.skipped, again.failed) == (N, 1, N - 1, 0)
    reg = Registry(spec.output.registry)
    versions = {m.partition["station"]: m.version for m in reg.list(JOB, all_versions=True)
                if m.run_id == again.run_id}
    assert versions == {"stn-00003": 2}


def test_only_and_limit(ray_session: None, transit_spec: JobSpec) -> None:
    only = manymodels.train(transit_spec, only=["station=stn-00001"])
    assert _counts(only) == (1, 1, 1, 0, 0)
    reg = Registry(transit_spec.output.registry)
    assert [m.partition for m in reg.list(JOB)] == [{"station": "stn-00001"}]
    both = manymodels.train(transit_spec, only=["station=stn-00001", "station=stn-00002"])
    assert (both.total, both.trained, both.skipped) == (2, 1, 1)
    limited = manymodels.train(transit_spec, limit=4)
    assert limited.total == 4
    assert len(reg.list(JOB)) == 2 + limited.trained
    with pytest.raises(InputError, match="no partition matches --only"):
        manymodels.train(transit_spec, only=["station=nope"])
    with pytest.raises(manymodels.SpecError, match="--only"):
        manymodels.train(transit_spec, only=["line=red"])
    with pytest.raises(manymodels.SpecError, match="--limit"):
        manymodels.train(transit_spec, limit=0)


def _faulty_data(path: Path) -> None:
    """10 stations; stn-00008 has too few rows, stn-00009 an all-NaN target."""
    df = make_transit(10, 24 * 3)
    df = df[(df["station"] != "stn-00008") | (df["ts"] < df["ts"].min() + pd.Timedelta(hours=20))].copy()
    df.loc[df["station"] == "stn-00009", "delay_min"] = np.nan
    df.to_parquet(path, index=False)


@pytest.mark.parametrize(("max_failure_fraction", "status", "code"),
                         [(0.25, "succeeded", 0), (0.1, "failed", 1)])
def test_failed_partitions_are_isolated(ray_session: None, make_spec: Any, tmp_path: Path,
                                        max_failure_fraction: float, status: str, code: int) -> None:
    data = tmp_path / "faulty.parquet"
    _faulty_data(data)
    spec = make_spec(data, tmp_path / "registry", run={"max_failure_fraction": max_failure_fraction})
    s = manymodels.train(spec)
    assert _counts(s) == (10, 8, 8, 0, 2)
    assert _failures(s) == {"stn-00008": "only 20 usable rows (min_rows = 48)",
                            "stn-00009": "only 0 usable rows (min_rows = 48)"}
    assert (s.status, s.exit_code) == (status, code)
    reg = Registry(spec.output.registry)
    assert len(reg.list(JOB)) == 8
    record, parts = reg.run(s.run_id)
    assert record["status"] == status and record["failures"] == s.failures
    assert parts is not None
    assert Counter(parts["status"]) == {"trained": 8, "failed": 2}
    failed = parts[parts["status"] == "failed"]
    assert failed["reason"].str.startswith("only ").all() and failed["version"].isna().all()


def test_prepare_failing_for_one_partition(ray_session: None, make_spec: Any, transit_dir: Path,
                                           tmp_path: Path) -> None:
    prep = tmp_path / "prep.py"
    prep.write_text(
        "import pandas as pd\n\n\n"
        "def prepare(df: pd.DataFrame) -> pd.DataFrame:\n"
        "    if (df['station'] == 'stn-00005').any():\n"
        "        raise KeyError('no timetable for this station')\n"
        "    return df.assign(hour=df['ts'].dt.hour)\n")
    spec = make_spec(transit_dir, tmp_path / "registry", pipeline={"prepare": f"{prep}:prepare"})
    s = manymodels.train(spec)
    assert _counts(s) == (N, N - 1, N - 1, 0, 1)
    assert _failures(s) == {"stn-00005": "prepare raised KeyError: 'no timetable for this station'"}
    assert s.exit_code == 1  # 1 of 12 is more than the demo's 5 %
    mv = Registry(spec.output.registry).get(JOB, {"station": "stn-00000"})
    assert "hour" in mv.features


HOSTILE = ["../x", "a/b", "ünïcødé ✓ 東京", "z" * 300, "..", "normal"]


def test_hostile_and_null_keys(ray_session: None, make_spec: Any, tmp_path: Path) -> None:
    df = make_transit(len(HOSTILE) + 1, 24 * 3)
    mapping = {f"stn-{i:05d}": v for i, v in enumerate([*HOSTILE, None])}
    df["station"] = df["station"].map(mapping).astype(object)
    data = tmp_path / "data" / "hostile.parquet"
    data.parent.mkdir()
    df.to_parquet(data, index=False)
    registry = tmp_path / "work" / "registry"
    spec = make_spec(data, registry)
    s = manymodels.train(spec)
    assert _counts(s) == (7, 7, 7, 0, 0), s.failures

    reg = Registry(str(registry))
    got = {m.partition["station"] for m in reg.list(JOB)}
    assert got == {*HOSTILE, None}
    for value in HOSTILE:
        mv = reg.get(JOB, {"station": value})
        assert mv.partition == {"station": value}
        assert Path(mv.model_uri).resolve().is_relative_to(registry.resolve())
        assert reg.load_model(JOB, {"station": value}).num_trees() > 0
    assert reg.get(JOB, {"station": None}).partition == {"station": None}  # the null-key partition

    # Nothing was written outside the registry root (nor next to the data) ...
    outside = [p for p in tmp_path.rglob("*") if p.is_file() and not p.is_relative_to(registry)]
    assert outside == [data]
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["registry"]
    # ... and no key value became a path component inside it.
    for dirpath, dirnames, filenames in os.walk(registry):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath, name)
            assert path.resolve().is_relative_to(registry.resolve())
            assert name not in ("..", ".") and len(name.encode()) <= 255
            assert name.isascii() and "ü" not in name
            for value in HOSTILE[:4]:
                assert value not in name


def test_bad_input_is_rejected_before_anything_is_written(make_spec: Any, transit_dir: Path,
                                                          tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    with pytest.raises(InputError, match=r"column 'nope' \(target\)"):
        manymodels.train(make_spec(transit_dir, registry, data={"target": "nope"}))
    with pytest.raises(InputError, match="does not exist"):
        manymodels.train(make_spec(tmp_path / "missing", registry))
    empty = tmp_path / "empty.parquet"
    make_transit(0, 10).to_parquet(empty, index=False)
    with pytest.raises(InputError, match="no rows"):
        manymodels.train(make_spec(empty, registry))
    empty_dir = tmp_path / "empty_dir"
    empty_dir.mkdir()
    with pytest.raises(InputError, match="no data files"):
        manymodels.train(make_spec(empty_dir, registry))
    text = tmp_path / "strings.parquet"
    make_transit(2, 60).astype({"delay_min": str}).to_parquet(text, index=False)
    with pytest.raises(InputError, match="must be numeric"):
        manymodels.train(make_spec(text, registry))
    assert not registry.exists()


# ----------------------------------------------------------------------------- issue 8


def _write(df: pd.DataFrame, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_parquet(path, index=False)
    return path


def test_champion_rule_holds_for_a_feature_name_lightgbm_alters(ray_session: None, make_spec: Any,
                                                                 tmp_path: Path) -> None:
    """A feature named ``trip distance`` (LightGBM stores ``trip_distance``): retraining with 2 trees
    after 200 promotes nothing, each version saying it is worse than the champion."""
    df = make_transit(3, 24 * 28).rename(columns={"temp_c": "trip distance"})
    data = _write(df, tmp_path / "data" / "rows.parquet")
    strong = make_spec(data, tmp_path / "registry",
                       model={"params": {"n_estimators": 200, "learning_rate": 0.05}})
    first = manymodels.train(strong)
    assert _counts(first) == (3, 3, 3, 0, 0), first.failures
    assert "trip distance" in Registry(strong.output.registry).get(JOB, {"station": STATIONS[0]}).features
    # Two trees at a small learning rate: close to a constant, far worse on every station.
    weak = make_spec(data, tmp_path / "registry",
                     model={"params": {"n_estimators": 2, "learning_rate": 0.01}})
    second = manymodels.train(weak)
    assert _counts(second) == (3, 3, 0, 0, 0), second.failures
    _, parts = Registry(weak.output.registry).run(second.run_id)
    assert parts is not None
    assert all("worse than the champion" in r for r in parts["reason"]), list(parts["reason"])


def test_ten_percent_more_rows_mostly_promotes(ray_session: None, make_spec: Any, tmp_path: Path) -> None:
    """Without a time column, retraining on the same rows plus 10 % more judges both models on rows
    neither trained on, so most partitions are not "worse than the champion" (19 of 20 were with the
    holdout re-drawn per row count; 5 of 20 are with the stable one: noise on a 20-row holdout)."""
    n = 20
    df = make_transit(n, 110)
    first_rows = df[df.groupby("station").cumcount() < 100]
    data = tmp_path / "data" / "rows.parquet"
    spec = make_spec(data, tmp_path / "registry", data={"time_column": ""},
                     validation={"max_metric": 1000.0})
    _write(first_rows, data)
    first = manymodels.train(spec)
    assert _counts(first) == (n, n, n, 0, 0), first.failures
    _write(df.sample(frac=1.0, random_state=3), data)  # 10 % more rows, and another row order
    second = manymodels.train(spec)
    assert second.trained == n and second.failed == 0
    _, parts = Registry(spec.output.registry).run(second.run_id)
    assert parts is not None
    worse = int(parts["reason"].str.contains("worse than the champion").sum())
    assert worse < n // 2, list(parts["reason"])


PREPARE_WITH_DATACLASS = """
from dataclasses import dataclass

import mm_job_helpers


@dataclass(frozen=True)
class Offset:
    value: float


def prepare(df):
    return df.assign(x2=df["x1"] * mm_job_helpers.SCALE + Offset(1.0).value)
"""


def test_prepare_with_dataclass_and_sibling_import_runs_on_workers(ray_session: None, tmp_path: Path
                                                                   ) -> None:
    code = tmp_path / "code"
    code.mkdir()
    (code / "mm_job_helpers.py").write_text("SCALE = 3.0\n")
    (code / "prep.py").write_text(PREPARE_WITH_DATACLASS)
    rng = np.random.default_rng(1)
    df = pd.DataFrame({"station": np.repeat(["a", "b"], 60), "x1": rng.normal(size=120),
                       "y": rng.normal(size=120)})
    data = _write(df, tmp_path / "data" / "rows.parquet")
    spec = manymodels.load_spec(None, data=str(data), partition_by="station", target="y",
                                registry=str(tmp_path / "registry"), prepare=f"{code / 'prep.py'}:prepare")
    s = manymodels.train(spec)
    assert _counts(s) == (2, 2, 2, 0, 0), s.failures
    assert Registry(spec.output.registry).get(spec.name, {"station": "a"}).features == ["x1", "x2"]


def test_stray_string_in_a_numeric_column_warns_once_per_run(ray_session: None, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from manymodels.cli import app

    rng = np.random.default_rng(2)
    stations = [f"s{i}" for i in range(4)]
    df = pd.DataFrame({"station": np.repeat(stations, 50), "fare": rng.normal(size=200).round(2).astype(str),
                       "x1": rng.normal(size=200), "y": rng.normal(size=200)})
    df.loc[df.index[::50], "fare"] = "n/a"  # one stray string in every partition
    data = _write(df, tmp_path / "data" / "rows.parquet")
    registry = tmp_path / "registry"
    result = CliRunner().invoke(app, ["train", "--data", str(data), "--partition-by", "station",
                                      "--target", "y", "--registry", str(registry), "--json"])
    assert result.exit_code == 0, (result.stdout, result.stderr)
    warned = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warned) == 1 and "feature column 'fare'" in warned[0]
    summary = json.loads(result.stdout)
    assert summary["warnings"] == [warned[0].removeprefix("warning: ")]
    record, _ = Registry(str(registry)).run(summary["run_id"])
    assert record["warnings"] == summary["warnings"]


def test_text_time_column_is_rejected_before_anything_is_written(make_spec: Any, tmp_path: Path) -> None:
    df = make_transit(2, 60)
    data = _write(df.assign(ts=df["ts"].astype(str)), tmp_path / "data" / "rows.parquet")
    registry = tmp_path / "registry"
    spec = make_spec(data, registry, pipeline={"prepare": ""})
    with pytest.raises(InputError, match=r"^column 'ts' \(time_column\) must be a date/time or a number"):
        manymodels.train(spec)
    assert not registry.exists()


def test_text_keys_continue_a_job_trained_on_integer_keys(ray_session: None, make_spec: Any, tmp_path: Path
                                                          ) -> None:
    """A job trained with integer station ids, retrained from Hive folders (whose values are text):
    the same partitions get version 2, not a second set of partitions; zero-padded folder values,
    which no integer gives back, stop the run before anything is written."""
    ids = {"stn-00000": 1, "stn-00001": 2, "stn-00002": 3}
    rows = make_transit(3, 24 * 5)
    flat = tmp_path / "ints.parquet"
    pq.write_table(pa.Table.from_pandas(rows.assign(station=rows["station"].map(ids)), preserve_index=False),
                   flat)
    spec = make_spec(flat, tmp_path / "registry")
    assert manymodels.train(spec).trained == 3
    hive = tmp_path / "hive"
    for sid, n in ids.items():
        part = hive / f"station={n}"
        part.mkdir(parents=True)
        pq.write_table(pa.Table.from_pandas(rows[rows["station"] == sid].drop(columns="station"),
                                            preserve_index=False), part / "part-0.parquet")
    again = manymodels.train(make_spec(hive, tmp_path / "registry"), force=True)
    assert (again.total, again.trained) == (3, 3)
    reg = Registry(str(tmp_path / "registry"))
    versions = Counter((json.dumps(m.partition), m.version) for m in reg.list(JOB, all_versions=True))
    assert sorted(versions) == sorted((json.dumps({"station": n}), v) for n in (1, 2, 3) for v in (1, 2))

    padded = tmp_path / "padded"
    shutil.copytree(hive / "station=1", padded / "station=01")
    runs = len(reg.runs(JOB))
    with pytest.raises(InputError, match=r"'station' is text .* but number in the registry"):
        manymodels.train(make_spec(padded, tmp_path / "registry"))
    assert len(reg.runs(JOB)) == runs
