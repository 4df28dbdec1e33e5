"""Cost accounting: a pure fold of measured wall times × declared resources × ``[cost]`` rates.

The engine only measures (per partition wall time; the job's wall time and what it held); this
module turns those numbers into resource-seconds and dollars. A partition is charged for what it
*reserved* (its task's CPUs, GPUs and memory) for as long as it ran; the job is charged for what it
*held* for its whole wall time. The difference is overhead: start-up, scheduling, idle slots.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from manymodels.spec import CostSpec

__all__ = ["Held", "JobCost", "PartitionCost", "hourly_usd", "job_cost", "partition_cost", "within_budget"]


@dataclass(frozen=True)
class Held:
    """Resources a job held for its wall time (embedded Ray: the whole local instance)."""

    cpus: float
    gpus: float = 0.0
    memory_gb: float = 0.0


@dataclass(frozen=True)
class PartitionCost:
    """Reserved resource-seconds and dollars of one partition."""

    cpu_seconds: float
    gpu_seconds: float
    memory_gb_seconds: float
    cost_usd: float


@dataclass(frozen=True)
class JobCost:
    """A job's cost: what it held, what its partitions used, and the rest."""

    wall_s: float
    cpu_seconds: float
    gpu_seconds: float
    memory_gb_seconds: float
    total_usd: float
    attributed_usd: float
    overhead_usd: float
    utilisation: float

    def to_dict(self) -> dict[str, float]:
        """The contract's ``"cost"`` object."""
        return {k: round(v, 9) for k, v in self.__dict__.items()}


def _usd(cpu_s: float, gpu_s: float, mem_gb_s: float, rates: CostSpec) -> float:
    return (cpu_s * rates.cpu_hour_usd + gpu_s * rates.gpu_hour_usd
            + mem_gb_s * rates.memory_gb_hour_usd) / 3600.0


def partition_cost(wall_s: float, num_cpus: float, num_gpus: float, memory_mb: float,
                   rates: CostSpec) -> PartitionCost:
    """What one partition reserved for ``wall_s`` seconds, and its price."""
    cpu_s, gpu_s, mem_s = num_cpus * wall_s, num_gpus * wall_s, memory_mb / 1024.0 * wall_s
    return PartitionCost(cpu_s, gpu_s, mem_s, _usd(cpu_s, gpu_s, mem_s, rates))


def hourly_usd(held: Held, rates: CostSpec) -> float:
    """What holding ``held`` costs per hour."""
    return _usd(held.cpus * 3600.0, held.gpus * 3600.0, held.memory_gb * 3600.0, rates)


def within_budget(spent_usd: float, done: int, total: int, max_usd: float | None) -> bool:
    """Whether the run's projected cost stays within ``max_usd``.

    The projection scales what was spent so far by ``total / done`` work items; before any item is
    done only what was already spent counts (the first wave of work is always allowed to start).
    """
    if max_usd is None:
        return True
    projected = spent_usd * total / done if done else spent_usd
    return projected <= max_usd


def job_cost(wall_s: float, held: Held, partitions: Iterable[PartitionCost], rates: CostSpec) -> JobCost:
    """Fold partition costs into the job's: total (held × wall), attributed (sum), overhead, use."""
    cpu_s, gpu_s, mem_s = held.cpus * wall_s, held.gpus * wall_s, held.memory_gb * wall_s
    total = _usd(cpu_s, gpu_s, mem_s, rates)
    parts = list(partitions)
    attributed = sum(p.cost_usd for p in parts)
    used = sum(p.cpu_seconds for p in parts) + sum(p.gpu_seconds for p in parts)
    capacity = cpu_s + gpu_s
    return JobCost(wall_s=wall_s, cpu_seconds=cpu_s, gpu_seconds=gpu_s, memory_gb_seconds=mem_s,
                   total_usd=total, attributed_usd=attributed, overhead_usd=total - attributed,
                   utilisation=used / capacity if capacity > 0 else 0.0)
