"""The per-partition pipeline: a pure function of (DataFrame, spec) to a trained model and its metrics.

No Ray, no storage and no clock reads in here: the engine calls :func:`train_partition` once per
partition inside its tasks, and unit tests call it directly. The same :func:`prepare_features` runs at
training and at scoring time, so a model sees the same columns in both.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import lightgbm as lgb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from manymodels.data import row_hashes as hash_rows
from manymodels.spec import OBJECTIVES_CLASSIFICATION, JobSpec
from manymodels.trees import Forest

__all__ = [
    "FeatureMatrix",
    "PartitionError",
    "PrepareFn",
    "TrainResult",
    "compute_metric",
    "holdout_split",
    "load_prepare",
    "model_categories",
    "predict_partition",
    "prepare_features",
    "run_prepare",
    "select_features",
    "train_partition",
]

PrepareFn = Callable[[pd.DataFrame], pd.DataFrame]


class PartitionError(ValueError):
    """This partition cannot be trained or scored; the message is the one-line reason recorded."""


@dataclass(frozen=True)
class TrainResult:
    """What training one partition produced.

    Attributes:
        model_str: the LightGBM text model.
        metric: the holdout value of the job's metric.
        metrics: every number worth keeping (metric, sizes, the champion's metric on this holdout).
        promote: passes the gates and is not worse than the champion on this holdout.
        reason: why it is not promoted ("" when it is).
        rows: usable rows (target present) used for train + holdout.
        time_min, time_max: range of ``time_column`` over the usable rows (ISO text), if set.
        features: the feature columns, in model order.
        comparison: what the champion rule compared: ``"no champion"``, ``"same features"``,
            ``"champion on its own features"`` or ``"not compared: <reason>"``.
        warnings: data problems worth telling the user once per job (the same text for every
            partition, so a run can fold them), e.g. a numeric column with a stray string.
    """

    model_str: str
    metric: float
    metrics: dict[str, float]
    promote: bool
    reason: str
    rows: int
    time_min: str | None = None
    time_max: str | None = None
    features: tuple[str, ...] = field(default_factory=tuple)
    comparison: str = "no champion"
    warnings: tuple[str, ...] = ()


_PREPARE_CACHE: dict[str, PrepareFn] = {}


def load_prepare(spec: JobSpec) -> PrepareFn | None:
    """Compile the spec's prepare function from the source text the driver read (cached per text).

    The code runs as a module of its own, registered in ``sys.modules`` (under a name derived from
    the file and its text, so it shadows nothing) for as long as the process lives: ``@dataclass``,
    ``typing.get_type_hints`` and pickling look a class's module up there. The file's folder is put
    on ``sys.path`` (first, as when the file runs as a script) so that ``import sibling`` finds the
    modules next to it, in every process that loads it (a relative path is resolved against that
    process's working directory: on a cluster, name the file by an absolute path). It is the code
    named by ``pipeline.prepare`` and nothing else (a job spec runs code: trust it as you trust the
    code you run).
    """
    if not spec.pipeline.prepare:
        return None
    path, _, func = spec.pipeline.prepare.rpartition(":")
    cache_key = hashlib.sha256(f"{path}\0{func}\0{spec.prepare_source}".encode()).hexdigest()
    if cache_key not in _PREPARE_CACHE:
        name = f"manymodels_prepare_{cache_key[:12]}"
        module = types.ModuleType(name)
        module.__file__ = path
        folder = os.path.dirname(os.path.abspath(path))
        if folder not in sys.path:
            sys.path.insert(0, folder)
        code = compile(spec.prepare_source, path, "exec")  # a SyntaxError is the caller's to report
        sys.modules[name] = module
        try:
            exec(code, module.__dict__)
        except Exception as exc:  # its top level failed (an import, a missing file): a spec error
            sys.modules.pop(name, None)
            raise PartitionError(f"pipeline.prepare: {path} raised {type(exc).__name__} when loaded: "
                                 f"{_one_line(exc)}") from exc
        fn = module.__dict__.get(func)
        if not callable(fn):
            sys.modules.pop(name, None)
            raise PartitionError(f"pipeline.prepare: {path} defines no function {func!r}")
        _PREPARE_CACHE[cache_key] = fn
    return _PREPARE_CACHE[cache_key]


def run_prepare(frame: pd.DataFrame, prepare: PrepareFn | None, *, same_rows: bool = False) -> pd.DataFrame:
    """Apply the user's prepare function, turning its failures into one-line partition errors."""
    if prepare is None:
        return frame
    try:
        out = prepare(frame)
    except Exception as exc:  # user code: any failure is this partition's failure
        raise PartitionError(f"prepare raised {type(exc).__name__}: {_one_line(exc)}") from exc
    if not isinstance(out, pd.DataFrame):
        raise PartitionError(f"prepare returned {type(out).__name__}, not a pandas DataFrame")
    if same_rows and len(out) != len(frame):
        raise PartitionError(f"prepare returned {len(out)} rows for {len(frame)}: at scoring time it "
                             "must keep every row")
    return out


def select_features(columns: Sequence[str], dtypes: Sequence[Any], spec: JobSpec) -> list[str]:
    """The feature columns: ``data.features`` if given, else every usable column but the reserved ones.

    Reserved: partition keys, target, ``time_column``, ``exclude``, and the score passthrough columns.
    Date/time columns are left out of the default selection (LightGBM cannot use them directly).
    """
    d = spec.data
    if d.features:
        missing = [f for f in d.features if f not in columns]
        if missing:
            raise PartitionError(f"feature column {missing[0]!r} is missing")
        return list(d.features)
    reserved = {*d.partition_by, d.target, d.time_column, *d.exclude, *spec.score.passthrough}
    return [c for c, t in zip(columns, dtypes, strict=True)
            if c not in reserved and not pd.api.types.is_datetime64_any_dtype(t)
            and not isinstance(t, pd.PeriodDtype)]


@dataclass(frozen=True)
class FeatureMatrix:
    """Model input: a float64 matrix, with categorical columns as codes into sorted categories.

    Attributes:
        X: rows × features, NaN for missing values.
        names: feature names, in column order.
        categorical: names of the categorical features (a subset of ``names``, same order).
        categories: per categorical feature, its categories (code ``i`` is ``categories[i]``).
    """

    X: np.ndarray
    names: tuple[str, ...]
    categorical: tuple[str, ...]
    categories: tuple[list[Any], ...]


def _is_categorical(series: pd.Series, spec: JobSpec) -> bool:
    dtype = series.dtype
    return series.name in spec.data.categorical or isinstance(dtype, pd.CategoricalDtype) or not (
        pd.api.types.is_numeric_dtype(dtype) or pd.api.types.is_bool_dtype(dtype))


def _numeric(series: pd.Series) -> np.ndarray:
    name = series.name
    if pd.api.types.is_datetime64_any_dtype(series.dtype):
        raise PartitionError(f"feature column {name!r} is a date/time; derive numbers from it in prepare")
    if isinstance(series.dtype, np.dtype) and series.dtype.kind in "iufb":
        # Plain numpy numbers have no missing-value mask: a cast (pandas' na_value path costs
        # ~60 µs per integer column, and this runs for every feature of every partition).
        return series.to_numpy().astype(np.float64)
    try:
        return series.to_numpy(dtype=np.float64, na_value=np.nan)
    except (TypeError, ValueError) as exc:
        raise PartitionError(f"feature column {name!r} is not numeric: {_one_line(exc)}") from exc


def model_categories(booster: lgb.Booster | Forest) -> dict[int, list[Any]]:
    """A trained model's categorical features: feature index → its categories (code order).

    Read from the model itself (its ``categorical_feature`` parameter and LightGBM's
    ``pandas_categorical`` list), so any model text from the registry can be scored correctly.
    """
    idx = booster.params.get("categorical_feature", [])
    idx = [idx] if isinstance(idx, int) else [int(i) for i in idx]
    cats = booster.pandas_categorical or []
    if len(cats) != len(idx):
        raise PartitionError(f"the model lists {len(idx)} categorical features but {len(cats)} category "
                             "lists")
    return dict(zip(idx, (list(c) for c in cats), strict=True))


def prepare_features(frame: pd.DataFrame, features: Sequence[str], spec: JobSpec,
                     categories: Mapping[int, Sequence[Any]] | None = None) -> FeatureMatrix:
    """Turn feature columns into LightGBM's input without going through pandas categoricals.

    Strings, pandas categoricals and ``data.categorical`` columns are categorical: each value is
    coded by its position in the sorted list of categories, exactly as pandas' ``astype("category")``
    would, and that list is stored in the model text (LightGBM's ``pandas_categorical``), so plain
    LightGBM given a DataFrame with category columns maps values the same way.

    Args:
        frame: the (prepared) rows.
        features: feature columns, in model order.
        spec: the job spec (for ``data.categorical``).
        categories: when scoring, the model's categorical features by position (see
            :func:`model_categories`); ``None`` when training (learnt from ``frame``). Unknown values
            become missing; every other feature must be numeric, as it was at training time.

    Raises:
        PartitionError: a feature is missing, or not numeric where the model needs numbers.
    """
    present = set(frame.columns)
    missing = [f for f in features if f not in present]
    if missing:
        raise PartitionError(f"feature column {missing[0]!r} is missing")
    X = np.empty((len(frame), len(features)), dtype=np.float64)
    cat_names: list[str] = []
    cat_lists: list[list[Any]] = []
    for j, name in enumerate(features):
        col = frame[name]
        categorical = _is_categorical(col, spec) if categories is None else j in categories
        if not categorical:
            X[:, j] = _numeric(col)
            continue
        known = None if categories is None else list(categories[j])
        if (known and (pd.api.types.is_numeric_dtype(col.dtype) or pd.api.types.is_bool_dtype(col.dtype))
                and all(isinstance(k, str) for k in known) and col.notna().any()):
            raise PartitionError(f"feature column {name!r} holds numbers here but was text (categorical) "
                                 "when the model was trained")
        codes, known = _category_codes(col, known)
        cat_names.append(name)
        cat_lists.append(known)
        X[:, j] = codes
    return FeatureMatrix(X=X, names=tuple(features), categorical=tuple(cat_names),
                         categories=tuple(cat_lists))


def _category_codes(col: pd.Series, known: list[Any] | None) -> tuple[np.ndarray, list[Any]]:
    """Codes (float, NaN for missing or unknown) of ``col`` in ``known`` (sorted categories);
    ``known=None`` learns them from ``col`` as pandas' ``astype("category")`` would.

    Text columns take Arrow's vectorised path (UTF-8 byte order is code point order, so the sort
    matches Python's); anything else (numbers, mixed objects) goes through pandas.
    """
    fast = _arrow_text_codes(col, known)
    if fast is not None:
        return fast
    arr = None
    if not (pd.api.types.is_numeric_dtype(col.dtype) or pd.api.types.is_bool_dtype(col.dtype)):
        try:
            arr = pa.array(col, from_pandas=True)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            arr = None
        if arr is not None and pa.types.is_dictionary(arr.type):
            arr = arr.dictionary_decode()
        if arr is not None and not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
            arr = None
    if arr is not None and (known is None or all(isinstance(k, str) for k in known)):
        if known is None:
            uniq = pc.unique(arr).drop_null()
            known = uniq.take(pc.sort_indices(uniq)).to_pylist()
        index = pc.index_in(arr, value_set=pa.array(known, type=arr.type))
        return index.to_numpy(zero_copy_only=False).astype(np.float64), known
    values = np.asarray(col.astype(object).where(col.notna(), None))
    if known is None:
        codes, uniques = pd.factorize(values, sort=True, use_na_sentinel=True)
        known = [_plain_value(u) for u in uniques]
    else:
        codes = pd.Categorical(values, categories=known).codes if known else np.full(len(values), -1)
    return np.where(codes < 0, np.nan, codes).astype(np.float64), known


def _arrow_text_codes(col: pd.Series, known: list[Any] | None) -> tuple[np.ndarray, list[Any]] | None:
    """:func:`_category_codes` for a text column that pandas keeps in Arrow (``str`` dtype), or
    ``None`` for any other column.

    The column is dictionary-encoded once and only its few distinct values are sorted or looked up
    (about 30 µs against 200 µs for the general path, per categorical feature per partition). The
    sort is Python's, by code point: the order Arrow's sort and pandas' categories give.
    """
    to_arrow = getattr(col.array, "__arrow_array__", None)
    if to_arrow is None or pd.api.types.is_numeric_dtype(col.dtype) or pd.api.types.is_bool_dtype(col.dtype):
        return None
    arr = to_arrow()
    if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        return None
    if known is not None and not all(isinstance(k, str) for k in known):
        return None
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    enc = arr.dictionary_encode()
    values = enc.dictionary.to_pylist()
    code = np.full(len(values) + 1, np.nan)  # the last slot: a missing value
    if known is None:
        order = sorted(range(len(values)), key=values.__getitem__)
        code[order] = np.arange(len(values), dtype=np.float64)
        known = [values[i] for i in order]
    elif values:
        where = pc.index_in(enc.dictionary, value_set=pa.array(known, type=arr.type))
        code[:-1] = where.to_numpy(zero_copy_only=False)  # unknown values: null, so NaN
    idx = pc.fill_null(enc.indices, len(values)).to_numpy(zero_copy_only=False)
    return code[idx], known


def _plain_value(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def _target(frame: pd.DataFrame, spec: JobSpec) -> np.ndarray:
    col = spec.data.target
    if col not in frame.columns:
        raise PartitionError(f"target column {col!r} is missing")
    try:
        y = pd.to_numeric(frame[col], errors="raise").to_numpy(dtype=np.float64, na_value=np.nan)
    except (TypeError, ValueError) as exc:
        raise PartitionError(f"target column {col!r} is not numeric: {_one_line(exc)}") from exc
    if np.isinf(y).any():
        raise PartitionError(f"target column {col!r} holds infinite values")
    return y


def _label_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows with index labels -1, -2, ..., -n (row ``i`` is ``-1 - i``).

    No ``reset_index`` or new frame can produce negative labels, so after ``prepare`` the labels
    that come back say which input row each output row is, in whatever order prepare returned them.
    """
    return frame.set_axis(pd.RangeIndex(-1, -1 - len(frame), -1), axis=0)


def _input_positions(out: pd.DataFrame, n: int) -> np.ndarray | None:
    """Each prepared row's position in prepare's input (see :func:`_label_rows`), or ``None`` when
    prepare replaced the index (``reset_index``, a merge, a new frame) so rows cannot be matched."""
    index = out.index
    if isinstance(index, pd.MultiIndex) or not pd.api.types.is_integer_dtype(index.dtype):
        return None
    pos = -1 - index.to_numpy(dtype=np.int64)
    if len(pos) and (int(pos.min()) < 0 or int(pos.max()) >= n):
        return None
    return pos


def _unit_draw(hashes: np.ndarray, seed: int) -> np.ndarray:
    """A uniform number in [0, 1) per row hash, mixed with the seed (splitmix64's finalizer)."""
    h = hashes.astype(np.uint64, copy=True)
    h ^= np.uint64((seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) % 2**64)
    h ^= h >> np.uint64(30)
    h *= np.uint64(0xBF58476D1CE4E5B9)  # uint64 arrays wrap around: the point of the mix
    h ^= h >> np.uint64(27)
    h *= np.uint64(0x94D049BB133111EB)
    h ^= h >> np.uint64(31)
    return (h >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _time_ticks(series: pd.Series, col: str) -> tuple[np.ndarray, np.ndarray]:
    """``time_column`` as sortable numbers and a mask of rows that have a time.

    Dates and times (tz-aware or naive, or date objects), durations and periods sort on their int64
    ticks (an object array of tz-aware Timestamps with NaT does not sort); numbers sort as numbers. Text or
    anything else is an error naming the column.
    """
    if series.dtype == object and pd.api.types.infer_dtype(series, skipna=True) in (
            "date", "datetime", "datetime64"):  # Arrow dates arrive as datetime.date objects
        series = pd.to_datetime(series, utc=True)
    dtype = series.dtype
    if (pd.api.types.is_datetime64_any_dtype(dtype) or pd.api.types.is_timedelta64_dtype(dtype)
            or isinstance(dtype, pd.PeriodDtype)):
        ticks = np.asarray(cast(Any, series.array).asi8, dtype=np.int64)
        return ticks, ~series.isna().to_numpy()
    if pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_bool_dtype(dtype):
        values = series.to_numpy(dtype=np.float64, na_value=np.nan)
        return values, ~np.isnan(values)
    raise PartitionError(f"time column {col!r} must hold dates/times or numbers, not {dtype}")


def _split(frame: pd.DataFrame, n: int, spec: JobSpec, row_keys: np.ndarray
           ) -> tuple[np.ndarray, np.ndarray]:
    """Train and holdout row positions of the usable, prepared rows.

    With ``time_column``: the latest rows are the holdout; rows without a time (NaT, NaN) are
    never "latest": they train. Without it, each row's side is fixed by the hash of its raw values
    (``row_keys``) and the seed, not by its position or the row count, so a row keeps its side when
    rows are added or removed and a champion is judged on rows it never trained on. The holdout is
    then about ``holdout_fraction`` of the rows; a tiny partition still gets one row on each side.
    """
    if spec.data.time_column:
        col = spec.data.time_column
        if col not in frame.columns:
            raise PartitionError(f"time column {col!r} is missing")
        ticks, timed = _time_ticks(frame[col], col)
        n_timed = int(timed.sum())
        if n_timed == 0:
            raise PartitionError(f"time column {col!r} has no values in this partition")
        k = min(n - 1, max(1, round(n * spec.validation.holdout_fraction)), n_timed)
        positions = np.flatnonzero(timed)
        latest = positions[np.argsort(ticks[positions], kind="stable")][n_timed - k:]
        holdout = np.zeros(n, dtype=bool)
        holdout[latest] = True
    else:
        u = _unit_draw(row_keys, spec.validation.seed)
        holdout = u < spec.validation.holdout_fraction
        if n >= 2 and not holdout.any():
            holdout[int(np.argmin(u))] = True
        elif n >= 2 and holdout.all():
            holdout[int(np.argmax(u))] = False
    return np.flatnonzero(~holdout), np.flatnonzero(holdout)


def _prepared(frame: pd.DataFrame, spec: JobSpec, prepare: PrepareFn | None,
              row_hashes: np.ndarray | None) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Prepare the rows and keep those with a target: ``(rows, target, row keys)``.

    A row's key is the hash of its values as read, carried through prepare by the index (see
    :func:`_label_rows`); when prepare replaced the index, the key is the hash of the prepared
    row's values instead (still stable across retrains for rows prepare derives the same way).
    """
    hashes = hash_rows(frame) if row_hashes is None else np.asarray(row_hashes, dtype=np.uint64)
    if len(hashes) != len(frame):
        raise ValueError(f"row_hashes has {len(hashes)} values for {len(frame)} rows")
    if prepare is None:
        out, keys = frame, hashes
    else:
        out = run_prepare(_label_rows(frame), prepare)
        pos = _input_positions(out, len(frame))
        keys = hash_rows(out) if pos is None else hashes[pos]
    y = _target(out, spec)
    usable = ~np.isnan(y)
    if not usable.all():
        out, y, keys = out.loc[usable], y[usable], keys[usable]
    return out, y, keys


def holdout_split(frame: pd.DataFrame, spec: JobSpec, *, prepare: PrepareFn | None = None,
                  row_hashes: np.ndarray | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The prepared rows :func:`train_partition` trains on and the holdout it judges on.

    Args:
        frame: the partition's rows as read.
        spec: the job spec.
        prepare: the compiled prepare function.
        row_hashes: as for :func:`train_partition`.
    """
    out, _, keys = _prepared(frame, spec, prepare, row_hashes)
    tr, ho = _split(out, len(out), spec, keys)
    return out.iloc[tr], out.iloc[ho]


def resolve_device(requested: str, num_gpus: float) -> str:
    """LightGBM's device for a task: ``auto`` is the GPU device when the task reserves GPUs."""
    if requested == "auto":
        return "gpu" if num_gpus > 0 else "cpu"
    return requested


def check_device(device: str) -> str:
    """Train a tiny model on ``device``; ``""`` if this LightGBM build can, else LightGBM's reason."""
    if device == "cpu":
        return ""
    x = np.arange(40, dtype=np.float64).reshape(20, 2)
    try:
        lgb.train({"device_type": device, "verbosity": -1, "num_iterations": 1, "min_data_in_leaf": 1},
                  lgb.Dataset(x, label=x[:, 0], params={"verbosity": -1}))
    except lgb.basic.LightGBMError as exc:
        return _one_line(exc)
    return ""


def lgb_params(spec: JobSpec, num_threads: int, device: str = "cpu") -> dict[str, Any]:
    """LightGBM parameters: the spec's, plus threads equal to the task's CPUs and determinism."""
    params: dict[str, Any] = {
        "objective": spec.model.objective, "verbosity": -1, "seed": spec.validation.seed,
        "deterministic": True, "force_col_wise": True,
    }
    params.update(spec.model.params)
    params["num_threads"] = max(1, num_threads)
    if device != "cpu":
        params["device_type"] = device
    return params


def compute_metric(name: str, y: np.ndarray, pred: np.ndarray) -> float:
    """The holdout metric (``pred`` is a probability for binary, a probability matrix for multiclass)."""
    if name == "mae":
        return float(np.mean(np.abs(pred - y)))
    if name == "rmse":
        return float(np.sqrt(np.mean((pred - y) ** 2)))
    if name == "mape":
        nz = y != 0
        return float(np.mean(np.abs((pred[nz] - y[nz]) / y[nz]))) if nz.any() else math.nan
    if name == "r2":
        ss = float(np.sum((y - y.mean()) ** 2))
        return 1.0 - float(np.sum((y - pred) ** 2)) / ss if ss > 0 else math.nan
    if name == "accuracy":
        labels = pred.argmax(axis=1) if pred.ndim == 2 else (pred >= 0.5)
        return float(np.mean(labels == y))
    if name == "logloss":
        eps = 1e-15
        if pred.ndim == 2:
            p = np.clip(pred[np.arange(len(y)), y.astype(int)], eps, 1.0)
            return float(-np.mean(np.log(p)))
        p = np.clip(pred, eps, 1 - eps)
        return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
    if name == "auc":
        pos = y == 1
        n_pos, n_neg = int(pos.sum()), int((~pos).sum())
        if n_pos == 0 or n_neg == 0:
            return math.nan
        ranks = pd.Series(pred).rank(method="average").to_numpy()
        return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    raise PartitionError(f"unknown metric {name!r}")


def _is_worse(new: float, old: float, higher_is_better: bool) -> bool:
    return new < old if higher_is_better else new > old


def _gate(metric: float, spec: JobSpec) -> str:
    v = spec.validation
    if math.isnan(metric):
        return f"holdout {v.metric} is undefined (NaN)"
    if v.max_metric is not None and metric > v.max_metric:
        return f"holdout {v.metric} {metric:.4g} > max_metric {v.max_metric:g}"
    if v.min_metric is not None and metric < v.min_metric:
        return f"holdout {v.metric} {metric:.4g} < min_metric {v.min_metric:g}"
    return ""


def _time_range(frame: pd.DataFrame, spec: JobSpec) -> tuple[str | None, str | None]:
    col = spec.data.time_column
    if not col or col not in frame.columns or frame.empty:
        return None, None
    values = frame[col]
    lo, hi = values.min(), values.max()
    return (None if pd.isna(lo) else str(lo)), (None if pd.isna(hi) else str(hi))


def _text_numbers(fm: FeatureMatrix, spec: JobSpec, frame: pd.DataFrame) -> tuple[str, ...]:
    """Warnings for text feature columns whose values are (nearly) all numbers.

    One stray string ("n/a", "12,5") makes a numeric column text; it would silently become a
    categorical with one category per value. The text is the same in every partition, so a run
    reports it once. Columns listed in ``data.categorical`` and pandas categoricals are codes on
    purpose and not checked.
    """
    out = []
    for name, known in zip(fm.categorical, fm.categories, strict=True):
        col = frame[name]
        if (name in spec.data.categorical or isinstance(col.dtype, pd.CategoricalDtype)
                or pd.api.types.is_numeric_dtype(col.dtype) or pd.api.types.is_bool_dtype(col.dtype)):
            continue
        # Plain text (labels) is the usual case: decided on three of the sorted distinct values for
        # the cost of a few µs, as this runs for every partition. Number text sorts first (digits,
        # signs and dots come before letters), so a column of numbers with a stray string is caught
        # by the first; the warning is per job, so a partition that slips through costs nothing.
        n = len(known)
        if n == 0 or not any(_parses_as_number(known[i]) for i in {0, n // 2, n - 1}):
            continue
        values = col.dropna()
        if pd.to_numeric(values, errors="coerce").notna().mean() >= 0.9:
            out.append(f"feature column {name!r} is text but nearly all of its values are numbers, so it "
                       "is used as a categorical (one category per value); fix the stray non-numbers or "
                       "convert it in prepare, or list it in data.categorical if it is a code")
    return tuple(out)


def _parses_as_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def _judge_champion(champion: str | None, champion_features: Sequence[str] | None,
                    booster: lgb.Booster, features: Sequence[str], holdout: pd.DataFrame,
                    y_ho: np.ndarray, spec: JobSpec, num_threads: int,
                    x_ho: FeatureMatrix | None = None) -> tuple[str, float | None]:
    """The champion's metric on this holdout and what was compared (never skipped silently).

    Feature lists are compared by the champion's registered names when given, else by LightGBM's
    own (sanitised) names on both models. When they differ, the champion is scored with its own
    features on the same holdout rows, where the prepared rows still have them. ``x_ho`` is the new
    model's holdout matrix: reused when the champion has the same features and categories.
    """
    if champion is None:
        return "no champion", None
    try:
        old = lgb.Booster(model_str=champion)
    except lgb.basic.LightGBMError as exc:
        return f"not compared: the champion model cannot be read ({_one_line(exc)})", None
    old_names = old.feature_name()
    if champion_features is not None:
        same = list(champion_features) == list(features)
    else:
        same = old_names == booster.feature_name()
    if same:
        columns, what = list(features), "same features"
    else:
        columns, what = list(champion_features or old_names), "champion on its own features"
        if len(columns) != len(old_names):
            return (f"not compared: the champion has {len(old_names)} features but the registry "
                    f"lists {len(columns)}"), None
        missing = [c for c in columns if c not in holdout.columns]
        if missing:
            return f"not compared: the champion's feature {missing[0]!r} is not in the prepared data", None
    try:
        old_categories = model_categories(old)
        if x_ho is not None and what == "same features" and old_categories == {
                list(x_ho.names).index(n): c for n, c in zip(x_ho.categorical, x_ho.categories, strict=True)}:
            x = x_ho  # the same columns coded the same way: no second pass over the rows
        else:
            x = prepare_features(holdout, columns, spec, old_categories)
        old_pred = np.asarray(old.predict(x.X, num_threads=num_threads))
    except (lgb.basic.LightGBMError, PartitionError) as exc:
        return f"not compared: the champion cannot score this holdout ({_one_line(exc)})", None
    return what, compute_metric(spec.metric, y_ho, old_pred)


def train_partition(frame: pd.DataFrame, spec: JobSpec, *, prepare: PrepareFn | None = None,
                    champion: str | None = None, champion_features: Sequence[str] | None = None,
                    row_hashes: np.ndarray | None = None, num_threads: int = 1, device: str = "cpu"
                    ) -> TrainResult:
    """Train, validate and judge one partition's model.

    Args:
        frame: the partition's rows as read.
        spec: the job spec.
        prepare: the compiled prepare function (see :func:`load_prepare`). It is given the rows
            with negative index labels and may reorder, add or drop rows.
        champion: the current champion's model text, judged on this holdout for the promotion rule.
        champion_features: the champion's feature columns as registered (default: compare by the
            names LightGBM stored in both models).
        row_hashes: one 64-bit hash per row of ``frame`` (the driver's ``data.row_hashes``, already
            computed for the fingerprint); they fix each row's holdout side. Default: computed here.
        num_threads: LightGBM threads; the engine passes the task's ``num_cpus``.
        device: LightGBM's device (``cpu``, ``gpu``, ``cuda``); see :func:`resolve_device`.

    Raises:
        PartitionError: the partition cannot be trained; the message is the recorded reason.
    """
    frame, y_all, keys = _prepared(frame, spec, prepare, row_hashes)
    n = len(frame)
    if n < spec.validation.min_rows:
        raise PartitionError(f"only {n} usable rows (min_rows = {spec.validation.min_rows})")
    columns, dtypes = list(frame.columns), list(frame.dtypes)
    features = select_features(columns, dtypes, spec)
    if not features:
        raise PartitionError("no feature columns left after removing keys, target, time and exclude")
    fm = prepare_features(frame, features, spec)
    warnings = _text_numbers(fm, spec, frame)
    tr, ho = _split(frame, n, spec, keys)
    params = lgb_params(spec, num_threads, device)
    if spec.model.objective in OBJECTIVES_CLASSIFICATION and spec.model.objective != "cross_entropy":
        classes = np.unique(y_all)
        if spec.model.objective == "binary" and not set(classes.tolist()) <= {0.0, 1.0}:
            raise PartitionError(f"binary target must be 0/1, found {classes[:5].tolist()}")
    x_ho, y_ho = fm.X[ho], y_all[ho]
    try:
        dataset = lgb.Dataset(fm.X[tr], label=y_all[tr], feature_name=list(features),
                              categorical_feature=list(fm.categorical),
                              params={"verbosity": -1, "seed": spec.validation.seed}, free_raw_data=True)
        # keep_training_booster: skips lgb.train's model text round trip; the text is made once below.
        booster = lgb.train(params, dataset, keep_training_booster=True)
    except lgb.basic.LightGBMError as exc:
        raise PartitionError(f"LightGBM: {_one_line(exc)}") from exc
    booster.pandas_categorical = [list(c) for c in fm.categories] if fm.categorical else None
    pred = np.asarray(booster.predict(x_ho, num_threads=params["num_threads"]))
    metric = compute_metric(spec.metric, y_ho, pred)
    metrics = {spec.metric: metric, "train_rows": float(len(tr)), "holdout_rows": float(len(ho))}
    reason = _gate(metric, spec)
    comparison, old_metric = _judge_champion(
        champion, champion_features, booster, features, frame.iloc[ho], y_ho, spec, params["num_threads"],
        FeatureMatrix(X=x_ho, names=fm.names, categorical=fm.categorical, categories=fm.categories))
    if old_metric is not None:
        metrics["champion_" + spec.metric] = old_metric
        if not reason and _is_worse(metric, old_metric, spec.higher_is_better):
            reason = f"holdout {spec.metric} {metric:.4g} is worse than the champion's {old_metric:.4g}"
    lo, hi = _time_range(frame, spec)
    return TrainResult(model_str=booster.model_to_string(), metric=metric, metrics=metrics,
                       promote=not reason, reason=reason, rows=n, time_min=lo, time_max=hi,
                       features=tuple(features), comparison=comparison, warnings=warnings)


def predict_partition(frame: pd.DataFrame, spec: JobSpec, booster: lgb.Booster | Forest, *,
                      prepare: PrepareFn | None = None, features: Sequence[str] | None = None,
                      num_threads: int = 1) -> np.ndarray:
    """Predictions of ``booster`` for every row of ``frame``, in ``frame``'s row order.

    ``prepare`` (the same as at training) may reorder the rows, e.g. sort them by time to build
    lags: each prediction is put back on its own row by the index labels prepare was given (see
    :func:`_label_rows`). A prepare that adds, drops or duplicates rows, or replaces the index
    (``reset_index``, a merge), fails the partition: rows it cannot match are never guessed.

    Returns a float64 vector: the prediction, the positive-class probability for binary, and the
    most likely class for multiclass.

    Args:
        frame: the partition's rows.
        spec: the job spec.
        booster: the model (a LightGBM Booster, or the same model as a :class:`Forest`).
        prepare: the compiled prepare function.
        features: the feature columns in model order (from the registry; default: the model's
            feature names, which LightGBM may have altered, e.g. spaces to underscores).
        num_threads: LightGBM threads (the task's CPUs; more would oversubscribe the node).

    Raises:
        PartitionError: prepare failed or changed the rows, or a feature the model needs is missing.
    """
    n = len(frame)
    order = None
    if prepare is not None:
        prepared = run_prepare(_label_rows(frame), prepare, same_rows=True)
        order = _input_positions(prepared, n)
        if order is None:
            raise PartitionError("prepare replaced the row index (reset_index, a merge or a new frame?): "
                                 "at scoring time each prediction is matched to its row by the index "
                                 "prepare was given, so prepare must keep it")
        if n and np.bincount(order, minlength=n).max() > 1:
            raise PartitionError("prepare returned some rows twice (and not others): at scoring time "
                                 "it must keep every row once")
        frame = prepared
    fm = prepare_features(frame, features or booster.feature_name(), spec, model_categories(booster))
    pred = np.asarray(booster.predict(fm.X, num_threads=num_threads), dtype=np.float64)
    if pred.ndim == 2:
        pred = pred.argmax(axis=1).astype(np.float64)
    if order is not None and not np.array_equal(order, np.arange(n)):
        aligned = np.empty_like(pred)
        aligned[order] = pred
        pred = aligned
    return pred
