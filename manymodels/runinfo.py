"""Run identity and environment facts stored with every run record and model version."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import os
import platform
import resource
import secrets
import sys

__all__ = ["environment", "new_run_id", "peak_rss_mb", "utc_now"]

_PACKAGES = ("manymodels", "lightgbm", "ray", "pandas", "pyarrow", "numpy", "fsspec")


def utc_now() -> dt.datetime:
    """The current time, timezone-aware UTC."""
    return dt.datetime.now(dt.UTC)


def new_run_id(kind: str) -> str:
    """A sortable, unique run id such as ``20261128T013012Z-train-3f9a1c``."""
    return f"{utc_now():%Y%m%dT%H%M%SZ}-{kind}-{secrets.token_hex(3)}"


def peak_rss_mb() -> float:
    """Peak RSS of this process in MiB: ``VmHWM``, the peak of this address space alone.

    ``ru_maxrss`` is carried over from the parent on Linux (a process started by one that held
    4 GB reports at least 4 GB), so it is only the fallback where ``/proc`` is missing.
    """
    global _STATUS
    try:
        if _STATUS is None or _STATUS[0] != os.getpid():  # a forked child must not read its parent's
            _STATUS = (os.getpid(), os.open("/proc/self/status", os.O_RDONLY))
        data = os.pread(_STATUS[1], 16384, 0)  # read per partition: no open/close each time
        at = data.find(b"VmHWM:")
        if at >= 0:
            return int(data[at + 6:data.index(b"kB", at)]) / 1024.0
    except (OSError, ValueError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


_STATUS: tuple[int, int] | None = None  # (pid, fd of /proc/self/status) of this process


def environment() -> dict[str, str]:
    """Python, platform and package versions of this process."""
    env = {"python": platform.python_version(), "platform": platform.platform(),
           "executable": sys.executable}
    for name in _PACKAGES:
        try:
            env[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            env[name] = "not installed"
    return env
