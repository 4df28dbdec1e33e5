"""Soak: the real command line, run back to back, exits 0 every time.

A nightly job must exit 0 when its work succeeded. ``train`` once ended with SIGABRT (exit 134) after
a good summary in about 1 run of 10: a pyarrow read-ahead thread of an unclosed scan took the GIL
while the interpreter exited. This runs the console entry point 30 times (20 partitions, a feature
named ``trip distance``, ``--force``), two at a time, each joining the session's Ray so that a run
costs seconds, and checks every exit code and every summary.
"""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from manymodels.synth import make_transit, write_transit

pytestmark = [pytest.mark.ray, pytest.mark.soak]

RUNS = 30
LANES = 2  # runs at once (each on its own registry)
STATIONS = 20

JOB_TOML = """\
[job]
name = "soak"

[data]
source = "{data}"
partition_by = ["station"]
target = "delay_min"
time_column = "ts"
features = ["trip distance", "temp_c", "line"]

[model]
objective = "regression"
params = {{ num_leaves = 7, n_estimators = 5, min_data_in_leaf = 5 }}

[validation]
min_rows = 20

[resources]
num_cpus = 1
"""


@pytest.fixture(scope="module")
def soak_job(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 stations × 48 hours in Hive folders, with a feature whose name holds a space."""
    root = tmp_path_factory.mktemp("soak")
    frame = make_transit(STATIONS, 48).rename(columns={"wind_kph": "trip distance"})
    write_transit(frame, str(root / "data"), layout="hive")
    job = root / "job.toml"
    job.write_text(JOB_TOML.format(data=root / "data"))
    return job


EXIT_RUNS = 60

# The storage module on its own (it imports no other part of manymodels): the package's heavy imports
# (Ray, LightGBM) happen to shrink the race at exit, which hides it; the CLI still met it.
READ_THEN_EXIT = """\
import importlib.util
import sys

spec = importlib.util.spec_from_file_location("storage_alone", sys.argv[1])
storage = importlib.util.module_from_spec(spec)
spec.loader.exec_module(storage)
store = storage.Store(sys.argv[2])
for _ in range(3):
    store.read_parquet("table.parquet")
"""


def test_reading_parquet_objects_then_exiting_never_aborts(tmp_path: Path) -> None:
    """What every driver does last (the end-of-run compaction reads the registry's Parquet objects)
    and then exit: 60 processes, every one exits 0. Reading them with ``pq.read_table`` over an
    in-memory buffer aborted about 18 of 40 such processes (a read-ahead thread took the GIL while
    the interpreter exited: SIGABRT, exit 134)."""
    import numpy as np
    import pyarrow as pa

    import manymodels.storage
    from manymodels.storage import Store

    Store(str(tmp_path)).write_parquet("table.parquet", pa.table(
        {"a": np.arange(200_000), "b": np.linspace(0, 1, 200_000)}), row_group_size=10_000)
    script = tmp_path / "read_then_exit.py"
    script.write_text(READ_THEN_EXIT)

    def once(_: int) -> tuple[int, str]:
        proc = subprocess.run([sys.executable, str(script), manymodels.storage.__file__, str(tmp_path)],
                              capture_output=True, text=True, timeout=60, check=False)
        return proc.returncode, proc.stderr[-1000:]

    with ThreadPoolExecutor(LANES) as pool:
        results = list(pool.map(once, range(EXIT_RUNS)))
    bad = [r for r in results if r[0] != 0]
    assert bad == [], f"{len(bad)} of {EXIT_RUNS} processes did not exit 0: {bad[:2]}"


@pytest.mark.usefixtures("ray_session")
def test_cli_train_exits_0_every_time(soak_job: Path, clean_env: dict[str, str]) -> None:
    import ray

    address = ray.get_runtime_context().gcs_address
    cli = [sys.executable, "-c", "from manymodels.cli import main; main()"]

    def lane(n: int) -> list[tuple[int, str, str]]:
        registry = soak_job.parent / f"registry-{n}"
        out = []
        for _ in range(RUNS // LANES):
            proc = subprocess.run([*cli, "train", "--job", str(soak_job), "--registry", str(registry),
                                   "--address", address, "--force", "--json"],
                                  cwd=soak_job.parent, env=clean_env, capture_output=True, text=True,
                                  timeout=120, check=False)
            out.append((proc.returncode, proc.stdout, proc.stderr))
        return out

    with ThreadPoolExecutor(LANES) as pool:
        results = [r for lane_results in pool.map(lane, range(LANES)) for r in lane_results]
    assert len(results) == RUNS
    bad = [(rc, err[-2000:]) for rc, _, err in results if rc != 0]
    assert bad == [], f"{len(bad)} of {RUNS} runs did not exit 0: {bad[:2]}"
    for _, stdout, stderr in results:
        assert "terminate called" not in stderr and "Aborted" not in stderr, stderr[-2000:]
        summary = json.loads(stdout)
        assert summary["status"] == "succeeded"
        assert summary["partitions"]["trained"] == STATIONS and summary["partitions"]["failed"] == 0
