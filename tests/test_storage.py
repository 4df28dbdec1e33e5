"""Tests of manymodels.storage.Store on a local folder."""

from __future__ import annotations

import os
import pickle
import threading
import time
from pathlib import Path

import fsspec
import pyarrow as pa
import pytest

from manymodels.storage import StorageError, Store, url_to_fs


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(str(tmp_path / "root"))


def all_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_write_read_exists(store: Store, tmp_path: Path) -> None:
    assert not store.exists("a/b.txt")
    store.write_bytes("a/b.txt", b"hello")
    assert store.exists("a/b.txt")
    assert store.read_bytes("a/b.txt") == b"hello"
    assert (tmp_path / "root" / "a" / "b.txt").read_bytes() == b"hello"


def test_write_replaces_atomically_without_leftovers(store: Store, tmp_path: Path) -> None:
    for i in range(5):
        store.write_bytes("k/obj.bin", bytes([i]) * 1000)
    assert store.read_bytes("k/obj.bin") == bytes([4]) * 1000
    assert all_files(tmp_path / "root") == ["k/obj.bin"]
    assert not any(".tmp-" in name for name in os.listdir(tmp_path / "root" / "k"))


def test_read_missing_raises_file_not_found(store: Store) -> None:
    with pytest.raises(FileNotFoundError):
        store.read_bytes("nope.txt")


def test_list(store: Store) -> None:
    assert store.list("missing") == []
    assert store.list("missing/deeper") == []
    store.write_bytes("p/b.txt", b"1")
    store.write_bytes("p/a.txt", b"2")
    store.write_bytes("p/sub/c.txt", b"3")
    store.write_bytes("q/d.txt", b"4")
    assert store.list("p") == ["p/a.txt", "p/b.txt", "p/sub"]
    assert store.list("p/sub") == ["p/sub/c.txt"]
    assert store.list("") == ["p", "q"]


def test_glob(store: Store) -> None:
    store.write_bytes("job/runs/r1/run.json", b"{}")
    store.write_bytes("job/runs/r2/run.json", b"{}")
    store.write_bytes("job/runs/r2/partitions.parquet", b"")
    store.write_bytes("other/runs/r3/run.json", b"{}")
    assert store.glob("job/runs/*/run.json") == ["job/runs/r1/run.json", "job/runs/r2/run.json"]
    assert store.glob("*/runs/r3/run.json") == ["other/runs/r3/run.json"]
    assert store.glob("nothing/*") == []


def test_delete(store: Store) -> None:
    store.write_bytes("x/y.txt", b"1")
    store.delete("x/y.txt")
    assert not store.exists("x/y.txt")
    store.delete("x/y.txt")  # missing is fine
    store.delete("never/was.txt")
    store.write_bytes("tree/a/b.txt", b"1")
    store.write_bytes("tree/c.txt", b"1")
    store.delete("tree", recursive=True)
    assert not store.exists("tree")
    assert store.list("tree") == []


def test_create_exclusive(store: Store) -> None:
    assert store.create_exclusive("locks/one", b"first") is True
    assert store.create_exclusive("locks/one", b"second") is False
    assert store.read_bytes("locks/one") == b"first"
    store.delete("locks/one")
    assert store.create_exclusive("locks/one", b"third") is True


def test_create_exclusive_one_winner_among_threads(store: Store) -> None:
    results: list[bool] = []
    barrier = threading.Barrier(8)

    def worker(i: int) -> None:
        barrier.wait()
        results.append(store.create_exclusive("race", str(i).encode()))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 7 + [True]


def test_lock_is_released(store: Store) -> None:
    with store.lock("job/index.lock"):
        assert store.exists("job/index.lock")
    assert not store.exists("job/index.lock")
    with store.lock("job/index.lock", timeout_s=1):  # can be taken again at once
        pass


def test_lock_released_on_error(store: Store) -> None:
    with pytest.raises(RuntimeError), store.lock("l"):
        raise RuntimeError("boom")
    assert not store.exists("l")


def test_lock_times_out_while_held(store: Store) -> None:
    with store.lock("l"):
        with pytest.raises(StorageError, match="lock"), store.lock("l", timeout_s=0.2):
            pass
        assert store.exists("l")  # the waiter did not break a live lock
    assert not store.exists("l")


def test_second_lock_waits_for_first(store: Store) -> None:
    events: list[str] = []
    holding = threading.Event()
    waiter_started = threading.Event()
    errors: list[BaseException] = []

    def first() -> None:
        with store.lock("shared.lock"):
            holding.set()
            waiter_started.wait(5)
            time.sleep(0.2)  # give the waiter time to try (and fail) to take the lock
            events.append("first released")

    def second() -> None:
        try:
            holding.wait(5)
            waiter_started.set()
            with store.lock("shared.lock", timeout_s=10):
                events.append("second acquired")
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    t1, t2 = threading.Thread(target=first), threading.Thread(target=second)
    t1.start()
    t2.start()
    t1.join(10)
    t2.join(10)
    assert not errors
    assert events == ["first released", "second acquired"]
    assert not store.exists("shared.lock")


def test_stale_lock_is_broken(store: Store, tmp_path: Path) -> None:
    store.write_bytes("job/index.lock", b"dead holder")
    path = tmp_path / "root" / "job" / "index.lock"
    old = time.time() - 3600
    os.utime(path, (old, old))
    with store.lock("job/index.lock", timeout_s=2, stale_s=60):
        assert store.read_bytes("job/index.lock") != b"dead holder"
    assert not store.exists("job/index.lock")


def test_fresh_lock_is_not_broken(store: Store) -> None:
    store.write_bytes("l", b"live holder")
    with pytest.raises(StorageError), store.lock("l", timeout_s=0.2, stale_s=3600):
        pass
    assert store.read_bytes("l") == b"live holder"


def test_parquet_round_trip(store: Store) -> None:
    table = pa.table({"a": [1, 2, None], "b": ["x", None, "Zürich 東京"],
                      "t": pa.array([0, 1, 2], pa.timestamp("us", tz="UTC"))})
    store.write_parquet("t/table.parquet", table)
    back = store.read_parquet("t/table.parquet")
    assert back.equals(table)
    assert back.schema == table.schema


def test_check_writable_ok(store: Store, tmp_path: Path) -> None:
    store.check_writable()
    assert (tmp_path / "root").is_dir()
    assert all_files(tmp_path / "root") == []  # the probe is removed


def test_check_writable_read_only_dir(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        probe = ro / "probe"
        try:
            probe.write_bytes(b"")
            root_can_write = True
            probe.unlink()
        except PermissionError:
            root_can_write = False
        if root_can_write:  # running as root: permissions do not stop us; a path under a file does
            blocker = tmp_path / "plainfile"
            blocker.write_bytes(b"not a folder")
            target = str(blocker / "sub")
        else:
            target = str(ro / "sub")
        with pytest.raises(StorageError) as info:
            Store(target).check_writable()
        assert target in str(info.value)
    finally:
        ro.chmod(0o700)


def test_write_under_a_file_raises_storage_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"x")
    store = Store(str(blocker))
    with pytest.raises(StorageError):
        store.write_bytes("k.txt", b"1")


def test_uri_is_absolute_and_openable(store: Store) -> None:
    store.write_bytes("models/p/r.txt", "model text ü".encode())
    uri = store.uri("models/p/r.txt")
    assert os.path.isabs(uri)
    with fsspec.open(uri, "r", encoding="utf-8") as f:
        assert f.read() == "model text ü"


def test_relative_root_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    store = Store("rel/registry")
    assert store.root == str(tmp_path / "rel" / "registry")
    store.write_bytes("a.txt", b"1")
    assert (tmp_path / "rel" / "registry" / "a.txt").read_bytes() == b"1"
    _fs, path = url_to_fs("rel/registry")
    assert path == store.root


def test_store_pickles(store: Store) -> None:
    store.write_bytes("a.txt", b"1")
    back = pickle.loads(pickle.dumps(store))
    assert back.root == store.root and back.url == store.url
    assert back.read_bytes("a.txt") == b"1"
