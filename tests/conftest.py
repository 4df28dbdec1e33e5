"""Shared fixtures: one local Ray for the whole session, a local S3 server, a small synthetic transit
dataset, job specs."""

from __future__ import annotations

import copy
import importlib.util
import os
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from manymodels.spec import JobSpec, spec_from_dict
from manymodels.synth import make_transit, write_transit

ROOT = Path(__file__).resolve().parents[1]
TRANSIT_TOML = ROOT / "jobs" / "transit.toml"
N_STATIONS = 12
HOURS = 24 * 7

SpecFactory = Callable[..., JobSpec]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str | None]:
    """An S3-compatible server (moto) on 127.0.0.1 for the whole session, its URL in the environment.

    Sets ``AWS_ENDPOINT_URL`` (honoured by botocore, hence s3fs, and by pyarrow's own S3) and dummy
    credentials, so plain ``s3://bucket/...`` URLs reach it with no manymodels-specific setting.
    The server is a subprocess, not moto's in-process thread: it shares neither the GIL nor pytest's
    warnings-as-errors filter with the tests. ``None`` (tests using it skip) when moto or s3fs is not
    installed.
    """
    if importlib.util.find_spec("moto") is None or importlib.util.find_spec("s3fs") is None:
        yield None
        return
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start on {url}") from None
                time.sleep(0.1)
        with pytest.MonkeyPatch.context() as mp:
            for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
                mp.delenv(name, raising=False)
            mp.setenv("AWS_ENDPOINT_URL", url)
            mp.setenv("AWS_ACCESS_KEY_ID", "testing")
            mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
            mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
            yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def ray_session(s3_endpoint: str | None) -> Iterator[None]:
    """One local Ray instance (2 CPUs, 1 logical GPU) shared by every test that trains; shut down at the end.

    It depends on ``s3_endpoint`` only for ordering: Ray's worker processes take their environment
    from the driver's at ``ray.init``, so the S3 endpoint and credentials must be in ``os.environ``
    before Ray starts (a later ``setenv`` never reaches the workers that read and write ``s3://``).
    """
    import ray

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        mp.delenv("RAY_ADDRESS", raising=False)  # never join a stray cluster from the tests
        if ray.is_initialized():  # pragma: no cover - a leftover from an aborted test
            ray.shutdown()
        ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False,
                 object_store_memory=200 * 1024 * 1024)
        try:
            yield
        finally:
            ray.shutdown()


@pytest.fixture(scope="session")
def transit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 stations × 7 days of hourly rows, Hive layout (``station=<id>/part-0.parquet``). Read-only:
    tests that change data copy it first."""
    root = tmp_path_factory.mktemp("transit")
    write_transit(make_transit(N_STATIONS, HOURS), str(root), layout="hive")
    return root


def transit_table() -> dict[str, Any]:
    """The demo job spec as a dict, with its prepare function's path made absolute."""
    table = tomllib.loads(TRANSIT_TOML.read_text())
    table["pipeline"]["prepare"] = f"{ROOT / 'jobs' / 'transit.py'}:prepare"
    return table


@pytest.fixture(scope="session")
def make_spec() -> SpecFactory:
    """``make_spec(source, registry, section={key: value}, ...)``: the demo spec with changed keys."""

    def build(source: str | Path, registry: str | Path, /, **sections: dict[str, Any]) -> JobSpec:
        table = copy.deepcopy(transit_table())
        for section, values in sections.items():
            table.setdefault(section, {}).update(values)
        return spec_from_dict(table, path=str(TRANSIT_TOML), data=str(source), registry=str(registry))

    return build


@pytest.fixture
def transit_spec(make_spec: SpecFactory, transit_dir: Path, tmp_path: Path) -> JobSpec:
    """The demo job on the session's transit data, with a fresh registry under ``tmp_path``."""
    return make_spec(transit_dir, tmp_path / "registry")


@pytest.fixture
def clean_env() -> dict[str, str]:
    """The environment for a subprocess: no inherited Ray address, no usage stats."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env
