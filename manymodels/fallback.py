"""The cold-start fallback: one global model across all partitions (``[score] fallback = "global"``).

The global model is versioned in the registry like a partition, under the pseudo-partition id
:data:`~manymodels.registry.GLOBAL_PID` with the partition text ``"{}"``. Every full ``train`` run
fits a candidate in one Ray task; it becomes the global champion only when it passes the job's gates
(``validation.max_metric`` / ``min_metric``) and is not worse than the current global champion on
the same holdout rows, exactly the rule for a partition. A rejected candidate is kept as a
``rejected`` version and the champion keeps scoring. ``--only`` / ``--limit`` runs never refit it:
they see a subset of the partitions, and a model of a subset is not a global model.

The partition keys are categorical features, so the model learns per-partition offsets and still
predicts for a partition it has never seen (its key code is missing). ``score`` uses the champion for
partitions that have no champion of their own, writing ``model_version = 0`` (the contract's mark of
the global model) and the global version's training run id in ``model_run_id``; the score run record
names the global version (``global_model``).

Bounded input: the task never reads every row into memory. It streams the data batch by batch and
keeps, per partition, the rows with the smallest stable row hash (a bottom-k sample): at most
``min(fallback_rows_per_partition, fallback_max_rows // partitions)`` rows per partition (at least 1)
and at most ``fallback_max_rows`` rows in total. The sample is a pure function of the rows, whatever
the file order or batch size, and the task holds at most twice the sample plus one batch.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from manymodels.data import Source, fingerprint_rows, schema_tag
from manymodels.pipeline import PartitionError, load_prepare, run_prepare, select_features, train_partition
from manymodels.registry import GLOBAL_PID, NewVersion, Registry
from manymodels.spec import JobSpec
from manymodels.storage import Store

__all__ = [
    "GLOBAL_PARTITION",
    "GlobalOutcome",
    "GlobalTask",
    "Sample",
    "global_champion",
    "global_hash",
    "global_spec",
    "global_state",
    "global_versions",
    "partition_cap",
    "rollback_global",
    "sample_rows",
    "stable_row_hashes",
    "train_global",
]

GLOBAL_PARTITION = "{}"
"""The encoded partition text of the global model (it has no key values)."""

_GROUP = "__manymodels_group"
_HASH = "__manymodels_hash"
_NO_LIMIT = np.uint64(np.iinfo(np.uint64).max)


def global_spec(spec: JobSpec) -> JobSpec:
    """The spec the global model uses: partition keys become categorical features."""
    d = spec.data
    features = (*d.partition_by, *d.features) if d.features else ()
    categorical = tuple(dict.fromkeys((*d.categorical, *d.partition_by)))
    # Keys are features here, so they must not be reserved: an empty partition_by is not allowed
    # by the spec checks, but select_features reads it, so the keys are listed explicitly instead.
    return dataclasses.replace(spec, data=dataclasses.replace(
        d, features=features, categorical=categorical, partition_by=()))


def global_hash(spec: JobSpec, spec_hash: str) -> str:
    """What the global model's registry entry records as its spec hash: the job's spec hash plus
    the sample caps, so that changing a cap refits the model even when no partition changed."""
    s = spec.score
    text = f"{spec_hash}\0{s.fallback_rows_per_partition}\0{s.fallback_max_rows}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- the bounded sample


def partition_cap(n_partitions: int, per_partition: int, max_rows: int) -> int:
    """Rows kept per partition: ``min(per_partition, max_rows // n_partitions)``, at least 1."""
    return max(1, min(per_partition, max_rows // max(1, n_partitions)))


def stable_row_hashes(rows: pa.Table | pa.RecordBatch) -> np.ndarray:
    """One 64-bit hash per row of its values, the same whichever batch or file the row comes from.

    pandas turns an integer column with a null into float64 and one without into int64, and a
    boolean column into object, so the same row would hash differently in two batches: numbers and
    booleans are hashed as float64, dictionary columns as their values. Nested columns (lists,
    structs, maps) cannot be hashed by pandas and take no part.
    """
    cols: dict[str, pa.Array | pa.ChunkedArray] = {}
    for col in rows.columns:
        t = col.type
        if pa.types.is_dictionary(t):
            col, t = pc.cast(col, t.value_type), t.value_type
        if pa.types.is_nested(t):
            continue
        if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t) \
                or pa.types.is_decimal(t):
            col = pc.cast(col, pa.float64())
        cols[f"c{len(cols)}"] = col  # positional names: a data column may be called anything
    if not cols or rows.num_rows == 0:
        return np.zeros(rows.num_rows, dtype=np.uint64)
    frame = pa.table(cols).to_pandas()
    return pd.util.hash_pandas_object(frame, index=False).to_numpy()


@dataclass(frozen=True)
class Sample:
    """The global model's bounded input.

    Attributes:
        frame: the sampled rows, grouped by partition (each partition a contiguous slice).
        spans: ``(start, stop)`` of each partition's rows in ``frame``.
        hashes: each sampled row's stable hash (in ``frame`` order).
        per_partition: the cap on rows kept per partition.
        max_rows: the cap on rows kept in total.
        rows_read: rows scanned.
        peak_held: the most rows the scan held at once (kept rows plus candidates).
    """

    frame: pd.DataFrame
    spans: list[tuple[int, int]]
    hashes: np.ndarray
    per_partition: int
    max_rows: int
    rows_read: int
    peak_held: int


def _bottom_k(table: pa.Table, k: int) -> pa.Table:
    """Per group, the ``k`` rows with the smallest hash; sorted by (group, hash)."""
    if table.num_rows == 0:
        return table
    groups = table.column(_GROUP).to_numpy()
    hashes = table.column(_HASH).to_numpy()
    order = np.lexsort((hashes, groups))  # stable: equal (group, hash) rows are equal rows anyway
    groups = groups[order]
    first = np.ones(len(groups), dtype=bool)
    first[1:] = groups[1:] != groups[:-1]
    starts = np.maximum.accumulate(np.where(first, np.arange(len(groups)), 0))
    rank = np.arange(len(groups)) - starts
    return table.take(pa.array(order[rank < k]))


def _thresholds(kept: pa.Table, k: int) -> tuple[pd.Index, np.ndarray]:
    """For each full group (``k`` rows kept): the largest kept hash. A row with a hash not below
    it cannot enter its group's bottom-k any more."""
    groups = kept.column(_GROUP).to_numpy()
    hashes = kept.column(_HASH).to_numpy()
    if len(groups) == 0:
        return pd.Index(np.zeros(0, dtype=np.uint64)), np.zeros(0, dtype=np.uint64)
    last = np.ones(len(groups), dtype=bool)
    last[:-1] = groups[1:] != groups[:-1]
    first = np.ones(len(groups), dtype=bool)
    first[1:] = groups[1:] != groups[:-1]
    counts = np.diff(np.append(np.flatnonzero(first), len(groups)))
    full = counts >= k
    return pd.Index(groups[last][full]), hashes[last][full]


def sample_rows(source: Source, keys: Sequence[str], files: Sequence[int], n_partitions: int,
                per_partition: int, max_rows: int, *, batch_size: int = 64 * 1024) -> Sample:
    """Stream ``files`` of ``source`` and keep a deterministic bottom-k sample per partition.

    Each row's stable hash (:func:`stable_row_hashes`) ranks it; a partition keeps its
    :func:`partition_cap` smallest. Candidates collect until they are as many as the sample may
    hold, then are folded into the kept rows, so memory stays within twice the sample plus one
    batch however large the input. If one row per partition is already more than ``max_rows``,
    the ``max_rows`` rows with the smallest hashes are kept.

    Args:
        source: the opened data.
        keys: the partition_by columns.
        files: indices into ``source.files`` to read.
        n_partitions: how many partitions the data holds (from planning).
        per_partition: ``[score] fallback_rows_per_partition``.
        max_rows: ``[score] fallback_max_rows``.
        batch_size: rows per scanned batch.
    """
    k = partition_cap(n_partitions, per_partition, max_rows)
    capacity = k * max(1, n_partitions)
    kept: pa.Table | None = None
    pending: list[pa.Table] = []
    pending_rows = rows_read = peak = 0
    full_groups, limits = pd.Index(np.zeros(0, dtype=np.uint64)), np.zeros(0, dtype=np.uint64)
    scanner = source.dataset([source.files[i] for i in files]).scanner(
        batch_size=batch_size, batch_readahead=1, fragment_readahead=1, use_threads=True)
    reader = scanner.to_reader()
    try:  # closed on every path: a scan left open can abort the interpreter at exit
        for batch in reader:
            if batch.num_rows == 0:
                continue
            rows_read += batch.num_rows
            groups = stable_row_hashes(batch.select(list(keys)))
            hashes = stable_row_hashes(batch)
            pos = full_groups.get_indexer(pd.Index(groups))
            limit = np.where(pos >= 0, limits[np.maximum(pos, 0)] if len(limits) else _NO_LIMIT, _NO_LIMIT)
            enter = (pos < 0) | (hashes < limit)
            if not enter.any():
                continue
            table = pa.Table.from_batches([batch]).append_column(_GROUP, pa.array(groups, pa.uint64()))
            table = table.append_column(_HASH, pa.array(hashes, pa.uint64()))
            pending.append(table.filter(pa.array(enter)))
            pending_rows += int(enter.sum())
            peak = max(peak, pending_rows + (kept.num_rows if kept is not None else 0))
            if pending_rows >= capacity:
                kept = _bottom_k(pa.concat_tables([t for t in (kept, *pending) if t is not None]), k)
                pending, pending_rows = [], 0
                full_groups, limits = _thresholds(kept, k)
    finally:
        reader.close()
    parts = [t for t in (kept, *pending) if t is not None]
    if parts:
        kept = _bottom_k(pa.concat_tables(parts), k)
    else:
        kept = source.schema.empty_table().append_column(_GROUP, pa.array([], pa.uint64())).append_column(
            _HASH, pa.array([], pa.uint64()))
    if kept.num_rows > max_rows:  # more partitions than max_rows: the smallest hashes overall
        order = np.argsort(kept.column(_HASH).to_numpy(), kind="stable")[:max_rows]
        kept = kept.take(pa.array(np.sort(order)))
    groups = kept.column(_GROUP).to_numpy()
    hashes = kept.column(_HASH).to_numpy()
    bounds = np.flatnonzero(np.diff(groups)) + 1 if len(groups) else np.zeros(0, dtype=np.int64)
    edges = [0, *bounds.tolist(), len(groups)]
    spans = [(a, b) for a, b in itertools.pairwise(edges) if b > a]
    frame = kept.drop_columns([_GROUP, _HASH]).to_pandas(split_blocks=True, self_destruct=False)
    return Sample(frame=frame, spans=spans, hashes=hashes, per_partition=k, max_rows=max_rows,
                  rows_read=rows_read, peak_held=peak)


# ----------------------------------------------------------------------------- training (one Ray task)


@dataclass(frozen=True)
class GlobalTask:
    """What the global model's task reads: every file of a full run, and the champion to beat."""

    source: Source
    keys: tuple[str, ...]
    files: tuple[int, ...]
    n_partitions: int
    champion_key: str | None


@dataclass(frozen=True)
class GlobalOutcome:
    """A fitted global model candidate (its file already written), for the driver to register."""

    model_key: str
    metric: float
    metrics: dict[str, float]
    promote: bool
    reason: str
    rows: int
    features: tuple[str, ...]
    fingerprint: str
    time_min: str | None
    time_max: str | None
    trained_at: dt.datetime
    sample: dict[str, int] = field(default_factory=dict)
    comparison: str = ""


def train_global(task: GlobalTask, ctx: Any) -> GlobalOutcome:
    """Fit the global model on a bounded sample of every partition (runs as one Ray task).

    ``prepare`` runs per partition on the sampled rows, exactly as for the per-partition models;
    a partition whose ``prepare`` fails is left out (and counted). The candidate is judged against
    the global champion on this holdout (``task.champion_key``) by :func:`train_partition`.

    Raises:
        PartitionError: no rows to train on, or the model cannot be trained.
    """
    spec: JobSpec = ctx.spec
    s = spec.score
    sample = sample_rows(task.source, task.keys, task.files, task.n_partitions,
                         s.fallback_rows_per_partition, s.fallback_max_rows)
    prepare = load_prepare(spec)
    parts, failed = [], 0
    for a, b in sample.spans:
        try:
            parts.append(run_prepare(sample.frame.iloc[a:b].reset_index(drop=True), prepare))
        except PartitionError:
            failed += 1
    if not parts:
        raise PartitionError("no partition's rows could be prepared for the global model")
    data = pd.concat(parts, ignore_index=True)
    gspec = global_spec(spec)
    if not gspec.data.features:
        own = select_features(list(data.columns), list(data.dtypes), spec)
        gspec = dataclasses.replace(gspec, data=dataclasses.replace(
            gspec.data, features=(*task.keys, *[c for c in own if c not in task.keys])))
    store = Store(ctx.registry_url)
    champion = None
    if task.champion_key is not None:
        try:  # as for a partition: an unreadable champion does not block its replacement
            champion = store.read_bytes(task.champion_key).decode("utf-8", errors="replace")
        except FileNotFoundError:
            champion = None
    result = train_partition(data, gspec, champion=champion,
                             num_threads=max(1, int(spec.resources.num_cpus)))
    key = Registry.model_key(spec.name, GLOBAL_PID, ctx.run_id)
    store.write_bytes(key, result.model_str.encode())
    info = {"rows_read": sample.rows_read, "rows": len(sample.frame), "partitions": len(sample.spans),
            "partitions_failed": failed, "per_partition_cap": sample.per_partition,
            "max_rows": sample.max_rows, "peak_rows_held": sample.peak_held}
    metrics = {**result.metrics, **{f"sample_{k}": float(v) for k, v in info.items()}}
    return GlobalOutcome(
        model_key=key, metric=result.metric, metrics=metrics, promote=result.promote,
        reason=result.reason, rows=result.rows, features=result.features,
        fingerprint=fingerprint_rows(sample.hashes, schema_tag(sample.frame)),
        time_min=result.time_min, time_max=result.time_max, trained_at=dt.datetime.now(dt.UTC),
        sample=info, comparison=result.comparison)


def new_global_version(outcome: GlobalOutcome, run_id: str, spec: JobSpec, ghash: str) -> NewVersion:
    """The registry entry of a fitted candidate (promoted or rejected by its own verdict)."""
    return NewVersion(
        pid=GLOBAL_PID, partition=GLOBAL_PARTITION, run_id=run_id, trained_at=outcome.trained_at,
        rows=outcome.rows, metric=spec.metric, metric_value=float(outcome.metric),
        metrics=outcome.metrics, fingerprint=outcome.fingerprint, spec_hash=ghash,
        model_key=outcome.model_key, features=outcome.features, time_min=outcome.time_min,
        time_max=outcome.time_max, promote=outcome.promote, reason=outcome.reason,
        comparison=outcome.comparison)


# ----------------------------------------------------------------------------- registry access


def global_state(reg: Registry, job: str) -> dict[str, Any] | None:
    """The global model's champion and latest index rows (``None``: never registered)."""
    return reg.state(job, [GLOBAL_PID]).get(GLOBAL_PID)


def global_champion(reg: Registry, job: str) -> dict[str, Any] | None:
    """The index row of the global champion, the model that scores partitions without one."""
    state = global_state(reg, job)
    return None if state is None else state["champion"]


def global_versions(reg: Registry, job: str) -> list[dict[str, Any]]:
    """Every version of the global model (index rows with their current status), oldest first.

    ``Registry.list`` shows partitions only; this is the global model's ``models list --all``.
    """
    table = reg.table(job)
    rows = table.filter(pc.equal(table.column("pid"), GLOBAL_PID)).to_pylist()
    return sorted(rows, key=lambda r: int(r["version"]))


def rollback_global(reg: Registry, job: str) -> int:
    """Restore the previous good global model (the newest archived version older than the champion,
    exactly as ``Registry.rollback`` does for a partition); returns the version that now scores.

    Raises:
        RegistryError: there is no global champion, or no earlier good version to restore.
    """
    return reg.rollback(job, {}).version
