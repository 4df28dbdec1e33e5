"""Tests of the registry's commit log (issue 8 items 8, 9, 10 and the registry defects): concurrent
writers in separate processes on the local filesystem and on S3, checkpoints, torn files, retention
(``gc``), strict JSON, the global model's pseudo-partition."""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import multiprocessing
import os
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from typer.testing import CliRunner

from manymodels.cli import app
from manymodels.registry import (
    GLOBAL_PID,
    NewVersion,
    Registry,
    RegistryError,
    encode_partition,
    partition_id,
)

JOB = "transit"
MODEL = "tree\nversion=v4\n"  # what a worker wrote; these tests never load it as a model


def new_version(reg: Registry, station: Any, *, promote: bool = True, run_id: str | None = None,
                metric: float = 1.0, job: str = JOB, comparison: str = "") -> NewVersion:
    run_id = run_id or f"train-{uuid.uuid4().hex[:10]}"
    pid = partition_id(["station"], [station])
    key = Registry.model_key(job, pid, run_id)
    reg.store.write_bytes(key, MODEL.encode())
    return NewVersion(
        pid=pid, partition=encode_partition(["station"], [station]), run_id=run_id,
        trained_at=dt.datetime.now(dt.UTC), rows=10, metric="mae", metric_value=metric,
        metrics={"mae": metric}, fingerprint=f"fp-{run_id}", spec_hash="h", model_key=key,
        features=["f0"], time_min=None, time_max=None, promote=promote,
        reason="" if promote else "worse than champion", comparison=comparison)


def versions(reg: Registry, job: str = JOB) -> dict[str, list[tuple[int, str]]]:
    out: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for m in reg.list(job, all_versions=True, include_global=True):
        out[str(m.partition.get("station"))].append((m.version, m.status))
    return dict(out)


def check_consistent(reg: Registry, job: str = JOB) -> None:
    """Versions 1..n per partition (gaps only where gc removed), one champion at most, no duplicate."""
    seen: dict[str, list[int]] = defaultdict(list)
    champions: dict[str, int] = defaultdict(int)
    for m in reg.list(job, all_versions=True, include_global=True):
        seen[m.pid].append(m.version)
        champions[m.pid] += m.status == "champion"
    for pid, numbers in seen.items():
        assert len(numbers) == len(set(numbers)), (pid, numbers)
        assert champions[pid] <= 1, pid
    listed = [m.pid for m in reg.list(job, include_global=True)]
    assert len(listed) == len(set(listed))


# ----------------------------------------------------------------------------- item 8: no lock, a log


def _commit_at_barrier(url: str, barrier: Any, results: Any, action: str) -> None:
    """Child process: commit (or promote) once, held at the barrier right before the put-if-absent of
    the first try, so that both processes race for the same commit number."""
    held: list[int] = []

    def hook(job: str, number: int) -> None:
        if not held:
            held.append(number)
            barrier.wait(timeout=120)

    Registry.before_create = hook
    try:
        reg = Registry(url)
        if action == "commit":
            got: Any = reg.commit(JOB, [new_version(reg, "a")])[partition_id(["station"], ["a"])]
        else:
            got = reg.promote(JOB, {"station": "a"}, 1).version
        results.put((action, held, got, None))
    except BaseException as exc:  # reported by the parent
        results.put((action, held, None, repr(exc)))


def race(url: str, actions: tuple[str, str]) -> list[tuple[str, list[int], Any, str | None]]:
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that may run Ray threads
    barrier = ctx.Barrier(2)
    results = ctx.Queue()
    procs = [ctx.Process(target=_commit_at_barrier, args=(url, barrier, results, a)) for a in actions]
    for p in procs:
        p.start()
    out = [results.get(timeout=180) for _ in procs]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert all(err is None for *_, err in out), out
    return out


@pytest.fixture(params=["local", "s3"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "registry")
    endpoint = request.getfixturevalue("s3_endpoint")
    if endpoint is None:
        pytest.skip("needs moto[server] and s3fs")
    import fsspec

    bucket = f"mm-{uuid.uuid4().hex[:12]}"
    fsspec.filesystem("s3", skip_instance_cache=True).mkdir(bucket)
    return f"s3://{bucket}/registry"


def test_two_processes_commit_at_the_same_moment(url: str) -> None:
    out = race(url, ("commit", "commit"))
    # Both were held before creating commit 1: one created it, the other found it taken, read it
    # and committed again as commit 2 with the next version.
    assert [held for _, held, _, _ in out] == [[1], [1]]
    assert sorted(got for _, _, got, _ in out) == [1, 2]
    reg = Registry(url)
    assert versions(reg) == {"a": [(1, "archived"), (2, "champion")]}
    assert reg.store.list(f"{JOB}/log") == [Registry.commit_key(JOB, 1), Registry.commit_key(JOB, 2)]
    assert reg.get(JOB, {"station": "a"}).previous_version == 1
    check_consistent(reg)


def test_promote_racing_a_commit(url: str) -> None:
    reg = Registry(url)
    reg.commit(JOB, [new_version(reg, "a")])
    reg.commit(JOB, [new_version(reg, "a")])  # v1 archived, v2 champion
    out = race(url, ("commit", "promote"))
    assert [held for _, held, _, _ in out] == [[3], [3]]
    got = dict((action, value) for action, _, value, _ in out)
    assert got == {"commit": 3, "promote": 1}
    fresh = Registry(url)
    statuses = dict(versions(fresh)["a"])
    assert sorted(statuses) == [1, 2, 3]  # no version lost
    assert list(statuses.values()).count("champion") == 1
    # Whichever landed second saw the other: the champion is the one written last, the other archived.
    log_files = fresh.store.list(f"{JOB}/log")
    assert log_files == [Registry.commit_key(JOB, n) for n in (1, 2, 3, 4)]
    last = fresh.store.read_parquet(log_files[-1]).to_pylist()
    winner = next(r["version"] for r in last if r["status"] == "champion")
    assert statuses[winner] == "champion"
    check_consistent(fresh)


def test_order_is_the_log_position_not_the_clock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Two machines whose clocks disagree: the second writer's clock is an hour behind. With events
    # ordered by wall-clock time, the archive of version 1 sorted before its promotion and version 1
    # stayed champion next to version 2.
    reg = Registry(str(tmp_path / "registry"))
    reg.commit(JOB, [new_version(reg, "a")])
    behind = time.time_ns() - 3600 * 10**9
    monkeypatch.setattr(time, "time_ns", lambda: behind)
    reg.commit(JOB, [new_version(reg, "a")])
    assert versions(Registry(reg.url)) == {"a": [(1, "archived"), (2, "champion")]}


def test_commit_retries_with_the_next_number(tmp_path: Path) -> None:
    # A writer that lost the race for commit N computes again on N and creates N + 1.
    url = str(tmp_path / "registry")
    one, two = Registry(url), Registry(url)
    one.commit(JOB, [new_version(one, "a")])
    calls: list[int] = []

    def sneak(job: str, number: int) -> None:
        calls.append(number)
        if len(calls) == 1:  # another writer lands first, on the same number
            Registry.before_create = None
            try:
                two.commit(JOB, [new_version(two, "a", promote=False)])
            finally:
                Registry.before_create = sneak

    Registry.before_create = sneak
    try:
        got = one.commit(JOB, [new_version(one, "a")])
    finally:
        Registry.before_create = None
    assert calls == [2, 3]
    assert got == {partition_id(["station"], ["a"]): 3}
    assert versions(Registry(url)) == {"a": [(1, "archived"), (2, "rejected"), (3, "champion")]}


# ----------------------------------------------------------------------------- item 9: checkpoints


def test_checkpoint_killed_before_cleanup_shows_nothing_twice(tmp_path: Path) -> None:
    reg = Registry(str(tmp_path / "registry"))
    for i in range(4):
        reg.commit(JOB, [new_version(reg, s, promote=i != 2) for s in ("a", "b")])
    before = versions(reg)
    # A process killed between writing the checkpoint and removing the files it summarises: the
    # commits are all still there next to it.
    assert reg.checkpoint(JOB, cleanup=False) == 4
    files = reg.store.list(f"{JOB}/log")
    assert len([f for f in files if "checkpoint" not in f]) == 4
    for r in (reg, Registry(reg.url)):
        assert versions(r) == before
        assert len(r.list(JOB)) == 2
        check_consistent(r)
    # A later checkpoint (with more commits after the first) keeps no duplicates either, and this
    # time the files below the previous checkpoint go.
    reg.commit(JOB, [new_version(reg, "a")])
    assert reg.checkpoint(JOB) == 5
    fresh = Registry(reg.url)
    got = versions(fresh)
    assert got["a"] == [(1, "archived"), (2, "archived"), (3, "rejected"), (4, "archived"), (5, "champion")]
    assert got["b"] == before["b"]
    assert len(fresh.list(JOB)) == 2
    check_consistent(fresh)
    left = fresh.store.list(f"{JOB}/log")
    assert Registry.commit_key(JOB, 1) not in left and Registry.commit_key(JOB, 5) in left
    assert Registry.checkpoint_key(JOB, 4, "live") in left  # the one before the newest stays


def test_checkpoint_every_ten_commits(tmp_path: Path) -> None:
    reg = Registry(str(tmp_path / "registry"))
    for _ in range(21):
        reg.commit(JOB, [new_version(reg, "a")])
    files = reg.store.list(f"{JOB}/log")
    assert Registry.checkpoint_key(JOB, 20, "live") in files
    assert Registry.checkpoint_key(JOB, 10, "all") in files
    assert Registry.commit_key(JOB, 10) not in files  # summarised by checkpoint 10, below 20
    fresh = Registry(reg.url)
    assert [v for v, _ in versions(fresh)["a"]] == list(range(1, 22))
    assert fresh.get(JOB, {"station": "a"}).version == 21


# ----------------------------------------------------------------------------- torn files


def test_torn_commit_is_skipped_and_its_number_stays_taken(tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    reg = Registry(str(tmp_path / "registry"))
    reg.commit(JOB, [new_version(reg, "a")])
    reg.commit(JOB, [new_version(reg, "b")])
    path = tmp_path / "registry" / JOB / "log" / f"{2:020d}.parquet"
    path.write_bytes(path.read_bytes()[:50])  # torn: half a Parquet file
    fresh = Registry(reg.url)
    with caplog.at_level(logging.WARNING, logger="manymodels.registry"):
        assert [m.partition["station"] for m in fresh.list(JOB)] == ["a"]
    assert str(path) in caplog.text
    fresh.commit(JOB, [new_version(fresh, "c")])
    assert fresh.store.exists(Registry.commit_key(JOB, 3))
    assert sorted(m.partition["station"] for m in Registry(reg.url).list(JOB)) == ["a", "c"]


def test_torn_checkpoint_falls_back_to_the_log(tmp_path: Path) -> None:
    reg = Registry(str(tmp_path / "registry"))
    for s in ("a", "b", "c"):
        reg.commit(JOB, [new_version(reg, s)])
    reg.checkpoint(JOB)
    reg.commit(JOB, [new_version(reg, "a")])
    for kind in ("live", "all"):
        (tmp_path / "registry" / JOB / "log" / f"{3:020d}.checkpoint.{kind}.parquet").write_bytes(b"junk")
    fresh = Registry(reg.url)
    assert {m.partition["station"]: m.version for m in fresh.list(JOB)} == {"a": 2, "b": 1, "c": 1}
    assert len(fresh.list(JOB, all_versions=True)) == 4


# ----------------------------------------------------------------------------- item 10: cost and gc


def test_live_reads_skip_the_history(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reg = Registry(str(tmp_path / "registry"))
    for _ in range(3):
        reg.commit(JOB, [new_version(reg, s) for s in ("a", "b")])
    reg.checkpoint(JOB)
    reg.commit(JOB, [new_version(reg, "a")])
    fresh = Registry(reg.url)
    reads: list[str] = []
    original = fresh.store.read_bytes

    def counting(key: str) -> bytes:
        reads.append(key)
        return original(key)

    monkeypatch.setattr(fresh.store, "read_bytes", counting)
    assert set(fresh.state(JOB)) == {partition_id(["station"], [s]) for s in ("a", "b")}
    assert len(fresh.list(JOB)) == 2
    assert sorted(fresh.champions(JOB).column("version").to_pylist()) == [3, 4]  # what score reads
    assert fresh.load_model_text(fresh._find(JOB, {"station": "a"}, None)) == MODEL
    fresh.load_model_text(fresh._find(JOB, {"station": "a"}, None))
    assert not any("checkpoint.all" in k for k in reads), reads  # never the full history
    assert not any(k.endswith("run.json") for k in reads), reads
    assert {k for k in reads if "/log/" in k} == {Registry.commit_key(JOB, 4),
                                                  Registry.checkpoint_key(JOB, 3, "live")}


def test_load_model_does_not_read_the_run_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lightgbm as lgb
    import numpy as np

    reg = Registry(str(tmp_path / "registry"))
    x = np.arange(100, dtype=float).reshape(50, 2)
    booster = lgb.train({"objective": "regression", "verbosity": -1, "min_data_in_leaf": 5},
                        lgb.Dataset(x, x[:, 0]), num_boost_round=2)
    nv = new_version(reg, "a")
    reg.store.write_bytes(nv.model_key, booster.model_to_string().encode())
    reg.commit(JOB, [nv])
    reg.write_run(JOB, nv.run_id, {"run_id": nv.run_id, "environment": {"python": "3.11"}})
    opened: list[str] = []
    original = reg.store.read_bytes
    monkeypatch.setattr(reg.store, "read_bytes", lambda key: opened.append(key) or original(key))
    assert reg.load_model(JOB, {"station": "a"}).num_trees() == 2
    assert not any(k.endswith("run.json") for k in opened)
    assert reg.get(JOB, {"station": "a"}).environment == {"python": "3.11"}  # get() still has it


def _score_run(reg: Registry, run_id: str, started: dt.datetime, used: list[tuple[str, int]],
               status: str = "succeeded") -> None:
    parts = pa.table({"partition": [encode_partition(["station"], [s]) for s, _ in used],
                      "status": ["scored"] * len(used), "model_version": [v for _, v in used]})
    reg.write_run(JOB, run_id, {"run_id": run_id, "job": JOB, "kind": "score", "status": status,
                                "started_at": started.isoformat()}, parts)


def test_gc_keeps_champions_latest_and_recently_scored(tmp_path: Path) -> None:
    reg = Registry(str(tmp_path / "registry"))
    for i in range(6):  # a: v1..v6, v3 and v6 rejected -> champion v5
        reg.commit(JOB, [new_version(reg, "a", promote=i not in (2, 5)), new_version(reg, "b")])
    now = dt.datetime.now(dt.UTC)
    _score_run(reg, "score-recent", now - dt.timedelta(days=2), [("a", 1)])
    _score_run(reg, "score-old", now - dt.timedelta(days=30), [("a", 2)])
    files_before = {m.model_uri for m in reg.list(JOB, all_versions=True)}

    dry = reg.gc(JOB, keep=2, dry_run=True)
    assert dry.dry_run and dry.removed == 7 and dry.kept == 5
    assert versions(reg)["a"] == [(1, "archived"), (2, "archived"), (3, "rejected"), (4, "archived"),
                                  (5, "champion"), (6, "rejected")]  # nothing changed
    assert all(os.path.exists(u) for u in files_before)

    report = reg.gc(JOB, keep=2)
    assert (report.removed, report.kept) == (7, 5)
    assert {(v["partition"]["station"], v["version"]) for v in report.removed_versions} == {
        ("a", 2), ("a", 3), ("a", 4), ("b", 1), ("b", 2), ("b", 3), ("b", 4)}
    assert report.bytes_freed == 7 * len(MODEL) and report.orphan_files_removed == 0
    fresh = Registry(reg.url)
    got = versions(fresh)
    # a: the champion (5), the 2 latest (5, 6) and v1 that a score run used 2 days ago
    assert got["a"] == [(1, "archived"), (5, "champion"), (6, "rejected")]
    assert got["b"] == [(5, "archived"), (6, "champion")]
    for m in fresh.list(JOB, all_versions=True):
        assert os.path.exists(m.model_uri)
    assert len([u for u in files_before if os.path.exists(u)]) == 5
    # The next version is still max + 1, and a removed version cannot be promoted.
    fresh.commit(JOB, [new_version(fresh, "b")])
    assert fresh.get(JOB, {"station": "b"}).version == 7
    with pytest.raises(RegistryError, match="no version 2"):
        fresh.promote(JOB, {"station": "a"}, 2)
    assert fresh.gc(JOB, keep=2).removed == 1  # b: v5 now beyond the 2 latest
    check_consistent(fresh)


def test_gc_champion_is_kept_even_when_old(tmp_path: Path) -> None:
    reg = Registry(str(tmp_path / "registry"))
    reg.commit(JOB, [new_version(reg, "a")])
    for _ in range(3):
        reg.commit(JOB, [new_version(reg, "a", promote=False)])
    reg.gc(JOB, keep=1)
    assert versions(Registry(reg.url))["a"] == [(1, "champion"), (4, "rejected")]
    with pytest.raises(RegistryError, match="at least 1"):
        reg.gc(JOB, keep=0)


def test_gc_removes_orphans_but_not_a_running_runs_files(tmp_path: Path) -> None:
    reg = Registry(str(tmp_path / "registry"))
    reg.commit(JOB, [new_version(reg, "a", run_id="train-1")])
    pid = partition_id(["station"], ["b"])
    killed = Registry.model_key(JOB, pid, "train-killed")  # a run SIGKILLed before its commit
    reg.store.write_bytes(killed, b"orphan!")
    reg.write_run(JOB, "train-killed", {"run_id": "train-killed", "kind": "train", "status": "failed"})
    running = Registry.model_key(JOB, pid, "train-running")  # still training, not committed yet
    reg.store.write_bytes(running, b"in flight")
    from manymodels.storage import process_identity

    reg.write_run(JOB, "train-running", {"run_id": "train-running", "kind": "train", "status": "running",
                                         "driver": process_identity()})
    report = reg.gc(JOB, keep=1)
    assert (report.removed, report.orphan_files_removed, report.bytes_freed) == (0, 1, len(b"orphan!"))
    assert not reg.store.exists(killed)
    assert reg.store.exists(running)
    assert reg.store.exists(Registry.model_key(JOB, partition_id(["station"], ["a"]), "train-1"))


def test_gc_cli_json(tmp_path: Path) -> None:
    reg = Registry(str(tmp_path / "registry"))
    for _ in range(3):
        reg.commit(JOB, [new_version(reg, "a")])
    runner = CliRunner()
    args = ["models", "gc", "--job", JOB, "--registry", str(tmp_path / "registry"), "--keep", "1", "--json"]
    dry = runner.invoke(app, [*args, "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert json.loads(dry.stdout) == {"job": JOB, "dry_run": True, "kept": 1, "removed": 2,
                                      "removed_versions": [{"partition": {"station": "a"}, "version": 1},
                                                           {"partition": {"station": "a"}, "version": 2}],
                                      "orphan_files_removed": 0, "bytes_freed": 2 * len(MODEL)}
    done = runner.invoke(app, args)
    assert json.loads(done.stdout)["removed"] == 2 and json.loads(done.stdout)["dry_run"] is False
    bad = runner.invoke(app, [*args[:-2], "0"])
    assert bad.exit_code == 2 and "--keep" in bad.stderr


# ----------------------------------------------------------------------------- defects and new fields


def test_list_and_show_json_is_strict_with_nan_metrics(tmp_path: Path) -> None:
    reg = Registry(str(tmp_path / "registry"))
    reg.commit(JOB, [new_version(reg, "a")])
    nv = new_version(reg, "a", promote=False, metric=float("nan"))
    reg.commit(JOB, [NewVersion(**{**nv.__dict__, "metrics": {"mae": float("nan"), "rmse": math.inf}})])
    runner = CliRunner()
    base = ["--job", JOB, "--registry", str(tmp_path / "registry"), "--json"]
    listed = runner.invoke(app, ["models", "list", "--all", *base])
    shown = runner.invoke(app, ["models", "show", "--partition", "station=a", "--version", "2", *base])
    for result in (listed, shown):
        assert result.exit_code == 0, result.output
        assert "NaN" not in result.stdout and "Infinity" not in result.stdout
        json.loads(result.stdout, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))
    entry = json.loads(shown.stdout)
    assert entry["metrics"] == {"mae": None, "rmse": None} and entry["metric_value"] is None
    json.dumps(reg.get(JOB, {"station": "a"}, 2).to_dict(), allow_nan=False)


def test_comparison_is_stored(tmp_path: Path) -> None:
    reg = Registry(str(tmp_path / "registry"))
    reg.commit(JOB, [new_version(reg, "a", comparison="same features, 24 holdout rows")])
    assert reg.get(JOB, {"station": "a"}).comparison == "same features, 24 holdout rows"
    assert reg.table(JOB).column("comparison").to_pylist() == ["same features, 24 holdout rows"]


def test_global_pseudo_partition_is_hidden_from_list(tmp_path: Path) -> None:
    reg = Registry(str(tmp_path / "registry"))
    nv = new_version(reg, "a")
    key = Registry.model_key(JOB, GLOBAL_PID, "train-g")
    reg.store.write_bytes(key, MODEL.encode())
    glob = NewVersion(**{**nv.__dict__, "pid": GLOBAL_PID, "partition": "{}", "model_key": key,
                         "run_id": "train-g"})
    reg.commit(JOB, [nv, glob])
    assert [m.pid for m in reg.list(JOB)] == [nv.pid]
    assert [m.pid for m in reg.list(JOB, all_versions=True)] == [nv.pid]
    assert {m.pid for m in reg.list(JOB, include_global=True)} == {nv.pid, GLOBAL_PID}
    state = reg.state(JOB, [GLOBAL_PID])
    assert list(state) == [GLOBAL_PID] and state[GLOBAL_PID]["champion"]["version"] == 1
    assert reg.get(JOB, {}).pid == GLOBAL_PID


def test_older_index_is_carried_over(tmp_path: Path) -> None:
    # A registry written by the previous release: index segments of events, old partition ids.
    from manymodels.registry import INDEX_SCHEMA

    reg = Registry(str(tmp_path / "registry"))
    old_schema = pa.schema([f for f in INDEX_SCHEMA if f.name != "comparison"])
    rows = []
    for v, status in ((1, "archived"), (2, "champion")):
        rows.append({"pid": f"stn-1-old{v}", "partition": '{"station":"stn-1"}', "version": v,
                     "status": status, "run_id": f"train-{v}", "trained_at": dt.datetime.now(dt.UTC),
                     "rows": 5, "metric": "mae", "metric_value": 1.0, "metrics": '{"mae": 1.0}',
                     "fingerprint": "f", "spec_hash": "h", "model_key": f"{JOB}/models/old/train-{v}.txt",
                     "features": '["f0"]', "time_min": None, "time_max": None, "previous_version": None,
                     "reason": "", "seq": v})
    reg.store.write_parquet(f"{JOB}/index/seg-1-x.parquet", pa.Table.from_pylist(rows, schema=old_schema))
    fresh = Registry(reg.url)
    assert fresh.has_index(JOB)
    [champ] = fresh.list(JOB)
    assert champ.version == 2 and champ.pid == partition_id(["station"], ["stn-1"])
    fresh.commit(JOB, [new_version(fresh, "stn-1")])
    assert [(v, s) for v, s in versions(Registry(reg.url))["stn-1"]] == [
        (1, "archived"), (2, "archived"), (3, "champion")]
