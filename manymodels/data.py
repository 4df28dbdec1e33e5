"""Data access and partition planning.

The driver plans from the partition key columns only: one projected scan gives every distinct key
combination, its row count and the files that hold it. Workers then open only their chunk's files and
keep only their chunk's rows. Parquet (a file, a folder, Hive ``key=value/`` folders) and CSV are read
through pyarrow datasets on fsspec filesystems.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import reduce
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.dataset as ds
import pyarrow.fs as pafs
from fsspec.implementations.local import LocalFileSystem

from manymodels.storage import url_to_fs

__all__ = [
    "InputError",
    "Partition",
    "Plan",
    "Source",
    "fingerprint",
    "fingerprint_rows",
    "key_label",
    "open_source",
    "plan_partitions",
    "read_partitions",
    "row_hashes",
    "schema_tag",
]

Key = tuple[Any, ...]


class InputError(ValueError):
    """The input data cannot be used (missing, unreadable, empty, wrong columns); nothing was written."""


@dataclass(frozen=True)
class Source:
    """A picklable description of a dataset that any worker can reopen.

    Attributes:
        url: the URL the user gave.
        format: ``parquet`` or ``csv``.
        files: every data file, as paths inside the filesystem.
        base_dir: the folder Hive partition fields are parsed relative to.
        hive_fields: the Hive partition fields (name and type), in folder order.
        schema: the dataset's full schema (file columns plus Hive fields).
    """

    url: str
    format: str
    files: tuple[str, ...]
    base_dir: str
    hive_fields: tuple[tuple[str, str], ...]
    schema: pa.Schema

    def dataset(self, files: Sequence[str] | None = None) -> ds.Dataset:
        """Open the dataset (or only ``files`` of it) with the planned schema."""
        fs = _arrow_fs(url_to_fs(self.url)[0])
        partitioning = None
        if self.hive_fields:
            fields = [pa.field(n, self.schema.field(n).type) for n, _ in self.hive_fields]
            partitioning = ds.partitioning(pa.schema(fields), flavor="hive")
        return ds.dataset(list(files if files is not None else self.files), filesystem=fs,
                          format=_file_format(self.format), partitioning=partitioning,
                          partition_base_dir=self.base_dir, schema=self.schema)


@dataclass(frozen=True)
class Partition:
    """One partition: its key values (in ``partition_by`` order), row count and the files holding it."""

    key: Key
    rows: int
    files: tuple[int, ...]

    def as_dict(self, names: Sequence[str]) -> dict[str, Any]:
        """The key as ``{column: value}``."""
        return dict(zip(names, self.key, strict=True))


@dataclass(frozen=True)
class Plan:
    """The partitions of a dataset, in data order."""

    source: Source
    keys: tuple[str, ...]
    partitions: tuple[Partition, ...]
    total_rows: int = field(default=0)


def _arrow_fs(fs: Any) -> Any:
    """pyarrow's own filesystem for local paths: its I/O threads then never call back into Python
    (an fsspec filesystem is wrapped in a Python handler, and a read-ahead thread that needs the GIL
    while the interpreter exits aborts the process)."""
    return pafs.LocalFileSystem() if isinstance(fs, LocalFileSystem) else fs


def _file_format(fmt: str) -> ds.FileFormat:
    if fmt == "csv":
        # Ragged rows are an error (the default); empty strings in numeric columns read as null.
        # pyarrow.csv is imported at module level: workers never run open_source.
        return ds.CsvFileFormat(convert_options=pacsv.ConvertOptions(strings_can_be_null=True))
    return ds.ParquetFileFormat()


def _guess_format(path: str, files: Sequence[str]) -> str:
    names = [path, *files[:50]]
    if any(n.lower().endswith((".csv", ".csv.gz")) for n in names) and not any(
            n.lower().endswith((".parquet", ".pq")) for n in names):
        return "csv"
    return "parquet"


def open_source(url: str, fmt: str = "auto") -> Source:
    """Open a dataset at ``url`` and describe it.

    Raises:
        InputError: the URL does not exist, holds no data files, or a file cannot be read.
    """
    fs, path = url_to_fs(url)
    try:
        if not fs.exists(path):
            raise InputError(f"data source {url!r} does not exist")
        if fs.isdir(path):
            found = [f for f in fs.find(path) if not any(
                part.startswith((".", "_")) for part in f[len(path):].split("/") if part)]
        else:
            found = [path]
    except OSError as exc:
        raise InputError(f"data source {url!r} cannot be listed: {exc}") from None
    if not found:
        raise InputError(f"data source {url!r} holds no data files")
    fmt = _guess_format(path, found) if fmt == "auto" else fmt
    if fs.isdir(path):
        suffixes = (".csv", ".csv.gz") if fmt == "csv" else (".parquet", ".pq", ".parq")
        data_files = [f for f in found if f.lower().endswith(suffixes)] or found
    else:
        data_files = found
    base = path if fs.isdir(path) else path.rsplit("/", 1)[0]
    try:
        dataset = ds.dataset(data_files, filesystem=_arrow_fs(fs), format=_file_format(fmt),
                             partitioning="hive", partition_base_dir=base)
        schema = dataset.schema
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
        raise InputError(f"data source {url!r} cannot be read as {fmt}: {_first_line(exc)}") from None
    hive_names = _hive_names(data_files, base)
    hive = tuple((n, str(schema.field(n).type)) for n in hive_names if n in schema.names)
    return Source(url=url, format=fmt, files=tuple(sorted(data_files)), base_dir=base,
                  hive_fields=hive, schema=schema)


def _hive_names(files: Sequence[str], base: str) -> list[str]:
    names: list[str] = []
    for f in files[:1]:
        for part in f[len(base):].strip("/").split("/")[:-1]:
            if "=" in part:
                names.append(part.split("=", 1)[0])
    return names


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def check_columns(source: Source, required: dict[str, Sequence[str]]) -> None:
    """Fail when a required column is missing from the data, naming the column and its role.

    Args:
        source: the opened data.
        required: role (``"partition_by"``, ``"target"``, ...) → columns that must exist.
    """
    names = set(source.schema.names)
    for role, cols in required.items():
        for col in cols:
            if col and col not in names:
                have = ", ".join(source.schema.names[:20])
                raise InputError(f"column {col!r} ({role}) is not in {source.url!r} (columns: {have})")


def check_numeric(source: Source, column: str, role: str) -> None:
    """Fail when ``column`` is not numeric or boolean (e.g. a target read as strings)."""
    t = source.schema.field(column).type
    if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)
            or pa.types.is_decimal(t)):
        raise InputError(f"column {column!r} ({role}) must be numeric, but {source.url!r} has it as {t}")


def plan_partitions(source: Source, keys: Sequence[str],
                    keep: Callable[[dict[str, Any]], bool] | None = None) -> Plan:
    """Find every distinct key combination, its row count and its files, reading key columns only.

    Null key values form their own partition. Partitions come in data order (first appearance).

    Args:
        source: the opened data.
        keys: the partition_by columns.
        keep: an optional predicate on ``{column: value}`` (``--only``) deciding which partitions stay.

    Raises:
        InputError: a file cannot be read, or the data has no rows.
    """
    merged: dict[Key, tuple[int, list[int]]] = {}
    total = 0
    try:
        # Batch by batch with little read-ahead, so the driver's memory grows with the number of
        # partitions, not rows. ``__fragment_index`` is the file's position in ``source.files``
        # (the dataset is opened from that list), a small integer where a file name would be a
        # string per row.
        scanner = source.dataset().scanner(columns=[*keys, "__fragment_index"], use_threads=True,
                                           batch_readahead=2, fragment_readahead=2)
        # A reader closed on every exit (an error, an early return): a scan left open keeps read-ahead
        # work alive until the interpreter exits, where it can abort the process (SIGABRT).
        with scanner.to_reader() as reader:
            for batch in reader:
                if batch.num_rows == 0:
                    continue
                total += batch.num_rows
                counts = pa.Table.from_batches([batch]).group_by(
                    [*keys, "__fragment_index"], use_threads=False).aggregate([([], "count_all")])
                key_cols = [counts.column(k).to_pylist() for k in keys]
                files = counts.column("__fragment_index").to_pylist()
                rows = counts.column("count_all").to_pylist()
                for i, file in enumerate(files):
                    key = tuple(_canon(col[i]) for col in key_cols)
                    n, fl = merged.get(key, (0, []))
                    fl.append(file)
                    merged[key] = (n + rows[i], fl)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
        raise InputError(f"cannot read {source.url!r}: {_first_line(exc)}") from None
    if total == 0:
        raise InputError(f"data source {source.url!r} has no rows")
    parts = [Partition(key=k, rows=n, files=tuple(sorted(set(fl)))) for k, (n, fl) in merged.items()]
    if keep is not None:  # --only: the plan's rows are the kept partitions' rows
        parts = [p for p in parts if keep(p.as_dict(keys))]
        total = sum(p.rows for p in parts)
    return Plan(source=source, keys=tuple(keys), partitions=tuple(parts), total_rows=total)


def _canon(value: Any) -> Any:
    """Key values compare equal across planning and workers (NaN keys become None, like nulls)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _key_filter(keys: Sequence[str], wanted: Sequence[Key]) -> ds.Expression:
    """A pushdown filter selecting (a superset of) the rows of ``wanted`` partitions."""
    exprs = []
    for i, name in enumerate(keys):
        values = {k[i] for k in wanted}
        present = [v for v in values if v is not None]
        expr = ds.field(name).isin(present) if present else None
        if None in values:
            null = ds.field(name).is_null(nan_is_null=True)  # NaN keys are the null partition too
            expr = null if expr is None else (expr | null)
        if len(present) > 1 and len({type(v) for v in present}) == 1:
            try:  # a range lets Parquet skip row groups by their statistics; isin alone does not
                lo, hi = min(present), max(present)
                rng = (ds.field(name) >= lo) & (ds.field(name) <= hi)
                expr = rng & expr if None not in values else (rng & expr) | ds.field(name).is_null(
                    nan_is_null=True)
            except TypeError:
                pass
        assert expr is not None  # every key has a value or a null in a non-empty chunk
        exprs.append(expr)
    return reduce(lambda a, b: a & b, exprs)


def read_partitions(source: Source, keys: Sequence[str], wanted: Sequence[Key],
                    files: Sequence[int], columns: Sequence[str] | None = None
                    ) -> tuple[pd.DataFrame, dict[Key, tuple[int, int]], pa.Table]:
    """Read the rows of ``wanted`` partitions from their ``files``, grouped by partition.

    Returns:
        ``(frame, spans, table)``: the rows as one pandas frame, stably sorted by key so that each
        partition is the contiguous slice ``frame.iloc[start:stop]`` given by ``spans[key]``
        (partitions without rows are absent), and the same rows as an Arrow table (original types,
        used by scoring to write key columns unchanged).
    """
    dataset = source.dataset([source.files[i] for i in files])
    table = dataset.to_table(columns=list(columns) if columns is not None else None,
                             filter=_key_filter(keys, wanted), use_threads=False)
    for name in keys:  # NaN keys are null keys (as in planning): one sort run, one span per partition
        col = table.column(name)
        if pa.types.is_floating(col.type):
            table = table.set_column(table.schema.get_field_index(name), name,
                                     pc.if_else(pc.is_nan(col), pa.scalar(None, col.type), col))
    if table.num_rows:
        order = pc.sort_indices(table, sort_keys=[(k, "ascending", "at_end") for k in keys]) \
            if _sort_keys_supported() else pc.sort_indices(table, sort_keys=[(k, "ascending") for k in keys])
        if not np.array_equal(order.to_numpy(), np.arange(table.num_rows)):
            table = table.take(order)  # data sorted by key (the fast layout) needs no copy
    spans: dict[Key, tuple[int, int]] = {}
    want = set(wanted)
    if table.num_rows:
        idx = pa.array(np.arange(table.num_rows, dtype=np.int64))
        groups = pa.table({**{k: table.column(k) for k in keys}, "__row": idx}).group_by(
            list(keys), use_threads=False).aggregate([("__row", "min"), ("__row", "max")])
        starts = groups.column("__row_min").to_pylist()
        stops = groups.column("__row_max").to_pylist()
        cols = [groups.column(k).to_pylist() for k in keys]
        for i, start in enumerate(starts):
            key = tuple(_canon(c[i]) for c in cols)
            if key in want:
                spans[key] = (start, stops[i] + 1)
    frame = table.to_pandas(split_blocks=True, self_destruct=False)
    return frame, spans, table


_SORT_KEYS_3: bool | None = None


def _sort_keys_supported() -> bool:
    """pyarrow >= 25 takes null placement per sort key; older ones only as an option."""
    global _SORT_KEYS_3
    if _SORT_KEYS_3 is None:
        try:
            pc.sort_indices(pa.table({"a": [1]}), sort_keys=[("a", "ascending", "at_end")])
            _SORT_KEYS_3 = True
        except (TypeError, ValueError, pa.ArrowInvalid):
            _SORT_KEYS_3 = False
    return _SORT_KEYS_3


def row_hashes(frame: pd.DataFrame) -> np.ndarray:
    """One 64-bit content hash per row (all columns), computed for a whole chunk at once."""
    if frame.empty:
        return np.zeros(0, dtype=np.uint64)
    return pd.util.hash_pandas_object(frame, index=False).to_numpy()


def schema_tag(frame: pd.DataFrame) -> bytes:
    """The column names and types that take part in a fingerprint."""
    return "\x1e".join(f"{name}\x1f{dtype}" for name, dtype in frame.dtypes.items()).encode()


def fingerprint_rows(hashes: np.ndarray, tag: bytes) -> str:
    """A partition's fingerprint from its slice of :func:`row_hashes` and the :func:`schema_tag`."""
    h = hashlib.blake2b(tag, digest_size=16)
    h.update(np.ascontiguousarray(hashes).tobytes())
    return h.hexdigest()


def fingerprint(frame: pd.DataFrame) -> str:
    """A content hash of a partition's rows as read (column names, types, values, order)."""
    return fingerprint_rows(row_hashes(frame), schema_tag(frame))


def key_label(names: Sequence[str], key: Key) -> str:
    """A short human label of a partition key, e.g. ``station=stn-00001``."""
    return ",".join(f"{n}={v}" for n, v in zip(names, key, strict=True))
