"""The peer benchmark (benchmarks/peers.py) runs end to end at a tiny size and compares like with like."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from manymodels.pipeline import lgb_params
from manymodels.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
PEERS = ROOT / "benchmarks" / "peers.py"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _run(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    out = tmp_path / "peers.json"
    proc = subprocess.run([sys.executable, str(PEERS), *args, "--workdir", str(tmp_path), "--out", str(out)],
                          capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result: dict[str, Any] = json.loads(out.read_text())
    return proc, result


def test_peers_trains_the_same_models_with_every_method(tmp_path: Path) -> None:
    # Skewed sizes: holdouts of 4 rows and more, where a rounding rule that differs would show.
    proc, result = _run(tmp_path, "--shape", "skewed", "--n", "20", "--rows", "30", "--max-rows", "90")
    assert [r["method"] for r in result["results"]] == ["serial", "procpool", "ray_batch", "manymodels"]
    data = result["data"]
    assert data["partitions"] == 20 and 20 <= data["rows_min"] < data["rows_max"] <= 90
    assert result["same_mean_mae"] is True
    assert len({round(r["mean_mae"], 4) for r in result["results"]}) == 1
    for r in result["results"]:
        assert r["models"] == 20, r
        assert r["wall_s"] > 0 and r["driver_peak_mb"] > 0 and r["ratio_to_serial"] > 0
    mm = result["results"][-1]
    assert mm["failed"] == 0
    assert set(mm["phases_s"]) >= {"import", "before_ray", "ray_start", "tasks", "ray_shutdown", "after",
                                   "to_first_partition", "partitions_span", "after_last_partition"}
    assert mm["partition_work_s"] > 0 and mm["mean_concurrency"] > 0
    # The hand-written peers pass LightGBM exactly what manymodels passes for this job.
    spec = load_spec(ROOT / "benchmarks" / "peers.toml")
    assert result["loop_params"] == mm["lgb_params"] == lgb_params(spec, 1)
    assert "| manymodels |" in proc.stdout


def test_peers_uniform_shape_a_subset_of_methods_and_repeats(tmp_path: Path) -> None:
    _, result = _run(tmp_path, "--n", "6", "--rows", "40", "--methods", "serial", "--repeats", "2")
    assert [(r["method"], r["repeat"]) for r in result["results"]] == [("serial", 0), ("serial", 1)]
    assert result["data"] == {"partitions": 6, "total_rows": 240, "rows_min": 40, "rows_median": 40.0,
                              "rows_p90": 40.0, "rows_p99": 40.0, "rows_max": 40}
    assert all(r["models"] == 6 and r["ratio_to_serial"] == 1.0 for r in result["results"])
    assert result["median_ratio_to_serial"] == {"serial": 1.0}


def test_peers_rejects_an_unknown_method(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(PEERS), "--methods", "serial,dask", "--workdir",
                           str(tmp_path)], capture_output=True, text=True, env=_env(), timeout=60,
                          check=False)
    assert proc.returncode == 2
    assert "unknown method 'dask'" in proc.stderr
    assert not (tmp_path / "peers-data").exists()
