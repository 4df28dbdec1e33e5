"""The model registry: versioned models per partition, an ordered commit log, and run records, on any
fsspec URL.

Layout under ``<registry>/<job>/``::

    models/<partition id>/<run id>.txt         LightGBM text models, written by the workers
    log/<N:020d>.parquet                       commit N (N = 1, 2, ...): version events, in order
    log/<N:020d>.checkpoint.live.parquet       the state after commit N: each partition's champion
                                               and latest version (what planning and serving read)
    log/<N:020d>.checkpoint.all.parquet        the state after commit N: every version's current row
    runs/<run id>/run.json                     a run's summary (train or score)
    runs/<run id>/partitions.parquet           one row per partition of that run

A partition id is a short slug of the key values plus a hash of their exact typed values: never a
raw value as a path part. The log is the only thing readers trust: a model file becomes visible only
when a commit naming it exists, and the model was written before. The log works like a table
format's (Delta Lake's): a writer reads the state, computes its events (the next version number of a
partition is its highest + 1) and creates commit N+1 *only if absent* (an exclusive create, atomic on
local disks, S3, GCS and Azure); if another writer got N+1 first it reads the new commits and
computes again. No lock, no clock: events are ordered by (commit number, row), and the latest event
per (partition, version) wins. Checkpoints summarise the log every few commits (and at the end of
every train run), so a reader reads one checkpoint and the few commits after it; a checkpoint is a
pure function of the commits up to its number, so writing it twice or leaving older files behind
never shows anything twice.
"""

from __future__ import annotations

import builtins
import dataclasses
import datetime as dt
import hashlib
import io
import json
import logging
import math
import random
import re
import time
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from manymodels.storage import StorageError, Store, parquet_from_bytes, process_gone
from manymodels.trees import COMPACT_SUFFIX

__all__ = [
    "GLOBAL_PID",
    "GcReport",
    "ModelVersion",
    "NewVersion",
    "Registry",
    "RegistryError",
    "decode_partition",
    "encode_partition",
    "partition_id",
]

STATUSES = ("champion", "archived", "rejected")
REMOVED = "removed"  # a version deleted by gc: a tombstone event, never listed
KEPT_STATUSES = ["champion", "challenger"]  # gc never removes these, however old

GLOBAL_PID = "__global__"
"""The pseudo-partition id under which a job's global fallback model is versioned (partition ``{}``).
Never a real partition's id (those are ``<slug>-<hash>``); ``list()`` hides it unless asked."""

LOG = "log"
SEQ_STRIDE = 1_000_000_000  # seq = commit number * SEQ_STRIDE + row within the commit
CHECKPOINT_EVERY = 10  # commits between checkpoints
COMMIT_TRIES = 50
ROW_GROUP_ROWS = 2048  # log files: small row groups, so that one partition's lookup reads one
SCORE_PROTECT_DAYS = 7

_COMMIT = re.compile(r"(\d{20})\.parquet")
_CHECKPOINT = re.compile(r"(\d{20})\.checkpoint\.(live|all)\.parquet")

log = logging.getLogger(__name__)

INDEX_SCHEMA = pa.schema([
    ("pid", pa.string()), ("partition", pa.string()), ("version", pa.int64()), ("status", pa.string()),
    ("run_id", pa.string()), ("trained_at", pa.timestamp("us", tz="UTC")), ("rows", pa.int64()),
    ("metric", pa.string()), ("metric_value", pa.float64()), ("metrics", pa.string()),
    ("fingerprint", pa.string()), ("spec_hash", pa.string()), ("model_key", pa.string()),
    ("features", pa.string()), ("time_min", pa.string()), ("time_max", pa.string()),
    ("previous_version", pa.int64()), ("reason", pa.string()), ("comparison", pa.string()),
    ("seq", pa.int64()),
])


class RegistryError(LookupError):
    """A registry lookup or change cannot be done (unknown partition, version, run)."""


def _json_value(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    if hasattr(value, "item"):
        return _json_value(value.item())
    return str(value)


def encode_partition(names: Sequence[str], key: Sequence[Any]) -> str:
    """Canonical JSON of a partition key: ``{"col": value, ...}`` in partition_by order."""
    return json.dumps({n: _json_value(v) for n, v in zip(names, key, strict=True)},
                      ensure_ascii=False, separators=(",", ":"))


def decode_partition(text: str) -> dict[str, Any]:
    """The ``{column: value}`` object of an encoded partition key."""
    out: dict[str, Any] = json.loads(text)
    return out


def _typed(value: Any) -> str:
    # The type family is part of the identity, so "1" and 1 are different partitions, but an int32
    # Hive folder value and an int64 file column are the same one.
    if isinstance(value, np.generic):
        value = value.item()  # numpy scalars (np.int64(1), np.bool_) are their Python values
    if value is None:
        return "n:"
    if isinstance(value, bool):
        return f"b:{value}"
    if isinstance(value, int):
        return f"i:{value}"
    if isinstance(value, float):
        return f"i:{int(value)}" if value.is_integer() else f"f:{value!r}"
    return f"s:{_json_value(value)}"


def partition_id(names: Sequence[str], key: Sequence[Any]) -> str:
    """A path-safe, fixed-shape id of a partition key: ``<slug>-<hash>``.

    The slug (at most 40 characters of ``[a-z0-9_.-]``, never ``.`` or ``..``) is for humans; the
    hash of the typed values makes the id unique. No key value ever reaches a path unescaped.
    The hashed text is JSON (``[[name, typed value], ...]``, every character escaped), so no name or
    value can forge a separator and collide with another key.
    """
    raw = json.dumps([[n, _typed(v)] for n, v in zip(names, key, strict=True)], ensure_ascii=True,
                     separators=(",", ":"))
    digest = hashlib.sha256(raw.encode("ascii")).hexdigest()[:20]
    text = "_".join("null" if v is None else str(v) for v in key)
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
    slug = re.sub(r"[^a-z0-9_.-]+", "-", text).strip("-.")[:40].strip("-.")
    return f"{slug}-{digest}" if slug else digest


@dataclass(frozen=True)
class NewVersion:
    """A trained model to register (its file already written by the worker)."""

    pid: str
    partition: str
    run_id: str
    trained_at: dt.datetime
    rows: int
    metric: str
    metric_value: float
    metrics: Mapping[str, float]
    fingerprint: str
    spec_hash: str
    model_key: str
    features: Sequence[str]
    time_min: str | None
    time_max: str | None
    promote: bool
    reason: str
    comparison: str = ""  # what the champion comparison compared (filled by the pipeline)


@dataclass(frozen=True)
class ModelVersion:
    """One version of one partition's model, as the registry knows it."""

    job: str
    pid: str
    partition: dict[str, Any]
    version: int
    status: str
    run_id: str
    trained_at: str
    rows: int
    metric: str
    metric_value: float | None
    metrics: dict[str, float]
    fingerprint: str
    spec_hash: str
    model_uri: str
    features: list[str]
    time_min: str | None
    time_max: str | None
    previous_version: int | None
    reason: str
    environment: dict[str, str] | None = None  # the training run's; filled by get()
    comparison: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (the contract's ``models list/show --json`` entries): a metric that
        is NaN or infinite (a rejected version's) becomes ``null``, so strict JSON parsers read it."""
        out = dataclasses.asdict(self)
        out["metrics"] = {k: _finite(v) for k, v in self.metrics.items()}
        out["metric_value"] = _finite(self.metric_value)
        return out


def _finite(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


@dataclass(frozen=True)
class GcReport:
    """What ``Registry.gc`` removed (or, with ``dry_run``, would remove)."""

    job: str
    dry_run: bool
    kept: int
    removed: int
    removed_versions: list[dict[str, Any]] = field(default_factory=list)  # the first 100
    orphan_files_removed: int = 0
    bytes_freed: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The ``models gc --json`` object."""
        return dataclasses.asdict(self)


def _live_status(record: dict[str, Any]) -> dict[str, Any]:
    """A run record whose driver died while it was running reads as ``interrupted``."""
    if record.get("status") == "running" and process_gone(record.get("driver")):
        return {**record, "status": "interrupted"}
    return record


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class _Listing:
    """The files of a job's log at one moment: commit and checkpoint numbers → keys."""

    def __init__(self, keys: Iterable[str]) -> None:
        self.commits: dict[int, str] = {}
        self.checkpoints: dict[str, dict[int, str]] = {"live": {}, "all": {}}
        for key in keys:
            name = key.rsplit("/", 1)[-1]
            if m := _COMMIT.fullmatch(name):
                self.commits[int(m.group(1))] = key
            elif m := _CHECKPOINT.fullmatch(name):
                self.checkpoints[m.group(2)][int(m.group(1))] = key
        self.head = max(self.commits, default=0)


def _pid_filter(table: pa.Table, pids: Iterable[str]) -> pa.Array:
    return pc.is_in(table.column("pid"), value_set=pa.array(builtins.list(pids), pa.string()))


def _latest_per_pid(rows: pa.Table) -> pa.Table:
    """Of resolved rows: each partition's champion and its highest version (no tombstones)."""
    rows = rows.filter(pc.not_equal(rows.column("status"), REMOVED))
    if rows.num_rows == 0:
        return rows
    top = rows.group_by("pid", use_threads=False).aggregate([("version", "max")])
    keep = rows.join(top, keys="pid", join_type="left outer", use_threads=False)
    mask = pc.or_(pc.equal(keep.column("status"), "champion"),
                  pc.equal(keep.column("version"), keep.column("version_max")))
    return keep.filter(mask).select(INDEX_SCHEMA.names)


def _last_events(events: pa.Table) -> pa.Table:
    """One row per (partition, version): its event of the highest ``seq`` (log order)."""
    if events.num_rows == 0:
        return events
    last = events.group_by(["pid", "version"], use_threads=False).aggregate([("seq", "max")])
    keyed = events.join(last, keys=["pid", "version", "seq"], right_keys=["pid", "version", "seq_max"],
                        join_type="inner", use_threads=False)
    return keyed.select(INDEX_SCHEMA.names)


def _pairs(rows: pa.Table, name: str) -> Any:
    """``<name>\\0<version>`` per row: one text key per (partition, version), for set lookups."""
    version = pc.cast(rows.column("version"), pa.string())
    return pc.binary_join_element_wise(rows.column(name), version, "\x00")


def _features_json(memo: dict[tuple[str, ...], str], features: Sequence[str]) -> str:
    key = tuple(features)
    if key not in memo:
        memo[key] = json.dumps(builtins.list(key))
    return memo[key]


def _by_partition(table: pa.Table) -> pa.Table:
    """Rows sorted by partition text (a stable sort): log files are written so, in small row groups,
    so that one partition's rows are read through the row-group statistics."""
    return table.take(pc.sort_indices(table, sort_keys=[("partition", "ascending")]))


def _parquet(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=ROW_GROUP_ROWS)
    return buf.getvalue()


def _conform(table: pa.Table) -> pa.Table:
    """A log table in today's schema (columns added since it was written read as null)."""
    for f in INDEX_SCHEMA:
        if f.name not in table.column_names:
            table = table.append_column(f.name, pa.nulls(table.num_rows, f.type))
    return table.select(INDEX_SCHEMA.names).cast(INDEX_SCHEMA)


class Registry:
    """A model registry rooted at an fsspec URL (local folder, ``s3://bucket/prefix``, ...).

    Example:
        >>> reg = Registry("registry")
        >>> champions = reg.list("transit-delays")
        >>> booster = reg.load_model("transit-delays", {"station": "stn-00001"})
    """

    # Called with (job, commit number) right before each put-if-absent of a commit: tests use it to
    # hold two writers at a barrier so that they race for the same number. None in production.
    before_create: ClassVar[Callable[[str, int], None] | None] = None

    def __init__(self, url: str) -> None:
        self.store = Store(url)
        self.url = self.store.url
        self._files: dict[str, pa.Table | None] = {}  # log files never change once written
        self._exclusive_checked = False
        self._legacy_checked: set[str] = set()
        # (job, kind) → (last commit number applied, resolved rows): commits never change, so a view
        # moves forward by applying only the commits after it (one per train batch)
        self._views: dict[tuple[str, str], tuple[int, pa.Table]] = {}
        self._rows: dict[tuple[str, str], pa.Table] = {}  # (log file, partition) → its rows

    # ----------------------------------------------------------------- paths (pure)
    @staticmethod
    def model_key(job: str, pid: str, run_id: str) -> str:
        """Where a run's model for a partition is written (relative to the registry root)."""
        return f"{job}/models/{pid}/{run_id}.txt"

    @staticmethod
    def run_key(job: str, run_id: str, name: str = "run.json") -> str:
        """Where a run record's files live."""
        return f"{job}/runs/{run_id}/{name}"

    @staticmethod
    def commit_key(job: str, number: int) -> str:
        """The object of commit ``number`` of a job's log."""
        return f"{job}/{LOG}/{number:020d}.parquet"

    @staticmethod
    def checkpoint_key(job: str, number: int, kind: Literal["live", "all"]) -> str:
        """The checkpoint of ``kind`` summarising commits 1..``number``."""
        return f"{job}/{LOG}/{number:020d}.checkpoint.{kind}.parquet"

    # ----------------------------------------------------------------- log reading
    def _read_log_file(self, key: str, partition: str | None = None) -> pa.Table | None:
        """A commit or checkpoint table (cached); ``None`` (and a warning) when it cannot be read.

        With ``partition`` (an exact encoded key): only that partition's rows, read through the
        Parquet row-group statistics (log files are sorted by partition), and not cached.

        Raises:
            FileNotFoundError: it was removed since it was listed (the caller lists again).
        """
        if key in self._files:
            cached = self._files[key]
            if cached is None or partition is None:
                return cached
            return cached.filter(pc.equal(cached.column("partition"), partition))
        if partition is not None and (key, partition) in self._rows:
            return self._rows[(key, partition)]
        try:
            data = self.store.read_bytes(key)
        except FileNotFoundError:
            raise
        except OSError as exc:
            log.warning("registry: cannot read %s, skipping it: %s", self.store.uri(key), exc)
            return None  # not cached: a transient read error may pass
        try:
            if partition is not None:
                rows = _conform(parquet_from_bytes(data, ("partition", partition)))
                if len(self._rows) >= 4096:  # a bounded cache of single-partition lookups
                    self._rows.clear()
                self._rows[(key, partition)] = rows
                return rows
            table: pa.Table | None = _conform(parquet_from_bytes(data))
        except (pa.ArrowException, ValueError, KeyError) as exc:
            # A torn or foreign file: its number stays taken (writers go on at the next one), its
            # events are lost, and every other commit still reads.
            log.warning("registry: %s is unreadable, skipping it: %s", self.store.uri(key), exc)
            table = None
        self._files[key] = table
        return table

    def _view(self, job: str, kind: Literal["live", "all"],
              partition: str | None = None) -> tuple[pa.Table, int]:
        """Resolved index rows of ``job`` and the last commit number they include.

        ``live``: each partition's champion row and latest-version row. ``all``: every version's
        current row. Read from the newest readable checkpoint of that kind and the commits after it
        (only the rows of ``partition``, an exact encoded key, when given).
        """
        for _attempt in range(10):
            listing = _Listing(self.store.list(f"{job}/{LOG}"))
            listed = {*listing.commits.values(), *(k for c in listing.checkpoints.values()
                                                   for k in c.values())}
            memo = self._views.get((job, kind)) if partition is None else None
            if memo is not None and memo[0] == listing.head:
                return memo[1], listing.head
            try:
                if memo is not None and memo[0] < listing.head and all(
                        n in listing.commits for n in range(memo[0] + 1, listing.head + 1)):
                    base, base_n = memo[1], memo[0]  # forward from the view this process has
                else:
                    base, base_n = None, 0
                    for n in sorted(listing.checkpoints[kind], reverse=True):
                        if n > listing.head:
                            continue  # a checkpoint is written after its commit: never ahead of the log
                        base = self._read_log_file(listing.checkpoints[kind][n], partition)
                        if base is not None:
                            base_n = n
                            break
                tail_keys = [listing.commits[n] for n in sorted(listing.commits) if n > base_n]
                tail = [t for k in tail_keys if (t := self._read_log_file(k, partition)) is not None]
            except FileNotFoundError:
                continue  # cleaned up between listing and reading: list again
            for gone in [k for k in self._files if k.startswith(f"{job}/{LOG}/") and k not in listed]:
                del self._files[gone]  # cleaned up: keep the cache as small as the log
            prefix = f"{job}/{LOG}/"
            for gone_row in [k for k in self._rows if k[0].startswith(prefix) and k[0] not in listed]:
                del self._rows[gone_row]
            if not listing.commits and job not in self._legacy_checked and self._migrate_legacy(job):
                continue
            view = self._apply(base, tail, kind)
            # Remembered unless a commit could not be read for a passing reason (not cached: a later
            # call reads it again); a torn commit is cached as unreadable and stays skipped.
            if partition is None and all(k in self._files for k in tail_keys):
                self._views[(job, kind)] = (listing.head, view)
            return view, listing.head
        raise StorageError(f"the registry log of {job!r} in {self.url} kept changing while it was read")

    @staticmethod
    def _apply(base: pa.Table | None, tail: Sequence[pa.Table], kind: Literal["live", "all"]) -> pa.Table:
        """A checkpoint's rows with later commits applied: only partitions the commits touch are
        resolved again, so the cost follows the commits, not the checkpoint's size."""
        base = base if base is not None else INDEX_SCHEMA.empty_table()
        if not tail:
            return base
        events = pa.concat_tables(tail)
        if kind == "live":  # (at most two rows per partition): redo the partitions the commits touch
            in_base = _pid_filter(base, pc.unique(events.column("pid")).to_pylist())
        else:  # (the whole history): replace only the versions the commits touch
            in_base = pc.is_in(_pairs(base, "pid"), value_set=pc.unique(_pairs(events, "pid")))
        touched = bool(pc.any(in_base).as_py())  # False for partitions new to the log: no base copy
        resolved = _last_events(pa.concat_tables([base.filter(in_base), events]) if touched else events)
        if kind == "live":
            resolved = _latest_per_pid(resolved)
        else:
            resolved = resolved.filter(pc.not_equal(resolved.column("status"), REMOVED))
        return pa.concat_tables([base.filter(pc.invert(in_base)) if touched else base, resolved])

    def live(self, job: str) -> pa.Table:
        """Every partition's champion and latest-version rows (the live state, not the history)."""
        return self._view(job, "live")[0]

    def table(self, job: str) -> pa.Table:
        """Every version of every partition of ``job`` as index rows (an Arrow table, one row per
        version, with its current status): the fast path for programs that filter in bulk."""
        return self._view(job, "all")[0]

    def champions(self, job: str) -> pa.Table:
        """Every partition's champion as index rows (read from the live state only, not the history;
        the global model's too): what scoring needs."""
        live = self.live(job)
        return live.filter(pc.equal(live.column("status"), "champion"))

    def has_index(self, job: str) -> bool:
        """Whether ``job`` has a registry log (or an index of an older release)."""
        return bool(self.store.list(f"{job}/{LOG}") or self.store.exists(f"{job}/index"))

    def _versions(self, job: str, rows: pa.Table) -> builtins.list[ModelVersion]:
        """ModelVersion objects from index rows: columns converted in Arrow, JSON decoded in bulk."""
        if rows.num_rows == 0:
            return []
        base = self.store.uri("")
        prefix = base if base.endswith("/") else base + "/"
        trained = pc.replace_substring(pc.cast(rows.column("trained_at"), pa.string()), " ", "T")
        value = rows.column("metric_value")
        value = pc.if_else(pc.is_nan(value), pa.scalar(None, pa.float64()), value)
        reason = pc.fill_null(rows.column("reason"), "")
        comparison = pc.fill_null(rows.column("comparison"), "")

        def col(name: str) -> builtins.list[Any]:
            return rows.column(name).to_pylist()  # type: ignore[no-any-return]

        def bulk(values: builtins.list[str]) -> builtins.list[Any]:
            return json.loads("[" + ",".join(values) + "]")  # type: ignore[no-any-return]

        feature_text = col("features")
        feature_cache = {text: json.loads(text) for text in set(feature_text)}  # one list per set
        features = [feature_cache[text] for text in feature_text]
        n = rows.num_rows
        return builtins.list(map(
            ModelVersion, [job] * n, col("pid"), bulk(col("partition")), col("version"), col("status"),
            col("run_id"), trained.to_pylist(), col("rows"), col("metric"), value.to_pylist(),
            bulk(col("metrics")), col("fingerprint"), col("spec_hash"),
            [prefix + k for k in col("model_key")], features, col("time_min"), col("time_max"),
            col("previous_version"), reason.to_pylist(), [None] * n, comparison.to_pylist()))

    def jobs(self) -> list[str]:
        """Names of the jobs this registry holds."""
        return [k.rsplit("/", 1)[-1] for k in self.store.list("")
                if any(self.store.exists(f"{k}/{d}") for d in (LOG, "runs", "index"))]

    @staticmethod
    def _matching(rows: pa.Table, partition: Mapping[str, Any]) -> pa.Table:
        """Rows whose partition includes these ``{column: value}`` pairs, values compared as text.

        The exact encoded key is looked up first (one Arrow comparison); only when nothing matches
        that way (a partial key, values given as strings of another type) is every distinct
        partition text decoded and compared.
        """
        if not partition or rows.num_rows == 0:
            return rows
        exact = json.dumps({k: _json_value(v) for k, v in partition.items()}, ensure_ascii=False,
                           separators=(",", ":"))
        hit = rows.filter(pc.equal(rows.column("partition"), exact))
        if hit.num_rows:
            return hit
        want = {k: str(v) for k, v in partition.items()}
        texts = [t for t in pc.unique(rows.column("partition")).to_pylist()
                 if all(str(decode_partition(t).get(k)) == v for k, v in want.items())]
        return rows.filter(pc.is_in(rows.column("partition"), value_set=pa.array(texts, pa.string())))

    def list(self, job: str, *, partition: Mapping[str, Any] | None = None,
             all_versions: bool = False, include_global: bool = False) -> builtins.list[ModelVersion]:
        """Champions of ``job`` (one per partition), or every version with ``all_versions``.

        Args:
            job: the job name.
            partition: only entries whose key includes these ``{column: value}`` pairs (values
                compared as text, so ``--partition station=12`` matches an integer key 12).
            all_versions: every version of every partition, rejected and archived ones too
                (read from the full history; champions alone read only the live state).
            include_global: also the global fallback model's versions (:data:`GLOBAL_PID`).

        Returns:
            Entries sorted by partition, then version.
        """
        if all_versions:
            rows = self.table(job)
        else:
            rows = self.live(job)
            rows = rows.filter(pc.equal(rows.column("status"), "champion"))
        if not include_global and rows.num_rows:
            rows = rows.filter(pc.not_equal(rows.column("pid"), GLOBAL_PID))
        rows = self._matching(rows, partition or {})
        if rows.num_rows:
            rows = rows.take(pc.sort_indices(rows, sort_keys=[("partition", "ascending"),
                                                              ("version", "ascending")]))
        return self._versions(job, rows)

    def _find(self, job: str, partition: Mapping[str, Any], version: int | None) -> ModelVersion:
        """One version of one partition, read from the live state (the history only for a version
        that is neither the champion nor the latest)."""
        exact = json.dumps({k: _json_value(v) for k, v in partition.items()}, ensure_ascii=False,
                           separators=(",", ":"))
        # First only the rows of the exact encoded key (row-group statistics skip the rest of each
        # file); the whole live state only when that finds nothing (a partial key, other types).
        matches, _ = self._view(job, "live", exact)
        if matches.num_rows == 0:
            live = self.live(job)
            matches = self._matching(live, partition)
            if partition == {} and live.num_rows:  # the global model's pseudo-partition "{}"
                matches = live.filter(pc.equal(live.column("pid"), GLOBAL_PID))
        pids = pc.unique(matches.column("pid")).to_pylist() if matches.num_rows else []
        if not pids:
            raise RegistryError(f"job {job!r} has no partition {dict(partition)!r}")
        if len(pids) > 1:
            raise RegistryError(f"{dict(partition)!r} matches {len(pids)} partitions of {job!r}: name "
                                "every partition_by column")
        if version is None:
            rows = matches.filter(pc.equal(matches.column("status"), "champion"))
            if rows.num_rows == 0:
                raise RegistryError(f"partition {dict(partition)!r} of {job!r} has no champion")
        else:
            rows = matches.filter(pc.equal(matches.column("version"), version))
            if rows.num_rows == 0:  # neither champion nor latest: from the history (of this key only)
                history = self._view(job, "all", exact)[0]
                if history.num_rows == 0:
                    history = self.table(job)
                rows = history.filter(pc.and_(pc.equal(history.column("pid"), pids[0]),
                                              pc.equal(history.column("version"), version)))
            if rows.num_rows == 0:
                raise RegistryError(f"partition {dict(partition)!r} of {job!r} has no version {version}")
        return self._versions(job, rows.slice(0, 1))[0]

    def get(self, job: str, partition: Mapping[str, Any], version: int | None = None) -> ModelVersion:
        """One version of one partition (its champion when ``version`` is None), with the training
        run's environment.

        Raises:
            RegistryError: no such partition, version or champion.
        """
        return self._with_environment(job, self._find(job, partition, version))

    def _with_environment(self, job: str, mv: ModelVersion) -> ModelVersion:
        """The version with its training environment (Python and package versions) from its run."""
        try:
            record = json.loads(self.store.read_bytes(self.run_key(job, mv.run_id)))
        except (FileNotFoundError, json.JSONDecodeError):
            return mv
        return dataclasses.replace(mv, environment=record.get("environment"))

    def load_model_text(self, mv: ModelVersion) -> str:
        """The LightGBM text of a model version (never unpickled: it is text)."""
        key = mv.model_uri[len(self.store.uri("")):].lstrip("/")
        return self.store.read_bytes(key).decode("utf-8")

    def load_model(self, job: str, partition: Mapping[str, Any], version: int | None = None) -> Any:
        """A ``lightgbm.Booster`` for a partition's champion (or a given version)."""
        import lightgbm as lgb

        return lgb.Booster(model_str=self.load_model_text(self._find(job, partition, version)))

    def state(self, job: str, pids: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
        """Per partition id: its champion's and latest version's index rows, for planning a run.

        Args:
            job: the job name.
            pids: only these partitions (default: all, :data:`GLOBAL_PID` included).

        Returns:
            ``{pid: {"champion": row or None, "latest": row}}`` with index rows as dicts.
        """
        return self._state_of(self.live(job), pids)

    @staticmethod
    def _state_of(live: pa.Table, pids: Iterable[str] | None) -> dict[str, dict[str, Any]]:
        rows = live if pids is None else live.filter(_pid_filter(live, pids))
        out: dict[str, dict[str, Any]] = {}
        if rows.num_rows == 0:
            return out
        rows = rows.take(pc.sort_indices(rows, sort_keys=[("pid", "ascending"), ("version", "ascending")]))
        for r in rows.to_pylist():
            entry = out.setdefault(r["pid"], {"champion": None, "latest": r})
            entry["latest"] = r
            if r["status"] == "champion":
                entry["champion"] = r
        return out

    # ----------------------------------------------------------------- log writing
    def _events_table(self, events: Sequence[Mapping[Any, Any]] | pa.Table, number: int) -> pa.Table:
        if isinstance(events, pa.Table):  # already index rows (gc): only the log position is new
            table = _by_partition(events.select(INDEX_SCHEMA.names).cast(INDEX_SCHEMA))
            seq = pa.array(number * SEQ_STRIDE + np.arange(table.num_rows, dtype=np.int64), pa.int64())
            return table.set_column(INDEX_SCHEMA.get_field_index("seq"), "seq", seq)
        # Rows re-read through pandas carry NaN for nulls (e.g. time_min, previous_version); Arrow
        # only takes None there. Float columns keep their NaN as it was.
        nullable = {f.name for f in INDEX_SCHEMA if not pa.types.is_floating(f.type)}
        clean = [{**{k: None if k in nullable and isinstance(v, float) and v != v else v
                     for k, v in e.items()}, "seq": 0} for e in events]
        table = _by_partition(pa.Table.from_pylist(clean, schema=INDEX_SCHEMA))
        # The log position (commit, row) orders events; the stable sort by partition above keeps the
        # order of one partition's events (an archive before the promotion that causes it).
        seq = pa.array(number * SEQ_STRIDE + np.arange(table.num_rows, dtype=np.int64), pa.int64())
        return table.set_column(INDEX_SCHEMA.get_field_index("seq"), "seq", seq)

    def _append(self, job: str,
                build: Callable[[pa.Table], builtins.list[dict[str, Any]] | pa.Table]) -> int:
        """Add one commit to the log: ``build(live state)`` gives its events; on a lost race (another
        writer created that commit number first) the state is read again and ``build`` runs again.

        Returns:
            The commit number, or 0 when ``build`` had nothing to write.

        Raises:
            StorageError: the store cannot create exclusively, or other writers won every try.
        """
        if not self._exclusive_checked:
            self.store.check_exclusive()  # a store that would race is an error, not a silent loss
            self._exclusive_checked = True
        for attempt in range(COMMIT_TRIES):
            live, head = self._view(job, "live")
            events = build(live)
            if (events.num_rows if isinstance(events, pa.Table) else len(events)) == 0:
                return 0
            number = head + 1
            table = self._events_table(events, number)
            data = _parquet(table)
            key = self.commit_key(job, number)
            hook = Registry.before_create
            if hook is not None:
                hook(job, number)
            if self.store.create_exclusive(key, data):
                self._files[key] = table
                if number % CHECKPOINT_EVERY == 0:
                    self._checkpoint_quietly(job)
                return number
            # Lost the race for this number: back off a little (jittered) and compute again.
            time.sleep(random.uniform(0, min(0.2, 0.005 * 2 ** min(attempt, 6))))
        raise StorageError(f"cannot commit to the registry log of {job!r} in {self.url}: other writers "
                           f"won {COMMIT_TRIES} times in a row")

    def commit(self, job: str, new: Iterable[NewVersion]) -> dict[str, int]:
        """Register new versions (their model files must already exist); returns pid → version.

        Version = the partition's highest version + 1, computed on the state the commit lands on; a
        promoted version becomes champion and the previous champion is archived, else it is stored
        as rejected. One commit is one object created put-if-absent: readers see all of it or none.
        """
        new = builtins.list(new)
        if not new:
            return {}
        assigned: dict[str, int] = {}

        feature_json: dict[tuple[str, ...], str] = {}  # partitions mostly share one feature list

        def build(live: pa.Table) -> pa.Table:
            state = self._state_of(live, {nv.pid for nv in new})
            events: builtins.list[dict[str, Any]] = []
            assigned.clear()
            for nv in new:
                prior = state.get(nv.pid)
                version = (int(prior["latest"]["version"]) if prior else 0) + 1
                champ = prior["champion"] if prior else None
                if nv.promote and champ is not None:
                    events.append({**champ, "status": "archived"})
                events.append({
                    "pid": nv.pid, "partition": nv.partition, "version": version,
                    "status": "champion" if nv.promote else "rejected", "run_id": nv.run_id,
                    "trained_at": nv.trained_at, "rows": nv.rows, "metric": nv.metric,
                    "metric_value": nv.metric_value, "metrics": json.dumps(dict(nv.metrics)),
                    "fingerprint": nv.fingerprint, "spec_hash": nv.spec_hash, "model_key": nv.model_key,
                    "features": _features_json(feature_json, nv.features), "time_min": nv.time_min,
                    "time_max": nv.time_max,
                    "previous_version": int(champ["version"]) if champ is not None else None,
                    "reason": nv.reason, "comparison": nv.comparison})
                assigned[nv.pid] = version
                # the same partition twice in one batch: the next one follows this one
                state[nv.pid] = {"champion": events[-1] if nv.promote else champ, "latest": events[-1]}
            # Column by column: every value is already what Arrow takes (the champion rows come from
            # Arrow), so no per-row clean-up pass (about 1 s of driver CPU per 100,000 versions).
            return pa.Table.from_pydict({name: [e.get(name) for e in events] for name in INDEX_SCHEMA.names},
                                        schema=INDEX_SCHEMA)

        self._append(job, build)
        return dict(assigned)

    def promote(self, job: str, partition: Mapping[str, Any], version: int) -> ModelVersion:
        """Make ``version`` the partition's champion (the current one is archived)."""
        target = self._find(job, partition, version)
        exact = json.dumps(target.partition, ensure_ascii=False, separators=(",", ":"))
        row = None
        readers: builtins.list[Callable[[], pa.Table]] = [lambda: self._view(job, "all", exact)[0],
                                                          lambda: self.table(job)]
        for history in readers:
            rows = history()
            rows = rows.filter(pc.and_(pc.equal(rows.column("pid"), target.pid),
                                       pc.equal(rows.column("version"), version))).to_pylist()
            if rows:
                row = rows[0]
                break
        if row is None:  # pragma: no cover - _find found it a moment ago
            raise RegistryError(f"partition {dict(partition)!r} of {job!r} has no version {version}")

        def build(live: pa.Table) -> builtins.list[dict[str, Any]]:
            champ = self._state_of(live, [target.pid]).get(target.pid, {}).get("champion")
            if champ is not None and champ["version"] == version:
                return []  # already the champion
            events = [{**champ, "status": "archived"}] if champ is not None else []
            return [*events, {**row, "status": "champion"}]

        self._append(job, build)
        return self.get(job, partition, version)

    def rollback(self, job: str, partition: Mapping[str, Any]) -> ModelVersion:
        """Demote the champion (to archived) and restore the previous good version as champion."""
        current = self._find(job, partition, None)
        candidates = [m for m in self.list(job, partition=partition, all_versions=True, include_global=True)
                      if m.pid == current.pid and m.version < current.version and m.status == "archived"]
        if not candidates:
            raise RegistryError(f"partition {dict(partition)!r} of {job!r} has no earlier good version")
        return self.promote(job, partition, max(candidates, key=lambda m: m.version).version)

    # ----------------------------------------------------------------- checkpoints
    def checkpoint(self, job: str, *, cleanup: bool = True) -> int:
        """Summarise the log up to its last commit N as ``N.checkpoint.live`` and ``N.checkpoint.all``,
        then (with ``cleanup``) delete what no reader needs any more: commits up to and checkpoints
        below the second-newest checkpoint (a reader that finds the newest unreadable falls back to
        the one before). Idempotent; the content is a pure function of commits 1..N, so a process
        killed between writing and cleaning up leaves nothing that could be shown twice.

        Returns:
            N (0 for an empty log).
        """
        live, head = self._view(job, "live")
        history, head_all = self._view(job, "all")
        if head == 0 or head != head_all:  # empty, or a commit landed in between: the next one will
            return head
        for kind, rows in (("all", history), ("live", live)):
            key = self.checkpoint_key(job, head, kind)  # type: ignore[arg-type]
            if not self.store.exists(key):
                # (partition, version) order: the same bytes whoever writes it, from whichever state
                ordered = rows.take(pc.sort_indices(rows, sort_keys=[("partition", "ascending"),
                                                                     ("pid", "ascending"),
                                                                     ("version", "ascending")]))
                self.store.write_bytes(key, _parquet(ordered))
                self._files[key] = rows
        if cleanup:
            listing = _Listing(self.store.list(f"{job}/{LOG}"))
            cuts = {kind: sorted(nums)[-2] if len(nums) > 1 else 0
                    for kind, nums in listing.checkpoints.items()}
            cut = min(cuts.values())
            for n, key in listing.commits.items():
                if n <= cut:
                    self.store.delete(key)
            for kind, nums in listing.checkpoints.items():
                for n, key in nums.items():
                    if n < cuts[kind]:
                        self.store.delete(key)
        return head

    def compact(self, job: str) -> None:
        """Checkpoint the log (called by ``train`` at the end of every run)."""
        self.checkpoint(job)

    def _checkpoint_quietly(self, job: str) -> None:
        try:
            self.checkpoint(job)
        except (OSError, pa.ArrowException) as exc:  # the commit stands; a later checkpoint catches up
            log.warning("registry: checkpoint of %s failed: %s", job, exc)

    def _migrate_legacy(self, job: str) -> bool:
        """Carry an index of an older release (``<job>/index/seg-*.parquet``) into commit 1, with the
        partition ids of this release. Returns whether commit 1 exists now."""
        self._legacy_checked.add(job)  # looked at once per process
        keys = [k for k in self.store.list(f"{job}/index") if k.endswith(".parquet")]
        if not keys:
            return False
        try:
            events = pa.concat_tables([_conform(self.store.read_parquet(k)) for k in keys])
        except (OSError, pa.ArrowException) as exc:
            log.warning("registry: cannot read the old index of %s: %s", job, exc)
            return False
        rows = _last_events(events).to_pylist()
        rows.sort(key=lambda r: (r["seq"], r["version"]))
        for r in rows:
            key = decode_partition(r["partition"])
            r["pid"] = partition_id(builtins.list(key), builtins.list(key.values()))
        self.store.create_exclusive(self.commit_key(job, 1), _parquet(self._events_table(rows, 1)))
        return True

    # ----------------------------------------------------------------- retention
    def gc(self, job: str, keep: int, *, dry_run: bool = False) -> GcReport:
        """Remove old versions and orphaned model files of ``job``.

        Per partition the champion and its ``keep`` latest versions stay, and so does every version a
        score run of the last 7 days used (or a score run still running uses); the rest is marked
        removed in one commit, then their model files are deleted. Model files under
        ``<job>/models/`` that no index entry names are deleted too, unless they belong to a run whose
        record says it is still running (its driver alive): a run writes its record before any model.
        Works in Arrow throughout: a year of nightly runs is millions of versions.

        Raises:
            RegistryError: ``keep`` is below 1 (the latest version numbers the next one).
        """
        if keep < 1:
            raise RegistryError(f"--keep must be at least 1, not {keep}")
        # Order matters: files first, then run records, then the index. A listed file's run either
        # committed before its record stopped saying "running" (so the index read after shows it) or
        # is seen running (so its files are kept).
        root = self.store.root.rstrip("/") + "/"
        try:
            found = self.store.fs.find(self.store.path(f"{job}/models"), detail=True)
        except FileNotFoundError:
            found = {}
        sizes = {(str(p)[len(root):] if str(p).startswith(root) else str(p)): int(i.get("size") or 0)
                 for p, i in found.items()}
        running, used = self._protected_by_runs(job)
        history = self.table(job)
        doomed = self._gc_candidates(history, keep, used)

        def build(live: pa.Table) -> pa.Table:
            # A version promoted since the history was read (a rollback) is a champion again: kept.
            champs = live.filter(pc.equal(live.column("status"), "champion")).select(["pid", "version"])
            champs = champs.rename_columns(["pid", "champion_version"])
            joined = doomed.join(champs, keys="pid", join_type="left outer", use_threads=False)
            still = pc.fill_null(pc.not_equal(joined.column("version"), joined.column("champion_version")),
                                 True)
            rows = joined.filter(still).select(INDEX_SCHEMA.names)
            return rows.set_column(rows.schema.get_field_index("status"), "status",
                                   pa.array([REMOVED] * rows.num_rows, pa.string()))

        removed = doomed
        if not dry_run and doomed.num_rows:
            events: builtins.list[pa.Table] = []

            def record(live: pa.Table) -> pa.Table:
                events[:] = [build(live)]
                return events[0]

            self._append(job, record)
            removed = events[0]
            self._checkpoint_quietly(job)  # the next reader starts after the removal
        removed_keys = pc.unique(removed.column("model_key"))
        kept = history.filter(pc.invert(pc.is_in(_pairs(history, "pid"), value_set=_pairs(removed, "pid"))))
        listed = pa.array(builtins.list(sizes), pa.string())
        # A model's compact form (its text's key + COMPACT_SUFFIX) goes with its text.
        texts = pc.replace_substring_regex(listed, pattern=re.escape(COMPACT_SUFFIX) + "$", replacement="")
        named = pc.is_in(texts, value_set=pc.unique(kept.column("model_key")))
        of_removed = pc.is_in(texts, value_set=removed_keys)
        orphans = 0
        doomed_files: builtins.list[str] = []
        for key, is_named, is_removed in zip(listed.to_pylist(), named.to_pylist(), of_removed.to_pylist(),
                                             strict=True):
            run = key.rsplit("/", 1)[-1].removesuffix(COMPACT_SUFFIX).removesuffix(".txt")
            if is_named or run in running:
                continue
            doomed_files.append(key)
            orphans += not is_removed
        if not dry_run:
            for key in doomed_files:
                self.store.delete(key)
        first = removed.take(pc.sort_indices(removed, sort_keys=[("partition", "ascending"),
                                                                  ("version", "ascending")])[:100])
        return GcReport(
            job=job, dry_run=dry_run, kept=kept.num_rows, removed=removed.num_rows,
            removed_versions=[{"partition": decode_partition(p), "version": v} for p, v in zip(
                first.column("partition").to_pylist(), first.column("version").to_pylist(), strict=True)],
            orphan_files_removed=orphans, bytes_freed=sum(sizes[k] for k in doomed_files))

    @staticmethod
    def _gc_candidates(history: pa.Table, keep: int, used: set[tuple[str, int]]) -> pa.Table:
        """Rows beyond each partition's ``keep`` latest that are neither champion (nor challenger) nor
        recently scored."""
        if history.num_rows == 0:
            return history
        order = pc.sort_indices(history, sort_keys=[("pid", "ascending"), ("version", "descending")])
        rows = history.take(order)
        pids = rows.column("pid").combine_chunks()
        first = np.ones(rows.num_rows, dtype=bool)
        if rows.num_rows > 1:
            first[1:] = pc.not_equal(pids.slice(1), pids.slice(0, rows.num_rows - 1)).to_numpy(
                zero_copy_only=False)
        index = np.arange(rows.num_rows)
        rank = index - np.maximum.accumulate(np.where(first, index, 0))
        serving = pc.is_in(rows.column("status"), value_set=pa.array(KEPT_STATUSES, pa.string()))
        mask = (rank >= keep) & ~serving.to_numpy(zero_copy_only=False)
        if used:
            scored = pc.is_in(_pairs(rows, "partition"),
                              value_set=pa.array([f"{p}\x00{v}" for p, v in used], pa.string()))
            mask &= ~scored.to_numpy(zero_copy_only=False)
        return rows.filter(pa.array(mask))

    def _protected_by_runs(self, job: str) -> tuple[set[str], set[tuple[str, int]]]:
        """Run ids still running (their model files are in flight) and the (partition, version)
        pairs score runs of the last :data:`SCORE_PROTECT_DAYS` days (or still running) used."""
        running: set[str] = set()
        used: set[tuple[str, int]] = set()
        since = dt.datetime.now(dt.UTC) - dt.timedelta(days=SCORE_PROTECT_DAYS)
        for key in self.store.glob(f"{job}/runs/*/run.json"):
            try:
                record = _live_status(json.loads(self.store.read_bytes(key)))
            except (FileNotFoundError, json.JSONDecodeError):
                continue
            run_id = str(record.get("run_id") or key.rsplit("/", 2)[-2])
            live = record.get("status") == "running"
            if live:
                running.add(run_id)
            if record.get("kind") != "score":
                continue
            try:
                started = dt.datetime.fromisoformat(str(record.get("started_at")))
                recent = started.astimezone(dt.UTC) >= since if started.tzinfo else True
            except ValueError:
                recent = True  # unreadable date: keep what it used
            if not (recent or live):
                continue
            try:
                parts = self.store.read_parquet(key.rsplit("/", 1)[0] + "/partitions.parquet")
            except FileNotFoundError:
                continue
            if {"partition", "model_version"} <= set(parts.column_names):
                for p, v in zip(parts.column("partition").to_pylist(),
                                parts.column("model_version").to_pylist(), strict=True):
                    if p is not None and v is not None:
                        used.add((str(p), int(v)))
        return running, used

    # ----------------------------------------------------------------- run records
    def write_run(self, job: str, run_id: str, record: Mapping[str, Any],
                  partitions: pa.Table | None = None) -> None:
        """Write (or replace) a run record; the per-partition table first, then the summary."""
        if partitions is not None:
            self.store.write_parquet(self.run_key(job, run_id, "partitions.parquet"), partitions)
        self.store.write_bytes(self.run_key(job, run_id),
                               json.dumps(record, indent=2, default=str).encode())

    def runs(self, job: str | None = None) -> builtins.list[dict[str, Any]]:
        """Run summaries, newest first (of one job, or of every job in the registry)."""
        jobs = [job] if job else self.jobs()
        out = []
        for j in jobs:
            for key in self.store.glob(f"{j}/runs/*/run.json"):
                try:
                    out.append(_live_status(json.loads(self.store.read_bytes(key))))
                except (FileNotFoundError, json.JSONDecodeError):
                    continue
        return sorted(out, key=lambda r: str(r.get("started_at", "")), reverse=True)

    def run(self, run_id: str) -> tuple[dict[str, Any], pd.DataFrame | None]:
        """One run's summary and its per-partition rows.

        Raises:
            RegistryError: no run with that id.
        """
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", run_id):
            raise RegistryError(f"no run {run_id!r}")
        keys = self.store.glob(f"*/runs/{run_id}/run.json")
        if not keys:
            raise RegistryError(f"no run {run_id!r} in {self.url}")
        record = _live_status(json.loads(self.store.read_bytes(keys[0])))
        part_key = keys[0].rsplit("/", 1)[0] + "/partitions.parquet"
        try:
            parts = self.store.read_parquet(part_key).to_pandas()
        except FileNotFoundError:
            parts = None
        return record, parts
