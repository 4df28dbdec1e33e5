"""Storage: the one place that turns URLs into fsspec filesystems and bytes into files.

Everything above this module (registry, data access, scoring) speaks in URLs and relative keys; a
:class:`Store` is rooted at a URL (a local directory, ``s3://bucket/prefix``, ...) and offers the few
operations the rest needs: atomic whole-object writes, reads, listing, exclusive creation (for locks)
and deletes. Local writes go through a temporary file and ``os.replace``; object stores publish
whole objects atomically by themselves.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import posixpath
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

__all__ = ["StorageError", "Store", "url_to_fs"]


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
        """Write a whole object so that readers see either the old content or all of the new."""
        path = self.path(key)
        try:
            if self.local:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            else:
                self.fs.pipe_file(path, data)
        except OSError as exc:
            raise self._wrap(exc, key, "write") from exc

    def create_exclusive(self, key: str, data: bytes) -> bool:
        """Create ``key`` only if it does not exist yet; ``False`` when it already does."""
        path = self.path(key)
        try:
            if self.local:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                try:
                    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    return False
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                return True
            try:
                with self.fs.open(path, "xb") as f:
                    f.write(data)
                return True
            except FileExistsError:
                return False
            except (ValueError, NotImplementedError):
                # A filesystem without exclusive create: check-then-write is the best it offers.
                if self.fs.exists(path):
                    return False
                self.fs.pipe_file(path, data)
                return True
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
        """Read one Parquet object written by :meth:`write_parquet`.

        ``ParquetFile.read`` reads synchronously; ``pq.read_table`` scans through a dataset whose
        read-ahead threads can outlive the call, and one still holding this Python buffer when the
        interpreter exits takes the GIL there and aborts the process (SIGABRT, exit 134).
        """
        with pq.ParquetFile(pa.BufferReader(self.read_bytes(key))) as f:
            return f.read()

    def check_writable(self) -> None:
        """Fail early (before any work) when the root cannot be written."""
        key = f".manymodels-probe-{uuid.uuid4().hex[:8]}"
        self.write_bytes(key, b"")
        self.delete(key)

    def _holder_dead(self, key: str) -> bool:
        """Whether the lock object ``key`` was left by a process of this machine that no longer runs.

        Only a holder on this very machine (same host name, boot and PID namespace) can be checked;
        anything else (another machine, an unreadable or foreign lock) counts as alive.
        """
        try:
            holder = json.loads(self.read_bytes(key))
        except (OSError, ValueError):
            return False
        return process_gone(holder)

    @contextmanager
    def lock(self, key: str, *, timeout_s: float = 330.0, stale_s: float = 300.0) -> Iterator[None]:
        """Hold an exclusive lock object ``key`` while the block runs (for short critical sections).

        A lock left behind by a holder that died (a SIGKILLed driver) is broken at once when the
        holder ran on this machine, else once it is older than ``stale_s``; the default
        ``timeout_s`` outlasts ``stale_s`` so that a waiter gets there instead of giving up.
        """
        import time

        deadline = time.monotonic() + timeout_s
        token = json.dumps({**process_identity(), "token": uuid.uuid4().hex}).encode()
        while not self.create_exclusive(key, token):
            try:
                held = self.read_bytes(key)
                if self._holder_dead(key) and self.read_bytes(key) == held:
                    self.delete(key)  # its holder died on this machine
                    continue
                info = self.fs.info(self.path(key))
                mtime = info.get("mtime") or info.get("LastModified")
                age = time.time() - (mtime.timestamp() if hasattr(mtime, "timestamp") else float(mtime or 0))
                if mtime is not None and age > stale_s:
                    self.delete(key)  # its holder died; a lock is only ever held for seconds
                    continue
            except FileNotFoundError:
                continue
            if time.monotonic() > deadline:
                raise StorageError(f"timed out waiting for lock {self.uri(key)}")
            time.sleep(0.05)
        try:
            yield
        finally:
            self.delete(key)


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
