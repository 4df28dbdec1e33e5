"""Object storage for real: data, registry and scores on ``s3://`` (a local moto server, see conftest).

Every URL is a plain ``s3://bucket/...``: the endpoint comes from ``AWS_ENDPOINT_URL``, as it would
for any S3-compatible store, and reaches the Ray workers through their inherited environment.
"""

from __future__ import annotations

import threading
import uuid
from typing import Any

import fsspec
import lightgbm as lgb
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pytest

import manymodels
from manymodels import InputError, Registry, StorageError
from manymodels.storage import Store
from manymodels.synth import make_transit, write_transit

pytestmark = pytest.mark.ray

N = 6
HOURS = 24 * 7
STATIONS = [f"stn-{i:05d}" for i in range(N)]


@pytest.fixture(scope="module")
def s3(s3_endpoint: str | None, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, str]:
    """A fresh bucket holding the transit data twice: ``flat/`` (8 files) and ``hive/`` (station=...)."""
    if s3_endpoint is None:
        pytest.skip("needs moto[server] and s3fs")
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    bucket = f"mm-{uuid.uuid4().hex[:12]}"
    fs.mkdir(bucket)
    frame = make_transit(N, HOURS)
    for layout in ("flat", "hive"):
        local = tmp_path_factory.mktemp(layout)
        write_transit(frame, str(local), layout=layout)
        fs.put(f"{local}/", f"{bucket}/data/{layout}/", recursive=True)
    fs.invalidate_cache()
    return fs, bucket


def test_upload_layouts(s3: tuple[Any, str]) -> None:
    fs, bucket = s3
    assert fs.ls(f"{bucket}/data/flat", detail=False)[0] == f"{bucket}/data/flat/part-000.parquet"
    hive = sorted(p.rsplit("/", 2)[-2] for p in fs.find(f"{bucket}/data/hive"))
    assert hive == [f"station={s}" for s in STATIONS]


@pytest.mark.parametrize("layout", ["hive", "flat"])
def test_train_and_score_on_s3(ray_session: None, make_spec: Any, s3: tuple[Any, str], layout: str) -> None:
    fs, bucket = s3
    job = f"transit-{layout}"
    registry, scores = f"s3://{bucket}/registry", f"s3://{bucket}/scores"
    spec = make_spec(f"s3://{bucket}/data/{layout}", registry, job={"name": job},
                     output={"scores": scores})

    first = manymodels.train(spec)
    assert (first.total, first.trained, first.promoted, first.skipped, first.failed) == (N, N, N, 0, 0)
    assert first.status == "succeeded" and first.registry == registry

    champions = Registry(registry).list(job)
    assert sorted(m.partition["station"] for m in champions) == STATIONS
    assert all(m.status == "champion" and m.version == 1 and m.rows == HOURS for m in champions)
    for mv in champions:
        assert mv.model_uri.startswith(f"s3://{bucket}/registry/{job}/models/")
        booster = lgb.Booster(model_str=fsspec.open(mv.model_uri, "r").open().read())
        assert booster.feature_name() == mv.features

    # Fingerprints and spec hash read back from S3 are stable: nothing to retrain.
    second = manymodels.train(spec)
    assert (second.total, second.trained, second.promoted, second.skipped, second.failed) == (N, 0, 0, N, 0)
    assert [m.run_id for m in Registry(registry).list(job)] == [first.run_id] * N

    s = manymodels.score(spec)
    assert s.status == "succeeded" and s.unscored == []
    assert s.input_rows == s.scored_rows == N * HOURS and s.partitions_scored == N
    assert s.output == f"{scores}/{job}/score_run_id={s.run_id}"

    # An analyst reads it back with pyarrow, through fsspec and through pyarrow's own S3 client.
    handler = pafs.PyFileSystem(pafs.FSSpecHandler(fs))
    table = ds.dataset(f"{bucket}/scores/{job}", filesystem=handler, partitioning="hive").to_table()
    assert table.num_rows == s.scored_rows
    assert sorted(set(table.column("station").to_pylist())) == STATIONS
    assert set(table.column("score_run_id").to_pylist()) == {s.run_id}
    assert set(table.column("model_run_id").to_pylist()) == {first.run_id}
    assert table.column("prediction").null_count == 0
    native = ds.dataset(f"s3://{bucket}/scores/{job}", partitioning="hive").to_table()
    assert native.num_rows == s.scored_rows
    assert not fs.exists(f"{bucket}/scores/.staging/{job}")  # staging cleaned up


def _objects(fs: Any, bucket: str) -> list[str]:
    fs.invalidate_cache()
    return sorted(fs.find(bucket))


def test_missing_bucket_is_a_one_line_error_before_writing(ray_session: None, make_spec: Any,
                                                             s3: tuple[Any, str]) -> None:
    fs, bucket = s3
    missing = f"mm-missing-{uuid.uuid4().hex[:8]}"
    before = _objects(fs, bucket)

    spec = make_spec(f"s3://{bucket}/data/hive", f"s3://{missing}/registry", job={"name": "nowhere"})
    with pytest.raises(StorageError) as err:
        manymodels.train(spec)
    assert missing in str(err.value) and "\n" not in str(err.value)
    assert not fs.exists(missing)

    # Scores into a missing bucket: refused before the run record is written to the registry.
    spec = make_spec(f"s3://{bucket}/data/hive", f"s3://{bucket}/registry", job={"name": "transit-hive"},
                     output={"scores": f"s3://{missing}/scores"})
    if not Registry(f"s3://{bucket}/registry").list("transit-hive"):
        manymodels.train(spec)  # this test run alone: give score something to score
        before = _objects(fs, bucket)
    with pytest.raises(StorageError) as err:
        manymodels.score(spec)
    assert missing in str(err.value) and "\n" not in str(err.value)

    # Data in a missing bucket is bad input.
    spec = make_spec(f"s3://{missing}/data", f"s3://{bucket}/registry", job={"name": "nodata"})
    with pytest.raises(InputError) as err2:
        manymodels.train(spec)
    assert "\n" not in str(err2.value)

    assert _objects(fs, bucket) == before


def test_create_exclusive_on_s3(s3: tuple[Any, str]) -> None:
    _, bucket = s3
    store = Store(f"s3://{bucket}/log")
    assert store.create_exclusive("a/commit", b"first") is True
    assert store.create_exclusive("a/commit", b"second") is False
    assert store.read_bytes("a/commit") == b"first"
    # An empty body too (s3fs's open("xb") writes it with an unconditional touch: it "succeeded"
    # twice).
    assert store.create_exclusive("a/empty", b"") is True
    assert store.create_exclusive("a/empty", b"") is False
    store.check_exclusive()  # the start-up probe passes on a server that honours If-None-Match

    # A conditional put (If-None-Match: *): of many racing creators exactly one wins.
    wins: list[bool] = []
    barrier = threading.Barrier(8)

    def race(i: int) -> None:
        s = Store(f"s3://{bucket}/log")
        barrier.wait()
        wins.append(s.create_exclusive("race/commit", str(i).encode()))

    threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(wins) == [False] * 7 + [True]


def test_s3fs_too_old_for_conditional_writes_is_refused(s3: tuple[Any, str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from importlib import metadata

    _, bucket = s3
    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: "2024.2.0" if name == "s3fs" else real(name))
    store = Store(f"s3://{bucket}/old")
    with pytest.raises(StorageError, match=r"cannot create objects exclusively.*s3fs>=2025\.7"):
        store.create_exclusive("k", b"1")
    assert not store.exists("k")


def test_storage_error_names_the_url(s3: tuple[Any, str]) -> None:
    missing = f"mm-missing-{uuid.uuid4().hex[:8]}"
    store = Store(f"s3://{missing}/reg")
    with pytest.raises(StorageError, match=f"s3://{missing}/reg/"):
        store.check_writable()
    assert Store(f"s3://{s3[1]}/reg").uri("a/b.txt") == f"s3://{s3[1]}/reg/a/b.txt"
