"""Tests of the job spec (manymodels.spec): parsing, defaults, overrides, errors, immutability, hash."""

from __future__ import annotations

import dataclasses
import pickle
import typing
from pathlib import Path
from typing import Any

import pytest

from manymodels.spec import (
    HASH_EXCLUDED,
    DataSpec,
    FrozenMap,
    JobSpec,
    ModelSpec,
    ResourceOverride,
    SpecError,
    load_spec,
    spec_hash,
)

PREPARE = '''\
def prepare(df):
    return df
'''


def contract_example(prepare: Path) -> str:
    """The example spec of CONTRACT.md, with a real prepare file."""
    return f'''
[job]
name = "transit-delays"

[data]
source = "partitions/transit"
partition_by = ["station"]
target = "delay_min"
features = []
exclude = []
time_column = "ts"
categorical = []

[pipeline]
prepare = "{prepare}:prepare"

[model]
objective = "regression"
params = {{ num_leaves = 31, learning_rate = 0.05, n_estimators = 200 }}

[validation]
holdout_fraction = 0.2
metric = "mae"
max_metric = 15.0
min_rows = 30

[resources]
num_cpus = 1
num_gpus = 0
memory_mb = 0

[cost]
cpu_hour_usd = 0.048
gpu_hour_usd = 2.50

[score]
passthrough = ["trip_id"]
fallback = "none"

[output]
registry = "registry"
scores = "scores"

[run]
max_failure_fraction = 0.05
max_retries = 2
'''


MINIMAL = '''
[data]
source = "data/transit"
partition_by = ["station"]
target = "delay_min"
'''


@pytest.fixture
def prepare_file(tmp_path: Path) -> Path:
    path = tmp_path / "transit.py"
    path.write_text(PREPARE)
    return path


@pytest.fixture
def example(tmp_path: Path, prepare_file: Path) -> Path:
    path = tmp_path / "transit.toml"
    path.write_text(contract_example(prepare_file))
    return path


def write(tmp_path: Path, text: str, name: str = "job.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------- parsing


def test_contract_example_parses(example: Path, prepare_file: Path) -> None:
    spec = load_spec(example)
    assert isinstance(spec, JobSpec)
    assert spec.name == "transit-delays"
    assert spec.path == str(example)
    assert spec.data == DataSpec(source="partitions/transit", partition_by=("station",),
                                 target="delay_min", time_column="ts")
    assert spec.pipeline.prepare == f"{prepare_file}:prepare"
    assert spec.prepare_source == PREPARE
    assert spec.model.objective == "regression"
    assert dict(spec.model.params) == {"num_leaves": 31, "learning_rate": 0.05, "n_estimators": 200}
    assert spec.validation.holdout_fraction == 0.2
    assert spec.metric == "mae" and spec.higher_is_better is False
    assert spec.validation.max_metric == 15.0 and spec.validation.min_metric is None
    assert spec.validation.min_rows == 30
    assert (spec.resources.num_cpus, spec.resources.num_gpus, spec.resources.memory_mb) == (1, 0, 0)
    assert isinstance(spec.resources.num_cpus, float)
    assert spec.cost.cpu_hour_usd == 0.048 and spec.cost.gpu_hour_usd == 2.5
    assert spec.cost.memory_gb_hour_usd == 0.0
    assert spec.score.passthrough == ("trip_id",) and spec.score.fallback == "none"
    assert (spec.output.registry, spec.output.scores) == ("registry", "scores")
    assert spec.run.max_failure_fraction == 0.05 and spec.run.max_retries == 2
    for part in (spec, spec.job, spec.data, spec.pipeline, spec.model, spec.validation, spec.resources,
                 spec.cost, spec.score, spec.output, spec.run):
        assert dataclasses.is_dataclass(part)
        assert type(part).__dataclass_params__.frozen  # type: ignore[attr-defined]


def test_defaults(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, MINIMAL))
    assert spec.name == "transit"  # derived from the data folder's name
    assert spec.data.features == () and spec.data.exclude == () and spec.data.time_column == ""
    assert spec.data.format == "auto"
    assert spec.pipeline.prepare == "" and spec.prepare_source == ""
    assert spec.model == ModelSpec()
    assert spec.model.objective == "regression" and dict(spec.model.params) == {}
    assert spec.metric == "mae"  # defaulted from the regression objective
    assert spec.validation.holdout_fraction == 0.2 and spec.validation.min_rows == 30
    assert spec.validation.max_metric is None and spec.validation.min_metric is None
    assert spec.resources.num_cpus == 1 and spec.resources.num_gpus == 0 and spec.resources.memory_mb == 0
    assert spec.cost.cpu_hour_usd == 0 and spec.cost.gpu_hour_usd == 0
    assert spec.score.passthrough == () and spec.score.fallback == "none"
    assert spec.output.registry == "registry" and spec.output.scores == "scores"
    assert spec.run.max_failure_fraction == 0.05 and spec.run.max_retries == 2


def test_classification_metric_default(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, MINIMAL + '[model]\nobjective = "binary"\n'))
    assert spec.metric == "logloss" and spec.higher_is_better is False
    spec = load_spec(write(tmp_path, MINIMAL + '[model]\nobjective = "binary"\n'
                                               '[validation]\nmetric = "auc"\nmin_metric = 0.6\n'))
    assert spec.metric == "auc" and spec.higher_is_better is True and spec.validation.min_metric == 0.6


def test_overrides_replace_file_values(example: Path) -> None:
    spec = load_spec(example, data="elsewhere/trips.parquet", partition_by=["line", "station"],
                     target="late", registry="s3://bucket/reg")
    assert spec.data.source == "elsewhere/trips.parquet"
    assert spec.data.partition_by == ("line", "station")
    assert spec.data.target == "late"
    assert spec.output.registry == "s3://bucket/reg"
    assert spec.output.scores == "scores"
    assert spec.name == "transit-delays"  # the file's name wins over the data's


def test_partition_by_override_as_comma_string(example: Path) -> None:
    assert load_spec(example, partition_by="line,station").data.partition_by == ("line", "station")
    assert load_spec(example, partition_by=" line , station ").data.partition_by == ("line", "station")
    assert load_spec(example, partition_by="line").data.partition_by == ("line",)


def test_none_override_means_not_given(example: Path) -> None:
    assert load_spec(example, data=None, target=None) == load_spec(example)


def test_unknown_override_rejected(example: Path) -> None:
    with pytest.raises(SpecError, match="bogus"):
        load_spec(example, bogus="x")


@pytest.mark.parametrize(("source", "name"), [
    ("partitions/transit", "transit"),
    ("partitions/transit/", "transit"),
    ("/abs/path/Sales Data", "sales-data"),
    ("data/trips.parquet", "trips"),
    ("data/trips.csv", "trips"),
    ("s3://bucket/prefix/Daily_Loads", "daily_loads"),
])
def test_no_file_overrides_are_enough(source: str, name: str) -> None:
    spec = load_spec(data=source, partition_by="station", target="delay_min")
    assert spec.name == name
    assert spec.data.source == source
    assert spec.data.partition_by == ("station",) and spec.data.target == "delay_min"
    assert spec.path == ""
    assert spec.output.registry == "registry" and spec.output.scores == "scores"


@pytest.mark.parametrize("missing", ["data", "partition_by", "target"])
def test_no_file_each_override_required(missing: str) -> None:
    kwargs = {"data": "d/x", "partition_by": "a", "target": "y"}
    del kwargs[missing]
    with pytest.raises(SpecError, match=r"required|at least one"):
        load_spec(**kwargs)


# ----------------------------------------------------------------------------- errors


def spec_error(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    message = str(info.value)
    assert str(path) in message, message
    return message


def test_unknown_section(tmp_path: Path) -> None:
    message = spec_error(tmp_path, MINIMAL + "[trainer]\nx = 1\n")
    assert "[trainer]" in message


def test_unknown_key_names_key_and_file(tmp_path: Path) -> None:
    text = '[data]\nsource = "d"\npartion_by = ["a"]\npartition_by = ["a"]\ntarget = "y"\n'
    message = spec_error(tmp_path, text)
    assert "data.partion_by" in message


def test_unknown_key_in_other_section(tmp_path: Path) -> None:
    assert "model.n_estimators" in spec_error(tmp_path, MINIMAL + "[model]\nn_estimators = 5\n")


@pytest.mark.parametrize(("extra", "key"), [
    ('[validation]\nholdout_fraction = "0.2"\n', "validation.holdout_fraction"),  # string for a number
    ('[cost]\ncpu_hour_usd = "cheap"\n', "cost.cpu_hour_usd"),
    ("[score]\npassthrough = 5\n", "score.passthrough"),  # number for a list
    ("[validation]\nmin_rows = true\n", "validation.min_rows"),  # bool for int
    ("[run]\nmax_retries = true\n", "run.max_retries"),
    ("[resources]\nnum_cpus = true\n", "resources.num_cpus"),  # bool for a number
    ("[validation]\nmin_rows = 2.5\n", "validation.min_rows"),  # float for int
    ("[model]\nobjective = 3\n", "model.objective"),  # number for a string
    ("[model]\nparams = 3\n", "model.params"),  # number for a table
    ("[score]\npassthrough = [1, 2]\n", "score.passthrough[0]"),  # numbers in a list of strings
])
def test_wrong_types(tmp_path: Path, extra: str, key: str) -> None:
    assert key in spec_error(tmp_path, MINIMAL + extra)


def test_number_for_partition_by_list(tmp_path: Path) -> None:
    message = spec_error(tmp_path, '[data]\nsource = "d"\npartition_by = 3\ntarget = "y"\n')
    assert "data.partition_by" in message and "list" in message


@pytest.mark.parametrize(("text", "key"), [
    ('[data]\nsource = "d"\npartition_by = ["a"]\n', "data.target"),
    ('[data]\nsource = "d"\ntarget = "y"\n', "data.partition_by"),
    ('[data]\nsource = "d"\npartition_by = []\ntarget = "y"\n', "data.partition_by"),
    ('[data]\npartition_by = ["a"]\ntarget = "y"\n', "data.source"),
])
def test_missing_required(tmp_path: Path, text: str, key: str) -> None:
    assert key in spec_error(tmp_path, text)


@pytest.mark.parametrize("name", ["Transit", "transit delays", "a/b", "x" * 65, "../up", "ümlaut"])
def test_bad_job_name(tmp_path: Path, name: str) -> None:
    assert "job.name" in spec_error(tmp_path, MINIMAL + f'[job]\nname = "{name}"\n')


@pytest.mark.parametrize("fraction", ["0", "0.0", "1", "1.0", "-0.1", "1.5"])
def test_holdout_fraction_out_of_range(tmp_path: Path, fraction: str) -> None:
    message = spec_error(tmp_path, MINIMAL + f"[validation]\nholdout_fraction = {fraction}\n")
    assert "validation.holdout_fraction" in message


@pytest.mark.parametrize("metric", ["auc", "r2", "accuracy"])
def test_max_metric_with_higher_is_better_metric(tmp_path: Path, metric: str) -> None:
    message = spec_error(tmp_path, MINIMAL + f'[validation]\nmetric = "{metric}"\nmax_metric = 0.5\n')
    assert "max_metric" in message and "min_metric" in message


def test_min_metric_with_lower_is_better_metric(tmp_path: Path) -> None:
    assert "min_metric" in spec_error(tmp_path, MINIMAL + '[validation]\nmetric = "mae"\nmin_metric = 1\n')


def test_unknown_metric(tmp_path: Path) -> None:
    message = spec_error(tmp_path, MINIMAL + '[validation]\nmetric = "f1"\n')
    assert "validation.metric" in message and "'f1'" in message


def test_invalid_toml(tmp_path: Path) -> None:
    message = spec_error(tmp_path, MINIMAL + "target = = 1\n")
    assert "TOML" in message


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(path) in str(info.value)


def test_prepare_file_missing(tmp_path: Path) -> None:
    missing = tmp_path / "gone.py"
    message = spec_error(tmp_path, MINIMAL + f'[pipeline]\nprepare = "{missing}:prepare"\n')
    assert "pipeline.prepare" in message and str(missing) in message


def test_prepare_without_function(tmp_path: Path, prepare_file: Path) -> None:
    assert "pipeline.prepare" in spec_error(tmp_path, MINIMAL + f'[pipeline]\nprepare = "{prepare_file}"\n')


def test_multiclass_without_num_class(tmp_path: Path) -> None:
    message = spec_error(tmp_path, MINIMAL + '[model]\nobjective = "multiclass"\n')
    assert "num_class" in message
    text = MINIMAL + '[model]\nobjective = "multiclass"\nparams = { num_class = 3 }\n'
    ok = load_spec(write(tmp_path, text, name="ok.toml"))
    assert ok.model.params["num_class"] == 3 and ok.metric == "logloss"


def test_target_cannot_be_a_key(tmp_path: Path) -> None:
    assert "data.target" in spec_error(tmp_path, '[data]\nsource = "d"\npartition_by = ["a"]\ntarget = "a"\n')


# ----------------------------------------------------------------------------- immutability


def test_spec_is_immutable(example: Path) -> None:
    spec = load_spec(example)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.data = DataSpec()  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.data.target = "other"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.model.params = {}  # type: ignore[misc]
    with pytest.raises(TypeError):
        spec.model.params["num_leaves"] = 7  # type: ignore[index]
    with pytest.raises((TypeError, AttributeError)):
        del spec.model.params["num_leaves"]  # type: ignore[attr-defined]
    with pytest.raises(AttributeError):
        spec.model.params.update({"num_leaves": 7})  # type: ignore[attr-defined]
    assert isinstance(spec.model.params, FrozenMap)
    assert spec.model.params["num_leaves"] == 31
    assert isinstance(spec.data.partition_by, tuple) and isinstance(spec.score.passthrough, tuple)


def test_params_detached_from_source_table(tmp_path: Path) -> None:
    from manymodels.spec import spec_from_dict

    params = {"num_leaves": 31}
    spec = spec_from_dict({"data": {"source": "d", "partition_by": ["a"], "target": "y"},
                           "model": {"params": params}})
    params["num_leaves"] = 99
    assert spec.model.params["num_leaves"] == 31


def test_spec_pickles(example: Path) -> None:
    spec = load_spec(example)
    back = pickle.loads(pickle.dumps(spec))
    assert back == spec
    assert back.prepare_source == spec.prepare_source
    assert isinstance(back.model.params, FrozenMap)
    assert spec_hash(back) == spec_hash(spec)
    assert hash(back) == hash(spec)


def test_to_dict_round_trip(example: Path) -> None:
    from manymodels.spec import spec_from_dict

    spec = load_spec(example)
    assert spec_from_dict(spec.to_dict(), path=spec.path) == spec


# ----------------------------------------------------------------------------- spec_hash


def test_spec_hash_stable(example: Path) -> None:
    first, second = load_spec(example), load_spec(example)
    assert spec_hash(first) == spec_hash(second)
    assert len(spec_hash(first)) == 16


@pytest.mark.parametrize(("old", "new"), [
    ("num_cpus = 1", "num_cpus = 8"),
    ("memory_mb = 0", "memory_mb = 4096"),
    ("cpu_hour_usd = 0.048", "cpu_hour_usd = 0.5"),
    ("gpu_hour_usd = 2.50", "gpu_hour_usd = 9.0"),
    ('registry = "registry"', 'registry = "s3://b/registry"'),
    ('scores = "scores"', 'scores = "gs://b/scores"'),
    ("max_failure_fraction = 0.05", "max_failure_fraction = 0.5"),
    ("max_retries = 2", "max_retries = 0"),
    ('source = "partitions/transit"', 'source = "s3://bucket/transit"'),
])
def test_spec_hash_ignores_where_and_how_fast(tmp_path: Path, example: Path, old: str, new: str) -> None:
    text = example.read_text()
    assert text.count(old) == 1
    changed = write(tmp_path, text.replace(old, new), name="changed.toml")
    assert load_spec(changed) != load_spec(example)
    assert spec_hash(load_spec(changed)) == spec_hash(load_spec(example))


@pytest.mark.parametrize(("old", "new"), [
    ("num_leaves = 31", "num_leaves = 63"),
    ("learning_rate = 0.05", "learning_rate = 0.1"),
    ('objective = "regression"', 'objective = "poisson"'),
    ("features = []", 'features = ["temp_c"]'),
    ("exclude = []", 'exclude = ["trip_id"]'),
    ('target = "delay_min"', 'target = "late_min"'),
    ('partition_by = ["station"]', 'partition_by = ["line"]'),
    ('time_column = "ts"', 'time_column = "event_time"'),
    ("holdout_fraction = 0.2", "holdout_fraction = 0.3"),
    ("max_metric = 15.0", "max_metric = 10.0"),
    ('passthrough = ["trip_id"]', "passthrough = []"),  # passthrough columns are never features
    ("num_gpus = 0", "num_gpus = 1"),  # model.device = "auto": the GPU device, another model
])
def test_spec_hash_changes_with_the_model(tmp_path: Path, example: Path, old: str, new: str) -> None:
    text = example.read_text()
    assert text.count(old) == 1
    changed = write(tmp_path, text.replace(old, new), name="changed.toml")
    assert spec_hash(load_spec(changed)) != spec_hash(load_spec(example))


def test_spec_hash_changes_with_prepare_content(example: Path, prepare_file: Path) -> None:
    before = spec_hash(load_spec(example))
    prepare_file.write_text(PREPARE.replace("return df", "return df.dropna()"))
    after = spec_hash(load_spec(example))
    assert before != after
    prepare_file.write_text(PREPARE)
    assert spec_hash(load_spec(example)) == before


def test_spec_hash_param_order_irrelevant(tmp_path: Path, example: Path) -> None:
    text = example.read_text()
    old = "params = { num_leaves = 31, learning_rate = 0.05, n_estimators = 200 }"
    new = "params = { n_estimators = 200, learning_rate = 0.05, num_leaves = 31 }"
    assert text.count(old) == 1
    changed = write(tmp_path, text.replace(old, new), name="changed.toml")
    assert spec_hash(load_spec(changed)) == spec_hash(load_spec(example))


# Per spec key: a value other than the contract example's. Every key of every section is listed,
# so a key added to the spec must be classified (hashed or in HASH_EXCLUDED) before this passes.
OTHER_VALUES: dict[str, Any] = {
    "job.name": "other-job",
    "data.source": "s3://bucket/elsewhere",
    "data.partition_by": ("line",),
    "data.target": "late_min",
    "data.features": ("temp_c",),
    "data.exclude": ("temp_c",),
    "data.time_column": "event_time",
    "data.categorical": ("line",),
    "data.format": "parquet",
    "data.key_types": FrozenMap({"station": "int64"}),
    "pipeline.prepare": "other.py:make_features",
    "model.objective": "poisson",
    "model.params": FrozenMap({"num_leaves": 7}),
    "model.device": "gpu",
    "model.gpu_fallback": "cpu",
    "validation.holdout_fraction": 0.3,
    "validation.metric": "rmse",
    "validation.max_metric": 3.0,
    "validation.min_metric": 0.5,
    "validation.min_rows": 99,
    "validation.seed": 7,
    "resources.num_cpus": 8.0,
    "resources.num_gpus": 0.5,  # with model.device = "cpu" below: no other device
    "resources.memory_mb": 4096,
    "resources.override": (ResourceOverride(match=FrozenMap({"station": "a"}), num_cpus=4.0),),
    "cost.cpu_hour_usd": 1.0,
    "cost.gpu_hour_usd": 9.0,
    "cost.memory_gb_hour_usd": 0.1,
    "cost.max_usd": 5.0,
    "score.passthrough": ("trip_id", "line"),
    "score.fallback": "global",
    "score.fallback_rows_per_partition": 50,
    "score.fallback_max_rows": 5000,
    "output.registry": "s3://b/registry",
    "output.scores": "gs://b/scores",
    "output.format": "delta",
    "run.max_failure_fraction": 0.5,
    "run.max_retries": 0,
    "run.timeout_s": 60.0,
}
EXCLUDED_KEYS = {"job.name", "data.source", "data.format", "model.gpu_fallback", "score.fallback",
                 "score.fallback_rows_per_partition", "score.fallback_max_rows"} | {
    k for k in OTHER_VALUES if k.split(".")[0] in ("resources", "cost", "output", "run")}


def every_spec_key() -> list[str]:
    hints = typing.get_type_hints(JobSpec)
    sections = [f.name for f in dataclasses.fields(JobSpec) if f.name not in ("path", "prepare_source")]
    return [f"{name}.{f.name}" for name in sections for f in dataclasses.fields(hints[name])]


def with_key(spec: JobSpec, dotted: str, value: Any) -> JobSpec:
    section, key = dotted.split(".")
    return dataclasses.replace(spec, **{section: dataclasses.replace(getattr(spec, section), **{key: value})})


def test_every_spec_key_is_classified() -> None:
    assert sorted(OTHER_VALUES) == sorted(every_spec_key())
    excluded = {k for k in OTHER_VALUES if k in HASH_EXCLUDED or k.split(".")[0] in HASH_EXCLUDED}
    assert excluded == EXCLUDED_KEYS


@pytest.mark.parametrize("key", sorted(set(OTHER_VALUES) - EXCLUDED_KEYS))
def test_spec_hash_changes_with_every_training_key(example: Path, key: str) -> None:
    base = with_key(load_spec(example), "model.device", "cpu")
    changed = with_key(base, key, OTHER_VALUES[key])
    assert changed != base
    assert spec_hash(changed) != spec_hash(base), key


@pytest.mark.parametrize("key", sorted(EXCLUDED_KEYS))
def test_spec_hash_ignores_every_other_key(example: Path, key: str) -> None:
    base = with_key(load_spec(example), "model.device", "cpu")
    changed = with_key(base, key, OTHER_VALUES[key])
    assert changed != base
    assert spec_hash(changed) == spec_hash(base), key


def test_spec_hash_follows_the_device_auto_resolves_to(example: Path) -> None:
    """``model.device = "auto"`` trains on the GPU when the task reserves one: another model. The
    amounts themselves are not hashed, nor GPUs reserved for a CPU device."""
    auto = load_spec(example)
    assert auto.model.device == "auto"
    gpu = with_key(auto, "resources.num_gpus", 1.0)
    assert spec_hash(gpu) != spec_hash(auto)
    assert spec_hash(with_key(auto, "resources.num_gpus", 2.0)) == spec_hash(gpu)
    assert spec_hash(gpu) == spec_hash(with_key(auto, "model.device", "gpu"))
    one = with_key(auto, "resources.override",
                   (ResourceOverride(match=FrozenMap({"station": "a"}), num_gpus=1.0),))
    assert spec_hash(one) != spec_hash(auto)  # that partition trains on the GPU
    cpu = with_key(auto, "model.device", "cpu")
    assert spec_hash(with_key(cpu, "resources.num_gpus", 1.0)) == spec_hash(cpu)


def test_key_types_validated(tmp_path: Path) -> None:
    ok = write(tmp_path, MINIMAL + 'key_types = { station = "int64" }\n')
    assert dict(load_spec(ok).data.key_types) == {"station": "int64"}
    assert load_spec(write(tmp_path, MINIMAL, name="plain.toml")).data.key_types == {}
    message = spec_error(tmp_path, MINIMAL + 'key_types = { station = "integer" }\n')
    assert "data.key_types.station" in message and "int64" in message and "job.toml" in message
    assert "data.key_types.station" in spec_error(tmp_path, MINIMAL + "key_types = { station = 5 }\n")
    assert "data.key_types" in spec_error(tmp_path, MINIMAL + 'key_types = "int64"\n')


@pytest.mark.ray
@pytest.mark.usefixtures("ray_session")
def test_adding_a_passthrough_column_retrains_without_it(make_spec: Any, tmp_path: Path) -> None:
    """Issue 8 item 4: a new passthrough column is no longer a feature, so every partition is
    retrained (not skipped as "unchanged") and the new models leave it out."""
    import manymodels
    from manymodels import Registry
    from manymodels.synth import make_transit, write_transit

    data = tmp_path / "data"
    write_transit(make_transit(3, 24 * 7), str(data), layout="hive")
    first = make_spec(data, tmp_path / "registry")
    t1 = manymodels.train(first)
    assert (t1.trained, t1.failed) == (3, 0), t1.failures
    reg = Registry(first.output.registry)
    assert all("temp_c" in m.features for m in reg.list(first.name))
    again = manymodels.train(first)
    assert (again.trained, again.skipped) == (0, 3)  # unchanged data and spec: skipped
    second = make_spec(data, tmp_path / "registry", score={"passthrough": ["trip_id", "temp_c"]})
    t2 = manymodels.train(second)
    assert (t2.trained, t2.skipped, t2.failed) == (3, 0, 0), t2.failures
    latest = {m.partition["station"]: m for m in reg.list(first.name, all_versions=True) if m.version == 2}
    assert len(latest) == 3
    assert all("temp_c" not in m.features and m.run_id == t2.run_id for m in latest.values())
