"""Tests of manymodels.storage.Store on a local folder."""

from __future__ import annotations

import os
import pickle
import threading
import uuid
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


def test_write_unpublished_creates_folders_and_rewrites_in_place(store: Store, tmp_path: Path) -> None:
    store.write_unpublished("models/p1/run-a.txt", b"first")  # a new partition folder
    store.write_unpublished("models/p1/run-b.txt", b"second")  # the folder exists
    store.write_unpublished("models/p1/run-a.txt", b"again")  # a retried task rewrites its file
    assert store.read_bytes("models/p1/run-a.txt") == b"again"
    assert all_files(tmp_path / "root") == ["models/p1/run-a.txt", "models/p1/run-b.txt"]
    blocker = tmp_path / "file"
    blocker.write_bytes(b"x")
    with pytest.raises(StorageError):
        Store(str(blocker)).write_unpublished("m/k.txt", b"1")


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


def test_create_exclusive_empty_body_once(store: Store) -> None:
    assert store.create_exclusive("e", b"") is True
    assert store.create_exclusive("e", b"") is False


def test_create_exclusive_never_shows_a_partial_file(store: Store, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # The final name appears only once every byte is on disk (a hard link of a complete temporary
    # file): a writer that dies while writing leaves no half-written commit under the final name.
    seen: list[tuple[bool, bytes]] = []
    real_link = os.link

    def watching_link(src: str, dst: str, *args: object, **kwargs: object) -> None:
        seen.append((os.path.exists(dst), Path(src).read_bytes()))
        real_link(src, dst)

    monkeypatch.setattr(os, "link", watching_link)
    assert store.create_exclusive("c/commit", b"x" * 100_000) is True
    assert seen == [(False, b"x" * 100_000)]  # complete before it got its name
    assert all_files(tmp_path / "root") == ["c/commit"]  # no temporary file left behind
    assert store.create_exclusive("c/commit", b"y") is False
    assert all_files(tmp_path / "root") == ["c/commit"]
    assert store.read_bytes("c/commit") == b"x" * 100_000


def test_check_exclusive_local(store: Store, tmp_path: Path) -> None:
    store.check_exclusive()
    assert all_files(tmp_path / "root") == []  # the probe is removed


def test_filesystem_without_conditional_create_is_refused() -> None:
    # fsspec's generic pipe_file(mode="create") is check-then-write: two writers can both "create".
    store = Store(f"memory://mm-{uuid.uuid4().hex[:8]}")
    with pytest.raises(StorageError, match="cannot create objects exclusively"):
        store.create_exclusive("k", b"1")
    with pytest.raises(StorageError, match="cannot create objects exclusively"):
        store.check_writable()


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
