"""Training a job: plan the partitions, fan them out in packed chunks, register what comes back.

The driver (:func:`train`) validates the spec and the data, plans partitions from the key columns,
packs them into chunks and hands them to the engine. Each chunk runs :func:`train_chunk` on a
worker: it reads only its partitions' rows, trains each one with the pure pipeline, writes each
model straight to the registry and returns small typed outcomes. The driver folds outcomes as they
stream in, commits them to the registry index every few seconds (so a killed run resumes where it
stopped), and writes the run record at the end.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa

from manymodels.cost import Held, JobCost, hourly_usd, job_cost, partition_cost, within_budget
from manymodels.data import (
    InputError,
    Plan,
    Source,
    check_columns,
    check_numeric,
    check_temporal,
    fingerprint_rows,
    normalised_keys,
    open_source,
    plan_partitions,
    read_partitions,
    row_hashes,
    schema_tag,
)
from manymodels.engine import NOT_SUBMITTED, Engine, TaskResources, pack_chunks
from manymodels.pipeline import PartitionError, check_device, load_prepare, resolve_device, train_partition
from manymodels.registry import GLOBAL_PID, NewVersion, Registry, encode_partition, partition_id
from manymodels.runinfo import environment, new_run_id, peak_rss_mb, utc_now
from manymodels.spec import JobSpec, SpecError, load_spec, spec_hash
from manymodels.storage import StorageError, Store, process_identity
from manymodels.trees import COMPACT_SUFFIX, compact

__all__ = ["PartitionOutcome", "RunSummary", "parse_only", "train", "train_chunk"]

COMMIT_EVERY_S = 5.0


@dataclass(frozen=True)
class PlannedPartition:
    """A partition as a worker needs it: key, id, and what the registry already has for it."""

    key: tuple[Any, ...]
    pid: str
    partition: str
    rows: int
    champion_key: str | None
    latest_fingerprint: str | None
    latest_spec_hash: str | None
    files: tuple[int, ...] = ()
    champion_features: tuple[str, ...] | None = None


@dataclass(frozen=True)
class TrainTask:
    """One chunk of partitions for one Ray task."""

    chunk: int
    partitions: tuple[PlannedPartition, ...]
    files: tuple[int, ...]
    resources: TaskResources


@dataclass(frozen=True)
class TrainContext:
    """What every task of a run shares (put in Ray's object store once)."""

    spec: JobSpec
    source: Source
    keys: tuple[str, ...]
    registry_url: str
    run_id: str
    spec_hash: str
    force: bool
    force_cpu: bool = False


@dataclass(frozen=True)
class PartitionOutcome:
    """What happened to one partition in a run (a typed record crossing the process boundary)."""

    pid: str
    partition: str
    status: str  # trained | skipped | failed
    reason: str = ""
    rows: int = 0
    promote: bool = False
    metric_value: float | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)
    fingerprint: str = ""
    model_key: str = ""
    features: tuple[str, ...] = ()
    time_min: str | None = None
    time_max: str | None = None
    trained_at: dt.datetime | None = None
    wall_s: float = 0.0
    cpu_s: float = 0.0
    peak_rss_mb: float = 0.0
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    memory_mb: int = 0
    node: str = ""
    started_s: float = 0.0
    device: str = "cpu"
    comparison: str = ""
    warnings: tuple[str, ...] = ()


@dataclass
class RunSummary:
    """The result of ``manymodels train`` (``to_dict`` is the contract's ``--json`` object)."""

    run_id: str
    job: str
    status: str
    total: int
    trained: int
    promoted: int
    skipped: int
    failed: int
    failures: list[dict[str, Any]]
    cost: JobCost
    registry: str
    wall_s: float
    nodes: list[str] = field(default_factory=list)
    versions: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """0 when the run is within ``run.max_failure_fraction``, else 1."""
        return 0 if self.status == "succeeded" else 1

    def to_dict(self) -> dict[str, Any]:
        """The contract's ``train --json`` object."""
        return {"run_id": self.run_id, "job": self.job, "status": self.status, "kind": "train",
                "partitions": {"total": self.total, "trained": self.trained, "promoted": self.promoted,
                               "skipped": self.skipped, "failed": self.failed},
                "failures": self.failures, "cost": self.cost.to_dict(), "registry": self.registry,
                "wall_s": round(self.wall_s, 3), "nodes": self.nodes, "warnings": self.warnings}


class PartitionTimeout(BaseException):
    """A partition ran longer than ``run.timeout_s``.

    A ``BaseException``, like ``KeyboardInterrupt``, so that ``except Exception`` in user code (or
    in the pipeline's wrapping of it) does not swallow it.
    """


@contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Raise :class:`PartitionTimeout` in the block after ``seconds`` (``None``: no limit).

    Uses ``SIGALRM``, so it interrupts Python code (a user's ``prepare``, LightGBM between boosting
    rounds) in the worker's main thread, where Ray runs tasks; elsewhere it does nothing.
    """
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def _expired(signum: int, frame: Any) -> None:
        raise PartitionTimeout(f"timeout: the partition ran longer than run.timeout_s = {seconds:g}s")

    previous = signal.signal(signal.SIGALRM, _expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _outcome(p: PlannedPartition, res: TaskResources, **kw: Any) -> PartitionOutcome:
    return PartitionOutcome(pid=p.pid, partition=p.partition, num_cpus=res.num_cpus,
                            num_gpus=res.num_gpus, memory_mb=res.memory_mb, **kw)


def train_chunk(task: TrainTask, ctx: TrainContext) -> list[PartitionOutcome]:
    """Train every partition of one chunk (runs inside a Ray task; idempotent, so retries are safe).

    A partition that fails is recorded with its reason and the chunk goes on. Models are written
    to the registry from here, so they never travel through the driver.
    """
    spec, res = ctx.spec, task.resources
    try:
        frame, spans, _ = read_partitions(ctx.source, ctx.keys, [p.key for p in task.partitions],
                                          task.files)
        prepare = load_prepare(spec)
    except Exception as exc:
        if len(task.partitions) > 1:  # one bad file must not fail its neighbours: one at a time
            return [o for p in task.partitions for o in train_chunk(
                dataclasses.replace(task, partitions=(p,), files=p.files or task.files), ctx)]
        reason = f"cannot read partition data: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        return [_outcome(p, res, status="failed", reason=reason) for p in task.partitions]
    store = Store(ctx.registry_url)
    hashes, tag = row_hashes(frame), schema_tag(frame)  # once per chunk: hashing is vectorised
    threads = max(1, int(res.num_cpus))
    device = "cpu" if ctx.force_cpu else resolve_device(spec.model.device, res.num_gpus)
    out: list[PartitionOutcome] = []
    for p in task.partitions:
        t0, c0, s0 = time.perf_counter(), time.process_time(), time.time()
        span = spans.get(p.key)
        if span is None:
            out.append(_outcome(p, res, status="failed", reason="no rows found (the data changed "
                                                                "after planning?)"))
            continue
        part = frame.iloc[span[0]:span[1]].reset_index(drop=True)
        fp = fingerprint_rows(hashes[span[0]:span[1]], tag)
        if not ctx.force and p.latest_fingerprint == fp and p.latest_spec_hash == ctx.spec_hash:
            out.append(_outcome(p, res, status="skipped", reason="unchanged data and spec",
                                rows=len(part), fingerprint=fp,
                                wall_s=time.perf_counter() - t0, cpu_s=time.process_time() - c0))
            continue
        try:
            champion = None
            if p.champion_key is not None:
                # Undecodable bytes (a corrupt or planted file) become text LightGBM refuses to parse,
                # and an unparsable champion does not block its replacement (see train_partition).
                # A missing champion file likewise: retraining is how that partition recovers.
                try:
                    champion = store.read_bytes(p.champion_key).decode("utf-8", errors="replace")
                except FileNotFoundError:
                    champion = None
            with time_limit(spec.run.timeout_s):
                result = train_partition(part, spec, prepare=prepare, champion=champion,
                                         champion_features=p.champion_features,
                                         row_hashes=hashes[span[0]:span[1]], num_threads=threads,
                                         device=device)
            model_key = Registry.model_key(spec.name, p.pid, ctx.run_id)
            # Not fsynced one by one (that costs more than training a small model); see README
            # "Reliability" for what a machine crash can cost.
            text = result.model_str.encode()
            store.write_unpublished(model_key, text)
            _write_compact(store, model_key, text)
        except (PartitionError, PartitionTimeout, StorageError) as exc:
            out.append(_outcome(p, res, status="failed", reason=str(exc), rows=len(part),
                                wall_s=time.perf_counter() - t0, cpu_s=time.process_time() - c0))
            continue
        except Exception as exc:  # anything else in one partition must not stop the others
            msg = str(exc).strip().splitlines()
            out.append(_outcome(p, res, status="failed", rows=len(part),
                                reason=f"{type(exc).__name__}: {msg[0][:300] if msg else ''}",
                                wall_s=time.perf_counter() - t0, cpu_s=time.process_time() - c0))
            continue
        out.append(_outcome(
            p, res, status="trained", reason=result.reason, rows=result.rows, promote=result.promote,
            metric_value=result.metric, metrics=result.metrics, fingerprint=fp, model_key=model_key,
            features=result.features, time_min=result.time_min, time_max=result.time_max,
            trained_at=dt.datetime.now(dt.UTC), wall_s=time.perf_counter() - t0,
            cpu_s=time.process_time() - c0, peak_rss_mb=peak_rss_mb(), started_s=s0, device=device,
            comparison=result.comparison, warnings=result.warnings))
    return out


def _write_compact(store: Store, model_key: str, text: bytes) -> None:
    """Write the model's compact form beside its text (see :func:`manymodels.trees.compact`): scoring
    then loads the model without parsing the text. Best effort: without it scoring parses the text;
    if it cannot be written, an earlier attempt's is removed (it may not match this text)."""
    blob = compact(text)
    if blob is not None:
        try:
            store.write_unpublished(model_key + COMPACT_SUFFIX, blob)
        except StorageError:
            with suppress(StorageError):
                store.delete(model_key + COMPACT_SUFFIX)


def parse_only(items: Sequence[str] | None, keys: Sequence[str]) -> Callable[[dict[str, Any]], bool] | None:
    """Turn ``--only COL=VALUE`` items into a partition predicate (values compared as text).

    Several values for one column are alternatives; different columns must all match.
    """
    if not items:
        return None
    wanted: dict[str, set[str]] = {}
    for item in items:
        col, sep, value = item.partition("=")
        if not sep or col not in keys:
            raise SpecError(f"--only {item!r} must be COL=VALUE with COL one of {', '.join(keys)}")
        wanted.setdefault(col, set()).add(value)

    def keep(part: dict[str, Any]) -> bool:
        return all(("" if part[c] is None else str(part[c])) in vs for c, vs in wanted.items())

    return keep


def _resources_for(spec: JobSpec, part: Mapping[str, Any]) -> TaskResources:
    r = spec.resources
    res = TaskResources(num_cpus=r.num_cpus, num_gpus=r.num_gpus, memory_mb=r.memory_mb)
    for o in r.override:
        if all(str(part.get(k)) == str(v) for k, v in o.match.items()):
            res = TaskResources(num_cpus=o.num_cpus if o.num_cpus is not None else res.num_cpus,
                                num_gpus=o.num_gpus if o.num_gpus is not None else res.num_gpus,
                                memory_mb=o.memory_mb if o.memory_mb is not None else res.memory_mb)
    return res


def pack_plan(plan: Plan, spec: JobSpec, slots: float, **pack: int
              ) -> list[tuple[TaskResources, list[int], tuple[int, ...]]]:
    """Pack a plan's partitions into chunks: ``(resources, partition indices, file indices)``.

    Partitions whose ``[[resources.override]]`` gives them other resources never share a chunk with
    the rest, and each resource shape is packed for as many tasks as the cluster can run at once.
    """
    groups: dict[TaskResources, list[int]] = {}
    for i, p in enumerate(plan.partitions):
        groups.setdefault(_resources_for(spec, p.as_dict(plan.keys)), []).append(i)
    out = []
    for res, members in groups.items():
        per_task_slots = max(1, int(slots / max(res.num_cpus, 1e-9)))
        for chunk in pack_chunks([plan.partitions[i].rows for i in members], slots=per_task_slots, **pack):
            idx = [members[j] for j in chunk]
            files = tuple(sorted({f for i in idx for f in plan.partitions[i].files}))
            out.append((res, idx, files))
    return out


def plan_tasks(plan: Plan, spec: JobSpec, planned: Sequence[PlannedPartition], slots: int
               ) -> list[TrainTask]:
    """The training tasks of a run (see :func:`pack_plan`)."""
    return [TrainTask(chunk=n, partitions=tuple(planned[i] for i in idx), files=files, resources=res)
            for n, (res, idx, files) in enumerate(pack_plan(plan, spec, slots))]


def _feature_list(value: Any) -> tuple[str, ...] | None:
    """An index row's feature list (JSON text, or a list where already decoded)."""
    if value is None:
        return None
    return tuple(json.loads(value) if isinstance(value, str) else value)


def _check_inputs(spec: JobSpec, source: Source) -> None:
    d = spec.data
    check_columns(source, {"partition_by": d.partition_by, "target": [d.target],
                           "time_column": [d.time_column]})
    check_numeric(source, d.target, "target")
    if not spec.pipeline.prepare:
        check_columns(source, {"features": d.features})
        # The holdout is the latest rows by this column: text would sort as text (a prepare may
        # still parse it, so with one the pipeline checks the prepared column instead).
        if d.time_column:
            check_temporal(source, d.time_column, "time_column")


def check_prepare(spec: JobSpec) -> None:
    """Compile and load the spec's prepare function now, so its errors are spec errors (exit 2)."""
    try:
        load_prepare(spec)
    except SyntaxError as exc:
        raise SpecError(f"pipeline.prepare {spec.pipeline.prepare!r} does not compile: {exc}") from None
    except PartitionError as exc:
        raise SpecError(str(exc)) from None


def resolve_spec(spec: JobSpec | str | Path | None, overrides: Mapping[str, Any]) -> JobSpec:
    """A spec object from a spec, a TOML path or overrides alone (flags win over the file)."""
    if isinstance(spec, JobSpec):
        if any(v is not None for v in overrides.values()):
            from manymodels.spec import spec_from_dict
            return spec_from_dict(spec.to_dict(), path=spec.path, **overrides)
        return spec
    return load_spec(spec, **overrides)


def train(spec: JobSpec | str | Path | None = None, *, data: str | None = None,
          partition_by: Sequence[str] | str | None = None, target: str | None = None,
          registry: str | None = None, address: str | None = None, only: Sequence[str] | None = None,
          limit: int | None = None, force: bool = False, progress: bool | None = None,
          num_cpus: int | None = None) -> RunSummary:
    """Train one model per partition and register the versions.

    Args:
        spec: a :class:`JobSpec`, a path to a TOML job spec, or ``None`` (then ``data``,
            ``partition_by`` and ``target`` are enough).
        data, partition_by, target, registry: override the spec's keys.
        address: Ray to use: ``None`` → ``RAY_ADDRESS`` if set, else a new embedded local instance.
        only: ``COL=VALUE`` filters; only matching partitions are trained.
        limit: train at most this many partitions (in data order).
        force: retrain partitions whose data and spec are unchanged.
        progress: show a progress bar (``None``: when stderr is a terminal).
        num_cpus: CPUs of the embedded Ray instance (default: all).

    Raises:
        SpecError, InputError, StorageError: bad spec, data or registry, before anything is written.
    """
    started = time.perf_counter()
    # Here, not with the module: Ray workers import this module for its chunk function, and the
    # progress bar's Rich would only slow their first task.
    from manymodels.progress import RunProgress

    spec = resolve_spec(spec, {"data": data, "partition_by": partition_by, "target": target,
                               "registry": registry})
    if limit is not None and limit < 1:
        raise SpecError(f"--limit must be at least 1, got {limit}")
    check_prepare(spec)
    source = open_source(spec.data.source, spec.data.format, spec.data.key_types,
                         spec.data.partition_by)
    _check_inputs(spec, source)
    keep = parse_only(only, spec.data.partition_by)
    force_cpu, device_note = _check_devices(spec)
    reg = Registry(spec.output.registry)
    job, shash = spec.name, spec_hash(spec)

    def plan_run() -> tuple[Plan, list[PlannedPartition]]:
        """Every partition's key, rows and registry state, read while Ray starts (Engine.started)."""
        plan = plan_partitions(source, spec.data.partition_by, keep)
        if limit is not None:
            plan = dataclasses.replace(plan, partitions=plan.partitions[:limit])
        if not plan.partitions:
            raise InputError("no partition matches --only" if only else f"{source.url!r} has no partitions")
        reg.store.check_writable()  # after the plan: a run stopped by its plan leaves no registry folder
        state = reg.state(job)
        planned = []
        for p, rkey in zip(plan.partitions, _registry_keys(job, source, plan, state), strict=True):
            pid = partition_id(plan.keys, rkey)
            st = state.get(pid)
            champ, latest = (st["champion"], st["latest"]) if st else (None, None)
            planned.append(PlannedPartition(
                key=p.key, pid=pid, partition=encode_partition(plan.keys, rkey), rows=p.rows,
                champion_key=champ["model_key"] if champ else None,
                latest_fingerprint=latest["fingerprint"] if latest else None,
                latest_spec_hash=latest["spec_hash"] if latest else None, files=p.files,
                champion_features=_feature_list(champ["features"]) if champ else None))
        return plan, planned

    run_id = new_run_id("train")
    address = address or os.environ.get("RAY_ADDRESS") or None
    outcomes: list[PartitionOutcome] = []
    versions: dict[str, int] = {}
    nodes: set[str] = set()
    reserved_cpu_s = reserved_gpu_s = 0.0
    engine = Engine(address, num_cpus=num_cpus)
    # Errors above (spec, prepare, data schema) come before Ray starts; planning and registry errors
    # stop it again. Either way, nothing is written and the error is one line (exit 2 in the CLI).
    with engine.started(beside=plan_run) as (plan, planned):
        keys = plan.keys
        record: dict[str, Any] = {
            "run_id": run_id, "job": job, "kind": "train", "status": "running",
            "started_at": utc_now().isoformat(), "spec": spec.to_dict(), "spec_path": spec.path,
            "spec_hash": shash, "data": source.url, "registry": reg.url, "environment": environment(),
            "partitions": {"total": len(planned)}, "device": device_note, "driver": process_identity()}
        ctx = TrainContext(spec=spec, source=source, keys=keys, registry_url=reg.url, run_id=run_id,
                           spec_hash=shash, force=force, force_cpu=force_cpu)
        # Only once Ray is up: a Ray that cannot be started or joined leaves no "running" record.
        reg.write_run(job, run_id, record)
        cluster = engine.resources()
        slots = max(1, int(cluster.get("CPU", 1)))
        tasks = plan_tasks(plan, spec, planned, slots)
        gpus = cluster.get("GPU", 0.0)
        if force_cpu and any(t.resources.num_gpus > gpus for t in tasks):
            # LightGBM trains on the CPU anyway: a GPU reservation this cluster cannot give would
            # leave those tasks waiting forever, so they reserve none (and are charged none).
            tasks = [dataclasses.replace(t, resources=dataclasses.replace(t.resources, num_gpus=0.0))
                     if t.resources.num_gpus > gpus else t for t in tasks]
            record["device"] = f"{device_note}; no GPU reserved (the Ray cluster has {gpus:g})"
        pending_commit: list[PartitionOutcome] = []
        last_commit = time.perf_counter()
        failed = 0
        gate = budget_gate(spec, engine.embedded, cluster, started, outcomes, len(planned))

        with RunProgress(f"train {job}", len(planned), progress) as bar:
            for item in engine.map(train_chunk, tasks, resources=[t.resources for t in tasks],
                                   shared=ctx, max_retries=spec.run.max_retries,
                                   gate=gate):
                if item is not None:
                    i, result, node, task_wall = item
                    reserved_cpu_s += task_wall * tasks[i].resources.num_cpus
                    reserved_gpu_s += task_wall * tasks[i].resources.num_gpus
                    if result is NOT_SUBMITTED:
                        result = [_outcome(p, tasks[i].resources, status="skipped", reason="budget",
                                           rows=p.rows) for p in tasks[i].partitions]
                    elif isinstance(result, BaseException):
                        reason = f"task failed: {type(result).__name__}: {str(result).splitlines()[0][:200]}"
                        result = [_outcome(p, tasks[i].resources, status="failed", reason=reason)
                                  for p in tasks[i].partitions]
                    if node:
                        nodes.add(node)
                    for o in result:
                        outcomes.append(dataclasses.replace(o, node=node))
                        failed += o.status == "failed"
                        if o.status == "trained":
                            pending_commit.append(o)
                    bar.update(len(outcomes), failed)
                if pending_commit and time.perf_counter() - last_commit > COMMIT_EVERY_S:
                    versions.update(_commit(reg, job, run_id, pending_commit, shash, spec))
                    pending_commit, last_commit = [], time.perf_counter()
        versions.update(_commit(reg, job, run_id, pending_commit, shash, spec))
        global_info = _fit_global(engine, plan, spec, ctx, reg, trained=any(
            o.status == "trained" for o in outcomes), full=not only and limit is None)
        embedded = engine.embedded
    reg.compact(job)
    wall = time.perf_counter() - started
    # Embedded Ray: the job held the whole local instance for its wall time. On a shared cluster it
    # held what its tasks reserved while they ran (expressed as an average over the wall time).
    held = (_held_embedded(cluster) if embedded else
            Held(cpus=reserved_cpu_s / wall, gpus=reserved_gpu_s / wall))
    record["global_model"] = global_info
    return _finish(reg, spec, run_id, record, outcomes, versions, sorted(nodes), held, wall)


def _registry_keys(job: str, source: Source, plan: Plan, state: Mapping[str, Any]) -> list[tuple[Any, ...]]:
    """Each planned partition's key as the registry knows it.

    The data's own keys, unless none of them is registered while the registry holds partitions and
    a key column's type family differs from the registry's (text Hive folders for a job trained on
    integer keys): then the keys are converted where that is exact, or the run stops with a clear
    error (:func:`~manymodels.data.normalised_keys`), instead of silently starting every
    partition over under a new identity.
    """
    own = [p.key for p in plan.partitions]
    registered = [st["latest"]["partition"] for pid, st in state.items() if pid != GLOBAL_PID]
    if not registered or any(partition_id(plan.keys, k) in state for k in own):
        return own
    converted = normalised_keys(job, source.url, plan.keys, [source.schema.field(k).type for k in plan.keys],
                                plan.partitions, pa.array(registered, pa.string()))
    return own if converted is None else converted


class _Measured(Protocol):
    """A partition's outcome as the budget guard reads it (train's and score's both are)."""

    @property
    def wall_s(self) -> float: ...

    @property
    def num_cpus(self) -> float: ...

    @property
    def num_gpus(self) -> float: ...

    @property
    def memory_mb(self) -> int: ...


def budget_gate(spec: JobSpec, embedded: bool, cluster: Mapping[str, float], started: float,
                outcomes: Sequence[_Measured], total: int) -> Callable[[], bool] | None:
    """The ``[cost] max_usd`` guard for :meth:`Engine.map`: submit more only while the run's
    projected cost stays within budget (``None`` when the spec sets no budget).

    Spent so far: an embedded instance costs what it holds for the elapsed time; on a cluster, what
    the finished partitions reserved. ``outcomes`` is the caller's growing list of results (append
    only): each call folds only the outcomes added since the last one into a running total, so a
    run of N partitions costs O(N) in all, not O(N²).
    """
    if spec.cost.max_usd is None:
        return None
    rate = hourly_usd(_held_embedded(cluster), spec.cost)
    folded = 0
    reserved_usd = 0.0

    def gate() -> bool:
        nonlocal folded, reserved_usd
        done = len(outcomes)
        if embedded:
            spent = (time.perf_counter() - started) * rate / 3600.0
        else:
            for i in range(folded, done):
                o = outcomes[i]
                reserved_usd += partition_cost(o.wall_s, o.num_cpus, o.num_gpus, o.memory_mb,
                                               spec.cost).cost_usd
            folded, spent = done, reserved_usd
        return within_budget(spent, done, total, spec.cost.max_usd)

    return gate


def _check_devices(spec: JobSpec) -> tuple[bool, str]:
    """Fail up front when the spec needs LightGBM's GPU device and this build has none.

    Returns ``(force_cpu, note)``: with ``model.gpu_fallback = "cpu"`` a build without GPU support
    trains on the CPU instead, and the note (stored in the run record) says so.
    """
    shapes = [spec.resources.num_gpus, *[o.num_gpus for o in spec.resources.override
                                         if o.num_gpus is not None]]
    devices = sorted({resolve_device(spec.model.device, g) for g in shapes} - {"cpu"})
    for device in devices:
        reason = check_device(device)
        if not reason:
            continue
        if spec.model.gpu_fallback == "cpu":
            return True, f"cpu (fallback: LightGBM cannot use device {device!r}: {reason})"
        where = f" (in {spec.path})" if spec.path else ""
        raise SpecError(f"model device {device!r} is not usable with this LightGBM build: {reason}; install "
                        f"a GPU-enabled LightGBM or set model.gpu_fallback = \"cpu\"{where}")
    return False, ", ".join(devices) or "cpu"


def _held_embedded(cluster: Mapping[str, float]) -> Held:
    """An embedded Ray instance is the job's alone: it holds all of its CPUs, GPUs and memory."""
    return Held(cpus=cluster.get("CPU", 0.0), gpus=cluster.get("GPU", 0.0),
                memory_gb=cluster.get("memory", 0.0) / 2**30)


def _fit_global(engine: Engine, plan: Plan, spec: JobSpec, ctx: TrainContext, reg: Registry,
                trained: bool, full: bool) -> dict[str, Any] | None:
    """With ``[score] fallback = "global"``: fit the cross-partition model in one more task and
    register it as a version of the global pseudo-partition, gated like a partition's model.

    Only on full runs: an ``--only``/``--limit`` run sees a subset, and leaves the global model as
    it is. Refitted when any partition was (re)trained, when the sample caps changed, or when
    there is none yet. Returns the run record's ``global_model`` entry.
    """
    from manymodels.fallback import GlobalTask, global_hash, global_state, new_global_version, train_global

    if spec.score.fallback != "global":
        return None
    if not full:
        return {"status": "skipped", "reason": "--only/--limit run"}
    state = global_state(reg, spec.name)
    champ = state["champion"] if state else None
    ghash = global_hash(spec, ctx.spec_hash)
    if not trained and state is not None and state["latest"]["spec_hash"] == ghash:
        return {"status": "unchanged", "version": int(champ["version"]) if champ else None}
    task = GlobalTask(source=plan.source, keys=plan.keys, files=tuple(range(len(plan.source.files))),
                      n_partitions=len(plan.partitions),
                      champion_key=champ["model_key"] if champ else None)
    res = TaskResources(spec.resources.num_cpus, spec.resources.num_gpus, spec.resources.memory_mb)
    for item in engine.map(train_global, [task], resources=[res], shared=ctx,
                           max_retries=spec.run.max_retries):
        if item is None:
            continue
        _, result, _, _ = item
        if isinstance(result, BaseException):
            return {"status": "failed", "reason": f"{type(result).__name__}: "
                                                  f"{str(result).splitlines()[0][:300]}"}
        version = reg.commit(spec.name, [new_global_version(result, ctx.run_id, spec, ghash)])
        metric = result.metric if math.isfinite(result.metric) else None  # the record is strict JSON
        return {"status": "trained", "version": version[GLOBAL_PID], "promoted": result.promote,
                "reason": result.reason, "metric": metric, "rows": result.rows,
                "model_key": result.model_key, "sample": result.sample}
    return None


def _commit(reg: Registry, job: str, run_id: str, outcomes: Sequence[PartitionOutcome], shash: str,
            spec: JobSpec) -> dict[str, int]:
    return reg.commit(job, [NewVersion(
        pid=o.pid, partition=o.partition, run_id=run_id,
        trained_at=o.trained_at or utc_now(), rows=o.rows, metric=spec.metric,
        metric_value=float(o.metric_value) if o.metric_value is not None else float("nan"),
        metrics=o.metrics, fingerprint=o.fingerprint, spec_hash=shash, model_key=o.model_key,
        features=o.features, time_min=o.time_min, time_max=o.time_max, promote=o.promote,
        reason=o.reason, comparison=o.comparison) for o in outcomes])


PARTITION_SCHEMA = pa.schema([
    ("partition", pa.string()), ("pid", pa.string()), ("status", pa.string()), ("reason", pa.string()),
    ("version", pa.int64()), ("promoted", pa.bool_()), ("rows", pa.int64()), ("metric", pa.float64()),
    ("wall_s", pa.float64()), ("process_cpu_s", pa.float64()), ("peak_rss_mb", pa.float64()),
    ("num_cpus", pa.float64()), ("num_gpus", pa.float64()), ("memory_mb", pa.int64()),
    ("cpu_seconds", pa.float64()), ("gpu_seconds", pa.float64()), ("cost_usd", pa.float64()),
    ("node", pa.string()), ("started_s", pa.float64()), ("device", pa.string()),
])


def _finish(reg: Registry, spec: JobSpec, run_id: str, record: dict[str, Any],
            outcomes: Sequence[PartitionOutcome], versions: Mapping[str, int], nodes: list[str],
            held: Held, wall: float) -> RunSummary:
    costs = [partition_cost(o.wall_s, o.num_cpus, o.num_gpus, o.memory_mb, spec.cost) for o in outcomes]
    cost = job_cost(wall, held, costs, spec.cost)
    rows = [{"partition": o.partition, "pid": o.pid, "status": o.status, "reason": o.reason,
             "version": versions.get(o.pid) if o.status == "trained" else None,
             "promoted": o.status == "trained" and o.promote, "rows": o.rows, "metric": o.metric_value,
             "wall_s": o.wall_s, "process_cpu_s": o.cpu_s, "peak_rss_mb": o.peak_rss_mb,
             "num_cpus": o.num_cpus, "num_gpus": o.num_gpus, "memory_mb": o.memory_mb,
             "cpu_seconds": c.cpu_seconds, "gpu_seconds": c.gpu_seconds, "cost_usd": c.cost_usd,
             "node": o.node, "started_s": o.started_s, "device": o.device}
            for o, c in zip(outcomes, costs, strict=True)]
    failures = [{"partition": json.loads(o.partition), "reason": o.reason}
                for o in outcomes if o.status == "failed"]
    total = int(record["partitions"]["total"])
    n_failed = len(failures)
    status = "succeeded" if n_failed <= spec.run.max_failure_fraction * total else "failed"
    if any(o.status == "skipped" and o.reason == "budget" for o in outcomes):
        status = "budget_exceeded"
    # A data warning is the same text in every partition it concerns: reported once per run.
    warnings = list(dict.fromkeys(w for o in outcomes for w in o.warnings))
    summary = RunSummary(
        run_id=run_id, job=spec.name, status=status, total=total,
        trained=sum(o.status == "trained" for o in outcomes),
        promoted=sum(o.status == "trained" and o.promote for o in outcomes),
        skipped=sum(o.status == "skipped" for o in outcomes), failed=n_failed, failures=failures,
        cost=cost, registry=reg.url, wall_s=wall, nodes=nodes, versions=dict(versions),
        warnings=warnings)
    record = {**record, **summary.to_dict(), "finished_at": utc_now().isoformat()}
    reg.write_run(spec.name, run_id, record, pa.Table.from_pylist(rows, schema=PARTITION_SCHEMA))
    return summary
