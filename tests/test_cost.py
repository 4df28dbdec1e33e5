"""Tests of cost accounting (manymodels.cost): exact rates, attribution, overhead, utilisation."""

from __future__ import annotations

import pytest

from manymodels.cost import Held, JobCost, PartitionCost, job_cost, partition_cost
from manymodels.spec import CostSpec

RATES = CostSpec(cpu_hour_usd=0.048, gpu_hour_usd=2.50, memory_gb_hour_usd=0.01)


def test_cpu_rate_exact() -> None:
    c = partition_cost(90.0, num_cpus=2, num_gpus=0, memory_mb=0, rates=CostSpec(cpu_hour_usd=0.048))
    assert c.cpu_seconds == 180.0
    assert c.gpu_seconds == 0.0 and c.memory_gb_seconds == 0.0
    assert c.cost_usd == pytest.approx(0.0024, rel=1e-12)


def test_gpu_rate() -> None:
    c = partition_cost(36.0, num_cpus=1, num_gpus=0.5, memory_mb=0, rates=CostSpec(gpu_hour_usd=2.5))
    assert c.gpu_seconds == 18.0
    assert c.cpu_seconds == 36.0
    assert c.cost_usd == pytest.approx(18.0 * 2.5 / 3600, rel=1e-12)  # CPU rate is 0


def test_memory_rate() -> None:
    c = partition_cost(3600.0, num_cpus=1, num_gpus=0, memory_mb=2048,
                       rates=CostSpec(memory_gb_hour_usd=0.01))
    assert c.memory_gb_seconds == 2 * 3600.0
    assert c.cost_usd == pytest.approx(0.02, rel=1e-12)


def test_all_rates_add_up() -> None:
    c = partition_cost(60.0, num_cpus=4, num_gpus=1, memory_mb=512, rates=RATES)
    expected = (240 * 0.048 + 60 * 2.5 + 0.5 * 60 * 0.01) / 3600
    assert c.cost_usd == pytest.approx(expected, rel=1e-12)
    assert (c.cpu_seconds, c.gpu_seconds, c.memory_gb_seconds) == (240.0, 60.0, 30.0)


def test_job_cost_total_attributed_overhead() -> None:
    parts = [partition_cost(w, num_cpus=2, num_gpus=0, memory_mb=0, rates=RATES) for w in (10.0, 20.0, 30.0)]
    job = job_cost(100.0, Held(cpus=8), parts, RATES)
    assert isinstance(job, JobCost)
    assert job.wall_s == 100.0
    assert job.cpu_seconds == 800.0 and job.gpu_seconds == 0.0
    assert job.total_usd == pytest.approx(800 * 0.048 / 3600, rel=1e-12)
    assert job.attributed_usd == pytest.approx(sum(p.cost_usd for p in parts), rel=1e-12)
    assert job.attributed_usd == pytest.approx(120 * 0.048 / 3600, rel=1e-12)
    assert job.overhead_usd == pytest.approx(job.total_usd - job.attributed_usd, rel=1e-12)
    assert job.overhead_usd > 0
    assert job.utilisation == pytest.approx(120 / 800)


def test_job_cost_with_gpus_and_memory() -> None:
    parts = [partition_cost(50.0, num_cpus=1, num_gpus=1, memory_mb=1024, rates=RATES)]
    job = job_cost(100.0, Held(cpus=4, gpus=2, memory_gb=16), parts, RATES)
    assert (job.cpu_seconds, job.gpu_seconds, job.memory_gb_seconds) == (400.0, 200.0, 1600.0)
    assert job.total_usd == pytest.approx((400 * 0.048 + 200 * 2.5 + 1600 * 0.01) / 3600, rel=1e-12)
    assert job.attributed_usd == pytest.approx(parts[0].cost_usd, rel=1e-12)
    assert job.overhead_usd == pytest.approx(job.total_usd - parts[0].cost_usd, rel=1e-12)
    assert job.utilisation == pytest.approx((50 + 50) / (400 + 200))


def test_job_cost_accepts_a_generator() -> None:
    parts = [partition_cost(5.0, 1, 0, 0, RATES) for _ in range(3)]
    job = job_cost(10.0, Held(cpus=2), (p for p in parts), RATES)
    assert job.attributed_usd == pytest.approx(3 * parts[0].cost_usd, rel=1e-12)


def test_zero_rates_give_zero_dollars() -> None:
    zero = CostSpec()
    p = partition_cost(120.0, num_cpus=4, num_gpus=1, memory_mb=4096, rates=zero)
    assert p.cost_usd == 0.0
    assert p.cpu_seconds == 480.0 and p.gpu_seconds == 120.0  # resource-seconds still measured
    job = job_cost(300.0, Held(cpus=8, gpus=1, memory_gb=32), [p], zero)
    assert (job.total_usd, job.attributed_usd, job.overhead_usd) == (0.0, 0.0, 0.0)
    assert job.cpu_seconds == 2400.0


def test_no_partitions_all_overhead() -> None:
    job = job_cost(60.0, Held(cpus=2), [], RATES)
    assert job.attributed_usd == 0
    assert job.overhead_usd == pytest.approx(job.total_usd) and job.total_usd > 0
    assert job.utilisation == 0.0


def test_zero_capacity_utilisation() -> None:
    job = job_cost(0.0, Held(cpus=0), [PartitionCost(0.0, 0.0, 0.0, 0.0)], RATES)
    assert job.utilisation == 0.0 and job.total_usd == 0.0


def test_to_dict_contract_keys() -> None:
    job = job_cost(100.0, Held(cpus=8), [partition_cost(90.0, 2, 0, 0, CostSpec(cpu_hour_usd=0.048))],
                   CostSpec(cpu_hour_usd=0.048))
    d = job.to_dict()
    for key in ("total_usd", "cpu_seconds", "gpu_seconds", "attributed_usd", "overhead_usd"):
        assert key in d
    assert d["attributed_usd"] == pytest.approx(0.0024)
    assert d["total_usd"] == pytest.approx(800 * 0.048 / 3600)
