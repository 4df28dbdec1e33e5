"""Data access and partition planning.

The driver plans from the partition key columns only: one projected scan gives every distinct key
combination, its row count and the files that hold it. Workers then open only their chunk's files and
keep only their chunk's rows. Parquet (a file, a folder, Hive ``key=value/`` folders) and CSV are read
through pyarrow datasets on fsspec filesystems.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from array import array
from collections.abc import Callable, Iterable, Mapping, Sequence
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
    "PartitionTally",
    "Plan",
    "ReadStats",
    "Source",
    "fingerprint",
    "fingerprint_rows",
    "keep_wanted",
    "key_label",
    "normalised_keys",
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
        csv_types: CSV columns read with a given type instead of one inferred from their values
            (partition keys are text there too: ``007`` stays ``"007"``).
    """

    url: str
    format: str
    files: tuple[str, ...]
    base_dir: str
    hive_fields: tuple[tuple[str, str], ...]
    schema: pa.Schema
    csv_types: tuple[tuple[str, str], ...] = ()

    def dataset(self, files: Sequence[str] | None = None) -> ds.Dataset:
        """Open the dataset (or only ``files`` of it) with the planned schema."""
        fs = _arrow_fs(url_to_fs(self.url)[0])
        partitioning = None
        if self.hive_fields:
            fields = [pa.field(n, self.schema.field(n).type) for n, _ in self.hive_fields]
            partitioning = ds.partitioning(pa.schema(fields), flavor="hive")
        return ds.dataset(list(files if files is not None else self.files), filesystem=fs,
                          format=_file_format(self.format, self.csv_types), partitioning=partitioning,
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


def _file_format(fmt: str, csv_types: Sequence[tuple[str, str]] = ()) -> ds.FileFormat:
    if fmt == "csv":
        # Ragged rows are an error (the default); empty strings in numeric columns read as null.
        # pyarrow.csv is imported at module level: workers never run open_source.
        return ds.CsvFileFormat(convert_options=pacsv.ConvertOptions(
            strings_can_be_null=True, column_types={n: pa.type_for_alias(t) for n, t in csv_types}))
    return ds.ParquetFileFormat()


def _guess_format(path: str, files: Sequence[str]) -> str:
    names = [path, *files[:50]]
    if any(n.lower().endswith((".csv", ".csv.gz")) for n in names) and not any(
            n.lower().endswith((".parquet", ".pq")) for n in names):
        return "csv"
    return "parquet"


def open_source(url: str, fmt: str = "auto", key_types: Mapping[str, str] | None = None,
                text_columns: Sequence[str] = ()) -> Source:
    """Open a dataset at ``url`` and describe it.

    Hive folder values (``key=value/``) are read as text, so ``store=00042`` stays ``"00042"`` and
    ``007`` and ``7`` stay two partitions, unless ``key_types`` (the spec's ``data.key_types``) names
    another Arrow type for that field. Columns stored in Parquet files keep their stored type; CSV
    has none, so its ``text_columns`` (the partition keys) are read as text too, unless
    ``key_types`` names one.

    Raises:
        InputError: the URL does not exist, holds no data files, a file cannot be read, or
            ``key_types`` names a column the data does not have.
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
    types = dict(key_types or {})
    hive_names = _hive_names(data_files, base)
    csv_types = tuple((n, types.get(n, "string")) for n in dict.fromkeys([*text_columns, *types])
                      if n not in hive_names) if fmt == "csv" else ()
    # An explicit Hive schema: pyarrow's inference would turn "00042" into 42 and merge "007" with "7".
    partitioning = ds.partitioning(pa.schema(
        [pa.field(n, pa.type_for_alias(types.get(n, "string"))) for n in hive_names]),
        flavor="hive") if hive_names else None
    try:
        dataset = ds.dataset(data_files, filesystem=_arrow_fs(fs), format=_file_format(fmt, csv_types),
                             partitioning=partitioning, partition_base_dir=base)
        schema = dataset.schema
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
        raise InputError(f"data source {url!r} cannot be read as {fmt}: {_first_line(exc)}") from None
    for name in types:
        if name not in schema.names:
            raise InputError(f"data.key_types names column {name!r}, which is not in {url!r} "
                             f"(Hive folder fields: {', '.join(hive_names) or 'none'})")
    hive = tuple((n, str(schema.field(n).type)) for n in hive_names if n in schema.names)
    return Source(url=url, format=fmt, files=tuple(sorted(data_files)), base_dir=base,
                  hive_fields=hive, schema=schema, csv_types=csv_types)


def _hive_names(files: Sequence[str], base: str) -> list[str]:
    """The ``key=value`` folder names under ``base``, in folder order (of every file, not only the first)."""
    names: dict[str, None] = {}
    for f in files:
        for part in f[len(base):].strip("/").split("/")[:-1]:
            if "=" in part:
                names.setdefault(part.split("=", 1)[0], None)
    return list(names)


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


class PartitionTally:
    """Row counts and files per partition key, folded from per-batch counts while planning.

    Unsorted data puts a partition in many batches of the same file; each partition keeps its
    *distinct* files only (a plain int for the usual single file, a compact ``array`` of 4-byte
    indices beyond), so memory grows with distinct (partition, file) pairs, never with
    batches × partitions.
    """

    __slots__ = ("_keys",)

    def __init__(self) -> None:
        self._keys: dict[Key, list[Any]] = {}  # key -> [rows, file index or array of file indices]

    def add(self, keys: Sequence[str], counts: pa.Table) -> None:
        """Fold one batch's ``group_by([*keys, "__fragment_index"]).count_all`` table."""
        key_cols = [counts.column(k).to_pylist() for k in keys]
        files = counts.column("__fragment_index").to_pylist()
        rows = counts.column("count_all").to_pylist()
        entries = self._keys
        for i, file in enumerate(files):
            key = tuple(_canon(col[i]) for col in key_cols)
            entry = entries.get(key)
            if entry is None:
                entries[key] = [rows[i], file]
                continue
            entry[0] += rows[i]
            held = entry[1]
            if isinstance(held, int):
                if held != file:
                    entry[1] = array("i", (held, file))
            elif file not in held:
                held.append(file)

    def file_entries(self) -> int:
        """How many file indices are held over all partitions (= distinct (partition, file) pairs)."""
        return sum(1 if isinstance(f, int) else len(f) for _, f in self._keys.values())

    def partitions(self) -> list[Partition]:
        """The partitions in first-appearance order, each with its sorted files."""
        return [Partition(key=k, rows=n, files=(f,) if isinstance(f, int) else tuple(sorted(f)))
                for k, (n, f) in self._keys.items()]


def check_temporal(source: Source, column: str, role: str) -> None:
    """Fail when ``column`` is neither a date/time nor a number (e.g. timestamps read as text, which
    would sort as text)."""
    t = source.schema.field(column).type
    if not (pa.types.is_timestamp(t) or pa.types.is_date(t) or pa.types.is_duration(t)
            or pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)):
        raise InputError(f"column {column!r} ({role}) must be a date/time or a number, but {source.url!r} "
                         f"has it as {t}")


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
    tally = PartitionTally()
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
                tally.add(keys, pa.Table.from_batches([batch]).group_by(
                    [*keys, "__fragment_index"], use_threads=False).aggregate([([], "count_all")]))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
        raise InputError(f"cannot read {source.url!r}: {_first_line(exc)}") from None
    if total == 0:
        raise InputError(f"data source {source.url!r} has no rows")
    parts = tally.partitions()
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


@dataclass
class ReadStats:
    """What a chunk read cost, in rows: scanned (after the pushdown filter), kept, and the most held
    at once (kept rows plus the batch in hand)."""

    scanned_rows: int = 0
    kept_rows: int = 0
    peak_held_rows: int = 0


def _null_nan_keys(table: pa.Table, keys: Sequence[str]) -> pa.Table:
    """NaN keys are null keys (as in planning): one sort run, one span per partition."""
    for name in keys:
        col = table.column(name)
        if pa.types.is_floating(col.type):
            table = table.set_column(table.schema.get_field_index(name), name,
                                     pc.if_else(pc.is_nan(col), pa.scalar(None, col.type), col))
    return table


def _wanted_mask(table: pa.Table, keys: Sequence[str], wanted: Sequence[Key]) -> np.ndarray:
    """Which rows of ``table`` belong to a ``wanted`` key tuple (null matches a ``None`` key value).

    Column by column, each row's key prefix becomes a dense code among the wanted prefixes (-1 when
    no wanted tuple starts with it), so codes never exceed ``len(wanted) ** 2``.
    """
    code = w_code = None
    for i, name in enumerate(keys):
        col = table.column(name)
        if pa.types.is_dictionary(col.type):
            col = pc.cast(col, col.type.value_type)
        values = list(dict.fromkeys(k[i] for k in wanted))
        try:
            value_set = pa.array(values, type=col.type)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, TypeError):
            want = set(wanted)  # a key type Arrow cannot build from Python values: compare in Python
            cols = [table.column(k).to_pylist() for k in keys]
            return np.fromiter((tuple(_canon(c[r]) for c in cols) in want for r in range(table.num_rows)),
                               dtype=bool, count=table.num_rows)
        rows = pc.fill_null(pc.index_in(col, value_set=value_set, skip_nulls=False), -1)
        row_idx = rows.to_numpy().astype(np.int64)
        pos = {v: j for j, v in enumerate(values)}
        w_idx = np.fromiter((pos[k[i]] for k in wanted), dtype=np.int64, count=len(wanted))
        if code is None or w_code is None:
            code, w_code = row_idx, w_idx
            continue
        prefixes = np.unique(w_code * len(values) + w_idx)
        w_code = np.searchsorted(prefixes, w_code * len(values) + w_idx)
        joined = code * len(values) + row_idx
        at = np.minimum(np.searchsorted(prefixes, joined), len(prefixes) - 1)
        code = np.where((code >= 0) & (row_idx >= 0) & (prefixes[at] == joined), at, -1)
    assert code is not None
    mask: np.ndarray = code >= 0
    return mask


def keep_wanted(batches: Iterable[pa.RecordBatch], keys: Sequence[str], wanted: Sequence[Key],
                schema: pa.Schema) -> tuple[pa.Table, ReadStats]:
    """Keep the rows of ``wanted`` key tuples from a scan, batch by batch (a semi-join).

    A pushdown filter has one condition per key column, so for multi-column keys it passes the
    cross product of the wanted values; this keeps the wanted tuples only, and never holds more
    than the kept rows plus one batch.
    """
    stats = ReadStats()
    kept: list[pa.Table] = []
    exact = len(keys) == 1  # the pushdown filter is exact for one key column
    for batch in batches:
        if batch.num_rows == 0:
            continue
        stats.scanned_rows += batch.num_rows
        stats.peak_held_rows = max(stats.peak_held_rows, stats.kept_rows + batch.num_rows)
        part = _null_nan_keys(pa.Table.from_batches([batch]), keys)
        if not exact:
            part = part.filter(pa.array(_wanted_mask(part, keys, wanted)))
        if part.num_rows:
            kept.append(part)
            stats.kept_rows += part.num_rows
    return (pa.concat_tables(kept) if kept else schema.empty_table()), stats


def read_partitions(source: Source, keys: Sequence[str], wanted: Sequence[Key],
                    files: Sequence[int], columns: Sequence[str] | None = None
                    ) -> tuple[pd.DataFrame, dict[Key, tuple[int, int]], pa.Table]:
    """Read the rows of ``wanted`` partitions from their ``files``, grouped by partition.

    Only the wanted partitions' rows are materialised (see :func:`keep_wanted`).

    Returns:
        ``(frame, spans, table)``: the rows as one pandas frame, stably sorted by key so that each
        partition is the contiguous slice ``frame.iloc[start:stop]`` given by ``spans[key]``
        (partitions without rows are absent), and the same rows as an Arrow table (original types,
        used by scoring to write key columns unchanged).
    """
    dataset = source.dataset([source.files[i] for i in files])
    scanner = dataset.scanner(columns=list(columns) if columns is not None else None,
                              filter=_key_filter(keys, wanted), use_threads=False)
    with scanner.to_reader() as reader:  # closed even on error: no read-ahead left at exit
        table, _ = keep_wanted(reader, keys, wanted, scanner.projected_schema)
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


_CANONICAL_INT = re.compile(r"-?(0|[1-9][0-9]*)")


def _family(value: Any) -> str:
    """A key value's type family as partition ids see it: number, bool or text (None: null)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    return "number" if isinstance(value, int | float) else "text"


def _arrow_family(t: pa.DataType) -> str:
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_boolean(t):
        return "bool"
    if pa.types.is_null(t):
        return "null"
    return "number" if pa.types.is_integer(t) or pa.types.is_floating(t) else "text"


def normalised_keys(job: str, url: str, keys: Sequence[str], types: Sequence[pa.DataType],
                     partitions: Sequence[Any], registry_partitions: pa.ChunkedArray | pa.Array
                     ) -> list[tuple[Any, ...]] | None:
    """The scoring keys in the registry's key types, where a key column's type family differs.

    The registry tells ``"7"`` from ``7`` (the family is part of a partition's identity). When the
    scoring data holds a key column in another family than every registered partition (integers in
    a flat file, text from Hive folders), the values are converted where that is exact both ways:
    digit strings without leading zeros ↔ integers. Anything else is an error naming the column, the
    two types and the fix, never "no champion" for every row.

    Returns:
        The converted keys (one per partition, in order), or ``None`` when no column differs.

    Raises:
        InputError: the families differ and the values cannot be converted exactly.
    """
    texts = pc.unique(registry_partitions).to_pylist()
    registered = json.loads("[" + ",".join(texts) + "]") if texts else []
    out = [list(p.key) for p in partitions]
    changed = False
    for i, (name, dtype) in enumerate(zip(keys, types, strict=True)):
        reg_values = [d.get(name) for d in registered]
        reg_families = {_family(v) for v in reg_values} - {"null"}
        data_family = _arrow_family(dtype)
        if not reg_families or data_family == "null" or data_family in reg_families:
            continue
        reg_family = "/".join(sorted(reg_families))
        where = (f"partition key {name!r} is {data_family} ({dtype}) in {url!r} but {reg_family} in the "
                 f"registry of job {job!r}")
        values = [k[i] for k in out]
        if data_family == "text" and reg_families == {"number"}:
            bad = next((v for v in values if v is not None and not (
                isinstance(v, str) and _CANONICAL_INT.fullmatch(v))), None)
            if bad is None:
                for k in out:
                    k[i] = None if k[i] is None else int(k[i])
                changed = True
                continue
            raise InputError(f"{where}, and {bad!r} is not an integer's text (e.g. leading zeros): "
                             f"set [data] key_types = {{ {name} = \"int64\" }} to read Hive folder values "
                             f"as integers, as in training, or retrain with text keys")
        if data_family == "number" and reg_families == {"text"}:
            bad_reg = next((v for v in reg_values if v is not None and not _CANONICAL_INT.fullmatch(v)),
                           None)
            bad = next((v for v in values if v is not None and not float(v).is_integer()), None)
            if bad_reg is None and bad is None:
                for k in out:
                    k[i] = None if k[i] is None else str(int(k[i]))
                changed = True
                continue
            example = bad_reg if bad_reg is not None else bad
            raise InputError(f"{where} (e.g. {example!r}), and integers cannot tell which text they "
                             f"were: score data whose {name!r} column holds the same text as in training "
                             f"(e.g. Hive folders or a string column), or retrain from this data")
        raise InputError(f"{where}: score data whose {name!r} column has the type it had in training, "
                         f"or retrain from this data")
    return [tuple(k) for k in out] if changed else None
