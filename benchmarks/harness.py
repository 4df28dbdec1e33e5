"""Running one benchmark method in a fresh Python process and reading its result line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

__all__ = ["clean_env", "run_child"]


def clean_env() -> dict[str, str]:
    """This environment without ``RAY_ADDRESS``, so every child starts its own embedded Ray."""
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def run_child(cmd: list[str], label: str) -> dict[str, Any]:
    """Run ``cmd``; return the JSON of its ``RESULT {...}`` stdout line, or exit naming ``label``."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), check=False)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not line:
        print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"{label} failed (exit {proc.returncode})")
    result: dict[str, Any] = json.loads(line[0][len("RESULT "):])
    return result
