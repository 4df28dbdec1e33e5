"""The cold-start fallback: one global model across all partitions (``[score] fallback = "global"``).

``train`` fits it after the per-partition models, in one Ray task that reads every row; the
partition keys are categorical features, so the model learns per-partition offsets and still
predicts for a partition it has never seen (its key code is missing). ``score`` uses it for
partitions that have no champion, writing ``model_version = 0`` and the global model's run id.

Layout: ``<registry>/<job>/global/<run id>.txt`` (the model) and ``<job>/global/current.json``
(which model is in use), written in that order.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

import pandas as pd

from manymodels.data import Source, read_partitions
from manymodels.pipeline import load_prepare, run_prepare, train_partition
from manymodels.spec import JobSpec
from manymodels.storage import Store

__all__ = ["GlobalModel", "current_global", "global_spec", "train_global"]


@dataclass(frozen=True)
class GlobalModel:
    """The global fallback model of a job."""

    run_id: str
    model_key: str
    features: tuple[str, ...]
    metric: float
    rows: int


def global_spec(spec: JobSpec) -> JobSpec:
    """The spec the global model uses: partition keys become categorical features."""
    d = spec.data
    features = (*d.partition_by, *d.features) if d.features else ()
    categorical = tuple(dict.fromkeys((*d.categorical, *d.partition_by)))
    # Keys are features here, so they must not be reserved: an empty partition_by is not allowed
    # by the spec checks, but select_features reads it, so the keys are listed explicitly instead.
    return dataclasses.replace(spec, data=dataclasses.replace(
        d, features=features, categorical=categorical, partition_by=()))


def current_global(store: Store, job: str) -> GlobalModel | None:
    """The job's global model, if one was trained."""
    try:
        info = json.loads(store.read_bytes(f"{job}/global/current.json"))
    except FileNotFoundError:
        return None
    return GlobalModel(run_id=info["run_id"], model_key=info["model_key"],
                       features=tuple(info["features"]), metric=float(info["metric"]),
                       rows=int(info["rows"]))


def train_global(payload: tuple[Source, tuple[str, ...], list[tuple[Any, ...]], tuple[int, ...]],
                 ctx: Any) -> GlobalModel:
    """Fit the global model on every planned partition's rows (runs as one Ray task).

    ``prepare`` runs per partition, exactly as for the per-partition models and at scoring time.
    """
    source, keys, wanted, files = payload
    spec: JobSpec = ctx.spec
    frame, spans, _ = read_partitions(source, keys, wanted, files)
    prepare = load_prepare(spec)
    parts = [run_prepare(frame.iloc[a:b].reset_index(drop=True), prepare) for a, b in spans.values()]
    data = pd.concat(parts, ignore_index=True) if parts else frame.iloc[:0]
    gspec = global_spec(spec)
    if not gspec.data.features:
        from manymodels.pipeline import select_features

        own = select_features(list(data.columns), list(data.dtypes), spec)
        gspec = dataclasses.replace(gspec, data=dataclasses.replace(
            gspec.data, features=(*keys, *[c for c in own if c not in keys])))
    result = train_partition(data, gspec, num_threads=max(1, int(spec.resources.num_cpus)))
    store = Store(ctx.registry_url)
    key = f"{spec.name}/global/{ctx.run_id}.txt"
    store.write_bytes(key, result.model_str.encode())
    model = GlobalModel(run_id=ctx.run_id, model_key=key, features=result.features,
                        metric=result.metric, rows=result.rows)
    store.write_bytes(f"{spec.name}/global/current.json", json.dumps(dataclasses.asdict(model)).encode())
    return model
