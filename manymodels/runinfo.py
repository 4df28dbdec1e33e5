"""Run identity and environment facts stored with every run record and model version."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import platform
import secrets
import sys

__all__ = ["environment", "new_run_id", "utc_now"]

_PACKAGES = ("manymodels", "lightgbm", "ray", "pandas", "pyarrow", "numpy", "fsspec")


def utc_now() -> dt.datetime:
    """The current time, timezone-aware UTC."""
    return dt.datetime.now(dt.UTC)


def new_run_id(kind: str) -> str:
    """A sortable, unique run id such as ``20261128T013012Z-train-3f9a1c``."""
    return f"{utc_now():%Y%m%dT%H%M%SZ}-{kind}-{secrets.token_hex(3)}"


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
