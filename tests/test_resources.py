"""Resources and cost end to end: logical GPUs, the GPU fallback, per-partition overrides, cost
accounting, the budget guard and ``runs show`` (the session's Ray has 2 CPUs and 1 logical GPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from itertools import combinations
from pathlib import Path
from typing import Any

import fsspec
import pandas as pd
import pytest
from typer.testing import CliRunner

import manymodels
from manymodels import Registry, RunSummary
from manymodels.cli import app
from manymodels.cost import within_budget
from manymodels.data import key_label, open_source, plan_partitions
from manymodels.engine import Engine, TaskResources
from manymodels.pipeline import lgb_params
from manymodels.registry import encode_partition
from manymodels.spec import JobSpec, SpecError, load_spec, spec_from_dict
from manymodels.synth import make_transit, write_transit
from manymodels.train import pack_plan

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]
JOB = "transit-delays"
CPU_RATE, GPU_RATE = 0.048, 2.5
SLOW_S = 0.3
runner = CliRunner()
GpuRun = tuple[JobSpec, RunSummary, dict[str, Any], pd.DataFrame]

SLOW_PREPARE = f"""

import time as _time


def slow_prepare(df):
    _time.sleep({SLOW_S})
    return prepare(df)
"""


def run_cli(*args: Any) -> Any:
    return runner.invoke(app, [str(a) for a in args])


def write_job(tmp_path: Path, data: Path, *replacements: tuple[str, str], name: str = "job.toml") -> Path:
    """The demo job spec as a TOML file (absolute paths), with ``(old, new)`` text replacements."""
    text = (ROOT / "jobs" / "transit.toml").read_text()
    for old, new in (('source = "partitions/transit"', f'source = "{data}"'),
                     ('prepare = "jobs/transit.py:prepare"', f'prepare = "{ROOT}/jobs/transit.py:prepare"'),
                     ('registry = "registry"', f'registry = "{tmp_path / "registry"}"'), *replacements):
        assert old in text, old
        text = text.replace(old, new, 1)
    path = tmp_path / name
    path.write_text(text)
    return path


def run_record(registry: str | Path, run_id: str) -> tuple[dict[str, Any], pd.DataFrame]:
    record, parts = Registry(str(registry)).run(run_id)
    assert parts is not None
    return record, parts


def stations(parts: pd.DataFrame) -> list[str]:
    return [json.loads(p)["station"] for p in parts["partition"]]


def overlapping(parts: pd.DataFrame, tolerance_s: float = 0.01) -> list[tuple[int, int]]:
    """Pairs of rows whose ``[started_s, started_s + wall_s]`` intervals overlap (by more than
    ``tolerance_s``: ``started_s`` is wall-clock time, ``wall_s`` a monotonic clock's difference)."""
    iv = [(r.started_s, r.started_s + r.wall_s) for r in parts.itertuples()]
    return [(a, b) for a, b in combinations(range(len(iv)), 2)
            if min(iv[a][1], iv[b][1]) - max(iv[a][0], iv[b][0]) > tolerance_s]


def task_of(spec: JobSpec, slots: int = 2) -> dict[str, int]:
    """Partition (as the run record encodes it) → index of the task ``train`` packs it into."""
    plan = plan_partitions(open_source(spec.data.source, spec.data.format), spec.data.partition_by, None)
    return {encode_partition(plan.keys, plan.partitions[i].key): n
            for n, (_, idx, _) in enumerate(pack_plan(plan, spec, slots)) for i in idx}


def assert_accounting(summary: RunSummary, record: dict[str, Any], parts: pd.DataFrame,
                      cpu_rate: float, gpu_rate: float) -> None:
    cost = record["cost"]
    assert cost == summary.cost.to_dict()
    assert {"total_usd", "attributed_usd", "overhead_usd", "cpu_seconds", "gpu_seconds"} <= set(cost)
    assert parts["cost_usd"].sum() == pytest.approx(cost["attributed_usd"], abs=1e-9)
    assert cost["overhead_usd"] == pytest.approx(cost["total_usd"] - cost["attributed_usd"], abs=2e-9)
    expected = cost["cpu_seconds"] * cpu_rate / 3600 + cost["gpu_seconds"] * gpu_rate / 3600
    assert cost["total_usd"] == pytest.approx(expected, abs=2e-9)
    for r in parts.itertuples():  # each partition: what it reserved × its wall time × the rates
        assert r.cpu_seconds == pytest.approx(r.num_cpus * r.wall_s, rel=1e-12)
        assert r.gpu_seconds == pytest.approx(r.num_gpus * r.wall_s, rel=1e-12)
        assert r.cost_usd == pytest.approx((r.cpu_seconds * cpu_rate + r.gpu_seconds * gpu_rate) / 3600,
                                           rel=1e-12, abs=1e-15)


@pytest.fixture(scope="module")
def data16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 stations × 14 days (5,376 rows): four packed tasks of ≤ 2,000 rows."""
    root = tmp_path_factory.mktemp("res16")
    write_transit(make_transit(16, 24 * 14), str(root), layout="hive")
    return root


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("small") / "small.parquet"
    make_transit(4, 24 * 5).to_parquet(path, index=False)
    return path


@pytest.fixture(scope="module")
def slow_prepare(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The demo's prepare, sleeping first: partitions of concurrent tasks overlap measurably."""
    path = tmp_path_factory.mktemp("prepare") / "slow.py"
    path.write_text((ROOT / "jobs" / "transit.py").read_text() + SLOW_PREPARE)
    return f"{path}:slow_prepare"


def _gpu_run(make_spec: Any, data: Path, prepare: str, registry: Path, num_gpus: float
             ) -> GpuRun:
    spec = make_spec(data, registry, resources={"num_cpus": 1, "num_gpus": num_gpus},
                     model={"device": "cpu"}, pipeline={"prepare": prepare},
                     cost={"cpu_hour_usd": CPU_RATE, "gpu_hour_usd": GPU_RATE})
    summary = manymodels.train(spec)
    return spec, summary, *run_record(registry, summary.run_id)


@pytest.fixture(scope="module")
def half_gpu(ray_session: None, make_spec: Any, data16: Path, slow_prepare: str,
             tmp_path_factory: pytest.TempPathFactory) -> GpuRun:
    """``num_gpus = 0.5``, LightGBM on the CPU: two tasks share the one logical GPU."""
    return _gpu_run(make_spec, data16, slow_prepare, tmp_path_factory.mktemp("half") / "registry", 0.5)


# 1. Logical GPUs ---------------------------------------------------------------------------------

def test_half_gpu_tasks_run_two_at_once(half_gpu: GpuRun) -> None:
    spec, s, record, parts = half_gpu
    assert (s.status, s.total, s.trained, s.failed) == ("succeeded", 16, 16, 0)
    assert record["device"] == "cpu"
    assert set(parts["device"]) == {"cpu"} and set(parts["status"]) == {"trained"}
    assert set(parts["num_gpus"]) == {0.5} and set(parts["num_cpus"]) == {1.0}
    tasks = task_of(spec)
    assert len(set(tasks.values())) >= 2
    # Partitions of one task run one after the other; an overlap is two tasks on the one GPU at once.
    pairs = overlapping(parts)
    assert pairs, parts[["partition", "started_s", "wall_s"]]
    parts_p = list(parts["partition"])
    assert all(tasks[parts_p[a]] != tasks[parts_p[b]] for a, b in pairs), parts
    assert (parts["wall_s"] >= SLOW_S).all()


def test_half_gpu_seconds_and_dollars(half_gpu: GpuRun) -> None:
    _, s, record, parts = half_gpu
    for r in parts.itertuples():
        assert r.gpu_seconds == pytest.approx(0.5 * r.wall_s, rel=1e-12) and r.gpu_seconds > 0
        assert r.cost_usd == pytest.approx((r.wall_s * CPU_RATE + 0.5 * r.wall_s * GPU_RATE) / 3600,
                                           rel=1e-12)
    cost = record["cost"]
    # The session's Ray is not the run's own, so the job held what its tasks reserved while they ran:
    # at least its partitions' GPU-seconds, at most the one logical GPU for the whole wall time.
    assert parts["gpu_seconds"].sum() - 1e-6 <= cost["gpu_seconds"] <= 1.0 * cost["wall_s"] + 1e-6
    assert cost["gpu_seconds"] >= 0.5 * SLOW_S * 16
    assert_accounting(s, record, parts, CPU_RATE, GPU_RATE)


def test_one_gpu_tasks_never_overlap(ray_session: None, make_spec: Any, data16: Path, slow_prepare: str,
                                     tmp_path: Path) -> None:
    spec, s, record, parts = _gpu_run(make_spec, data16, slow_prepare, tmp_path / "registry", 1)
    assert (s.status, s.trained) == ("succeeded", 16)
    assert len(set(task_of(spec).values())) >= 2
    assert overlapping(parts) == [], parts[["partition", "started_s", "wall_s"]]
    assert set(parts["num_gpus"]) == {1.0}
    for r in parts.itertuples():
        assert r.gpu_seconds == pytest.approx(r.wall_s, rel=1e-12)
    assert record["cost"]["gpu_seconds"] <= record["cost"]["wall_s"] + 1e-6
    assert_accounting(s, record, parts, CPU_RATE, GPU_RATE)


EMBEDDED = """
import functools, importlib, json, sys
import manymodels
from manymodels import Registry
from manymodels.engine import Engine
from manymodels.spec import spec_from_dict

train_module = importlib.import_module("manymodels.train")
data, registry, cpu_rate, gpu_rate = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
out = {}
for gpus, resources, model in ((1, {"num_gpus": 0.5}, {"device": "cpu"}),
                               (0, {"num_gpus": 1}, {"gpu_fallback": "cpu"})):
    # The run's own embedded Ray, with this many logical GPUs.
    train_module.Engine = functools.partial(Engine, num_gpus=gpus)
    spec = spec_from_dict({"resources": resources, "model": model,
                           "cost": {"cpu_hour_usd": cpu_rate, "gpu_hour_usd": gpu_rate}},
                          data=data, partition_by=["station"], target="delay_min",
                          registry=f"{registry}/{gpus}")
    s = manymodels.train(spec, num_cpus=2)
    record, parts = Registry(spec.output.registry).run(s.run_id)
    out[gpus] = {"summary": s.to_dict(), "device": record["device"],
                 "parts": parts[["status", "device", "num_gpus", "gpu_seconds", "wall_s"]].to_dict("records")}
print(json.dumps(out))
"""


def test_embedded_ray_holds_its_gpus_and_falls_back_without_any(small_data: Path, tmp_path: Path,
                                                                 clean_env: dict[str, str]) -> None:
    """A run's own Ray: the job is charged for the logical GPU it held × its wall time; and with
    ``gpu_fallback = "cpu"`` on an instance without GPUs it trains instead of waiting forever."""
    proc = subprocess.run([sys.executable, "-c", EMBEDDED, str(small_data), str(tmp_path / "reg"),
                           str(CPU_RATE), str(GPU_RATE)],
                          env=clean_env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    held = out["1"]
    cost = held["summary"]["cost"]
    assert held["summary"]["status"] == "succeeded" and held["device"] == "cpu"
    assert cost["gpu_seconds"] == pytest.approx(1.0 * cost["wall_s"], abs=1e-8)
    assert cost["cpu_seconds"] == pytest.approx(2.0 * cost["wall_s"], abs=1e-8)
    assert cost["total_usd"] == pytest.approx(
        (cost["cpu_seconds"] * CPU_RATE + cost["gpu_seconds"] * GPU_RATE) / 3600, abs=2e-9)
    assert cost["overhead_usd"] > 0
    for r in held["parts"]:
        assert r["num_gpus"] == 0.5 and r["gpu_seconds"] == pytest.approx(0.5 * r["wall_s"], rel=1e-12)
    none = out["0"]
    assert none["summary"]["status"] == "succeeded"
    assert none["summary"]["partitions"]["trained"] == 4
    assert none["device"].startswith("cpu (fallback") and "no GPU reserved" in none["device"]
    assert {(r["device"], r["num_gpus"], r["gpu_seconds"]) for r in none["parts"]} == {("cpu", 0.0, 0.0)}
    assert none["summary"]["cost"]["gpu_seconds"] == 0.0


@pytest.mark.usefixtures("ray_session")
def test_embedded_engine_fails_tasks_it_can_never_run() -> None:
    """Not the session's instance: an embedded one fails an unschedulable task instead of hanging."""
    engine = Engine()
    engine._started = True  # as if it had started its own instance: the session's stands in for it
    try:
        results = [item for item in engine.map(
            key_label, [["a"], ["b"], ["c"]], shared=("x",), wait_s=0.05,
            resources=[TaskResources(), TaskResources(num_gpus=2), TaskResources(num_cpus=3)])
            if item is not None]
    finally:
        engine._started = False
    by_index = {i: r for i, r, _, _ in results}
    assert sorted(by_index) == [0, 1, 2] and by_index[0] == "a=x"
    assert "needs 2 GPU but the local Ray instance has 1" in str(by_index[1])
    assert "needs 3 CPU but the local Ray instance has 2" in str(by_index[2])


# 2. The two-line TOML change ---------------------------------------------------------------------

GPU_LINES = (("[resources]\nnum_cpus = 1", "[resources]\nnum_cpus = 1\nnum_gpus = 1"),
             ('[model]\nobjective = "regression"', '[model]\ngpu_fallback = "cpu"\nobjective = "regression"'))


@pytest.mark.usefixtures("ray_session")
def test_gpu_spec_with_cpu_fallback_trains(small_data: Path, tmp_path: Path) -> None:
    job = write_job(tmp_path, small_data, *GPU_LINES)
    spec = load_spec(job)
    assert (spec.resources.num_gpus, spec.model.gpu_fallback) == (1, "cpu")
    result = run_cli("train", "--job", job, "--json")
    assert result.exit_code == 0, (result.stdout, result.stderr)
    summary = json.loads(result.stdout)
    assert summary["status"] == "succeeded" and summary["partitions"]["trained"] == 4
    record, parts = run_record(tmp_path / "registry", summary["run_id"])
    assert record["device"].startswith("cpu (fallback: LightGBM cannot use device 'gpu'"), record["device"]
    assert "no GPU reserved" not in record["device"]  # the session's Ray has a logical GPU to reserve
    assert set(parts["device"]) == {"cpu"} and set(parts["num_gpus"]) == {1.0}
    assert (parts["gpu_seconds"] > 0).all()
    assert summary["cost"]["gpu_seconds"] > 0


def test_gpu_spec_without_fallback_fails_up_front(small_data: Path, tmp_path: Path) -> None:
    job = write_job(tmp_path, small_data, GPU_LINES[0])
    registry = tmp_path / "registry"
    with pytest.raises(SpecError, match="gpu_fallback"):
        manymodels.train(job)
    result = run_cli("train", "--job", job, "--json")
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert result.stdout == ""
    err = result.stderr.strip()
    assert err.startswith("error:") and "\n" not in err, err
    assert "device 'gpu'" in err and 'gpu_fallback = "cpu"' in err and str(job) in err
    assert not registry.exists()


# 3. Overrides ------------------------------------------------------------------------------------

OVERRIDE = '\n[[resources.override]]\nmatch = { station = "stn-00001" }\nnum_cpus = 2\n'


@pytest.mark.usefixtures("ray_session")
def test_override_gives_one_partition_two_cpus(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_transit(make_transit(6, 24 * 7), str(data), layout="hive")
    job = write_job(tmp_path, data, ("[resources]\nnum_cpus = 1\n", "[resources]\nnum_cpus = 1\n" + OVERRIDE))
    spec = load_spec(job)
    plan = plan_partitions(open_source(spec.data.source, spec.data.format), spec.data.partition_by, None)
    chunks = pack_plan(plan, spec, 2)
    special = [i for i, p in enumerate(plan.partitions) if p.key == ("stn-00001",)]
    assert len(special) == 1
    mine = [(res, idx) for res, idx, _ in chunks if special[0] in idx]
    assert mine == [(TaskResources(num_cpus=2, num_gpus=0, memory_mb=0), special)]  # never shares a task
    assert {res.num_cpus for res, idx, _ in chunks if special[0] not in idx} == {1}
    assert any(len(idx) > 1 for _, idx, _ in chunks)  # the others do share tasks
    assert lgb_params(spec, 2)["num_threads"] == 2 and lgb_params(spec, 1)["num_threads"] == 1

    s = manymodels.train(spec)
    assert (s.status, s.trained) == ("succeeded", 6)
    record, parts = run_record(tmp_path / "registry", s.run_id)
    by_station = dict(zip(stations(parts), parts.itertuples(), strict=True))
    row = by_station.pop("stn-00001")
    assert row.num_cpus == 2
    assert row.cpu_seconds == pytest.approx(2 * row.wall_s, rel=1e-12)
    assert row.cost_usd == pytest.approx(2 * row.wall_s * CPU_RATE / 3600, rel=1e-12)
    assert {r.num_cpus for r in by_station.values()} == {1.0}
    assert_accounting(s, record, parts, CPU_RATE, 0.0)
    # LightGBM used as many threads as the task reserved CPUs (its text model keeps its parameters).
    reg = Registry(spec.output.registry)
    for station, threads in (("stn-00001", 2), ("stn-00000", 1)):
        with fsspec.open(reg.get(JOB, {"station": station}).model_uri, "r") as f:
            assert f"[num_threads: {threads}]" in f.read()


# 4. Accounting -----------------------------------------------------------------------------------

def test_rates_default_to_zero(ray_session: None, small_data: Path, tmp_path: Path) -> None:
    spec = spec_from_dict({}, data=str(small_data), partition_by=["station"], target="delay_min",
                          registry=str(tmp_path / "registry"))
    assert (spec.cost.cpu_hour_usd, spec.cost.gpu_hour_usd, spec.cost.memory_gb_hour_usd) == (0, 0, 0)
    assert spec.cost.max_usd is None
    result = run_cli("train", "--data", small_data, "--partition-by", "station", "--target", "delay_min",
                     "--registry", tmp_path / "registry", "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    record, parts = run_record(tmp_path / "registry", summary["run_id"])
    cost = record["cost"]
    assert cost["cpu_seconds"] > 0
    assert cost["total_usd"] == cost["attributed_usd"] == cost["overhead_usd"] == 0.0
    assert (parts["cost_usd"] == 0).all() and (parts["cpu_seconds"] > 0).all()


# 5. Budget guard ---------------------------------------------------------------------------------

def test_within_budget() -> None:
    assert within_budget(1e9, 1, 10, None)  # no budget
    assert within_budget(0.0, 0, 10, 0.0)  # the first wave always starts
    assert within_budget(0.5, 0, 10, 1.0) and not within_budget(1.5, 0, 10, 1.0)
    assert within_budget(1.0, 2, 4, 2.0)  # projected 1.0 × 4 / 2 = 2.0: exactly the budget
    assert not within_budget(1.0, 2, 4, 1.99)
    assert within_budget(3.0, 10, 10, 3.0) and not within_budget(3.0, 10, 10, 2.999)


@pytest.mark.usefixtures("ray_session")
def test_budget_stops_submitting(tmp_path: Path) -> None:
    data = tmp_path / "big.parquet"
    make_transit(10, 2_100).to_parquet(data, index=False)  # 10 partitions ≥ 2,000 rows: 10 tasks
    job = write_job(tmp_path, data, ("cpu_hour_usd = 0.048", "cpu_hour_usd = 1000\nmax_usd = 1e-9"))
    spec = load_spec(job)
    assert spec.cost.max_usd == 1e-9
    plan = plan_partitions(open_source(spec.data.source, spec.data.format), spec.data.partition_by, None)
    assert len(pack_plan(plan, spec, 2)) == 10

    result = run_cli("train", "--job", job, "--json")
    assert result.exit_code == 1, (result.stdout, result.stderr)
    summary = json.loads(result.stdout)
    counts = summary["partitions"]
    assert summary["status"] == "budget_exceeded"
    assert counts["total"] == 10
    assert counts["trained"] + counts["skipped"] + counts["failed"] == 10
    assert counts["trained"] >= 1 and counts["skipped"] >= 1
    record, parts = run_record(tmp_path / "registry", summary["run_id"])
    assert record["status"] == "budget_exceeded" and len(parts) == 10
    skipped = parts[parts["status"] == "skipped"]
    assert len(skipped) == counts["skipped"] and set(skipped["reason"]) == {"budget"}
    assert (skipped["wall_s"] == 0).all() and (skipped["cost_usd"] == 0).all()
    assert sorted(stations(parts)) == [f"stn-{i:05d}" for i in range(10)]
    assert Registry(str(tmp_path / "registry")).list(JOB) and len(
        Registry(str(tmp_path / "registry")).list(JOB)) == counts["trained"]
    assert summary["cost"]["total_usd"] > 1e-9

    s = manymodels.train(spec, registry=str(tmp_path / "registry2"))
    assert s.status == "budget_exceeded" and s.exit_code == 1
    assert s.trained + s.skipped + s.failed == s.total == 10


# 6. runs show ------------------------------------------------------------------------------------

def test_runs_show_cost_summary_and_top_partitions(half_gpu: GpuRun) -> None:
    spec, s, _, parts = half_gpu
    result = run_cli("runs", "show", s.run_id, "--registry", spec.output.registry)
    assert result.exit_code == 0, result.stderr
    text = result.stdout
    cost_lines = [line for line in text.splitlines() if line.startswith("cost: total $")]
    assert len(cost_lines) == 1 and "attributed $" in cost_lines[0] and "overhead $" in cost_lines[0]
    assert "most expensive partitions" in text
    table = text.split("most expensive partitions", 1)[1]
    shown = [w.strip('"{},') for w in table.split() if w.strip('"{},').startswith("stn-")]
    assert len(shown) == 10 < len(parts)
    top = parts.sort_values("cost_usd", ascending=False, kind="stable")
    assert shown == stations(top)[:10]


def test_runs_show_json(half_gpu: GpuRun) -> None:
    spec, s, _, parts = half_gpu
    result = run_cli("runs", "show", s.run_id, "--registry", spec.output.registry, "--json")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    shown = json.loads(lines[0])
    assert shown["run_id"] == s.run_id and shown["partition_counts"]["total"] == 16
    rows = shown["partitions"]
    assert isinstance(rows, list) and len(rows) == 16
    for r in rows:
        assert {"partition", "status", "rows", "wall_s", "cpu_seconds", "gpu_seconds", "cost_usd"} <= set(r)
        assert isinstance(r["partition"], dict) and r["status"] == "trained"
        assert r["gpu_seconds"] == pytest.approx(0.5 * r["wall_s"], rel=1e-12)
    assert sum(r["cost_usd"] for r in rows) == pytest.approx(shown["cost"]["attributed_usd"], abs=1e-9)
    assert {"total_usd", "attributed_usd", "overhead_usd", "cpu_seconds", "gpu_seconds"} <= set(shown["cost"])
    assert sorted(r["partition"]["station"] for r in rows) == sorted(stations(parts))

