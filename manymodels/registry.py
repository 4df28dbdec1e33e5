"""The model registry: versioned models per partition, an index, and run records, on any fsspec URL.

Layout under ``<registry>/<job>/``::

    models/<partition id>/<run id>.txt     LightGBM text models, written by the workers
    index/seg-<seq>-<run id>.parquet       the index: append-only segments of version events
    runs/<run id>/run.json                 a run's summary (train or score)
    runs/<run id>/partitions.parquet       one row per partition of that run

A partition id is a short slug of the key values plus a hash of their exact typed values: never a
raw value as a path part. The index is the only thing readers trust: a model file becomes visible
only when a segment naming it is committed, after the model was written. Versions are assigned at
commit time under a lock, so concurrent runs never hand out the same version twice. Each index row
is an event (a new version, or a status change of one); the latest event per (partition, version)
wins, and the segments are compacted into one at the end of every run.
"""

from __future__ import annotations

import builtins
import dataclasses
import datetime as dt
import hashlib
import json
import re
import time
import unicodedata
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from manymodels.storage import Store, process_gone

__all__ = [
    "ModelVersion",
    "NewVersion",
    "Registry",
    "RegistryError",
    "decode_partition",
    "encode_partition",
    "partition_id",
]

STATUSES = ("champion", "archived", "rejected")
GLOBAL_PID = "__global__"

INDEX_SCHEMA = pa.schema([
    ("pid", pa.string()), ("partition", pa.string()), ("version", pa.int64()), ("status", pa.string()),
    ("run_id", pa.string()), ("trained_at", pa.timestamp("us", tz="UTC")), ("rows", pa.int64()),
    ("metric", pa.string()), ("metric_value", pa.float64()), ("metrics", pa.string()),
    ("fingerprint", pa.string()), ("spec_hash", pa.string()), ("model_key", pa.string()),
    ("features", pa.string()), ("time_min", pa.string()), ("time_max", pa.string()),
    ("previous_version", pa.int64()), ("reason", pa.string()), ("seq", pa.int64()),
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
    """
    raw = "\x1f".join(f"{n}\x1e{_typed(v)}" for n, v in zip(names, key, strict=True))
    digest = hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()[:20]
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

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (the contract's ``models list/show --json`` entries)."""
        return dataclasses.asdict(self)


def _live_status(record: dict[str, Any]) -> dict[str, Any]:
    """A run record whose driver died while it was running reads as ``interrupted``."""
    if record.get("status") == "running" and process_gone(record.get("driver")):
        return {**record, "status": "interrupted"}
    return record


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Registry:
    """A model registry rooted at an fsspec URL (local folder, ``s3://bucket/prefix``, ...).

    Example:
        >>> reg = Registry("registry")
        >>> champions = reg.list("transit-delays")
        >>> booster = reg.load_model("transit-delays", {"station": "stn-00001"})
    """

    def __init__(self, url: str) -> None:
        self.store = Store(url)
        self.url = self.store.url
        self._segments: dict[str, dict[str, pa.Table]] = {}

    # ----------------------------------------------------------------- paths (pure)
    @staticmethod
    def model_key(job: str, pid: str, run_id: str) -> str:
        """Where a run's model for a partition is written (relative to the registry root)."""
        return f"{job}/models/{pid}/{run_id}.txt"

    @staticmethod
    def run_key(job: str, run_id: str, name: str = "run.json") -> str:
        """Where a run record's files live."""
        return f"{job}/runs/{run_id}/{name}"

    # ----------------------------------------------------------------- index reading
    def _read_index(self, job: str) -> pa.Table:
        """Every index event of ``job`` (cached per segment: segments never change once written)."""
        cache = self._segments.setdefault(job, {})
        for _attempt in range(5):
            names = [k for k in self.store.list(f"{job}/index") if k.endswith(".parquet")]
            try:
                for name in names:
                    if name not in cache:
                        cache[name] = self.store.read_parquet(name).cast(INDEX_SCHEMA)
            except FileNotFoundError:
                continue  # compacted away between listing and reading: list again
            for gone in set(cache) - set(names):
                del cache[gone]
            break
        tables = [cache[n] for n in sorted(cache)]
        return pa.concat_tables(tables) if tables else INDEX_SCHEMA.empty_table()

    def _resolved(self, job: str, pids: Iterable[str] | None = None) -> pa.Table:
        """One row per (partition, version): its latest event (only of ``pids`` when given)."""
        events = self._read_index(job)
        segments = builtins.list(self._segments.get(job, {}))
        if len(segments) == 1 and "-compact-" in segments[0] and pids is None:
            return events  # a compacted index holds resolved rows only
        if pids is not None:
            events = events.filter(pc.is_in(events.column("pid"), value_set=pa.array(list(pids),
                                                                                     pa.string())))
        if events.num_rows == 0:
            return events
        events = events.append_column("__i", pa.array(np.arange(events.num_rows), pa.int64()))
        last = events.group_by(["pid", "version"], use_threads=False).aggregate(
            [("seq", "max")])
        keyed = events.join(last, keys=["pid", "version", "seq"], right_keys=["pid", "version", "seq_max"],
                            join_type="inner", use_threads=False)
        # Equal seq values never happen for one (pid, version); keep the table in event order.
        keyed = keyed.sort_by("__i")
        return keyed.drop_columns(["__i"]).select(INDEX_SCHEMA.names)

    def table(self, job: str) -> pa.Table:
        """Every version of every partition of ``job`` as index rows (an Arrow table, one row per
        version, with its current status): the fast path for programs that filter in bulk."""
        return self._resolved(job)

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
            col("previous_version"), reason.to_pylist()))

    def jobs(self) -> list[str]:
        """Names of the jobs this registry holds."""
        return [k.rsplit("/", 1)[-1] for k in self.store.list("") if self.store.exists(f"{k}/index")
                or self.store.exists(f"{k}/runs")]

    def list(self, job: str, *, partition: Mapping[str, Any] | None = None,
             all_versions: bool = False) -> builtins.list[ModelVersion]:
        """Champions of ``job`` (one per partition), or every version with ``all_versions``.

        Args:
            job: the job name.
            partition: only entries whose key includes these ``{column: value}`` pairs (values
                compared as text, so ``--partition station=12`` matches an integer key 12).
            all_versions: every version of every partition, rejected and archived ones too.

        Returns:
            Entries sorted by partition, then version.
        """
        rows = self._resolved(job)
        if not all_versions and rows.num_rows:
            rows = rows.filter(pc.equal(rows.column("status"), "champion"))
        if rows.num_rows:
            rows = rows.take(pc.sort_indices(rows, sort_keys=[("partition", "ascending"),
                                                              ("version", "ascending")]))
        out = self._versions(job, rows)
        if partition:
            want = {k: str(v) for k, v in partition.items()}
            out = [m for m in out if all(str(m.partition.get(k)) == v for k, v in want.items())]
        return out

    def get(self, job: str, partition: Mapping[str, Any], version: int | None = None) -> ModelVersion:
        """One version of one partition (its champion when ``version`` is None).

        Raises:
            RegistryError: no such partition, version or champion.
        """
        matches = self.list(job, partition=partition, all_versions=True)
        pids = {m.pid for m in matches}
        if not matches:
            raise RegistryError(f"job {job!r} has no partition {dict(partition)!r}")
        if len(pids) > 1:
            raise RegistryError(f"{dict(partition)!r} matches {len(pids)} partitions of {job!r}: name "
                                "every partition_by column")
        if version is None:
            champs = [m for m in matches if m.status == "champion"]
            if not champs:
                raise RegistryError(f"partition {dict(partition)!r} of {job!r} has no champion")
            return self._with_environment(job, champs[0])
        for m in matches:
            if m.version == version:
                return self._with_environment(job, m)
        raise RegistryError(f"partition {dict(partition)!r} of {job!r} has no version {version}")

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

        return lgb.Booster(model_str=self.load_model_text(self.get(job, partition, version)))

    def state(self, job: str, pids: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
        """Per partition id: its champion's and latest version's index rows, for planning a run.

        Args:
            job: the job name.
            pids: only these partitions (default: all).

        Returns:
            ``{pid: {"champion": row or None, "latest": row}}`` with index rows as dicts.
        """
        rows = self._resolved(job, pids)
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

    # ----------------------------------------------------------------- index writing
    def _events_table(self, events: Sequence[Mapping[Any, Any]]) -> pa.Table:
        # Rows re-read through pandas carry NaN for nulls (e.g. time_min, previous_version); Arrow
        # only takes None there. Float columns keep their NaN as it was.
        nullable = {f.name for f in INDEX_SCHEMA if not pa.types.is_floating(f.type)}
        clean = [{k: None if k in nullable and isinstance(v, float) and v != v else v
                  for k, v in e.items()} for e in events]
        return pa.Table.from_pylist(clean, schema=INDEX_SCHEMA)

    def _write_segment(self, job: str, run_id: str, events: Sequence[Mapping[Any, Any]]) -> None:
        seq = time.time_ns()
        name = f"{job}/index/seg-{seq:020d}-{run_id}-{uuid.uuid4().hex[:6]}.parquet"
        self.store.write_parquet(name, self._events_table(events))

    def commit(self, job: str, new: Iterable[NewVersion]) -> dict[str, int]:
        """Register new versions (their model files must already exist); returns pid → version.

        Under the registry lock: version = the partition's highest version + 1; a promoted version
        becomes champion and the previous champion is archived, else it is stored as rejected.
        The index segment is written in one atomic put, so readers see all of it or nothing.
        """
        new = list(new)
        if not new:
            return {}
        with self.store.lock(f"{job}/index.lock"):
            state = self.state(job, {nv.pid for nv in new})
            events: builtins.list[dict[str, Any]] = []
            assigned: dict[str, int] = {}
            seq = time.time_ns()
            for nv in new:
                prior = state.get(nv.pid)
                version = (int(prior["latest"]["version"]) if prior else 0) + 1
                champ = prior["champion"] if prior else None
                if nv.promote and champ is not None:
                    events.append({**champ, "status": "archived", "seq": seq})
                    seq += 1
                events.append({
                    "pid": nv.pid, "partition": nv.partition, "version": version,
                    "status": "champion" if nv.promote else "rejected", "run_id": nv.run_id,
                    "trained_at": nv.trained_at, "rows": nv.rows, "metric": nv.metric,
                    "metric_value": nv.metric_value, "metrics": json.dumps(dict(nv.metrics)),
                    "fingerprint": nv.fingerprint, "spec_hash": nv.spec_hash, "model_key": nv.model_key,
                    "features": json.dumps(list(nv.features)), "time_min": nv.time_min,
                    "time_max": nv.time_max,
                    "previous_version": int(champ["version"]) if champ is not None else None,
                    "reason": nv.reason, "seq": seq})
                seq += 1
                assigned[nv.pid] = version
                # the same partition twice in one batch: the next one follows this one
                state[nv.pid] = {"champion": events[-1] if nv.promote else champ, "latest": events[-1]}
            self._write_segment(job, new[0].run_id, events)
        return assigned

    def _set_status(self, job: str, changes: Sequence[tuple[Mapping[Any, Any], str]], tag: str) -> None:
        seq = time.time_ns()
        events = [{**row, "status": status, "seq": seq + i} for i, (row, status) in enumerate(changes)]
        self._write_segment(job, tag, events)

    def promote(self, job: str, partition: Mapping[str, Any], version: int) -> ModelVersion:
        """Make ``version`` the partition's champion (the current one is archived)."""
        with self.store.lock(f"{job}/index.lock"):
            target = self.get(job, partition, version)
            rows = self._resolved(job, [target.pid]).to_pylist()
            changes = [(r, "archived") for r in rows if r["status"] == "champion" and r["version"] != version]
            changes += [(r, "champion") for r in rows if r["version"] == version]
            self._set_status(job, changes, "promote")
        return self.get(job, partition, version)

    def rollback(self, job: str, partition: Mapping[str, Any]) -> ModelVersion:
        """Demote the champion (to archived) and restore the previous good version as champion."""
        current = self.get(job, partition)
        candidates = [m for m in self.list(job, partition=partition, all_versions=True)
                      if m.version < current.version and m.status == "archived"]
        if not candidates:
            raise RegistryError(f"partition {dict(partition)!r} of {job!r} has no earlier good version")
        return self.promote(job, partition, max(candidates, key=lambda m: m.version).version)

    def compact(self, job: str) -> None:
        """Rewrite the index as one segment of resolved rows (readers never see a gap)."""
        with self.store.lock(f"{job}/index.lock"):
            old = [k for k in self.store.list(f"{job}/index") if k.endswith(".parquet")]
            if len(old) <= 1:
                return
            seq = time.time_ns()
            name = f"{job}/index/seg-{seq:020d}-compact-{uuid.uuid4().hex[:6]}.parquet"
            self.store.write_parquet(name, self._resolved(job))
            for key in old:
                self.store.delete(key)

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
