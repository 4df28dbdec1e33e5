"""Batch scoring: every row scored by its partition's model, written as Parquet analysts can read.

The driver plans partitions from the key columns (the same planning and packing as training), looks
up each partition's model in the registry index (its champion, a pinned version, or the version a
given train run produced) and fans chunks out on Ray. Each task reads its rows, runs the job's
``prepare`` exactly as in training, predicts, and writes one Parquet file into a staging folder. When
every task is done the run is published: on a local filesystem in one rename, so readers see all of
a run or none of it, and a re-run of the same run id swaps its rows atomically; on an object store
by server-side copies (each file atomic, the run's files one by one); with ``output.format =
"delta"`` in one Delta Lake commit on any store.

Output: ``<output.scores>/<job>/score_run_id=<run id>/part-<chunk>.parquet`` (a Delta table rooted at
``<output.scores>/<job>`` with ``output.format = "delta"``, partitioned by ``score_run_id``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import importlib.util
import json
import os
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from manymodels.cost import Held, JobCost, job_cost, partition_cost
from manymodels.data import (
    InputError,
    Plan,
    Source,
    check_columns,
    normalised_keys,
    open_source,
    plan_partitions,
    read_partitions,
)
from manymodels.engine import NOT_SUBMITTED, Engine, TaskResources
from manymodels.fallback import global_spec
from manymodels.pipeline import PartitionError, load_prepare, predict_partition
from manymodels.registry import Registry, encode_partition, partition_id
from manymodels.runinfo import environment, new_run_id, utc_now
from manymodels.spec import JobSpec, SpecError
from manymodels.storage import StorageError, Store, process_identity
from manymodels.train import (
    PartitionTimeout,
    _held_embedded,
    budget_gate,
    check_prepare,
    pack_plan,
    parse_only,
    resolve_spec,
    time_limit,
)
from manymodels.trees import COMPACT_SUFFIX, load_compact, parse_forest

__all__ = ["ScoreSummary", "score", "score_chunk"]

ROW_GROUP_ROWS = 128 * 1024


@dataclass(frozen=True)
class ModelRef:
    """Which model scores a partition (``version`` 0 is the global fallback model)."""

    model_key: str
    version: int
    run_id: str
    features: tuple[str, ...]
    global_version: int | None = None  # the global model's registry version (its rows say 0)


@dataclass(frozen=True)
class ScorePartition:
    """A partition to score, with its model (``None``: no model, its rows are unscored)."""

    key: tuple[Any, ...]
    partition: str
    rows: int
    model: ModelRef | None
    reason: str = ""
    files: tuple[int, ...] = ()


@dataclass(frozen=True)
class ScoreTask:
    """One chunk of partitions for one Ray task."""

    chunk: int
    partitions: tuple[ScorePartition, ...]
    files: tuple[int, ...]
    resources: TaskResources
    part: str = ""  # tells apart the files of a chunk scored one partition at a time


@dataclass(frozen=True)
class ScoreContext:
    """What every task of a score run shares."""

    spec: JobSpec
    source: Source
    keys: tuple[str, ...]
    columns: tuple[str, ...] | None
    keep: tuple[str, ...]
    registry_url: str
    staging_url: str
    run_id: str
    scored_at: dt.datetime


@dataclass(frozen=True)
class ScoreOutcome:
    """What happened to one partition's rows."""

    partition: str
    status: str  # scored | unscored
    rows: int
    reason: str = ""
    model_version: int | None = None
    wall_s: float = 0.0
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    memory_mb: int = 0
    node: str = ""


@dataclass
class ScoreSummary:
    """The result of ``manymodels score`` (``to_dict`` is the contract's ``--json`` object)."""

    run_id: str
    job: str
    status: str
    input_rows: int
    scored_rows: int
    partitions_scored: int
    unscored: list[dict[str, Any]]
    output: str
    cost: JobCost
    wall_s: float
    nodes: list[str] = field(default_factory=list)

    @property
    def unscored_rows(self) -> int:
        """Rows not in the output (each counted in ``unscored`` with its reason)."""
        return sum(int(u["rows"]) for u in self.unscored)

    @property
    def exit_code(self) -> int:
        """0 when unscored partitions are within ``run.max_failure_fraction``, else 1."""
        return 0 if self.status == "succeeded" else 1

    def to_dict(self) -> dict[str, Any]:
        """The contract's ``score --json`` object."""
        return {"run_id": self.run_id, "job": self.job, "status": self.status, "kind": "score",
                "rows": {"input": self.input_rows, "scored": self.scored_rows,
                         "unscored": self.unscored_rows},
                "partitions_scored": self.partitions_scored, "unscored": self.unscored,
                "output": self.output, "cost": self.cost.to_dict(), "wall_s": round(self.wall_s, 3),
                "nodes": self.nodes}


def _out(p: ScorePartition, res: TaskResources, **kw: Any) -> ScoreOutcome:
    return ScoreOutcome(partition=p.partition, num_cpus=res.num_cpus, num_gpus=res.num_gpus,
                        memory_mb=res.memory_mb, **kw)


# Up to this many rows a partition is scored by manymodels.trees: loading a compact form costs a
# small fraction of a Booster's text parse, but numpy predicts a row more slowly than LightGBM's
# compiled (and threaded) predict. Measured with the demo job's models (100 trees, 15 leaves), load
# and predict together cost the same both ways at about 500 rows.
COMPACT_MAX_ROWS = 512


def _load_model(store: Store, ref: ModelRef, rows: int, cache: dict[tuple[str, bool], Any]) -> Any:
    """The model of ``ref``: for a small partition a :class:`~manymodels.trees.Forest`, from the
    version's compact form if it has one, else parsed from its text; a ``lightgbm.Booster`` for a
    large partition or a model the Forest does not reproduce.

    All of them predict the same numbers bit for bit. A compact form is used only with the very text
    it was made from (its length and CRC-32 match): a torn, stale or planted file falls back to the
    text, which stays the model.
    """
    small = rows <= COMPACT_MAX_ROWS
    model = cache.get((ref.model_key, small))
    if model is not None:
        return model
    text = store.read_bytes(ref.model_key)  # the text is the model: a compact form must be its own
    if small:
        try:
            model = load_compact(store.read_bytes(ref.model_key + COMPACT_SUFFIX), text)
        except FileNotFoundError:  # trained before compact forms, or by the global fallback
            model = None
        if model is None:
            model = parse_forest(text)  # about half the cost of LightGBM's own parse
    if model is None:
        import lightgbm as lgb

        model = lgb.Booster(model_str=text.decode())
    cache[(ref.model_key, small)] = model
    return model


def score_chunk(task: ScoreTask, ctx: ScoreContext) -> list[ScoreOutcome]:
    """Score one chunk and write its rows as one Parquet file in the run's staging folder.

    Idempotent (the file name is the chunk's), so a retried task rewrites the same file.
    """
    spec, res = ctx.spec, task.resources
    try:
        frame, spans, table = read_partitions(ctx.source, ctx.keys, [p.key for p in task.partitions],
                                              task.files, ctx.columns)
        prepare = load_prepare(spec)
    except Exception as exc:
        if len(task.partitions) > 1:  # one bad file must not fail its neighbours: one at a time
            return [o for n, p in enumerate(task.partitions) for o in score_chunk(dataclasses.replace(
                task, partitions=(p,), files=p.files or task.files, part=f"-{n:05d}"), ctx)]
        reason = f"cannot read partition data: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        return [_out(p, res, status="unscored", rows=p.rows, reason=reason) for p in task.partitions]
    registry = Store(ctx.registry_url)
    models: dict[tuple[str, bool], Any] = {}
    threads = max(1, int(res.num_cpus))
    prediction = np.full(table.num_rows, np.nan)
    version = np.zeros(table.num_rows, dtype=np.int64)
    run_ids = np.empty(table.num_rows, dtype=object)
    keep = np.zeros(table.num_rows, dtype=bool)
    out: list[ScoreOutcome] = []
    for p in task.partitions:
        t0 = time.perf_counter()
        span = spans.get(p.key)
        if span is None:
            out.append(_out(p, res, status="unscored", rows=0, reason="no rows found"))
            continue
        a, b = span
        if p.model is None:
            out.append(_out(p, res, status="unscored", rows=b - a, reason=p.reason))
            continue
        try:
            model = _load_model(registry, p.model, b - a, models)
            with time_limit(spec.run.timeout_s):  # (predict_partition relabels the rows itself)
                pred = predict_partition(frame.iloc[a:b], global_spec(spec) if p.model.version == 0 else spec,
                                         model, prepare=prepare, features=p.model.features,
                                         num_threads=threads)
        except (PartitionError, PartitionTimeout, StorageError) as exc:
            out.append(_out(p, res, status="unscored", rows=b - a, reason=str(exc),
                            wall_s=time.perf_counter() - t0))
            continue
        except Exception as exc:  # one partition's failure must not stop the chunk
            msg = str(exc).strip().splitlines()
            out.append(_out(p, res, status="unscored", rows=b - a, wall_s=time.perf_counter() - t0,
                            reason=f"{type(exc).__name__}: {msg[0][:300] if msg else ''}"))
            continue
        prediction[a:b] = pred
        version[a:b] = p.model.version
        run_ids[a:b] = p.model.run_id
        keep[a:b] = True
        out.append(_out(p, res, status="scored", rows=b - a, model_version=p.model.version,
                        wall_s=time.perf_counter() - t0))
    if keep.any():
        cols = {name: table.column(name) for name in ctx.keep}
        n = table.num_rows
        result = pa.table({
            **cols,
            "prediction": pa.array(prediction, pa.float64()),
            "model_version": pa.array(version, pa.int64()),
            "model_run_id": pa.array(run_ids, pa.string()),
            "scored_at": pa.array(np.full(n, np.datetime64(ctx.scored_at.replace(tzinfo=None), "us")),
                                  pa.timestamp("us", tz="UTC")),
        })
        if not keep.all():
            result = result.filter(pa.array(keep))
        Store(ctx.staging_url).write_parquet(f"part-{task.chunk:05d}{task.part}.parquet", result,
                                             row_group_size=ROW_GROUP_ROWS, compression="zstd")
    return out


def _model_refs(reg: Registry, spec: JobSpec, keys: Sequence[str], partitions: Sequence[Any],
                model_version: int | None, train_run: str | None,
                types: Sequence[pa.DataType] | None = None, url: str = "") -> dict[str, ModelRef | str]:
    """pid (of the scoring data's key) → the model that scores it (the global fallback where
    configured), or why none does.

    ``types`` are the key columns' Arrow types in the scoring data: when no partition is found in
    the registry and a key column's type family differs from the registry's, keys are normalised
    (or an error is raised) by :func:`normalised_keys`.
    """
    job = spec.name
    everything = reg.live(job)  # every partition's champion and latest version (not the history)
    rows = reg.table(job) if train_run or model_version is not None else everything
    if train_run:
        rows = rows.filter(pc.equal(rows.column("run_id"), train_run))
        if rows.num_rows == 0:
            raise SpecError(f"train run {train_run!r} registered no model of job {job!r}")
    elif model_version is not None:
        rows = rows.filter(pc.equal(rows.column("version"), model_version))
    else:
        rows = rows.filter(pc.equal(rows.column("status"), "champion"))
    found = {pid: (key, version, run, feats) for pid, key, version, run, feats in zip(
        *(rows.column(c).to_pylist() for c in ("pid", "model_key", "version", "run_id", "features")),
        strict=True)}
    data_pids = [partition_id(keys, p.key) for p in partitions]
    lookup = data_pids
    if types is not None and everything.num_rows and not any(pid in found for pid in data_pids) and not \
            pc.any(pc.is_in(pa.array(data_pids, pa.string()), value_set=pc.unique(everything.column("pid")))
                   ).as_py():
        # Nothing of this data is registered at all: a key type that differs from training's?
        converted = normalised_keys(job, url, keys, types, partitions, everything.column("partition"))
        if converted is not None:
            lookup = [partition_id(keys, k) for k in converted]
    fallback = None
    if spec.score.fallback == "global" and model_version is None and not train_run:
        from manymodels.fallback import global_champion

        g = global_champion(reg, job)  # a rejected global model never scores
        fallback = None if g is None else ModelRef(
            model_key=g["model_key"], version=0, run_id=g["run_id"],
            features=tuple(json.loads(g["features"])), global_version=int(g["version"]))
    if train_run:
        missing = f"train run {train_run} has no model for it"
    elif model_version is not None:
        missing = f"no version {model_version}"
    else:
        missing = "no champion"
    out: dict[str, ModelRef | str] = {}
    # One decode per distinct feature list (100,000 partitions usually share one).
    feature_lists = {text: tuple(json.loads(text)) for text in {r[3] for r in found.values()}}
    for pid, registered in zip(data_pids, lookup, strict=True):
        r = found.get(registered)
        if r is None and fallback is not None:
            out[pid] = fallback
            continue
        out[pid] = missing if r is None else ModelRef(
            model_key=r[0], version=int(r[1]), run_id=r[2], features=feature_lists[r[3]])
    return out


def _check_rerun(reg: Registry, job: str, run_id: str) -> None:
    """A ``--run-id`` names a new run or an earlier score run of this job, never another run.

    Its record would otherwise replace a train run's (or another job's) record under the same id.
    """
    for key in reg.store.glob(f"*/runs/{run_id}/run.json"):
        owner = key.split("/", 1)[0]
        try:
            kind = json.loads(reg.store.read_bytes(key)).get("kind")
        except (FileNotFoundError, ValueError, AttributeError):
            kind = None
        if owner != job:
            raise SpecError(f"--run-id {run_id!r} is a run of job {owner!r} in {reg.url}, not of job "
                            f"{job!r}: choose another run id")
        if kind != "score":
            raise SpecError(f"--run-id {run_id!r} is a {kind or 'unknown'} run of job {job!r} in "
                            f"{reg.url}, not a score run: choose another run id")


def _publish(staging: Store, final_url: str) -> None:
    """Move the staged run folder to its final place (``output.format = "parquet"``).

    Local filesystems: one rename, an atomic swap on re-runs. Object stores have no rename: each
    staged object is copied server-side (S3 CopyObject; the bytes never pass through the driver),
    then objects the new run does not have are deleted. Each object appears atomically, but a new
    run's objects appear one by one: readers that must never see part of a run filter on finished
    run ids (``manymodels runs list --json``) or use ``output.format = "delta"``.
    """
    final = Store(final_url)
    if staging.local:
        os.makedirs(os.path.dirname(final.root), exist_ok=True)
        if not os.path.exists(final.root):
            os.rename(staging.root, final.root)
            return
        if _exchange(staging.root, final.root):
            _remove_tree(staging.root)  # now holds the previous rows of this run id
            return
        old = f"{final.root}.old-{os.getpid()}"
        os.rename(final.root, old)
        os.rename(staging.root, final.root)
        _remove_tree(old)
        return
    names = [key.rsplit("/", 1)[-1] for key in staging.list("")]
    try:
        if names:  # one call: the filesystem runs the copies concurrently
            staging.fs.copy([staging.path(n) for n in names], [final.path(n) for n in names])
    except OSError as exc:
        raise StorageError(f"cannot copy the staged scores {staging.url} to {final.url}: {exc}") from exc
    for key in final.list(""):
        if key.rsplit("/", 1)[-1] not in names:
            final.delete(key)
    staging.delete("", recursive=True)


DELTA_PARTITION = "score_run_id"


def _delta_options(url: str) -> dict[str, str]:
    """Storage options for delta-rs: it reads the AWS variables itself, but refuses plain-HTTP
    endpoints (a local S3-compatible server) unless told."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
    return {"AWS_ALLOW_HTTP": "true"} if url.startswith("s3") and endpoint.startswith("http://") else {}


def _publish_delta(staging: Store, table: Store, run_id: str) -> None:
    """Commit the staged files as the rows of ``run_id`` in the job's Delta table
    (``output.format = "delta"``), replacing that run's earlier rows, in one atomic commit.

    The workers wrote the files inside the table's folder (``score_run_id=<run>/<attempt>/``), where
    they are invisible until a commit names them, so nothing is copied. The commit is an overwrite
    of the ``score_run_id = <run>`` partition: readers see the old rows of that run or the new ones,
    never a mix, and other runs are untouched. Files of replaced or failed runs stay on storage until
    ``DeltaTable.vacuum``.
    """
    from deltalake import DeltaTable, Schema
    from deltalake.exceptions import DeltaError, TableNotFoundError
    from deltalake.transaction import AddAction, create_table_with_add_actions

    options = _delta_options(table.url)
    uri = table.uri("").rstrip("/")
    root = table.root.rstrip("/") + "/"
    adds: list[Any] = []
    schema: pa.Schema | None = None
    now_ms = int(time.time() * 1000)
    try:
        for key in staging.glob("*.parquet"):
            path = staging.path(key)
            with staging.fs.open(path, "rb") as f:
                meta = pq.read_metadata(f)  # the footer only
            if schema is None:
                schema = meta.schema.to_arrow_schema().remove_metadata()
            adds.append(AddAction(path=path[len(root):], size=int(staging.fs.size(path)),
                                  partition_values={DELTA_PARTITION: run_id}, modification_time=now_ms,
                                  data_change=True, stats=json.dumps({"numRecords": meta.num_rows})))
    except OSError as exc:
        raise StorageError(f"cannot read the staged scores in {staging.url}: {exc}") from exc
    for _attempt in range(5):
        try:
            dt_ = DeltaTable(uri, storage_options=options or None)
        except TableNotFoundError:
            if schema is None:
                return  # no table and nothing scored: nothing to show
            try:
                create_table_with_add_actions(
                    uri, Schema.from_arrow(schema.append(pa.field(DELTA_PARTITION, pa.string()))), adds,
                    mode="error", partition_by=[DELTA_PARTITION], storage_options=options or None)
                return
            except DeltaError:
                continue  # another run created the table first: commit to it
        full = (schema.append(pa.field(DELTA_PARTITION, pa.string())) if schema is not None
                else dt_.schema())
        try:
            dt_.create_write_transaction(adds, mode="overwrite", schema=full,
                                         partition_by=[DELTA_PARTITION],
                                         partition_filters=[(DELTA_PARTITION, "=", run_id)])
        except DeltaError as exc:  # e.g. this run's columns differ from the table's
            raise StorageError(f"cannot commit score run {run_id} to the Delta table {uri}: "
                               f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
        return
    raise StorageError(f"cannot commit score run {run_id} to the Delta table {uri}")


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths with Linux ``renameat2(RENAME_EXCHANGE)``; False where unsupported."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return bool(fn(at_fdcwd, a.encode(), at_fdcwd, b.encode(), rename_exchange) == 0)


def _remove_tree(path: str) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def score(spec: JobSpec | str | Path | None = None, *, data: str | None = None,
          output: str | None = None, registry: str | None = None, address: str | None = None,
          partition_by: Sequence[str] | str | None = None, target: str | None = None,
          model_version: int | None = None, train_run: str | None = None, run_id: str | None = None,
          only: Sequence[str] | None = None, progress: bool | None = None,
          num_cpus: int | None = None) -> ScoreSummary:
    """Score every row of ``data`` with its partition's model and write Parquet.

    Args:
        spec: a :class:`JobSpec`, a TOML path, or ``None`` (then ``data``, ``partition_by`` and
            ``target`` name the job as for training).
        data: the rows to score (default: the spec's ``data.source``).
        output: where scores go (overrides ``output.scores``).
        registry: the registry (overrides ``output.registry``).
        address: Ray to use (``None`` → ``RAY_ADDRESS`` if set, else embedded).
        model_version: score with this version of every partition instead of its champion.
        train_run: score with the versions that this train run produced.
        run_id: re-run (replace the rows of) this score run id; default a new id.
        only: ``COL=VALUE`` filters on partitions.
        progress: show a progress bar (``None``: when stderr is a terminal).
        num_cpus: CPUs of the embedded Ray instance.

    Raises:
        SpecError, InputError, StorageError: bad spec, data or output, before anything is written.
    """
    started = time.perf_counter()
    # Here, not with the module: Ray workers import this module for its chunk function, and the
    # progress bar's Rich would only slow their first task.
    from manymodels.progress import RunProgress

    spec = resolve_spec(spec, {"data": data, "partition_by": partition_by, "target": target,
                               "registry": registry, "output": output})
    if model_version is not None and train_run:
        raise SpecError("--model-version and --train-run cannot be used together")
    # A letter is required so that readers infer the score_run_id folder column as a string.
    if run_id is not None and not re.fullmatch(r"[A-Za-z0-9_-]*[A-Za-z][A-Za-z0-9_-]*", run_id):
        raise SpecError(f"--run-id {run_id!r} must be letters, digits, '-' and '_', with at least one letter")
    check_prepare(spec)
    if spec.output.format == "delta" and importlib.util.find_spec("deltalake") is None:
        raise SpecError('output.format = "delta" needs the deltalake package: '
                        'pip install "manymodels[delta]"')
    source = open_source(spec.data.source, spec.data.format, spec.data.key_types,
                         spec.data.partition_by)
    d = spec.data
    check_columns(source, {"partition_by": d.partition_by, "score.passthrough": spec.score.passthrough})
    wanted = parse_only(only, d.partition_by)
    reg = Registry(spec.output.registry)
    if run_id is not None:
        _check_rerun(reg, spec.name, run_id)
    if not reg.has_index(spec.name):  # pinned or not: nothing can score
        raise InputError(f"the registry {reg.url} has no models of job {spec.name!r}: train it first")
    scores = Store(spec.output.scores)

    def plan_run() -> tuple[Plan, list[ScorePartition], dict[str, ModelRef | str]]:
        """Every partition's key, rows and model, read while Ray starts (Engine.started)."""
        plan = plan_partitions(source, d.partition_by, wanted)
        if not plan.partitions:
            raise InputError("no partition matches --only" if only else f"{source.url!r} has no partitions")
        refs = _model_refs(reg, spec, plan.keys, plan.partitions, model_version, train_run,
                           [source.schema.field(k).type for k in plan.keys], source.url)
        # After the plan and the model look-up: a run they stop leaves no scores folder.
        reg.store.check_writable()
        scores.check_writable()
        planned = []
        for p in plan.partitions:
            ref = refs[partition_id(plan.keys, p.key)]
            planned.append(ScorePartition(key=p.key, partition=encode_partition(plan.keys, p.key),
                                          rows=p.rows, model=ref if isinstance(ref, ModelRef) else None,
                                          reason=ref if isinstance(ref, str) else "", files=p.files))
        return plan, planned, refs

    run_id = run_id or new_run_id("score")
    delta = spec.output.format == "delta"
    final_url = scores.uri(spec.name if delta else f"{spec.name}/score_run_id={run_id}")
    # Delta: staged inside the table (invisible until committed), in a folder of this attempt alone,
    # so a re-run never overwrites the files the current version of the run is read from.
    staging_url = scores.uri(f"{spec.name}/{DELTA_PARTITION}={run_id}/attempt-{uuid.uuid4().hex}" if delta
                             else f".staging/{spec.name}/{run_id}-{os.getpid()}")
    address = address or os.environ.get("RAY_ADDRESS") or None
    outcomes: list[ScoreOutcome] = []
    nodes: set[str] = set()
    reserved_cpu_s = reserved_gpu_s = 0.0
    engine = Engine(address, num_cpus=num_cpus)
    # Errors above (spec, prepare, data schema, registry) come before Ray starts; planning and model
    # look-up errors stop it again. Either way, nothing is written (exit 2 in the CLI).
    with engine.started(beside=plan_run) as (plan, planned, refs):
        keys = plan.keys
        keep = [*keys, *[c for c in spec.score.passthrough if c not in keys]]
        if d.time_column and d.time_column in source.schema.names and d.time_column not in keep:
            keep.append(d.time_column)
        record: dict[str, Any] = {
            "run_id": run_id, "job": spec.name, "kind": "score", "status": "running",
            "started_at": utc_now().isoformat(), "spec": spec.to_dict(), "spec_path": spec.path,
            "data": source.url, "output": scores.uri(spec.name), "registry": reg.url,
            "environment": environment(), "model_version": model_version, "train_run": train_run,
            "driver": process_identity()}
        fallback = next((r for r in refs.values() if isinstance(r, ModelRef) and r.version == 0), None)
        if fallback is not None:  # rows scored by it say model_version 0: the record names its version
            record["global_model"] = {"version": fallback.global_version, "run_id": fallback.run_id}
        ctx = ScoreContext(spec=spec, source=source, keys=keys, columns=None, keep=tuple(keep),
                           registry_url=reg.url, staging_url=staging_url, run_id=run_id,
                           scored_at=utc_now())
        # Only once Ray is up: a Ray that cannot be started or joined leaves no "running" record.
        reg.write_run(spec.name, run_id, record)
        cluster = engine.resources()
        slots = cluster.get("CPU", 1.0)
        # Scoring a row is far cheaper than training on it: bigger chunks, fewer model-cache misses.
        tasks = [ScoreTask(chunk=n, partitions=tuple(planned[i] for i in idx), files=files, resources=res)
                 for n, (res, idx, files) in enumerate(pack_plan(plan, spec, slots, min_rows=20_000,
                                                                 max_rows=1_000_000))]
        gate = budget_gate(spec, engine.embedded, cluster, started, outcomes, len(planned))

        with RunProgress(f"score {spec.name}", len(planned), progress) as bar:
            unscored = 0
            for item in engine.map(score_chunk, tasks, resources=[t.resources for t in tasks],
                                   shared=ctx, max_retries=spec.run.max_retries,
                                   gate=gate):
                if item is None:
                    continue
                i, result, node, task_wall = item
                reserved_cpu_s += task_wall * tasks[i].resources.num_cpus
                reserved_gpu_s += task_wall * tasks[i].resources.num_gpus
                if result is NOT_SUBMITTED:
                    result = [_out(p, tasks[i].resources, status="unscored", rows=p.rows, reason="budget")
                              for p in tasks[i].partitions]
                elif isinstance(result, BaseException):
                    reason = f"task failed: {type(result).__name__}: {str(result).splitlines()[0][:200]}"
                    result = [_out(p, tasks[i].resources, status="unscored", rows=p.rows, reason=reason)
                              for p in tasks[i].partitions]
                    # Its rows are unscored: a staged file from an earlier attempt must not publish them.
                    staged = Store(staging_url)
                    for key in staged.glob(f"part-{tasks[i].chunk:05d}*.parquet"):
                        staged.delete(key)
                if node:
                    nodes.add(node)
                for o in result:
                    outcomes.append(dataclasses.replace(o, node=node))
                    unscored += o.status != "scored"
                bar.update(len(outcomes), unscored)
        embedded = engine.embedded
    staging = Store(staging_url)
    if delta:
        _publish_delta(staging, Store(final_url), run_id)
    else:
        if staging.local:
            os.makedirs(staging.root, exist_ok=True)  # a run that scored nothing still replaces old rows
        _publish(staging, final_url)
        if staging.local:
            with contextlib.suppress(OSError):  # the job's staging folder, if no other run uses it now
                os.rmdir(os.path.dirname(staging.root))
                os.rmdir(os.path.dirname(os.path.dirname(staging.root)))
    wall = time.perf_counter() - started
    held = (_held_embedded(cluster) if embedded else
            Held(cpus=reserved_cpu_s / wall, gpus=reserved_gpu_s / wall))
    return _finish(reg, spec, run_id, record, outcomes, sorted(nodes), held, wall, plan, final_url)


SCORE_PARTITION_SCHEMA = pa.schema([
    ("partition", pa.string()), ("status", pa.string()), ("reason", pa.string()), ("rows", pa.int64()),
    ("model_version", pa.int64()), ("wall_s", pa.float64()), ("num_cpus", pa.float64()),
    ("num_gpus", pa.float64()), ("memory_mb", pa.int64()), ("cpu_seconds", pa.float64()),
    ("gpu_seconds", pa.float64()), ("cost_usd", pa.float64()), ("node", pa.string()),
])


def _finish(reg: Registry, spec: JobSpec, run_id: str, record: Mapping[str, Any],
            outcomes: Sequence[ScoreOutcome], nodes: list[str], held: Held, wall: float, plan: Plan,
            output: str) -> ScoreSummary:
    costs = [partition_cost(o.wall_s, o.num_cpus, o.num_gpus, o.memory_mb, spec.cost) for o in outcomes]
    cost = job_cost(wall, held, costs, spec.cost)
    unscored = [{"partition": json.loads(o.partition), "rows": o.rows, "reason": o.reason}
                for o in outcomes if o.status != "scored"]
    # Rows the plan counted but no task reported (cannot happen unless data changed underfoot)
    # are unscored too: input = scored + unscored holds by construction.
    scored_rows = sum(o.rows for o in outcomes if o.status == "scored")
    reported = scored_rows + sum(u["rows"] for u in unscored)
    if reported < plan.total_rows:
        unscored.append({"partition": None, "rows": plan.total_rows - reported,
                         "reason": "rows not reported by any task (the data changed while scoring?)"})
    total = len(plan.partitions)
    failed = sum(1 for o in outcomes if o.status != "scored")
    status = "succeeded" if failed <= spec.run.max_failure_fraction * total else "failed"
    summary = ScoreSummary(run_id=run_id, job=spec.name, status=status, input_rows=plan.total_rows,
                           scored_rows=scored_rows,
                           partitions_scored=sum(o.status == "scored" for o in outcomes),
                           unscored=unscored, output=output, cost=cost, wall_s=wall, nodes=nodes)
    rows = [{"partition": o.partition, "status": o.status, "reason": o.reason, "rows": o.rows,
             "model_version": o.model_version, "wall_s": o.wall_s, "num_cpus": o.num_cpus,
             "num_gpus": o.num_gpus, "memory_mb": o.memory_mb, "cpu_seconds": c.cpu_seconds,
             "gpu_seconds": c.gpu_seconds, "cost_usd": c.cost_usd, "node": o.node}
            for o, c in zip(outcomes, costs, strict=True)]
    full = {**record, **summary.to_dict(), "finished_at": utc_now().isoformat()}
    reg.write_run(spec.name, run_id, full, pa.Table.from_pylist(rows, schema=SCORE_PARTITION_SCHEMA))
    return summary
