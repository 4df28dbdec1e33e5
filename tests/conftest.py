"""Shared fixtures: one local Ray for the whole session, a small synthetic transit dataset, job specs."""

from __future__ import annotations

import copy
import os
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


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """One local Ray instance (2 CPUs) shared by every test that trains; shut down at the end."""
    import ray

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        mp.delenv("RAY_ADDRESS", raising=False)  # never join a stray cluster from the tests
        if ray.is_initialized():  # pragma: no cover - a leftover from an aborted test
            ray.shutdown()
        ray.init(address="local", num_cpus=2, include_dashboard=False,
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
