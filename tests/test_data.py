"""Tests of data access and partition planning (manymodels.data) on real files."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from manymodels.data import (
    InputError,
    PartitionTally,
    Plan,
    Source,
    check_columns,
    check_numeric,
    fingerprint,
    keep_wanted,
    key_label,
    open_source,
    plan_partitions,
    read_partitions,
)

LONG = "L" * 300
HIVE_LONG = "H" * 240  # a Hive folder name is one path component: at most 255 bytes on most filesystems
HOSTILE = ["../x", "a/b", "Zürich 東京", "with spaces here", "plain", None]


def norm(value: Any) -> Any:
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, np.generic):
        return value.item()
    return value


def expected_counts(df: pd.DataFrame, keys: Sequence[str]) -> dict[tuple[Any, ...], int]:
    """Row count per partition, by pandas (null keys kept as their own group)."""
    sizes = df.groupby(list(keys), dropna=False, sort=False).size()
    out: dict[tuple[Any, ...], int] = {}
    for key, n in sizes.items():
        tup = key if isinstance(key, tuple) else (key,)
        out[tuple(norm(v) for v in tup)] = int(n)
    return out


def rows_of(df: pd.DataFrame, keys: Sequence[str], key: tuple[Any, ...]) -> pd.DataFrame:
    mask = np.ones(len(df), dtype=bool)
    for name, value in zip(keys, key, strict=True):
        col = df[name]
        mask &= col.isna().to_numpy() if value is None else (col == value).fillna(False).to_numpy(bool)
    return df[mask]


def plan_counts(plan: Plan) -> dict[tuple[Any, ...], int]:
    counts = {p.key: p.rows for p in plan.partitions}
    assert len(counts) == len(plan.partitions), "a partition is listed twice"
    return counts


def make_frame(values: Sequence[Any], n: int = 300, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    keys = [values[i] for i in rng.integers(0, len(values), n)]
    return pd.DataFrame({
        "k": pd.array(keys, dtype=object),
        "seq": np.arange(n, dtype=np.int64),  # row order marker
        "x": rng.normal(size=n),
        "y": rng.normal(size=n),
    })


def check_read(source: Source, plan: Plan, df: pd.DataFrame, wanted: Sequence[tuple[Any, ...]]) -> None:
    """read_partitions of ``wanted`` gives exactly their rows, each in its original order."""
    keys = plan.keys
    by_key = {p.key: p for p in plan.partitions}
    files = sorted({f for w in wanted for f in by_key[w].files})
    frame, spans, table = read_partitions(source, keys, wanted, files)
    assert set(spans) == set(wanted)
    assert table.num_rows == len(frame)
    covered = 0
    for key in wanted:
        start, stop = spans[key]
        part = frame.iloc[start:stop]
        expected = rows_of(df, keys, key)
        assert len(part) == len(expected) == by_key[key].rows
        assert part["seq"].tolist() == expected["seq"].tolist()  # same rows, same order
        np.testing.assert_array_equal(part["y"].to_numpy(), expected["y"].to_numpy())
        for name, value in zip(keys, key, strict=True):
            assert [norm(v) for v in part[name]] == [value] * len(part)
        covered += stop - start
    assert covered == sum(by_key[w].rows for w in wanted)
    assert table.num_rows == covered  # no rows of other partitions are materialised
    others = set(df["seq"]) - {s for w in wanted for s in rows_of(df, keys, w)["seq"]}
    in_spans = {s for w in wanted for s in frame["seq"].iloc[spans[w][0]:spans[w][1]]}
    assert not in_spans & others


# ----------------------------------------------------------------------------- single file


@pytest.fixture
def single(tmp_path: Path) -> tuple[str, pd.DataFrame]:
    df = make_frame([*HOSTILE, LONG])
    path = tmp_path / "one.parquet"
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), path)
    return str(path), df


def test_single_file_plan(single: tuple[str, pd.DataFrame]) -> None:
    url, df = single
    source = open_source(url)
    assert source.format == "parquet" and len(source.files) == 1 and source.hive_fields == ()
    plan = plan_partitions(source, ["k"])
    assert plan_counts(plan) == expected_counts(df, ["k"])
    assert plan.total_rows == len(df)
    assert (None,) in plan_counts(plan) and (LONG,) in plan_counts(plan)
    assert all(p.files == (0,) for p in plan.partitions)
    # data order: first appearance
    first_seen = list(dict.fromkeys(norm(v) for v in df["k"]))
    assert [p.key[0] for p in plan.partitions] == first_seen


def test_single_file_read_subset(single: tuple[str, pd.DataFrame]) -> None:
    url, df = single
    source = open_source(url)
    plan = plan_partitions(source, ["k"])
    check_read(source, plan, df, [(None,), ("../x",), (LONG,)])
    check_read(source, plan, df, [("Zürich 東京",)])
    check_read(source, plan, df, [p.key for p in plan.partitions])


def test_keep_predicate(single: tuple[str, pd.DataFrame]) -> None:
    url, df = single
    source = open_source(url)
    plan = plan_partitions(source, ["k"], keep=lambda d: d["k"] in ("a/b", None))
    kept = {("a/b",), (None,)}
    assert plan_counts(plan) == {k: v for k, v in expected_counts(df, ["k"]).items() if k in kept}
    assert plan_partitions(source, ["k"], keep=lambda d: False).partitions == ()


def test_partition_as_dict_and_label(single: tuple[str, pd.DataFrame]) -> None:
    plan = plan_partitions(open_source(single[0]), ["k"])
    p = next(p for p in plan.partitions if p.key == ("a/b",))
    assert p.as_dict(["k"]) == {"k": "a/b"}
    assert key_label(["k"], p.key) == "k=a/b"


# ----------------------------------------------------------------------------- directory of files


@pytest.fixture
def sorted_dir(tmp_path: Path) -> tuple[str, pd.DataFrame]:
    values = [f"s{i:02d}" for i in range(12)]
    df = make_frame(values, n=600).sort_values("k", kind="stable").reset_index(drop=True)
    df["seq"] = np.arange(len(df))
    folder = tmp_path / "sorted"
    folder.mkdir()
    for i, chunk in enumerate(np.array_split(np.array(values), 4)):
        part = df[df["k"].isin(chunk)]
        pq.write_table(pa.Table.from_pandas(part, preserve_index=False), folder / f"part-{i}.parquet")
    (folder / "_SUCCESS").write_bytes(b"")
    (folder / ".hidden.parquet").write_bytes(b"not parquet")
    return str(folder), df


def test_sorted_directory(sorted_dir: tuple[str, pd.DataFrame]) -> None:
    url, df = sorted_dir
    source = open_source(url)
    assert len(source.files) == 4  # _SUCCESS and hidden files are not data
    plan = plan_partitions(source, ["k"])
    assert plan_counts(plan) == expected_counts(df, ["k"])
    for p in plan.partitions:
        assert len(p.files) == 1
        holder = source.files[p.files[0]]
        table = pq.read_table(holder)
        assert p.key[0] in table.column("k").to_pylist()
    # a partition's file is the only one read
    check_read(source, plan, df, [("s00",), ("s07",), ("s11",)])


def test_unsorted_directory_partition_in_several_files(tmp_path: Path) -> None:
    df = make_frame(["a", "b", None, "c"], n=400)
    folder = tmp_path / "unsorted"
    folder.mkdir()
    for i in range(4):  # contiguous row blocks: file order is row order
        part = df.iloc[i * 100:(i + 1) * 100]
        pq.write_table(pa.Table.from_pandas(part, preserve_index=False), folder / f"part-{i}.parquet")
    pq.write_table(pa.Table.from_pandas(df[df["k"] == "c"].iloc[:0], preserve_index=False),
                   folder / "part-9-empty.parquet")
    source = open_source(str(folder))
    plan = plan_partitions(source, ["k"])
    assert plan_counts(plan) == expected_counts(df, ["k"])
    for p in plan.partitions:
        holders = {i for i in range(4) if len(rows_of(df.iloc[i * 100:(i + 1) * 100], ["k"], p.key))}
        assert {source.files[f] for f in p.files} == {str(folder / f"part-{i}.parquet") for i in holders}
    check_read(source, plan, df, [("a",), (None,)])


# ----------------------------------------------------------------------------- Hive folders


@pytest.fixture
def hive(tmp_path: Path) -> tuple[str, pd.DataFrame]:
    df = make_frame([*HOSTILE, HIVE_LONG], n=400)
    folder = tmp_path / "hive"
    table = pa.Table.from_pandas(df, preserve_index=False)
    ds.write_dataset(table, folder, format="parquet",
                     partitioning=ds.partitioning(pa.schema([("k", pa.string())]), flavor="hive"))
    return str(folder), df


def test_hive_layout_is_what_we_think(hive: tuple[str, pd.DataFrame]) -> None:
    folder = Path(hive[0])
    names = {p.name for p in folder.iterdir()}
    assert "k=__HIVE_DEFAULT_PARTITION__" in names
    assert "k=..%2Fx" in names and "k=a%2Fb" in names


def test_hive_plan(hive: tuple[str, pd.DataFrame]) -> None:
    url, df = hive
    source = open_source(url)
    assert source.hive_fields == (("k", "string"),)
    assert "k" in source.schema.names
    plan = plan_partitions(source, ["k"])
    assert plan_counts(plan) == expected_counts(df, ["k"])
    assert (None,) in plan_counts(plan)  # __HIVE_DEFAULT_PARTITION__ is the null key
    assert ("__HIVE_DEFAULT_PARTITION__",) not in plan_counts(plan)
    for p in plan.partitions:
        assert len(p.files) == 1
    check_columns(source, {"partition_by": ["k"], "target": ["y"]})


def test_hive_read_subset(hive: tuple[str, pd.DataFrame]) -> None:
    url, df = hive
    source = open_source(url)
    plan = plan_partitions(source, ["k"])
    check_read(source, plan, df, [(None,), ("../x",), ("a/b",)])
    check_read(source, plan, df, [("Zürich 東京",), ("with spaces here",), (HIVE_LONG,)])


def test_hive_integer_keys(tmp_path: Path) -> None:
    df = pd.DataFrame({"zone": np.repeat([3, 1, 2], [5, 7, 9]), "seq": np.arange(21), "y": np.arange(21.0)})
    folder = tmp_path / "ints"
    ds.write_dataset(pa.Table.from_pandas(df, preserve_index=False), folder, format="parquet",
                     partitioning=ds.partitioning(pa.schema([("zone", pa.int64())]), flavor="hive"))
    source = open_source(str(folder), key_types={"zone": "int64"})  # text unless the spec says so
    assert source.hive_fields == (("zone", "int64"),)
    plan = plan_partitions(source, ["zone"])
    assert plan_counts(plan) == {(3,): 5, (1,): 7, (2,): 9}
    assert all(type(p.key[0]) is int for p in plan.partitions)
    check_read(source, plan, df, [(1,), (3,)])


# ----------------------------------------------------------------------------- CSV


def test_csv(tmp_path: Path) -> None:
    df = make_frame(["north", "south", "Zürich 東京", "with spaces"], n=200)
    path = tmp_path / "rows.csv"
    df.to_csv(path, index=False)
    source = open_source(str(path))
    assert source.format == "csv"
    plan = plan_partitions(source, ["k"])
    assert plan_counts(plan) == expected_counts(df, ["k"])
    check_read(source, plan, df, [("south",), ("Zürich 東京",)])
    check_numeric(source, "y", "target")


def test_csv_directory_and_empty_key(tmp_path: Path) -> None:
    folder = tmp_path / "csvs"
    folder.mkdir()
    (folder / "a.csv").write_text("k,seq,y\nx,0,1.5\n,1,2.5\n")
    (folder / "b.csv").write_text("k,seq,y\nx,2,3.5\nz,3,4.5\n")
    source = open_source(str(folder))
    assert source.format == "csv" and len(source.files) == 2
    plan = plan_partitions(source, ["k"])
    assert plan_counts(plan) == {("x",): 2, (None,): 1, ("z",): 1}
    assert next(p for p in plan.partitions if p.key == ("x",)).files == (0, 1)


def test_csv_keys_stay_text(tmp_path: Path) -> None:
    # CSV has no types: "007" and "7" inferred as integers would be one partition 7.
    path = tmp_path / "ids.csv"
    path.write_text("store,x,y\n007,1,1.0\n7,2,2.0\n00042,3,3.0\n7,4,4.0\n")
    source = open_source(str(path), text_columns=["store"])
    assert source.schema.field("store").type == pa.string()
    plan = plan_partitions(source, ["store"])
    assert plan_counts(plan) == {("007",): 1, ("7",): 2, ("00042",): 1}
    frame, spans, _ = read_partitions(source, ["store"], [("007",), ("7",)], [0])
    assert sorted(spans) == [("007",), ("7",)] and frame["store"].tolist().count("7") == 2
    typed = open_source(str(path), key_types={"store": "int64"}, text_columns=["store"])
    assert plan_counts(plan_partitions(typed, ["store"])) == {(7,): 3, (42,): 1}


def test_csv_ragged_rows(tmp_path: Path) -> None:
    path = tmp_path / "ragged.csv"
    path.write_text("k,y\na,1\nb,2,3\na,4\n")
    with pytest.raises(InputError, match=r"ragged\.csv"):
        plan_partitions(open_source(str(path)), ["k"])


def test_csv_ragged_row_after_first_block(tmp_path: Path) -> None:
    path = tmp_path / "late-ragged.csv"
    lines = ["k,y", *(f"s{i % 7},{i}" for i in range(120_000)), "a,1,2"]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=r"late-ragged\.csv"):
        plan_partitions(open_source(str(path)), ["k"])


# ----------------------------------------------------------------------------- multi-column keys


@pytest.fixture
def multi(tmp_path: Path) -> tuple[str, pd.DataFrame]:
    rng = np.random.default_rng(7)
    n = 500
    a = pd.array([[None, "x", "y", "../z"][i] for i in rng.integers(0, 4, n)], dtype=object)
    b = pd.array([[None, 1, 2][i] for i in rng.integers(0, 3, n)], dtype="Int64")
    df = pd.DataFrame({"a": a, "b": b, "seq": np.arange(n), "y": rng.normal(size=n)})
    path = tmp_path / "multi.parquet"
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), path)
    return str(path), df


def test_multi_column_keys_with_nulls(multi: tuple[str, pd.DataFrame]) -> None:
    url, df = multi
    source = open_source(url)
    plan = plan_partitions(source, ["a", "b"])
    counts = plan_counts(plan)
    assert counts == expected_counts(df, ["a", "b"])
    assert len(counts) == 12
    for key in [(None, 1), ("x", None), (None, None)]:
        assert key in counts
    check_read(source, plan, df, [(None, 1), ("x", None), (None, None), ("../z", 2)])
    check_read(source, plan, df, [("x", 1)])  # ("x", None) and (None, 1) rows are left out


def test_multi_column_keep(multi: tuple[str, pd.DataFrame]) -> None:
    source = open_source(multi[0])
    plan = plan_partitions(source, ["a", "b"], keep=lambda d: d["b"] is None)
    assert {p.key[1] for p in plan.partitions} == {None}
    assert len(plan.partitions) == 4


def test_nan_float_key_is_the_null_partition(tmp_path: Path) -> None:
    # Writers other than pandas keep NaN in float columns; pandas groups NaN with nulls.
    k = pa.array([1.5, float("nan"), None, 1.5, float("nan"), None, 2.5], pa.float64())
    table = pa.table({"k": k, "g": ["p", "q", "p", "q", "p", "q", "p"], "seq": list(range(7)),
                      "y": [float(i) for i in range(7)]})
    path = tmp_path / "nan.parquet"
    pq.write_table(table, path)
    df = table.to_pandas()
    source = open_source(str(path))
    plan = plan_partitions(source, ["k"])
    assert plan_counts(plan) == expected_counts(df, ["k"]) == {(1.5,): 2, (None,): 4, (2.5,): 1}
    check_read(source, plan, df, [(None,)])
    plan2 = plan_partitions(source, ["k", "g"])
    assert plan_counts(plan2) == expected_counts(df, ["k", "g"])
    check_read(source, plan2, df, [(None, "p"), (None, "q")])


# ----------------------------------------------------------------------------- errors


def test_missing_source(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        open_source(str(tmp_path / "nope"))


def test_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no data files"):
        open_source(str(tmp_path / "empty"))


def test_garbage_parquet(tmp_path: Path) -> None:
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"this is not parquet at all" * 10)
    with pytest.raises(InputError, match=r"bad\.parquet"):
        plan_partitions(open_source(str(path)), ["k"])


def test_garbage_file_among_good_ones(tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    pq.write_table(pa.table({"k": ["a"], "y": [1.0]}), folder / "a.parquet")
    (folder / "b.parquet").write_bytes(b"\x00\x01garbage")
    with pytest.raises(InputError):
        plan_partitions(open_source(str(folder)), ["k"])


def test_zero_row_parquet(tmp_path: Path) -> None:
    path = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"k": pa.array([], pa.string()), "y": pa.array([], pa.float64())}), path)
    source = open_source(str(path))
    with pytest.raises(InputError, match="no rows"):
        plan_partitions(source, ["k"])


def test_missing_columns_named(single: tuple[str, pd.DataFrame]) -> None:
    source = open_source(single[0])
    check_columns(source, {"partition_by": ["k"], "target": ["y"], "time_column": [""]})
    with pytest.raises(InputError, match="'station'") as info:
        check_columns(source, {"partition_by": ["station"], "target": ["y"]})
    assert "partition_by" in str(info.value)
    with pytest.raises(InputError, match="'delay_min'") as info:
        check_columns(source, {"partition_by": ["k"], "target": ["delay_min"]})
    assert "target" in str(info.value)


def test_string_target_rejected(tmp_path: Path) -> None:
    path = tmp_path / "s.parquet"
    pq.write_table(pa.table({"k": ["a", "b"], "y": ["1.0", "2.0"], "n": [1, 2], "f": [0.5, 1.5],
                             "b": [True, False]}), path)
    source = open_source(str(path))
    with pytest.raises(InputError, match="'y'"):
        check_numeric(source, "y", "target")
    for col in ("n", "f", "b"):
        check_numeric(source, col, "target")


# ----------------------------------------------------------------------------- fingerprint


def test_fingerprint(single: tuple[str, pd.DataFrame]) -> None:
    url, _ = single
    source = open_source(url)
    plan = plan_partitions(source, ["k"])
    key = ("plain",)
    frame, spans, _ = read_partitions(source, ["k"], [key], [0])
    part = frame.iloc[spans[key][0]:spans[key][1]]
    again, spans2, _ = read_partitions(source, ["k"], [key, (None,)], [0])
    part2 = again.iloc[spans2[key][0]:spans2[key][1]]
    fp = fingerprint(part)
    assert fp == fingerprint(part2) == fingerprint(part.reset_index(drop=True)) == fingerprint(part.copy())
    assert len(plan.partitions) > 1

    changed = part.reset_index(drop=True).copy()
    changed.loc[3, "y"] = changed.loc[3, "y"] + 1e-9
    assert fingerprint(changed) != fp
    assert fingerprint(part.iloc[::-1]) != fp
    assert fingerprint(part.rename(columns={"y": "target"})) != fp
    assert fingerprint(part.iloc[:-1]) != fp
    swapped = part.reset_index(drop=True).copy()
    swapped.loc[0, "k"] = "plain2"
    assert fingerprint(swapped) != fp


def test_fingerprint_same_rows_different_files(tmp_path: Path) -> None:
    df = pd.DataFrame({"k": ["a", "a", "b"], "x": [1.0, 2.0, 3.0], "y": [0.1, 0.2, 0.3]})
    for name in ("one", "two"):
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), tmp_path / f"{name}.parquet")
    prints = []
    for name in ("one", "two"):
        source = open_source(str(tmp_path / f"{name}.parquet"))
        frame, spans, _ = read_partitions(source, ["k"], [("a",)], [0])
        prints.append(fingerprint(frame.iloc[spans[("a",)][0]:spans[("a",)][1]]))
    assert prints[0] == prints[1]


# ----------------------------------------------------------------------------- Hive keys keep their text


def hive_folders(root: Path, values: Sequence[str], rows: int = 3) -> Path:
    for n, value in enumerate(values):
        folder = root / f"store={value}"
        folder.mkdir(parents=True)
        pq.write_table(pa.table({"seq": np.arange(rows) + 10 * n, "y": np.full(rows, float(n))}),
                       folder / "part-0.parquet")
    return root


def test_hive_values_stay_text(tmp_path: Path) -> None:
    """``store=007`` and ``store=7`` are two partitions, ``00042`` keeps its zeros."""
    source = open_source(str(hive_folders(tmp_path / "h", ["007", "7", "00042"])))
    assert source.hive_fields == (("store", "string"),)
    plan = plan_partitions(source, ["store"])
    assert plan_counts(plan) == {("007",): 3, ("7",): 3, ("00042",): 3}
    frame, spans, _ = read_partitions(source, ["store"], [("007",)], range(len(source.files)))
    assert frame["store"].iloc[spans[("007",)][0]:spans[("007",)][1]].tolist() == ["007"] * 3
    assert frame["seq"].tolist() == [0, 1, 2]


def test_hive_field_of_a_later_file_is_text_too(tmp_path: Path) -> None:
    """Fields are found in every file's folders, not only in the first file's."""
    root = tmp_path / "h"
    pq.write_table(pa.table({"store": ["1"], "y": [1.0]}), tmp_path / "flat.parquet")
    hive_folders(root / "region=010", ["01"])
    (root / "aaa.parquet").write_bytes((tmp_path / "flat.parquet").read_bytes())
    source = open_source(str(root))
    assert dict(source.hive_fields).get("region") == "string"


def test_key_types_parse_hive_values(tmp_path: Path) -> None:
    root = hive_folders(tmp_path / "h", ["007", "7", "00042"])
    source = open_source(str(root), key_types={"store": "int64"})
    assert source.hive_fields == (("store", "int64"),)
    assert plan_counts(plan_partitions(source, ["store"])) == {(7,): 6, (42,): 3}  # asked for: merged


def test_key_types_unknown_column(tmp_path: Path) -> None:
    root = hive_folders(tmp_path / "h", ["1"])
    with pytest.raises(InputError, match=r"data\.key_types names column 'shop'.*Hive folder fields: store"):
        open_source(str(root), key_types={"shop": "int64"})


def test_key_types_value_that_does_not_parse(tmp_path: Path) -> None:
    root = hive_folders(tmp_path / "h", ["1", "abc"])
    with pytest.raises(InputError, match="abc"):
        plan_partitions(open_source(str(root), key_types={"store": "int64"}), ["store"])


def test_key_types_leave_file_columns_alone(single: tuple[str, pd.DataFrame]) -> None:
    source = open_source(single[0], key_types={"seq": "string"})
    assert source.schema.field("seq").type == pa.int64()


# ----------------------------------------------------------------------------- exact chunk reads


@pytest.fixture
def store_sku(tmp_path: Path) -> tuple[str, pd.DataFrame]:
    """40 stores × 25 skus, 4 rows each, shuffled, in small row groups (several batches)."""
    stores, skus = np.meshgrid(np.arange(40), [f"sku-{i:02d}" for i in range(25)], indexing="ij")
    pairs = pd.DataFrame({"store": stores.ravel(), "sku": skus.ravel()})
    df = pairs.loc[pairs.index.repeat(4)].sample(frac=1.0, random_state=3).reset_index(drop=True)
    df["store"] = df["store"].astype(object)
    df.loc[df["store"] == 39, "store"] = None  # a null key value takes part in the tuples too
    df["store"] = df["store"].astype("Int64")
    df["seq"] = np.arange(len(df))
    df["y"] = np.random.default_rng(0).normal(size=len(df))
    path = tmp_path / "unsorted.parquet"
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), path, row_group_size=300)
    return str(path), df


def test_multi_column_chunk_reads_only_its_tuples(store_sku: tuple[str, pd.DataFrame]) -> None:
    """A chunk whose (store, sku) tuples span 20 stores and 20 skus reads its 20 partitions' rows,
    not the 400-pair cross product the per-column pushdown filter lets through."""
    url, df = store_sku
    source = open_source(url)
    plan = plan_partitions(source, ["store", "sku"])
    assert len(plan.partitions) == 1000
    wanted = [(s, f"sku-{(s * 7) % 25:02d}") for s in range(19)] + [(None, "sku-03")]
    frame, spans, table = read_partitions(source, plan.keys, wanted, [0])
    assert table.num_rows == len(frame) == 20 * 4  # the rows its partitions hold, nothing more
    assert set(spans) == set(wanted)
    check_read(source, plan, df, wanted)


def test_keep_wanted_holds_kept_rows_plus_one_batch(store_sku: tuple[str, pd.DataFrame]) -> None:
    url, _ = store_sku
    source = open_source(url)
    wanted = [(s, f"sku-{(s * 7) % 25:02d}") for s in range(19)]
    dataset = source.dataset()
    batches = list(dataset.to_batches(columns=["store", "sku", "seq"]))
    assert len(batches) > 10
    table, stats = keep_wanted(batches, ["store", "sku"], wanted, dataset.schema)
    assert table.num_rows == stats.kept_rows == 19 * 4
    assert stats.scanned_rows == 4000
    biggest = max(b.num_rows for b in batches)
    assert stats.peak_held_rows <= stats.kept_rows + biggest
    got = set(zip(table.column("store").to_pylist(), table.column("sku").to_pylist(), strict=True))
    assert got == set(wanted)


def test_keep_wanted_three_columns_and_no_match(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    t = pa.table({"a": rng.integers(0, 5, 2000), "b": rng.integers(0, 5, 2000).astype(float),
                  "c": [["x", "y", None][i] for i in rng.integers(0, 3, 2000)]})
    wanted = [(1, 2.0, "x"), (2, 1.0, None), (4, 4.0, "y"), (9, 9.0, "z")]
    table, stats = keep_wanted(t.to_batches(max_chunksize=128), ["a", "b", "c"], wanted, t.schema)
    rows = set(zip(*(table.column(k).to_pylist() for k in "abc"), strict=True))
    assert rows == set(wanted[:3])
    expected = sum(1 for r in zip(*(t.column(k).to_pylist() for k in "abc"), strict=True) if r in wanted)
    assert table.num_rows == stats.kept_rows == expected
    none, _ = keep_wanted(t.to_batches(max_chunksize=128), ["a", "b", "c"], [(9, 9.0, "z")], t.schema)
    assert none.num_rows == 0 and none.schema == t.schema


# ----------------------------------------------------------------------------- planning memory


def test_tally_keeps_distinct_files_only() -> None:
    """1,000 batches of the same 50 keys in the same 2 files: 100 file entries, not 100,000."""
    tally = PartitionTally()
    for n in range(1000):
        tally.add(["k"], pa.table({"k": list(range(50)), "count_all": [2] * 50,
                                   "__fragment_index": pa.array([n % 2] * 50, pa.int32())}))
    assert tally.file_entries() == 100
    parts = tally.partitions()
    assert [p.key for p in parts] == [(k,) for k in range(50)]
    assert all(p.files == (0, 1) and p.rows == 2000 for p in parts)


def test_planning_memory_does_not_grow_with_batches(tmp_path: Path) -> None:
    """Unsorted data, 2 files of 1,000 small row groups each (2,000 batches) × 50 partitions: each
    partition lists its 2 files once, and planning's Python memory stays small (a file entry per
    partition and batch took about 0.7 MB here)."""
    import tracemalloc

    rng = np.random.default_rng(0)
    folder = tmp_path / "many"
    folder.mkdir()
    for f in range(2):
        n = 100_000
        pq.write_table(pa.table({"k": rng.integers(0, 50, n), "x": rng.normal(size=n)}),
                       folder / f"part-{f}.parquet", row_group_size=100)
    source = open_source(str(folder))
    tracemalloc.start()
    try:
        plan = plan_partitions(source, ["k"])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(plan.partitions) == 50 and plan.total_rows == 200_000
    assert all(p.files == (0, 1) for p in plan.partitions)
    assert peak < 350_000, peak
