"""Storage: the one place that turns URLs into fsspec filesystems and bytes into files.

Everything above this module (registry, data access, scoring) speaks in URLs and relative keys; a
:class:`Store` is rooted at a URL (a local directory, ``s3://bucket/prefix``, ...) and offers the few
operations the rest needs: atomic whole-object writes, reads, listing, exclusive creation (the
registry's commit log) and deletes. Local writes go through a temporary file, fsync and
``os.replace``; object stores publish whole objects atomically by themselves.
"""

from __future__ import annotations

import builtins
import io
import os
import posixpath
import socket
import uuid
from contextlib import suppress
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

__all__ = ["StorageError", "Store", "parquet_from_bytes", "url_to_fs"]


class StorageError(OSError):
    """A storage location cannot be read or written; the message names the URL."""


def url_to_fs(url: str) -> tuple[Any, str]:
    """Split an fsspec URL into its filesystem and the path inside it (local paths made absolute)."""
    if "://" not in url:
        url = os.path.abspath(url)
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


class Store:
    """A folder on any fsspec filesystem, addressed by ``/``-separated keys relative to its root."""

    def __init__(self, url: str) -> None:
        self.fs, self.root = url_to_fs(url)
        self.local = isinstance(self.fs, LocalFileSystem)
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        self.url = self.root if self.local else f"{protocol}://{self.root}"

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self.url}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["url"])  # type: ignore[misc]

    def path(self, key: str) -> str:
        """The filesystem path of ``key`` (a relative, ``/``-separated key)."""
        return posixpath.join(self.root, key) if key else self.root

    def uri(self, key: str) -> str:
        """The full URL of ``key``, openable by ``fsspec.open`` without this class."""
        return self.path(key) if self.local else posixpath.join(self.url, key)

    def _wrap(self, exc: Exception, key: str, verb: str) -> StorageError:
        return StorageError(f"cannot {verb} {self.uri(key)}: {exc}")

    def write_bytes(self, key: str, data: bytes) -> None:
        """Write a whole object so that readers see either the old content or all of the new.

        On a local filesystem the bytes are fsynced before the name points at them (registry
        checkpoints, run records). Model files use :meth:`write_unpublished` instead.
        """
        path = self.path(key)
        try:
            if self.local:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())  # the bytes reach the disk before the name points at them
                os.replace(tmp, path)
            else:
                self.fs.pipe_file(path, data)
        except OSError as exc:
            raise self._wrap(exc, key, "write") from exc

    def write_unpublished(self, key: str, data: bytes) -> None:
        """Write an object that no reader looks at yet: a model file, named by its run and partition,
        which becomes visible only when a registry commit names it (after this returns).

        Locally it is written in place (no temporary file and rename, no fsync): a crash or a retried
        task leaves at worst a partial file that no commit names. Object stores write it whole.
        """
        path = self.path(key)
        try:
            if self.local:
                try:
                    f = open(path, "wb")  # noqa: SIM115 - closed by the with below
                except FileNotFoundError:  # the partition's first model: its folder is new
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    f = open(path, "wb")  # noqa: SIM115
                with f:
                    f.write(data)
            else:
                self.fs.pipe_file(path, data)
        except OSError as exc:
            raise self._wrap(exc, key, "write") from exc

    def create_exclusive(self, key: str, data: bytes) -> bool:
        """Create ``key`` with ``data`` only if it does not exist yet; ``False`` when it already does.

        Atomic on every supported store: a reader never sees part of ``data``, and of several
        concurrent creators exactly one gets ``True``. Locally the bytes go to a temporary file
        (fsynced) that is then hard-linked to the final name (``link`` fails if the name exists).
        Object stores use their conditional create (S3 ``If-None-Match: *``, GCS
        ``ifGenerationMatch=0``, Azure ``If-None-Match: *``); a filesystem without one is an error,
        never a check-then-write race.

        Raises:
            StorageError: the store cannot create exclusively, or the write failed.
        """
        path = self.path(key)
        try:
            if self.local:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
                try:
                    with open(tmp, "wb") as f:
                        f.write(data)
                        f.flush()
                        os.fsync(f.fileno())
                    try:
                        os.link(tmp, path)
                    except FileExistsError:
                        return False
                    return True
                finally:
                    with suppress(FileNotFoundError):
                        os.unlink(tmp)
            need = _exclusive_floor(self.fs)
            if need:
                raise StorageError(f"{self.url} cannot create objects exclusively ({need}); registry "
                                   "commits need it")
            try:
                # pipe_file, not open("xb"): s3fs's "xb" writes an empty body with a plain
                # (unconditional) touch, so an empty object could be "created" twice.
                self.fs.pipe_file(path, data, mode="create")
                return True
            except FileExistsError:
                return False
            except OSError as exc:
                # S3 answers 409 ConditionalRequestConflict while another conditional write of the
                # same key is in flight: this creator lost (the caller re-reads and retries).
                if "ConditionalRequestConflict" in str(exc):
                    return False
                raise
        except StorageError:
            raise
        except OSError as exc:
            raise self._wrap(exc, key, "create") from exc

    def read_bytes(self, key: str) -> bytes:
        """Read a whole object."""
        try:
            data: bytes = self.fs.cat_file(self.path(key))
            return data
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise self._wrap(exc, key, "read") from exc

    def exists(self, key: str) -> bool:
        """Whether ``key`` exists."""
        return bool(self.fs.exists(self.path(key)))

    def list(self, prefix: str) -> list[str]:
        """Keys (relative to the root) of the objects directly under ``prefix``; ``[]`` if none."""
        base = self.path(prefix)
        try:
            entries = self.fs.ls(base, detail=False, refresh=True) if not self.local else self.fs.ls(
                base, detail=False)
        except FileNotFoundError:
            return []
        root = self.root.rstrip("/") + "/"
        return sorted(str(e)[len(root):] if str(e).startswith(root) else str(e) for e in entries)

    def glob(self, pattern: str) -> builtins.list[str]:
        """Keys matching a glob pattern relative to the root."""
        root = self.root.rstrip("/") + "/"
        return sorted(str(p)[len(root):] for p in self.fs.glob(self.path(pattern)))

    def delete(self, key: str, recursive: bool = False) -> None:
        """Delete ``key`` (a missing key is not an error)."""
        with suppress(FileNotFoundError):
            self.fs.rm(self.path(key), recursive=recursive)

    def write_parquet(self, key: str, table: pa.Table, **kwargs: Any) -> None:
        """Write an Arrow table as one Parquet object, atomically."""
        buf = io.BytesIO()
        pq.write_table(table, buf, **kwargs)
        self.write_bytes(key, buf.getvalue())

    def read_parquet(self, key: str) -> pa.Table:
        """Read one Parquet object written by :meth:`write_parquet` (see :func:`parquet_from_bytes`)."""
        return parquet_from_bytes(self.read_bytes(key))

    def check_writable(self) -> None:
        """Fail early (before any work) when the root cannot be written or cannot create exclusively."""
        key = f".manymodels-probe-{uuid.uuid4().hex[:8]}"
        self.write_bytes(key, b"")
        self.delete(key)
        self.check_exclusive()

    def check_exclusive(self) -> None:
        """Prove that this store creates exclusively: a probe key created twice must fail the second
        time. Checked once per URL per process (train and score call it up front).

        Raises:
            StorageError: the store (or the server behind it) lets a second create succeed.
        """
        if self.url in _EXCLUSIVE_OK:
            return
        key = f".manymodels-probe-x-{uuid.uuid4().hex[:12]}"
        try:
            first = self.create_exclusive(key, b"")
            second = self.create_exclusive(key, b"")
        finally:
            self.delete(key)
        if not first or second:
            raise StorageError(f"{self.url} cannot create objects exclusively: a second create of the "
                               "same key succeeded (the server ignores conditional writes)")
        _EXCLUSIVE_OK.add(self.url)


_EXCLUSIVE_OK: set[str] = set()  # URLs whose exclusive create was proven in this process

# Filesystem class → (distribution, first release whose conditional create is correct).
_EXCLUSIVE_SUPPORT = {
    "S3FileSystem": ("s3fs", (2025, 7, 0)),  # If-None-Match on put since 2024.12, small files fixed in 2025.7
    "GCSFileSystem": ("gcsfs", (2024, 12, 0)),  # ifGenerationMatch=0
    "AzureBlobFileSystem": ("adlfs", (2024, 12, 0)),  # upload_blob(overwrite=False)
}


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:3]:
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def _exclusive_floor(fs: Any) -> str:
    """Why ``fs`` cannot create exclusively (``""`` when it can)."""
    from importlib import metadata

    name = type(fs).__name__
    need = _EXCLUSIVE_SUPPORT.get(name)
    if need is None:
        return (f"{name} has no conditional create; use a local path, s3:// (s3fs>=2025.7), gs:// "
                "(gcsfs>=2024.12) or abfs:// (adlfs>=2024.12)")
    dist, floor = need
    try:
        have = metadata.version(dist)
    except metadata.PackageNotFoundError:
        have = "0"
    if _version_tuple(have) < floor:
        return f"need {dist}>={'.'.join(map(str, floor))}, found {have}"
    return ""


def parquet_from_bytes(data: bytes, equals: tuple[str, str] | None = None) -> pa.Table:
    """A Parquet object's rows, read synchronously (only the rows whose ``equals[0]`` column is
    ``equals[1]``, from the row groups whose statistics can hold them, when given).

    ``ParquetFile`` reads synchronously; ``pq.read_table`` scans through a dataset whose read-ahead
    threads can outlive the call, and one still holding this Python buffer when the interpreter
    exits takes the GIL there and aborts the process (SIGABRT, exit 134).
    """
    with pq.ParquetFile(pa.BufferReader(data)) as f:
        if equals is None:
            return f.read(use_threads=False)
        name, value = equals
        col = f.schema_arrow.get_field_index(name)
        groups = []
        for i in range(f.metadata.num_row_groups):
            stats = f.metadata.row_group(i).column(col).statistics
            if stats is None or not stats.has_min_max or stats.min <= value <= stats.max:
                groups.append(i)
        table = f.read_row_groups(groups, use_threads=False) if groups else f.schema_arrow.empty_table()
    return table.filter(pc.equal(table.column(name), value))


def process_identity() -> dict[str, Any]:
    """Who this process is (machine, PID, start time), to tell later whether it still runs."""
    return {"machine": _machine(), "pid": os.getpid(), "start": _process_start(os.getpid())}


def process_gone(identity: Any) -> bool:
    """Whether the process of :func:`process_identity` ran on this machine and no longer runs.

    ``False`` when that cannot be told (another machine, no identity): such a process counts as alive.
    """
    machine = _machine()
    if not machine or not isinstance(identity, dict) or identity.get("machine") != machine:
        return False
    pid = identity.get("pid")
    return isinstance(pid, int) and pid > 0 and _process_start(pid) != identity.get("start")


def _machine() -> str:
    """This machine and PID namespace (``""`` where that cannot be told: then no PID is trusted)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        pidns = os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""
    return f"{socket.gethostname()}|{boot}|{pidns}"


def _process_start(pid: int) -> str | None:
    """The start time (clock ticks since boot) of a live process; ``None`` if gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return None
    return None if not fields or fields[0] in ("Z", "X") else fields[19]
