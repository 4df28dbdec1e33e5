"""The per-partition pipeline: a pure function of (DataFrame, spec) to a trained model and its metrics.

No Ray, no storage and no clock reads in here: the engine calls :func:`train_partition` once per
partition inside its tasks, and unit tests call it directly. The same :func:`prepare_features` runs at
training and at scoring time, so a model sees the same columns in both.
"""

from __future__ import annotations

import hashlib
import math
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightgbm as lgb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from manymodels.spec import OBJECTIVES_CLASSIFICATION, JobSpec

__all__ = [
    "FeatureMatrix",
    "PartitionError",
    "PrepareFn",
    "TrainResult",
    "compute_metric",
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


_PREPARE_CACHE: dict[str, PrepareFn] = {}


def load_prepare(spec: JobSpec) -> PrepareFn | None:
    """Compile the spec's prepare function from the source text the driver read (cached per text).

    The code runs as a module named after its file, so it can define helpers and import libraries;
    it is the code named by ``pipeline.prepare`` and nothing else (a job spec runs code: trust it as
    you trust the code you run).
    """
    if not spec.pipeline.prepare:
        return None
    path, _, func = spec.pipeline.prepare.rpartition(":")
    cache_key = hashlib.sha256(f"{path}\0{func}\0{spec.prepare_source}".encode()).hexdigest()
    if cache_key not in _PREPARE_CACHE:
        module = types.ModuleType(f"manymodels_prepare_{cache_key[:12]}")
        module.__file__ = path
        code = compile(spec.prepare_source, path, "exec")  # a SyntaxError is the caller's to report
        try:
            exec(code, module.__dict__)
        except Exception as exc:  # its top level failed (an import, a missing file): a spec error
            raise PartitionError(f"pipeline.prepare: {path} raised {type(exc).__name__} when loaded: "
                                 f"{_one_line(exc)}") from exc
        fn = module.__dict__.get(func)
        if not callable(fn):
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
    try:
        return series.to_numpy(dtype=np.float64, na_value=np.nan)
    except (TypeError, ValueError) as exc:
        raise PartitionError(f"feature column {name!r} is not numeric: {_one_line(exc)}") from exc


def model_categories(booster: lgb.Booster) -> dict[int, list[Any]]:
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
    missing = [f for f in features if f not in frame.columns]
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
        if (known and all(isinstance(k, str) for k in known) and col.notna().any()
                and (pd.api.types.is_numeric_dtype(col.dtype) or pd.api.types.is_bool_dtype(col.dtype))):
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


def _split(frame: pd.DataFrame, n: int, spec: JobSpec) -> tuple[np.ndarray, np.ndarray]:
    """Train and holdout row positions: the latest rows when ``time_column`` is set, else random."""
    k = min(n - 1, max(1, round(n * spec.validation.holdout_fraction)))
    if spec.data.time_column:
        col = spec.data.time_column
        if col not in frame.columns:
            raise PartitionError(f"time column {col!r} is missing")
        order = np.argsort(frame[col].to_numpy(), kind="stable")
    else:
        order = np.random.default_rng(spec.validation.seed).permutation(n)
    return np.sort(order[: n - k]), np.sort(order[n - k:])


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


def train_partition(frame: pd.DataFrame, spec: JobSpec, *, prepare: PrepareFn | None = None,
                    champion: str | None = None, num_threads: int = 1, device: str = "cpu"
                    ) -> TrainResult:
    """Train, validate and judge one partition's model.

    Args:
        frame: the partition's rows as read.
        spec: the job spec.
        prepare: the compiled prepare function (see :func:`load_prepare`).
        champion: the current champion's model text, judged on this holdout for the promotion rule.
        num_threads: LightGBM threads; the engine passes the task's ``num_cpus``.
        device: LightGBM's device (``cpu``, ``gpu``, ``cuda``); see :func:`resolve_device`.

    Raises:
        PartitionError: the partition cannot be trained; the message is the recorded reason.
    """
    frame = run_prepare(frame, prepare)
    y_all = _target(frame, spec)
    usable = ~np.isnan(y_all)
    n = int(usable.sum())
    if n < spec.validation.min_rows:
        raise PartitionError(f"only {n} usable rows (min_rows = {spec.validation.min_rows})")
    if not usable.all():
        frame, y_all = frame.loc[usable], y_all[usable]
    features = select_features(list(frame.columns), list(frame.dtypes), spec)
    if not features:
        raise PartitionError("no feature columns left after removing keys, target, time and exclude")
    fm = prepare_features(frame, features, spec)
    tr, ho = _split(frame, n, spec)
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
    if champion is not None:
        try:
            old = lgb.Booster(model_str=champion)
            if old.feature_name() == list(features):
                old_x = prepare_features(frame.iloc[ho], features, spec, model_categories(old))
                old_pred = old.predict(old_x.X, num_threads=params["num_threads"])
                old_metric = compute_metric(spec.metric, y_ho, np.asarray(old_pred))
                metrics["champion_" + spec.metric] = old_metric
                if not reason and _is_worse(metric, old_metric, spec.higher_is_better):
                    reason = (f"holdout {spec.metric} {metric:.4g} is worse than the champion's "
                              f"{old_metric:.4g}")
        except (lgb.basic.LightGBMError, PartitionError):
            pass  # a champion that cannot score this holdout (other features) cannot block promotion
    lo, hi = _time_range(frame, spec)
    return TrainResult(model_str=booster.model_to_string(), metric=metric, metrics=metrics,
                       promote=not reason, reason=reason, rows=n, time_min=lo, time_max=hi,
                       features=tuple(features))


def predict_partition(frame: pd.DataFrame, spec: JobSpec, booster: lgb.Booster, *,
                      prepare: PrepareFn | None = None, features: Sequence[str] | None = None,
                      num_threads: int = 1) -> np.ndarray:
    """Predictions of ``booster`` for every row of ``frame`` (after the same prepare as training).

    Returns a float64 vector: the prediction, the positive-class probability for binary, and the
    most likely class for multiclass.

    Args:
        frame: the partition's rows.
        spec: the job spec.
        booster: the model.
        prepare: the compiled prepare function.
        features: the feature columns in model order (from the registry; default: the model's
            feature names, which LightGBM may have altered, e.g. spaces to underscores).
        num_threads: LightGBM threads (the task's CPUs; more would oversubscribe the node).

    Raises:
        PartitionError: prepare failed or a feature the model needs is missing.
    """
    frame = run_prepare(frame, prepare, same_rows=True)
    fm = prepare_features(frame, features or booster.feature_name(), spec, model_categories(booster))
    pred = np.asarray(booster.predict(fm.X, num_threads=num_threads), dtype=np.float64)
    if pred.ndim == 2:
        pred = pred.argmax(axis=1).astype(np.float64)
    return pred
