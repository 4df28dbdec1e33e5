"""Tests of the model registry (manymodels.registry) on a local folder, with real LightGBM models."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import threading
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import fsspec
import lightgbm as lgb
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from manymodels.registry import (
    ModelVersion,
    NewVersion,
    Registry,
    RegistryError,
    decode_partition,
    encode_partition,
    partition_id,
)

JOB = "transit"
KEYS = ["station"]
SAFE = re.compile(r"^[a-z0-9_.-]+$")


# ----------------------------------------------------------------------------- partition ids

HOSTILE: list[Any] = [
    "../x", "/", "..", ".", "", "...", "./.", "a/../../b", "Zürich 東京", "x" * 300, "ü" * 300, None,
    0, 1, -1, 2**70, 1.5, -0.25, float("inf"), float("-inf"), float("nan"), True, False, " ",
    "\x00", "a\nb", "CON", "-", "_", ".hidden", "UPPER", "名前", "emoji 🚆", "\\", "%2F",
]


def check_safe(pid: str, base: Path) -> None:
    assert SAFE.match(pid), pid
    assert pid not in (".", "..")
    assert ".." not in pid.split("/")
    assert 1 <= len(pid) <= 62, (pid, len(pid))
    joined = os.path.normpath(os.path.join(base, pid))
    assert os.path.dirname(joined) == str(base)


@pytest.mark.parametrize("value", HOSTILE, ids=lambda v: repr(v)[:30])
def test_partition_id_path_safe(value: Any, tmp_path: Path) -> None:
    pid = partition_id(["k"], [value])
    check_safe(pid, tmp_path)
    assert partition_id(["k"], [value]) == pid  # deterministic


def test_partition_id_multi_column_safe(tmp_path: Path) -> None:
    for a in HOSTILE[:12]:
        for b in ("..", None, "x" * 300, 7):
            check_safe(partition_id(["a", "b"], [a, b]), tmp_path)


def test_partition_id_distinct() -> None:
    values = [v for v in HOSTILE if not (isinstance(v, float) and v != v)]
    values += ["1", "0", "True", "None", "null", "1.5", "x" * 299, "x" * 301, "X", "../X"]
    ids = [partition_id(["k"], [v]) for v in values]
    assert len(set(ids)) == len(values)


def test_partition_id_type_identity() -> None:
    one = partition_id(["k"], [1])
    assert partition_id(["k"], ["1"]) != one
    assert partition_id(["k"], [True]) != one
    assert partition_id(["k"], [None]) != partition_id(["k"], ["None"])
    assert partition_id(["k"], [None]) != partition_id(["k"], ["null"])
    assert partition_id(["k"], [None]) != partition_id(["k"], [""])
    # the same integer, whatever its width (Hive folders read as int32, file columns as int64)
    assert partition_id(["k"], [np.int32(1)]) == one
    assert partition_id(["k"], [np.int64(1)]) == one
    assert partition_id(["k"], [pa.scalar(1, pa.int32()).as_py()]) == one
    assert partition_id(["k"], [np.bool_(True)]) == partition_id(["k"], [True])
    assert partition_id(["k"], [np.bool_(True)]) != partition_id(["k"], ["True"])
    assert partition_id(["k"], [np.float64(1.5)]) == partition_id(["k"], [1.5])


def test_partition_id_names_and_positions_matter() -> None:
    assert partition_id(["a"], [1]) != partition_id(["b"], [1])
    assert partition_id(["a", "b"], ["x", "y"]) != partition_id(["a", "b"], ["y", "x"])
    assert partition_id(["a", "b"], ["x", "y_z"]) != partition_id(["a", "b"], ["x_y", "z"])
    assert partition_id(["a", "b"], ["x", None]) != partition_id(["a", "b"], [None, "x"])


def test_partition_id_is_stable_across_releases() -> None:
    # Registries store these ids: a change of scheme would orphan every existing model. (Changed once,
    # on purpose, when the hashed text became JSON; an older index is carried over with new ids.)
    assert partition_id(["station"], ["stn-00001"]) == "stn-00001-4c63b314927269b1619d"
    assert partition_id(["k"], [None]) == "null-44644f69b163ff05eb1f"


def test_partition_id_separators_in_values_cannot_collide() -> None:
    # Joined with raw \x1f/\x1e, a value holding those characters forged another key's id (the
    # 40-character slug made the readable part equal too).
    long = "A" * 40
    one = partition_id(["k"], [long + "\x1fb\x1es:z"])
    two = partition_id(["k", "b"], [long, "z"])
    assert one != two
    assert partition_id(["k\x1es:x"], ["y"]) != partition_id(["k"], ["x\x1es:y"])


@pytest.mark.parametrize("key", [
    ["stn-1"], [None], ["Zürich 東京"], ["../x"], [""], [3], [1.5], [True], ["x" * 300],
])
def test_encode_decode_round_trip(key: list[Any]) -> None:
    text = encode_partition(["k"], key)
    assert decode_partition(text) == {"k": key[0]}
    assert json.loads(text) == {"k": key[0]}


def test_encode_multi_and_numpy() -> None:
    text = encode_partition(["b", "a"], [np.int64(3), "ü"])
    assert text == '{"b":3,"a":"ü"}'  # partition_by order, not sorted; unicode kept
    assert decode_partition(text) == {"b": 3, "a": "ü"}
    assert encode_partition(["d"], [dt.date(2024, 1, 2)]) == '{"d":"2024-01-02"}'


# ----------------------------------------------------------------------------- registry helpers


@pytest.fixture(scope="module")
def model() -> tuple[str, np.ndarray, np.ndarray]:
    """A tiny real LightGBM model: its text, some inputs and its predictions."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 3))
    y = 2 * x[:, 0] - x[:, 1] + rng.normal(scale=0.1, size=200)
    params = {"objective": "regression", "num_leaves": 4, "min_data_in_leaf": 5, "verbosity": -1,
              "seed": 1, "num_threads": 1}
    booster = lgb.train(params, lgb.Dataset(x, y), num_boost_round=5)
    return booster.model_to_string(), x[:20], booster.predict(x[:20])


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    return Registry(str(tmp_path / "registry"))


_counter = iter(range(10**9))


def new_version(reg: Registry, partition: Mapping[str, Any], text: str, *, promote: bool = True,
                run_id: str | None = None, metric_value: float = 1.0, job: str = JOB,
                write: bool = True) -> NewVersion:
    run_id = run_id or f"train-{next(_counter):06d}"
    names, values = list(partition), list(partition.values())
    pid = partition_id(names, values)
    key = Registry.model_key(job, pid, run_id)
    if write:
        reg.store.write_bytes(key, text.encode())
    return NewVersion(
        pid=pid, partition=encode_partition(names, values), run_id=run_id,
        trained_at=dt.datetime.now(dt.UTC), rows=100, metric="mae", metric_value=metric_value,
        metrics={"mae": metric_value, "rmse": metric_value * 1.5}, fingerprint=f"fp-{run_id}",
        spec_hash="0123456789abcdef", model_key=key, features=["f0", "f1", "f2"],
        time_min=None, time_max=None, promote=promote, reason="" if promote else "worse than champion")


def statuses(reg: Registry, partition: Mapping[str, Any], job: str = JOB) -> dict[int, str]:
    return {m.version: m.status for m in reg.list(job, partition=partition, all_versions=True)}


def check_index(reg: Registry, job: str = JOB) -> None:
    """Every partition: versions 1..n without gaps or duplicates, at most one champion."""
    by_pid: dict[str, list[ModelVersion]] = defaultdict(list)
    for m in reg.list(job, all_versions=True):
        by_pid[m.pid].append(m)
    for pid, versions in by_pid.items():
        numbers = sorted(m.version for m in versions)
        assert numbers == list(range(1, len(numbers) + 1)), (pid, numbers)
        assert sum(m.status == "champion" for m in versions) <= 1, pid
        assert {m.status for m in versions} <= {"champion", "archived", "rejected"}
    champions = reg.list(job)
    assert len({m.pid for m in champions}) == len(champions)


# ----------------------------------------------------------------------------- commits and statuses


def test_empty_registry(reg: Registry) -> None:
    assert reg.list(JOB) == []
    assert reg.list(JOB, all_versions=True) == []
    assert reg.jobs() == []
    assert reg.commit(JOB, []) == {}
    with pytest.raises(RegistryError):
        reg.get(JOB, {"station": "a"})


def test_versions_from_one_per_partition(reg: Registry, model: tuple[str, Any, Any]) -> None:
    text = model[0]
    a, b = {"station": "a"}, {"station": "b"}
    first = reg.commit(JOB, [new_version(reg, a, text), new_version(reg, b, text)])
    assert first == {partition_id(KEYS, ["a"]): 1, partition_id(KEYS, ["b"]): 1}
    second = reg.commit(JOB, [new_version(reg, a, text)])
    assert second == {partition_id(KEYS, ["a"]): 2}
    assert statuses(reg, a) == {1: "archived", 2: "champion"}
    assert statuses(reg, b) == {1: "champion"}
    assert reg.get(JOB, a).previous_version == 1
    assert reg.get(JOB, a, 1).previous_version is None
    assert reg.jobs() == [JOB]
    check_index(reg)


def test_rejected_version_keeps_champion(reg: Registry, model: tuple[str, Any, Any]) -> None:
    a = {"station": "a"}
    reg.commit(JOB, [new_version(reg, a, model[0])])
    assert reg.commit(JOB, [new_version(reg, a, model[0], promote=False)]) == {partition_id(KEYS, ["a"]): 2}
    assert statuses(reg, a) == {1: "champion", 2: "rejected"}
    assert reg.get(JOB, a).version == 1
    rejected = reg.get(JOB, a, 2)
    assert rejected.reason == "worse than champion" and rejected.previous_version == 1
    reg.commit(JOB, [new_version(reg, a, model[0])])
    assert statuses(reg, a) == {1: "archived", 2: "rejected", 3: "champion"}
    check_index(reg)


def test_first_version_rejected_means_no_champion(reg: Registry, model: tuple[str, Any, Any]) -> None:
    a = {"station": "a"}
    reg.commit(JOB, [new_version(reg, a, model[0], promote=False)])
    assert reg.list(JOB) == []
    assert [m.status for m in reg.list(JOB, all_versions=True)] == ["rejected"]
    with pytest.raises(RegistryError, match="no champion"):
        reg.get(JOB, a)
    with pytest.raises(RegistryError):
        reg.load_model(JOB, a)


def test_same_partition_twice_in_one_commit(reg: Registry, model: tuple[str, Any, Any]) -> None:
    a = {"station": "a"}
    reg.commit(JOB, [new_version(reg, a, model[0]), new_version(reg, a, model[0])])
    assert statuses(reg, a) == {1: "archived", 2: "champion"}
    check_index(reg)


def test_list_and_get(reg: Registry, model: tuple[str, Any, Any]) -> None:
    text = model[0]
    parts = [{"station": s} for s in ("c", "a", "Zürich 東京", "../x")]
    reg.commit(JOB, [new_version(reg, p, text) for p in parts])
    reg.commit(JOB, [new_version(reg, parts[1], text, promote=False, metric_value=9.0)])
    reg.commit(JOB, [new_version(reg, parts[2], text, metric_value=0.5)])

    champions = reg.list(JOB)
    assert len(champions) == 4 and all(m.status == "champion" for m in champions)
    assert {m.partition["station"] for m in champions} == {"c", "a", "Zürich 東京", "../x"}
    assert len(reg.list(JOB, all_versions=True)) == 6

    got = reg.get(JOB, {"station": "Zürich 東京"})
    assert got.version == 2 and got.metric_value == 0.5 and got.metrics == {"mae": 0.5, "rmse": 0.75}
    assert got.partition == {"station": "Zürich 東京"} and got.job == JOB
    assert got.features == ["f0", "f1", "f2"] and got.rows == 100
    assert got.spec_hash == "0123456789abcdef" and got.time_min is None
    assert dt.datetime.fromisoformat(got.trained_at).tzinfo is not None
    assert reg.get(JOB, {"station": "a"}, 2).status == "rejected"
    assert reg.list(JOB, partition={"station": "../x"})[0].version == 1

    with pytest.raises(RegistryError, match="no partition"):
        reg.get(JOB, {"station": "nope"})
    with pytest.raises(RegistryError, match="no version 7"):
        reg.get(JOB, {"station": "a"}, 7)
    with pytest.raises(RegistryError):
        reg.get("other-job", {"station": "a"})

    entry = got.to_dict()
    for key in ("partition", "version", "status", "metrics", "run_id", "trained_at", "rows", "model_uri"):
        assert key in entry
    json.dumps(entry)


def test_multi_column_partitions(reg: Registry, model: tuple[str, Any, Any]) -> None:
    text = model[0]
    reg.commit(JOB, [new_version(reg, {"line": "L1", "station": s}, text) for s in ("a", "b")]
               + [new_version(reg, {"line": None, "station": 12}, text)])
    assert reg.get(JOB, {"line": "L1", "station": "b"}).partition == {"line": "L1", "station": "b"}
    assert reg.get(JOB, {"line": None, "station": 12}).version == 1
    assert reg.get(JOB, {"station": "12"}).partition == {"line": None, "station": 12}  # text match
    with pytest.raises(RegistryError, match="matches 2 partitions"):
        reg.get(JOB, {"line": "L1"})
    assert len(reg.list(JOB, partition={"line": "L1"})) == 2


def test_load_model_predicts_like_original(reg: Registry, model: tuple[str, Any, Any]) -> None:
    text, x, expected = model
    a = {"station": "a"}
    reg.commit(JOB, [new_version(reg, a, text)])
    booster = reg.load_model(JOB, a)
    assert isinstance(booster, lgb.Booster)
    np.testing.assert_array_equal(booster.predict(x), expected)
    np.testing.assert_array_equal(reg.load_model(JOB, a, 1).predict(x), expected)
    assert reg.load_model_text(reg.get(JOB, a)) == text


def test_model_uri_without_manymodels(reg: Registry, model: tuple[str, Any, Any]) -> None:
    text, x, expected = model
    reg.commit(JOB, [new_version(reg, {"station": "../x"}, text)])
    uri = reg.get(JOB, {"station": "../x"}).model_uri
    assert os.path.isabs(uri)
    assert "../" not in uri
    booster = lgb.Booster(model_str=fsspec.open(uri, "r").open().read())
    np.testing.assert_array_equal(booster.predict(x), expected)


def test_promote_and_rollback(reg: Registry, model: tuple[str, Any, Any]) -> None:
    a, text = {"station": "a"}, model[0]
    for _ in range(3):
        reg.commit(JOB, [new_version(reg, a, text)])
    reg.commit(JOB, [new_version(reg, a, text, promote=False)])
    assert statuses(reg, a) == {1: "archived", 2: "archived", 3: "champion", 4: "rejected"}

    rolled = reg.rollback(JOB, a)
    assert rolled.version == 2 and rolled.status == "champion"
    assert statuses(reg, a) == {1: "archived", 2: "champion", 3: "archived", 4: "rejected"}
    assert reg.rollback(JOB, a).version == 1
    with pytest.raises(RegistryError, match="no earlier good version"):
        reg.rollback(JOB, a)

    promoted = reg.promote(JOB, a, 3)
    assert promoted.version == 3 and promoted.status == "champion"
    assert statuses(reg, a) == {1: "archived", 2: "archived", 3: "champion", 4: "rejected"}
    reg.promote(JOB, a, 4)  # a person may promote a rejected version on purpose
    assert statuses(reg, a) == {1: "archived", 2: "archived", 3: "archived", 4: "champion"}
    reg.promote(JOB, a, 4)  # promoting the champion is a no-op
    assert reg.get(JOB, a).version == 4
    with pytest.raises(RegistryError):
        reg.promote(JOB, a, 9)
    check_index(reg)
    # a new commit after manual changes still takes the next number and archives the champion
    reg.commit(JOB, [new_version(reg, a, text)])
    assert statuses(reg, a) == {1: "archived", 2: "archived", 3: "archived", 4: "archived", 5: "champion"}
    assert reg.get(JOB, a).previous_version == 4


def test_compact(reg: Registry, model: tuple[str, Any, Any]) -> None:
    text = model[0]
    parts = [{"station": f"s{i}"} for i in range(5)]
    for round_ in range(4):
        reg.commit(JOB, [new_version(reg, p, text, promote=(round_ + i) % 3 != 1)
                         for i, p in enumerate(parts)])
    assert statuses(reg, parts[0]) == {1: "archived", 2: "rejected", 3: "archived", 4: "champion"}
    assert reg.rollback(JOB, parts[0]).version == 3
    reg.promote(JOB, parts[2], 1)
    assert reg.store.list(f"{JOB}/log") == [Registry.commit_key(JOB, n) for n in range(1, 7)]
    before = [m.to_dict() for m in reg.list(JOB)]
    before_all = [m.to_dict() for m in reg.list(JOB, all_versions=True)]
    reg.compact(JOB)
    files = reg.store.list(f"{JOB}/log")
    assert {Registry.checkpoint_key(JOB, 6, "live"), Registry.checkpoint_key(JOB, 6, "all")} <= set(files)
    fresh = Registry(reg.url)
    for r in (reg, fresh):
        assert [m.to_dict() for m in r.list(JOB)] == before
        assert [m.to_dict() for m in r.list(JOB, all_versions=True)] == before_all
    reg.compact(JOB)  # nothing new to summarise
    assert reg.store.list(f"{JOB}/log") == files
    # a commit after compaction continues the numbering
    reg.commit(JOB, [new_version(reg, parts[3], text)])
    assert reg.get(JOB, parts[3]).version == 5
    check_index(fresh)


def test_index_consistent_after_many_commits(reg: Registry, model: tuple[str, Any, Any]) -> None:
    text = model[0]
    rng = np.random.default_rng(3)
    parts = [{"station": f"s{i}"} for i in range(6)]
    expected = dict.fromkeys(range(6), 0)
    reg.commit(JOB, [new_version(reg, p, text) for p in parts])
    expected = dict.fromkeys(range(6), 1)
    for step in range(30):
        chosen = sorted(set(rng.integers(0, 6, 3).tolist()))
        reg.commit(JOB, [new_version(reg, parts[i], text, promote=bool(rng.random() < 0.6)) for i in chosen])
        for i in chosen:
            expected[i] += 1
        if step % 10 == 9:
            reg.compact(JOB)
    check_index(reg)
    for i, p in enumerate(parts):
        assert max(statuses(reg, p)) == expected[i]
        assert list(statuses(reg, p).values()).count("champion") == 1


def test_two_registries_alternating(tmp_path: Path, model: tuple[str, Any, Any]) -> None:
    text = model[0]
    url = str(tmp_path / "shared")
    one, two = Registry(url), Registry(url)
    a = {"station": "a"}
    for i in range(10):
        r = one if i % 2 == 0 else two
        got = r.commit(JOB, [new_version(r, a, text, promote=i % 3 != 2)])
        assert got == {partition_id(KEYS, ["a"]): i + 1}
        if i == 5:
            two.compact(JOB)
    for r in (one, two):
        assert sorted(statuses(r, a)) == list(range(1, 11))
        check_index(r)
    assert statuses(one, a) == statuses(two, a)


def _sorted_rows(table: pa.Table) -> list[dict[str, Any]]:
    return sorted(table.to_pylist(), key=lambda r: (r["pid"], r["version"], r["status"]))


def test_views_kept_in_memory_follow_other_writers(tmp_path: Path, model: tuple[str, Any, Any]) -> None:
    """A registry object moves its views forward by the new commits only; whatever other writers did
    meanwhile (commits, promotions, checkpoints that delete old commits), it shows what a fresh
    reader of the log shows."""
    text = model[0]
    url = str(tmp_path / "shared")
    reader, writer = Registry(url), Registry(url)
    parts = [{"station": f"s{i}"} for i in range(5)]
    rng = np.random.default_rng(7)

    def same_as_fresh() -> None:
        fresh = Registry(url)
        assert _sorted_rows(reader.live(JOB)) == _sorted_rows(fresh.live(JOB))
        assert _sorted_rows(reader.table(JOB)) == _sorted_rows(fresh.table(JOB))

    writer.commit(JOB, [new_version(writer, p, text) for p in parts])
    same_as_fresh()
    for step in range(3):  # a few commits at a time: the reader's views move forward by them
        for _ in range(4):
            chosen = sorted(set(rng.integers(0, 5, 3).tolist()))
            writer.commit(JOB, [new_version(writer, parts[i], text, promote=bool(rng.random() < 0.6))
                                for i in chosen])
        writer.promote(JOB, parts[step], 1)
        same_as_fresh()
    for _ in range(25):  # enough commits and checkpoints that the reader's last commit is deleted
        writer.commit(JOB, [new_version(writer, parts[0], text)])
        writer.compact(JOB)
    assert not (tmp_path / "shared" / JOB / "log" / f"{12:020d}.parquet").exists()
    same_as_fresh()
    check_index(reader)


def test_two_registries_concurrent_threads(tmp_path: Path, model: tuple[str, Any, Any]) -> None:
    text = model[0]
    url = str(tmp_path / "shared")
    a = {"station": "a"}
    errors: list[BaseException] = []
    got: list[int] = []
    barrier = threading.Barrier(3)

    def worker() -> None:
        r = Registry(url)
        try:
            barrier.wait()
            for _ in range(6):
                got.append(r.commit(JOB, [new_version(r, a, text)])[partition_id(KEYS, ["a"])])
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert sorted(got) == list(range(1, 19))
    check_index(Registry(url))
    assert list(statuses(Registry(url), a).values()).count("champion") == 1


def test_listing_many_partitions_reads_one_checkpoint(reg: Registry, model: tuple[str, Any, Any],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    n = 10_000
    parts = [{"station": f"stn-{i:05d}"} for i in range(n)]
    reg.store.write_bytes("shared-model.txt", model[0].encode())
    reg.commit(JOB, [new_version(reg, p, "", write=False) for p in parts[: n // 2]])
    reg.commit(JOB, [new_version(reg, p, "", write=False) for p in parts[n // 2:]])
    reg.commit(JOB, [new_version(reg, p, "", write=False, promote=False) for p in parts[:10]])
    reg.compact(JOB)

    fresh = Registry(reg.url)
    reads: list[str] = []
    fs = fresh.store.fs
    original = fs.cat_file

    def counting_cat_file(path: str, *args: Any, **kwargs: Any) -> Any:
        reads.append(path)
        return original(path, *args, **kwargs)

    monkeypatch.setattr(fs, "cat_file", counting_cat_file)
    champions = fresh.list(JOB)
    assert len(champions) == n
    assert len({m.pid for m in champions}) == n
    assert len(reads) == 1 and reads[0].endswith(".checkpoint.live.parquet")  # not the history
    assert len(fresh.list(JOB, all_versions=True)) == n + 10


# ----------------------------------------------------------------------------- runs


def test_runs_round_trip(reg: Registry) -> None:
    rec1 = {"run_id": "train-20260101-aaaa", "job": JOB, "kind": "train", "status": "done",
            "started_at": "2026-01-01T00:00:00+00:00", "cost": {"total_usd": 0.5}}
    rec2 = {**rec1, "run_id": "score-20260102-bbbb", "kind": "score",
            "started_at": "2026-01-02T00:00:00+00:00"}
    rec3 = {**rec1, "run_id": "train-20260103-cccc", "job": "other",
            "started_at": "2026-01-03T00:00:00+00:00"}
    parts = pa.table({"partition": ['{"station":"a"}'], "status": ["trained"], "rows": [10]})
    reg.write_run(JOB, rec1["run_id"], rec1, parts)
    reg.write_run(JOB, rec2["run_id"], rec2)
    reg.write_run("other", rec3["run_id"], rec3)

    assert [r["run_id"] for r in reg.runs(JOB)] == [rec2["run_id"], rec1["run_id"]]  # newest first
    assert [r["run_id"] for r in reg.runs()] == [rec3["run_id"], rec2["run_id"], rec1["run_id"]]
    assert sorted(reg.jobs()) == sorted([JOB, "other"])

    record, table = reg.run(rec1["run_id"])
    assert record == rec1
    assert isinstance(table, pd.DataFrame)
    assert table.to_dict("records") == [{"partition": '{"station":"a"}', "status": "trained", "rows": 10}]
    record, table = reg.run(rec2["run_id"])
    assert record == rec2 and table is None

    updated = {**rec1, "status": "failed"}
    reg.write_run(JOB, rec1["run_id"], updated)  # replaces
    assert reg.run(rec1["run_id"])[0]["status"] == "failed"


@pytest.mark.parametrize("bad", ["../x", "a/b", "..", ".", "/etc", "", "*", "run?", "r[1]", "x/../../y"])
def test_run_rejects_unsafe_ids(reg: Registry, tmp_path: Path, bad: str) -> None:
    reg.write_run(JOB, "r1", {"run_id": "r1"})
    reg.store.write_bytes(f"{JOB}/run.json", b'{"run_id": "escaped"}')
    reg.store.write_bytes(f"{JOB}/runs/run.json", b'{"run_id": "escaped"}')
    with pytest.raises(RegistryError):
        reg.run(bad)


def test_run_unknown(reg: Registry) -> None:
    with pytest.raises(RegistryError, match="no run"):
        reg.run("train-nope")
