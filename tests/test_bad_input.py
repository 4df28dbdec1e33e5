"""The bad-input matrix of docs/bad-input.md: one test per row, through the command line.

Rows detected before any work (spec load, planning) exit 2 with one line on stderr that names what is
wrong, print nothing on stdout and write nothing. Rows detected per partition finish the run: the
failing partition is recorded with its reason (summary, run record) and the others are trained.
Rows detected while scoring count the partition's rows as unscored, with the reason. Some bad inputs
are accepted as they are; their rows say so, and their tests pin that behaviour down.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.dataset as ds
import pytest
from typer.testing import CliRunner

from manymodels.cli import app

runner = CliRunner()
STATIONS = ("a", "b", "c")
SCORE_JOB = "scored"


# ----------------------------------------------------------------------------- helpers


def frame(stations: tuple[str, ...] = STATIONS, n: int = 40, seed: int = 0) -> pd.DataFrame:
    """``n`` rows per station: a numeric feature ``x1``, a string feature ``x2`` and a target ``y``."""
    rng = np.random.default_rng(seed)
    parts = []
    for i, station in enumerate(stations):
        x1 = rng.normal(size=n)
        parts.append(pd.DataFrame({"station": station, "x1": x1, "x2": rng.choice(["p", "q"], n),
                                   "y": 3 * x1 + i + rng.normal(scale=0.1, size=n)}))
    return pd.concat(parts, ignore_index=True)


def parquet(path: Path, df: pd.DataFrame) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_parquet(path, index=False)
    return path


def _toml(value: Any) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | list | tuple):
        return json.dumps(value)  # JSON strings and arrays of strings are valid TOML
    return repr(value)


def job_file(root: Path, data: Path | str, /, *, name: str = "bad-input", extra: str = "",
             **sections: dict[str, Any]) -> Path:
    """A job spec TOML under ``root`` (registry and scores in ``root``), with changed sections."""
    table: dict[str, dict[str, Any]] = {
        "job": {"name": name},
        "data": {"source": str(data), "partition_by": ["station"], "target": "y"},
        "output": {"registry": str(root / "registry"), "scores": str(root / "scores")},
    }
    for section, values in sections.items():
        table.setdefault(section, {}).update(values)
    text = "".join(f"[{s}]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in kv.items())
                   for s, kv in table.items())
    path = root / f"{name}.toml"
    path.write_text(text + extra)
    return path


def prep_file(root: Path, body: str, name: str = "prep.py") -> Path:
    """A prepare module whose ``prepare(df)`` runs ``body`` (indented by the caller's lines)."""
    path = root / name
    path.write_text("import pandas as pd\n\n\ndef prepare(df):\n" +
                    "".join(f"    {line}\n" for line in body.splitlines()))
    return path


def cli(*args: Any) -> Any:
    return runner.invoke(app, [str(a) for a in args])


def train_flags(data: Path, root: Path, *more: Any) -> Any:
    """``train`` without a spec file (the job is named after the data file)."""
    return cli("train", "--data", data, "--partition-by", "station", "--target", "y",
               "--registry", root / "registry", "--json", *more)


def usage_error(result: Any, pattern: str) -> str:
    """Exit 2, nothing on stdout, and exactly one stderr line matching ``error: <pattern>``."""
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr, result.exception)
    assert result.stdout == ""
    err: str = result.stderr
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert re.fullmatch(f"error: {pattern}", err.rstrip("\n")), err
    return err


def nothing_written(root: Path) -> None:
    assert not (root / "registry").exists()
    assert not (root / "scores").exists()


def tree(root: Path) -> set[Path]:
    return set(root.rglob("*")) if root.exists() else set()


def one_json(result: Any) -> dict[str, Any]:
    lines = result.stdout.splitlines()
    assert len(lines) == 1, (result.stdout, result.stderr, result.exception)
    out: dict[str, Any] = json.loads(lines[0])
    return out


def run_record(run_id: str, registry: Path) -> dict[str, tuple[str, str]]:
    """``runs show --json``: station → (status, reason) of every partition of the run."""
    detail = one_json(cli("runs", "show", run_id, "--registry", registry, "--json"))
    return {p["partition"]["station"]: (p["status"], p["reason"] or "") for p in detail["partitions"]}


def one_partition_failed(result: Any, root: Path, station: str, reason: str,
                         stations: tuple[str, ...] = STATIONS) -> None:
    """The run finished; ``station`` failed with a reason matching ``reason``; the others trained."""
    assert result.exit_code == 1, (result.stdout, result.stderr, result.exception)  # 1 of 3 > 5 %
    s = one_json(result)
    n = len(stations)
    assert s["status"] == "failed"
    assert s["partitions"] == {"total": n, "trained": n - 1, "promoted": n - 1, "skipped": 0, "failed": 1}
    [failure] = s["failures"]
    assert failure["partition"] == {"station": station}
    assert re.fullmatch(reason, failure["reason"]), failure["reason"]
    record = run_record(s["run_id"], root / "registry")
    assert record.pop(station) == ("failed", failure["reason"])
    assert record == {k: ("trained", "") for k in stations if k != station}
    listed = json.loads(cli("models", "list", "--registry", root / "registry", "--json").stdout)
    assert sorted(m["partition"]["station"] for m in listed) == sorted(set(stations) - {station})


def trained_ok(result: Any, n: int = len(STATIONS)) -> dict[str, Any]:
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    s = one_json(result)
    assert s["partitions"] == {"total": n, "trained": n, "promoted": n, "skipped": 0, "failed": 0}
    return s


# ----------------------------------------------------------------------------- spec load (exit 2)


def test_spec_file_missing(tmp_path: Path) -> None:
    usage_error(cli("train", "--job", tmp_path / "nope.toml"),
                r"job spec '.*/nope\.toml' cannot be read: No such file or directory")
    nothing_written(tmp_path)


def test_invalid_toml(tmp_path: Path) -> None:
    job = tmp_path / "job.toml"
    job.write_text("[job\nname = 'x'\n")
    usage_error(cli("train", "--job", job), r"job spec '.*/job\.toml' is not valid TOML: Expected '\]' "
                                            r"at the end of a table declaration \(at line 1, column 5\)")
    nothing_written(tmp_path)


@pytest.mark.parametrize(("extra", "pattern"), [
    ("[run]\nbogus = 1\n", r"unknown key run\.bogus \(known keys: max_failure_fraction, .*\) "
                           r"\(in .*/bad-input\.toml\)"),
    ("[bogus]\nkey = 1\n", r"unknown section \[bogus\] \(in .*/bad-input\.toml\) \(known: job, data, .*\)"),
], ids=["key", "section"])
def test_unknown_spec_key(tmp_path: Path, extra: str, pattern: str) -> None:
    job = job_file(tmp_path, parquet(tmp_path / "d.parquet", frame()), extra=extra)
    usage_error(cli("train", "--job", job), pattern)
    nothing_written(tmp_path)


@pytest.mark.parametrize(("section", "values", "pattern"), [
    ("validation", {"min_rows": "30"}, r"validation\.min_rows must be an integer, got str '30'"),
    ("data", {"partition_by": 3}, r"data\.partition_by must be a list, got int 3"),
    ("model", {"params": 5}, r"model\.params must be a table, got int 5"),
    ("validation", {"holdout_fraction": 2}, r"validation\.holdout_fraction must be between 0 and 1, "
                                            r"got 2\.0"),
    ("job", {"name": "Bad Name"}, r"job\.name must match \[a-z0-9_-\]\+ \(at most 64 characters\), "
                                  r"got 'Bad Name'"),
], ids=["int-as-string", "list-as-int", "table-as-int", "out-of-range", "job-name"])
def test_mistyped_spec_value(tmp_path: Path, section: str, values: dict[str, Any], pattern: str) -> None:
    job = job_file(tmp_path, parquet(tmp_path / "d.parquet", frame()), **{section: values})
    usage_error(cli("train", "--job", job), pattern + r" \(in .*\.toml\)")
    nothing_written(tmp_path)


@pytest.mark.parametrize(("prepare", "source", "pattern"), [
    ("jobs/nope.py:prepare", None,
     r"pipeline\.prepare file 'jobs/nope\.py' cannot be read: No such file or directory \(in .*\.toml\)"),
    ("prep.py:nope", "def prepare(df):\n    return df\n",
     r"pipeline\.prepare: prep\.py defines no function 'nope'"),
    ("prep.py:prepare", "def prepare(df)\n    return df\n",
     r"pipeline\.prepare 'prep\.py:prepare' does not compile: expected ':' \(prep\.py, line 1\)"),
    ("prep.py", "def prepare(df):\n    return df\n",
     r"pipeline\.prepare must be 'path/to/file\.py:function', got 'prep\.py' \(in .*\.toml\)"),
    ("prep.py:prepare", "import not_a_module_anywhere\n\ndef prepare(df):\n    return df\n",
     r"pipeline\.prepare: prep\.py raised ModuleNotFoundError when loaded: No module named "
     r"'not_a_module_anywhere'"),
], ids=["file-missing", "function-missing", "syntax-error", "no-function", "import-fails"])
def test_bad_prepare_reference(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prepare: str,
                               source: str | None, pattern: str) -> None:
    monkeypatch.chdir(tmp_path)  # relative prepare paths are relative to the working directory
    if source is not None:
        (tmp_path / "prep.py").write_text(source)
    job = job_file(tmp_path, parquet(tmp_path / "d.parquet", frame()), pipeline={"prepare": prepare})
    usage_error(cli("train", "--job", job), pattern)
    nothing_written(tmp_path)


# ----------------------------------------------------------------------------- flags (exit 2)


@pytest.mark.parametrize("limit", ["0", "-3"])
def test_limit_below_one(tmp_path: Path, limit: str) -> None:
    data = parquet(tmp_path / "d.parquet", frame())
    usage_error(train_flags(data, tmp_path, "--limit", limit), f"--limit must be at least 1, got {limit}")
    nothing_written(tmp_path)


def test_only_matches_nothing(tmp_path: Path) -> None:
    data = parquet(tmp_path / "d.parquet", frame())
    usage_error(train_flags(data, tmp_path, "--only", "station=zzz"), "no partition matches --only")
    nothing_written(tmp_path)


@pytest.mark.parametrize("item", ["region=north", "station", "[bogus]=1"])
def test_only_names_no_partition_column(tmp_path: Path, item: str) -> None:
    data = parquet(tmp_path / "d.parquet", frame())
    usage_error(train_flags(data, tmp_path, "--only", item),
                f"--only {re.escape(repr(item))} must be COL=VALUE with COL one of station")
    nothing_written(tmp_path)


# ----------------------------------------------------------------------------- planning (exit 2)


def test_missing_data_path(tmp_path: Path) -> None:
    usage_error(train_flags(tmp_path / "nowhere", tmp_path), r"data source '.*/nowhere' does not exist")
    nothing_written(tmp_path)


def test_garbage_bytes_named_parquet(tmp_path: Path) -> None:
    data = tmp_path / "garbage.parquet"
    data.write_bytes(b"this is not parquet\x00\x01\x02")
    usage_error(train_flags(data, tmp_path),
                r"data source '.*/garbage\.parquet' cannot be read as parquet: .*Parquet magic bytes not "
                r"found in footer.*")
    nothing_written(tmp_path)


def test_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    usage_error(train_flags(tmp_path / "empty", tmp_path), r"data source '.*/empty' holds no data files")
    nothing_written(tmp_path)


def test_zero_row_parquet(tmp_path: Path) -> None:
    data = parquet(tmp_path / "zero.parquet", frame().iloc[:0])
    usage_error(train_flags(data, tmp_path), r"data source '.*/zero\.parquet' has no rows")
    nothing_written(tmp_path)


@pytest.mark.parametrize("good_rows", [2, 120_000], ids=["first-block", "later-block"])
def test_csv_with_ragged_rows(tmp_path: Path, good_rows: int) -> None:
    data = tmp_path / "ragged.csv"
    data.write_text("station,x1,y\n" + "a,0.123456789,1.23456789\n" * good_rows + "b,1,2,3\n")
    row = good_rows + 2
    if good_rows < 1000:  # within the block the schema is inferred from: found by opening the source
        pattern = (r"data source '.*/ragged\.csv' cannot be read as csv: .*CSV parse error: "
                   f"Row #{row}: Expected 3 columns, got 4: b,1,2,3")
    else:  # beyond it: found by the planning scan
        pattern = (f"cannot read '.*/ragged\\.csv': CSV parse error: Row #{row}: Expected 3 columns, "
                   "got 4: b,1,2,3")
    usage_error(train_flags(data, tmp_path), pattern)
    nothing_written(tmp_path)


@pytest.mark.parametrize(("flags", "pattern"), [
    (("--target", "late"), r"column 'late' \(target\) is not in '.*/d\.parquet' \(columns: station, x1, x2, "
                           r"y\)"),
    (("--partition-by", "region"), r"column 'region' \(partition_by\) is not in '.*/d\.parquet' .*"),
], ids=["target", "partition_by"])
def test_column_missing(tmp_path: Path, flags: tuple[str, str], pattern: str) -> None:
    data = parquet(tmp_path / "d.parquet", frame())
    args = {"--partition-by": "station", "--target": "y", flags[0]: flags[1]}
    usage_error(cli("train", "--data", data, *[x for kv in args.items() for x in kv],
                    "--registry", tmp_path / "registry"), pattern)
    nothing_written(tmp_path)


def test_target_is_strings(tmp_path: Path) -> None:
    data = parquet(tmp_path / "d.parquet", frame().astype({"y": str}))
    usage_error(train_flags(data, tmp_path),
                r"column 'y' \(target\) must be numeric, but '.*/d\.parquet' has it as (large_)?string")
    nothing_written(tmp_path)


def test_unwritable_registry(tmp_path: Path) -> None:
    data = parquet(tmp_path / "d.parquet", frame())
    blocker = tmp_path / "file"
    blocker.write_text("a regular file")
    result = cli("train", "--data", data, "--partition-by", "station", "--target", "y",
                 "--registry", blocker / "registry")
    usage_error(result, r"cannot write .*/file/registry/\.manymodels-probe-[0-9a-f]{8}: \[Errno 20\] Not a "
                        r"directory: '.*/file/registry'")
    assert blocker.read_text() == "a regular file"
    assert tree(tmp_path) == {data, blocker}


def test_score_before_training(tmp_path: Path) -> None:
    data = parquet(tmp_path / "d.parquet", frame())
    result = cli("score", "--data", data, "--partition-by", "station", "--target", "y",
                 "--registry", tmp_path / "registry", "--output", tmp_path / "scores")
    usage_error(result, r"the registry .*/registry has no models of job 'd': train it first")
    nothing_written(tmp_path)


# ----------------------------------------------------------------------------- per partition (train)


@pytest.mark.ray
@pytest.mark.usefixtures("ray_session")
def test_target_all_nan_in_one_partition(tmp_path: Path) -> None:
    df = frame()
    df.loc[df["station"] == "b", "y"] = np.nan
    result = train_flags(parquet(tmp_path / "d.parquet", df), tmp_path)
    one_partition_failed(result, tmp_path, "b", r"only 0 usable rows \(min_rows = 30\)")


@pytest.mark.ray
@pytest.mark.usefixtures("ray_session")
def test_partition_with_one_row(tmp_path: Path) -> None:
    df = pd.concat([frame(), frame(("one",), n=1)], ignore_index=True)
    result = train_flags(parquet(tmp_path / "d.parquet", df), tmp_path)
    one_partition_failed(result, tmp_path, "one", r"only 1 usable rows \(min_rows = 30\)", (*STATIONS, "one"))


@pytest.mark.ray
@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("value", [np.inf, -np.inf], ids=["+inf", "-inf"])
def test_infinite_target(tmp_path: Path, value: float) -> None:
    df = frame()
    df.loc[df.index[df["station"] == "b"][3], "y"] = value
    result = train_flags(parquet(tmp_path / "d.parquet", df), tmp_path)
    one_partition_failed(result, tmp_path, "b", r"target column 'y' holds infinite values")


@pytest.mark.ray
@pytest.mark.usefixtures("ray_session")
def test_prepare_raises(tmp_path: Path) -> None:
    prep = prep_file(tmp_path, "if (df['station'] == 'b').any():\n"
                               "    raise ValueError('no timetable for b\\nsecond line')\n"
                               "return df")
    data = parquet(tmp_path / "d.parquet", frame())
    job = job_file(tmp_path, data, pipeline={"prepare": f"{prep}:prepare"})
    one_partition_failed(cli("train", "--job", job, "--json"), tmp_path, "b",
                         r"prepare raised ValueError: no timetable for b")


@pytest.mark.ray
@pytest.mark.usefixtures("ray_session")
def test_prepare_returns_no_dataframe(tmp_path: Path) -> None:
    prep = prep_file(tmp_path, "return df.to_dict() if (df['station'] == 'b').any() else df")
    data = parquet(tmp_path / "d.parquet", frame())
    job = job_file(tmp_path, data, pipeline={"prepare": f"{prep}:prepare"})
    one_partition_failed(cli("train", "--job", job, "--json"), tmp_path, "b",
                         r"prepare returned dict, not a pandas DataFrame")


@pytest.mark.ray
@pytest.mark.usefixtures("ray_session")
def test_binary_target_not_0_1(tmp_path: Path) -> None:
    df = frame()
    df["y"] = (df["x1"] > 0).astype(float)
    df.loc[df["station"] == "b", "y"] = df.loc[df["station"] == "b", "y"] * 2  # 0/2 instead of 0/1
    job = job_file(tmp_path, parquet(tmp_path / "d.parquet", df), model={"objective": "binary"})
    one_partition_failed(cli("train", "--job", job, "--json"), tmp_path, "b",
                         r"binary target must be 0/1, found \[0\.0, 2\.0\]")


@pytest.mark.ray
@pytest.mark.usefixtures("ray_session")
def test_unparseable_string_in_one_files_numeric_column(tmp_path: Path) -> None:
    """Hive folders whose files disagree on a column's type: the first file's type wins, and a value
    that does not convert fails the partition whose file holds it; the partitions that shared its
    task are read again one at a time and train."""
    for station, part in frame().groupby("station"):
        part = part.drop(columns="station")
        if station == "b":
            part = part.astype({"x1": str})
            part.loc[part.index[0], "x1"] = "oops"
        parquet(tmp_path / "hive" / f"station={station}" / "part-0.parquet", part)
    result = train_flags(tmp_path / "hive", tmp_path)
    assert result.exit_code == 1, result.stderr
    s = one_json(result)
    assert s["partitions"] == {"total": 3, "trained": 2, "promoted": 2, "skipped": 0, "failed": 1}
    reason = ("cannot read partition data: ArrowInvalid: Failed to parse string: 'oops' as a scalar of "
              "type double")
    assert s["failures"] == [{"partition": {"station": "b"}, "reason": reason}]
    assert run_record(s["run_id"], tmp_path / "registry") == {
        k: ("failed", reason) if k == "b" else ("trained", "") for k in STATIONS}


# ----------------------------------------------------------------------------- accepted as they are


@pytest.mark.ray
@pytest.mark.usefixtures("ray_session")
def test_constant_target_trains_and_is_promoted(tmp_path: Path) -> None:
    df = frame()
    df.loc[df["station"] == "b", "y"] = 5.0
    s = trained_ok(train_flags(parquet(tmp_path / "d.parquet", df), tmp_path))
    mv = one_json(cli("models", "show", "--registry", tmp_path / "registry", "--partition", "station=b",
                      "--json"))
    assert mv["status"] == "champion" and mv["run_id"] == s["run_id"]
    assert mv["metrics"]["mae"] == pytest.approx(0.0, abs=1e-9)


@pytest.mark.ray
@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_strings_in_numeric_feature_make_it_categorical(tmp_path: Path, fmt: str) -> None:
    """One non-number in a numeric column makes the column strings (Parquet: its type; CSV: type
    inference over the file), so it is a categorical feature in every partition, not a failure."""
    df = frame()
    df["x1"] = df["x1"].round(3).astype(str)
    df.loc[df.index[df["station"] == "b"][:3], "x1"] = "oops"
    data = tmp_path / f"d.{fmt}"
    if fmt == "csv":
        df.to_csv(data, index=False)
    else:
        parquet(data, df)
    trained_ok(train_flags(data, tmp_path))
    for station in STATIONS:
        mv = one_json(cli("models", "show", "--registry", tmp_path / "registry", "--partition",
                          f"station={station}", "--json"))
        assert mv["features"] == ["x1", "x2"]
        text = Path(mv["model_uri"]).read_text()
        categories = json.loads(text.rsplit("pandas_categorical:", 1)[1])
        assert len(categories) == 2  # x1 and x2 are both categorical
        assert ("oops" in categories[0]) == (station == "b")


@pytest.mark.ray
@pytest.mark.usefixtures("ray_session")
def test_infinite_features_train_and_score(tmp_path: Path) -> None:
    df = frame()
    rows = df.index[df["station"] == "b"]
    df.loc[rows[:5], "x1"] = np.inf
    df.loc[rows[5:10], "x1"] = -np.inf
    data = parquet(tmp_path / "d.parquet", df)
    trained_ok(train_flags(data, tmp_path))
    result = cli("score", "--data", data, "--partition-by", "station", "--target", "y",
                 "--registry", tmp_path / "registry", "--output", tmp_path / "scores", "--json")
    assert result.exit_code == 0, result.stderr
    assert one_json(result)["rows"] == {"input": 120, "scored": 120, "unscored": 0}
    out = ds.dataset(str(tmp_path / "scores" / "d"), partitioning="hive").to_table().to_pandas()
    assert np.isfinite(out["prediction"]).all()


# ----------------------------------------------------------------------------- scoring


@pytest.fixture(scope="module")
def trained_job(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Job ``scored`` trained once on stations a, b, c (no prepare); its registry is in the folder."""
    root = tmp_path_factory.mktemp("trained-job")
    job = job_file(root, parquet(root / "history.parquet", frame()), name=SCORE_JOB)
    trained_ok(cli("train", "--job", job, "--json"))
    return root


def score_rows(trained: Path, tmp_path: Path, rows: pd.DataFrame, **sections: dict[str, Any]) -> Any:
    """Score ``rows`` with the trained job's registry (and ``sections`` changed) into ``tmp_path``."""
    data = parquet(tmp_path / "rows.parquet", rows)
    job = job_file(tmp_path, data, name=SCORE_JOB,
                   output={"registry": str(trained / "registry"), "scores": str(tmp_path / "scores")},
                   **sections)
    before = tree(trained / "registry")
    result = cli("score", "--job", job, "--json")
    new = tree(trained / "registry") - before
    assert all("/runs/" in str(p) for p in new), new  # scoring only adds its run record there
    return result


def unscored(result: Any, trained: Path, tmp_path: Path, expected: dict[str, str],
             stations: tuple[str, ...] = STATIONS) -> None:
    """Partitions in ``expected`` are unscored with a reason matching its value and counted; the rest
    are scored and written."""
    assert result.exit_code == 1, (result.stdout, result.stderr, result.exception)
    s = one_json(result)
    got = {u["partition"]["station"]: u for u in s["unscored"]}
    assert set(got) == set(expected)
    for station, pattern in expected.items():
        assert re.fullmatch(pattern, got[station]["reason"]), got[station]
    total = 40 * len(stations)
    n_unscored = sum(u["rows"] for u in got.values())
    assert n_unscored == 40 * len(expected)
    assert s["rows"] == {"input": total, "scored": total - n_unscored, "unscored": n_unscored}
    record = run_record(s["run_id"], trained / "registry")
    assert {k: v for k, v in record.items() if v[0] != "scored"} == {
        k: ("unscored", got[k]["reason"]) for k in expected}
    out_dir = tmp_path / "scores" / SCORE_JOB
    written = ds.dataset(str(out_dir), partitioning="hive").to_table().column("station").to_pylist() \
        if any(out_dir.rglob("*.parquet")) else []
    assert len(written) == total - n_unscored
    assert set(written) == set(stations) - set(expected)


@pytest.mark.ray
def test_feature_missing_at_score_time(trained_job: Path, tmp_path: Path) -> None:
    result = score_rows(trained_job, tmp_path, frame(seed=1).drop(columns="x1"))
    unscored(result, trained_job, tmp_path, dict.fromkeys(STATIONS, r"feature column 'x1' is missing"))


@pytest.mark.ray
def test_extra_columns_at_score_time(trained_job: Path, tmp_path: Path) -> None:
    rows = frame(seed=1).drop(columns="y").assign(extra=1.0, note="hello")
    result = score_rows(trained_job, tmp_path, rows)
    assert result.exit_code == 0, result.stderr
    assert one_json(result)["rows"] == {"input": 120, "scored": 120, "unscored": 0}


@pytest.mark.ray
def test_feature_type_changed_at_score_time(trained_job: Path, tmp_path: Path) -> None:
    result = score_rows(trained_job, tmp_path, frame(seed=1).assign(x2=1.0))
    reason = r"feature column 'x2' holds numbers here but was text \(categorical\) when the model was trained"
    unscored(result, trained_job, tmp_path, dict.fromkeys(STATIONS, reason))


@pytest.mark.ray
def test_prepare_drops_rows_at_score_time(trained_job: Path, tmp_path: Path) -> None:
    prep = prep_file(tmp_path, "return df.dropna(subset=['x1'])")
    rows = frame(seed=1)
    rows.loc[rows.index[rows["station"] == "b"][0], "x1"] = np.nan
    result = score_rows(trained_job, tmp_path, rows, pipeline={"prepare": f"{prep}:prepare"})
    unscored(result, trained_job, tmp_path,
             {"b": r"prepare returned 39 rows for 40: at scoring time it must keep every row"})


@pytest.mark.ray
def test_prepare_raises_at_score_time(trained_job: Path, tmp_path: Path) -> None:
    prep = prep_file(tmp_path, "if (df['station'] == 'c').any():\n"
                               "    raise KeyError('holiday')\n"
                               "return df")
    result = score_rows(trained_job, tmp_path, frame(seed=1), pipeline={"prepare": f"{prep}:prepare"})
    unscored(result, trained_job, tmp_path, {"c": r"prepare raised KeyError: 'holiday'"})


@pytest.mark.ray
def test_partition_without_a_model(trained_job: Path, tmp_path: Path) -> None:
    result = score_rows(trained_job, tmp_path, frame(("a", "b", "new"), seed=1))
    unscored(result, trained_job, tmp_path, {"new": r"no champion"}, ("a", "b", "new"))


@pytest.mark.ray
@pytest.mark.usefixtures("ray_session")
def test_model_file_missing_from_the_registry(tmp_path: Path) -> None:
    """Scoring reports the partition unscored; retraining replaces the lost champion."""
    data = parquet(tmp_path / "d.parquet", frame())
    trained_ok(train_flags(data, tmp_path))
    mv = one_json(cli("models", "show", "--registry", tmp_path / "registry", "--partition", "station=b",
                      "--json"))
    Path(mv["model_uri"]).unlink()
    result = cli("score", "--data", data, "--partition-by", "station", "--target", "y",
                 "--registry", tmp_path / "registry", "--output", tmp_path / "scores", "--json")
    assert result.exit_code == 1, result.stderr
    [u] = one_json(result)["unscored"]
    assert u["partition"] == {"station": "b"} and u["rows"] == 40
    assert re.fullmatch(r"FileNotFoundError: \[Errno 2\] No such file or directory: '.*\.txt'", u["reason"])
    trained_ok(train_flags(data, tmp_path, "--force"))


# ----------------------------------------------------------------------------- hostile values


HOSTILE = ["../../escape", "/etc/passwd", "[bold]x", "x[/bold]", "[/]", "héllo wörld ✓", "~", "%2e%2e"]


@pytest.mark.ray
@pytest.mark.usefixtures("ray_session")
def test_hostile_partition_values_in_human_output(tmp_path: Path) -> None:
    """Key values are printed as they are (not as Rich markup) and stored under hashed ids."""
    df = frame(tuple(HOSTILE))
    df.loc[df["station"] == "[/]", "y"] = np.nan  # one failure, so its value is printed
    data = parquet(tmp_path / "d.parquet", df)
    result = cli("train", "--data", data, "--partition-by", "station", "--target", "y",
                 "--registry", tmp_path / "registry")
    assert result.exit_code == 1, (result.stdout, result.exception)
    assert '  failed {"station": "[/]"}: only 0 usable rows (min_rows = 30)\n' in result.stdout
    listed = cli("models", "list", "--registry", tmp_path / "registry")
    assert listed.exit_code == 0, listed.exception  # a table of "x[/bold]" (Rich markup crashed on it)
    scored = cli("score", "--data", data, "--partition-by", "station", "--target", "y",
                 "--registry", tmp_path / "registry", "--output", tmp_path / "scores")
    assert scored.exit_code == 1, (scored.stdout, scored.exception)
    assert '  unscored {"station": "[/]"} (40 rows): no champion\n' in scored.stdout
    names = {p.name for p in tree(tmp_path)}
    assert not names & set(HOSTILE)


@pytest.mark.ray
def test_unparseable_file_at_score_time_unscores_only_its_partition(trained_job: Path,
                                                                    tmp_path: Path) -> None:
    """The scoring twin of row 30: only the partition whose file cannot be read is unscored; the
    others of its task are read again one at a time, scored and written."""
    for station, part in frame(seed=1).groupby("station"):
        part = part.drop(columns="station")
        if station == "b":
            part = part.astype({"x1": str})
            part.loc[part.index[0], "x1"] = "oops"
        parquet(tmp_path / "hive" / f"station={station}" / "part-0.parquet", part)
    job = job_file(tmp_path, tmp_path / "hive", name=SCORE_JOB,
                   output={"registry": str(trained_job / "registry"), "scores": str(tmp_path / "scores")})
    result = cli("score", "--job", job, "--json")
    unscored(result, trained_job, tmp_path, {"b": r"cannot read partition data: ArrowInvalid: .*'oops'.*"})
