"""The job spec: a TOML file turned into a typed, immutable, validated object.

Every section of the TOML maps to one frozen dataclass below; unknown keys and wrong types are
rejected with a :class:`SpecError` that names the key and the file. :func:`spec_hash` is a stable
hash of everything that changes what a trained model is (data columns, pipeline code, model and
validation settings), and nothing that only changes where or how fast it runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import tomllib
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "HASH_EXCLUDED",
    "KEY_TYPES",
    "CostSpec",
    "DataSpec",
    "FrozenMap",
    "JobMeta",
    "JobSpec",
    "ModelSpec",
    "OutputSpec",
    "PipelineSpec",
    "ResourceOverride",
    "ResourcesSpec",
    "RunSpec",
    "ScoreSpec",
    "SpecError",
    "ValidationSpec",
    "load_spec",
    "spec_from_dict",
    "spec_hash",
]

HIGHER_IS_BETTER = {"r2": True, "auc": True, "accuracy": True, "mae": False, "rmse": False,
                    "mape": False, "logloss": False}
OBJECTIVES_CLASSIFICATION = {"binary", "multiclass", "multiclassova", "cross_entropy"}
_JOB_NAME = re.compile(r"^[a-z0-9_-]{1,64}$")
# Arrow types a Hive folder value (``key=value/``) may be parsed as; text is the default.
KEY_TYPES = ("string", "large_string", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
             "uint64", "date32")


class SpecError(ValueError):
    """A job spec (or a flag overriding it) is malformed; the message names the key and the file."""


class FrozenMap(Mapping[str, Any]):
    """A read-only mapping that pickles (specs travel to Ray workers), unlike ``MappingProxyType``."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, Any] | None = None) -> None:
        self._data = dict(data or {})

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return repr(self._data)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self.items()) == dict(other.items())

    def __hash__(self) -> int:
        return hash(tuple(sorted((k, repr(v)) for k, v in self._data.items())))

    def __reduce__(self) -> tuple[Any, ...]:
        return (FrozenMap, (self._data,))


@dataclass(frozen=True)
class JobMeta:
    """``[job]``: the job's name, which names its registry and output folders."""

    name: str = ""


@dataclass(frozen=True)
class DataSpec:
    """``[data]``: where the rows are and which columns play which role."""

    source: str = ""
    partition_by: tuple[str, ...] = ()
    target: str = ""
    features: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    time_column: str = ""
    categorical: tuple[str, ...] = ()
    format: str = "auto"
    key_types: Mapping[str, str] = field(default_factory=FrozenMap)


@dataclass(frozen=True)
class PipelineSpec:
    """``[pipeline]``: the optional user function ``df -> df`` run per partition (train and score)."""

    prepare: str = ""


@dataclass(frozen=True)
class ModelSpec:
    """``[model]``: the LightGBM objective and parameters passed to it as they are."""

    objective: str = "regression"
    params: Mapping[str, Any] = field(default_factory=FrozenMap)
    device: str = "auto"
    gpu_fallback: str = "none"


@dataclass(frozen=True)
class ValidationSpec:
    """``[validation]``: the holdout, its metric and the gates a model must pass."""

    holdout_fraction: float = 0.2
    metric: str = ""
    max_metric: float | None = None
    min_metric: float | None = None
    min_rows: int = 30
    seed: int = 0


@dataclass(frozen=True)
class ResourceOverride:
    """``[[resources.override]]``: other resources for the partitions whose keys match ``match``."""

    match: Mapping[str, Any] = field(default_factory=FrozenMap)
    num_cpus: float | None = None
    num_gpus: float | None = None
    memory_mb: int | None = None


@dataclass(frozen=True)
class ResourcesSpec:
    """``[resources]``: what one partition task reserves from Ray's scheduler (and LightGBM's threads)."""

    num_cpus: float = 1
    num_gpus: float = 0
    memory_mb: int = 0
    override: tuple[ResourceOverride, ...] = ()


@dataclass(frozen=True)
class CostSpec:
    """``[cost]``: USD rates used for cost accounting (0 when not given)."""

    cpu_hour_usd: float = 0.0
    gpu_hour_usd: float = 0.0
    memory_gb_hour_usd: float = 0.0
    max_usd: float | None = None


@dataclass(frozen=True)
class ScoreSpec:
    """``[score]``: what scoring copies through and how partitions without a champion are scored."""

    passthrough: tuple[str, ...] = ()
    fallback: str = "none"
    # The global model's bounded input: rows kept per partition and in total (see fallback.py).
    fallback_rows_per_partition: int = 1000
    fallback_max_rows: int = 1_000_000


@dataclass(frozen=True)
class OutputSpec:
    """``[output]``: fsspec URLs of the registry and of the scored output, and the scores' format
    (``parquet``: a Hive folder per score run; ``delta``: one Delta Lake table per job)."""

    registry: str = "registry"
    scores: str = "scores"
    format: str = "parquet"


@dataclass(frozen=True)
class RunSpec:
    """``[run]``: failure tolerance and retries."""

    max_failure_fraction: float = 0.05
    max_retries: int = 2
    timeout_s: float | None = None


@dataclass(frozen=True)
class JobSpec:
    """A whole job spec. Build it with :func:`load_spec` or :func:`spec_from_dict`.

    Attributes:
        path: the TOML file it came from ("" when built from a dict), used in error messages.
        prepare_source: the text of the prepare function's file, read once by the driver so that
            workers on any node run exactly the code that was hashed.
    """

    job: JobMeta = field(default_factory=JobMeta)
    data: DataSpec = field(default_factory=DataSpec)
    pipeline: PipelineSpec = field(default_factory=PipelineSpec)
    model: ModelSpec = field(default_factory=ModelSpec)
    validation: ValidationSpec = field(default_factory=ValidationSpec)
    resources: ResourcesSpec = field(default_factory=ResourcesSpec)
    cost: CostSpec = field(default_factory=CostSpec)
    score: ScoreSpec = field(default_factory=ScoreSpec)
    output: OutputSpec = field(default_factory=OutputSpec)
    run: RunSpec = field(default_factory=RunSpec)
    path: str = ""
    prepare_source: str = ""

    @property
    def name(self) -> str:
        """The job's name."""
        return self.job.name

    @property
    def metric(self) -> str:
        """The holdout metric (defaulted from the objective when the spec leaves it out)."""
        return self.validation.metric

    @property
    def higher_is_better(self) -> bool:
        """Whether a larger value of the metric is a better model."""
        return HIGHER_IS_BETTER[self.validation.metric]

    def to_dict(self) -> dict[str, Any]:
        """The spec as plain data (sections only), e.g. to store with a run record."""
        out = dataclasses.asdict(self)
        out.pop("path")
        out.pop("prepare_source")
        return typing.cast(dict[str, Any], _plain(out))


_SECTIONS: dict[str, type[Any]] = {
    "job": JobMeta, "data": DataSpec, "pipeline": PipelineSpec, "model": ModelSpec,
    "validation": ValidationSpec, "resources": ResourcesSpec, "cost": CostSpec, "score": ScoreSpec,
    "output": OutputSpec, "run": RunSpec,
}

# Flags and API keywords that override a single spec key.
_OVERRIDES: dict[str, tuple[str, str]] = {
    "data": ("data", "source"), "source": ("data", "source"), "partition_by": ("data", "partition_by"),
    "target": ("data", "target"), "registry": ("output", "registry"), "output": ("output", "scores"),
    "scores": ("output", "scores"), "name": ("job", "name"), "time_column": ("data", "time_column"),
    "prepare": ("pipeline", "prepare"),
}


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def _type_name(tp: Any) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it in the dataclass's own type."""
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where)
    if origin is tuple:
        (item,) = [a for a in typing.get_args(tp) if a is not Ellipsis]
        if isinstance(value, str) and item is str:
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise SpecError(f"{where} must be a list, got {type(value).__name__} {value!r}")
        return tuple(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is not None and issubclass(origin, Mapping):
        if not isinstance(value, Mapping):
            raise SpecError(f"{where} must be a table, got {type(value).__name__} {value!r}")
        return FrozenMap(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise SpecError(f"{where} must be a table, got {type(value).__name__} {value!r}")
        return _build(typing.cast(type[Any], tp), value, where)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise SpecError(f"{where} must be a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(f"{where} must be an integer, got {type(value).__name__} {value!r}")
        return value
    if not isinstance(value, tp):
        raise SpecError(f"{where} must be {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


def _build(cls: type[Any], table: Mapping[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        if key not in names:
            known = ", ".join(sorted(names))
            raise SpecError(f"unknown key {where}.{key} (known keys: {known})")
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}")
    return cls(**kwargs)


def _check(spec: JobSpec, where: str) -> JobSpec:
    """Cross-field validation and defaults that depend on other keys."""
    d, v, m = spec.data, spec.validation, spec.model
    if not _JOB_NAME.match(spec.job.name):
        raise SpecError(f"job.name must match [a-z0-9_-]+ (at most 64 characters), got {spec.job.name!r}"
                        f"{where}")
    if not d.source:
        raise SpecError(f"data.source is required (or pass --data){where}")
    if not d.partition_by:
        raise SpecError(f"data.partition_by needs at least one column (or pass --partition-by){where}")
    if not d.target:
        raise SpecError(f"data.target is required (or pass --target){where}")
    roles = {"data.target": {d.target}, "data.time_column": {d.time_column} - {""}}
    for role, cols in roles.items():
        clash = cols & set(d.partition_by)
        if clash:
            raise SpecError(f"{role} {sorted(clash)[0]!r} is also a partition_by column{where}")
    if d.target in d.features:
        raise SpecError(f"data.features lists the target {d.target!r}{where}")
    for col, type_name in d.key_types.items():
        if type_name not in KEY_TYPES:
            raise SpecError(f"data.key_types.{col} must be one of {', '.join(KEY_TYPES)}, got {type_name!r}"
                            f"{where}")
    if d.format not in ("auto", "parquet", "csv"):
        raise SpecError(f"data.format must be auto, parquet or csv, got {d.format!r}{where}")
    if spec.pipeline.prepare and ":" not in spec.pipeline.prepare:
        raise SpecError(f"pipeline.prepare must be 'path/to/file.py:function', got "
                        f"{spec.pipeline.prepare!r}{where}")
    metric = v.metric or ("logloss" if m.objective in OBJECTIVES_CLASSIFICATION else "mae")
    if metric not in HIGHER_IS_BETTER:
        raise SpecError(f"validation.metric must be one of {', '.join(HIGHER_IS_BETTER)}, got {metric!r}"
                        f"{where}")
    if not 0.0 < v.holdout_fraction < 1.0:
        raise SpecError(f"validation.holdout_fraction must be between 0 and 1, got {v.holdout_fraction}"
                        f"{where}")
    if v.min_rows < 2:
        raise SpecError(f"validation.min_rows must be at least 2, got {v.min_rows}{where}")
    if HIGHER_IS_BETTER[metric] and v.max_metric is not None:
        raise SpecError(f"validation.max_metric does not apply to {metric} (higher is better): "
                        f"use min_metric{where}")
    if not HIGHER_IS_BETTER[metric] and v.min_metric is not None:
        raise SpecError(f"validation.min_metric does not apply to {metric} (lower is better): "
                        f"use max_metric{where}")
    if m.objective.startswith("multiclass") and "num_class" not in m.params:
        raise SpecError(f"model.params.num_class is required for objective {m.objective!r}{where}")
    if m.device not in ("auto", "cpu", "gpu", "cuda"):
        raise SpecError(f"model.device must be auto, cpu, gpu or cuda, got {m.device!r}{where}")
    if m.gpu_fallback not in ("none", "cpu"):
        raise SpecError(f"model.gpu_fallback must be none or cpu, got {m.gpu_fallback!r}{where}")
    r = spec.resources
    limits: list[ResourcesSpec | ResourceOverride] = [r, *r.override]
    for res in limits:
        if res.num_cpus is not None and res.num_cpus <= 0:
            raise SpecError(f"resources.num_cpus must be positive, got {res.num_cpus}{where}")
        if res.num_gpus is not None and res.num_gpus < 0:
            raise SpecError(f"resources.num_gpus must be >= 0, got {res.num_gpus}{where}")
        if res.memory_mb is not None and res.memory_mb < 0:
            raise SpecError(f"resources.memory_mb must be >= 0, got {res.memory_mb}{where}")
    for o in r.override:
        unknown = set(o.match) - set(d.partition_by)
        if not o.match or unknown:
            raise SpecError(f"resources.override.match must name partition_by columns, got "
                            f"{dict(o.match)!r}{where}")
    for key in ("cpu_hour_usd", "gpu_hour_usd", "memory_gb_hour_usd"):
        if getattr(spec.cost, key) < 0:
            raise SpecError(f"cost.{key} must be >= 0{where}")
    if spec.score.fallback not in ("none", "global"):
        raise SpecError(f"score.fallback must be none or global, got {spec.score.fallback!r}{where}")
    for key in ("fallback_rows_per_partition", "fallback_max_rows"):
        if getattr(spec.score, key) < 1:
            raise SpecError(f"score.{key} must be at least 1, got {getattr(spec.score, key)}{where}")
    if spec.output.format not in ("parquet", "delta"):
        raise SpecError(f"output.format must be parquet or delta, got {spec.output.format!r}{where}")
    if not 0.0 <= spec.run.max_failure_fraction <= 1.0:
        raise SpecError(f"run.max_failure_fraction must be between 0 and 1{where}")
    if spec.run.max_retries < 0:
        raise SpecError(f"run.max_retries must be >= 0{where}")
    return dataclasses.replace(spec, validation=dataclasses.replace(v, metric=metric))


def _derive_name(source: str) -> str:
    stem = Path(source.rstrip("/")).name
    for suffix in (".parquet", ".csv", ".pq"):
        stem = stem.removesuffix(suffix)
    name = re.sub(r"[^a-z0-9_-]+", "-", stem.lower()).strip("-")[:64]
    return name or "job"


def spec_from_dict(table: Mapping[str, Any], *, path: str = "", **overrides: Any) -> JobSpec:
    """Build a validated :class:`JobSpec` from a parsed TOML table plus flag overrides.

    Args:
        table: the TOML document as a dict.
        path: the file it came from, named in error messages.
        **overrides: values that replace single keys: ``data``/``source``, ``partition_by``, ``target``,
            ``registry``, ``output``/``scores``, ``name``, ``time_column``, ``prepare``. ``None`` means
            "not given".

    Raises:
        SpecError: an unknown key, a wrong type or an inconsistent value.
    """
    where = f" (in {path})" if path else ""
    doc: dict[str, dict[str, Any]] = {}
    for section, value in table.items():
        if section not in _SECTIONS:
            raise SpecError(f"unknown section [{section}]{where} (known: {', '.join(_SECTIONS)})")
        if not isinstance(value, Mapping):
            raise SpecError(f"[{section}] must be a table{where}")
        doc[section] = dict(value)
    for key, value in overrides.items():
        if key not in _OVERRIDES:
            raise SpecError(f"unknown override {key!r}")
        if value is None:
            continue
        section, name = _OVERRIDES[key]
        doc.setdefault(section, {})[name] = value
    try:
        parts = {s: _build(cls, doc.get(s, {}), s) for s, cls in _SECTIONS.items()}
    except SpecError as exc:
        raise SpecError(f"{exc}{where}") from None
    spec = JobSpec(**parts, path=path)
    if not spec.job.name:
        spec = dataclasses.replace(spec, job=JobMeta(name=_derive_name(spec.data.source)))
    spec = _check(spec, where)
    if spec.pipeline.prepare:
        file, _, func = spec.pipeline.prepare.rpartition(":")
        try:
            source = Path(file).read_text()
        except OSError as exc:
            raise SpecError(f"pipeline.prepare file {file!r} cannot be read: {exc.strerror}{where}") from None
        if not func.isidentifier():
            raise SpecError(f"pipeline.prepare function name {func!r} is not a Python name{where}")
        spec = dataclasses.replace(spec, prepare_source=source)
    return spec


def load_spec(path: str | Path | None = None, **overrides: Any) -> JobSpec:
    """Read a job spec from a TOML file (or from overrides alone) and validate it.

    Relative paths in the spec (``data.source``, ``pipeline.prepare``, ``output.*``) are relative to
    the current working directory, as the CLI is run from the project root.

    Args:
        path: the TOML file; ``None`` builds the spec from ``overrides`` only (``data``,
            ``partition_by`` and ``target`` are then enough).
        **overrides: see :func:`spec_from_dict`.

    Raises:
        SpecError: the file is missing, is not TOML, or holds a bad key or value.
    """
    if path is None:
        return spec_from_dict({}, **overrides)
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise SpecError(f"job spec {str(p)!r} cannot be read: {exc.strerror}") from None
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"job spec {str(p)!r} is not valid TOML: {exc}") from None
    return spec_from_dict(table, path=str(p), **overrides)


# Keys that do not change what a trained model is: where the job's data and outputs live, what a run
# may cost or reserve, and how failures are handled. Every other key of every section is hashed, so a
# key added later makes models stale until it is listed here (a needless retrain, never a silent
# skip). ``section`` alone excludes the whole section.
HASH_EXCLUDED = frozenset({
    "job",  # the name only names folders
    "data.source", "data.format",  # where the rows are; the data fingerprint covers the rows as read
    "model.gpu_fallback",  # what to do when no GPU build exists (the device actually used is recorded)
    "resources",  # amounts only: the device they imply for ``model.device = "auto"`` is hashed
    "cost", "output", "run",
    # the global model is trained and versioned on its own (its sample caps are in its own hash)
    "score.fallback", "score.fallback_rows_per_partition", "score.fallback_max_rows",
})


def _hashed(section: str, key: str) -> bool:
    return section not in HASH_EXCLUDED and f"{section}.{key}" not in HASH_EXCLUDED


def spec_hash(spec: JobSpec) -> str:
    """A stable hash of what determines a trained model.

    Every key that changes what a model sees or how it is trained: the columns and their roles
    (``features``, ``exclude``, ``partition_by``, ``target``, ``time_column``, ``categorical``,
    ``key_types``, ``score.passthrough``: all of what selects the feature columns), the prepare
    function's name and code, the objective and parameters, the device LightGBM runs on, and all of
    ``[validation]``. Resources, cost rates, output locations, run settings and the data source's URL
    are left out (:data:`HASH_EXCLUDED`): moving a job to a bigger machine or a new bucket does not
    make its models stale (the data fingerprint covers the rows themselves).
    """
    from manymodels.pipeline import resolve_device  # pipeline imports this module

    payload: dict[str, Any] = {}
    for section in _SECTIONS:
        part = getattr(spec, section)
        payload[section] = {f.name: getattr(part, f.name) for f in dataclasses.fields(part)
                            if _hashed(section, f.name)}
    prepare = payload["pipeline"].pop("prepare")
    payload["pipeline"]["prepare"] = {"ref": prepare.rpartition(":")[2],
                                      "source": hashlib.sha256(spec.prepare_source.encode()).hexdigest()}
    # CPU and GPU builds of LightGBM grow different trees: hash the device each task trains on
    # (``auto`` follows the GPUs a task reserves), not the reserved amounts themselves.
    r = spec.resources
    device = resolve_device(spec.model.device, r.num_gpus)
    payload["model"]["device"] = device
    other = [[sorted((k, str(v)) for k, v in o.match.items()), d] for o in r.override
             if (d := resolve_device(spec.model.device, r.num_gpus if o.num_gpus is None else o.num_gpus))
             != device]
    if other:
        payload["model"]["device_overrides"] = other
    text = json.dumps(_plain(payload), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
