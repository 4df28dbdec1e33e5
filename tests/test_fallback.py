"""The global fallback model (``[score] fallback = "global"``): a bounded, deterministic input sample,
versions in the registry gated like a partition's, refitted only on full runs, and rollback.

The sampling tests run without Ray on a small Hive dataset; the lifecycle tests train the demo job
(4 stations × 4 days) on the session's Ray and score 2 stations that were never trained.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest

import manymodels
from manymodels import Registry
from manymodels.data import open_source, plan_partitions
from manymodels.fallback import (
    GLOBAL_PARTITION,
    global_champion,
    global_versions,
    partition_cap,
    rollback_global,
    sample_rows,
)
from manymodels.score import score
from manymodels.spec import SpecError
from manymodels.synth import make_transit, score_frame, write_transit

JOB = "transit-delays"
N, HOURS = 4, 24 * 4


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """History of N stations; the next day of N + 2 stations (2 never trained); a bigger set for
    sampling (8 stations × 7 days in 8 files)."""
    root = tmp_path_factory.mktemp("fallback-data")
    paths = {name: root / name for name in ("history", "next", "big")}
    write_transit(make_transit(N, HOURS), str(paths["history"]))
    write_transit(score_frame(N + 2, 24, after_hours=HOURS), str(paths["next"]))
    write_transit(make_transit(8, 24 * 7), str(paths["big"]))
    return paths


# ----------------------------------------------------------------------------- the bounded sample


@pytest.mark.parametrize(("per_partition", "max_rows", "batch_size"),
                         [(20, 100, 64), (20, 100, 7), (3, 1000, 64), (1000, 1_000_000, 50), (20, 5, 64)])
def test_sample_never_exceeds_its_caps(data: dict[str, Path], per_partition: int, max_rows: int,
                                       batch_size: int) -> None:
    source = open_source(str(data["big"]))
    plan = plan_partitions(source, ["station"])
    total = plan.total_rows
    assert (len(plan.partitions), total) == (8, 8 * 24 * 7)
    files = tuple(range(len(source.files)))
    s = sample_rows(source, ["station"], files, 8, per_partition, max_rows, batch_size=batch_size)
    k = partition_cap(8, per_partition, max_rows)
    assert s.per_partition == k == max(1, min(per_partition, max_rows // 8))
    sizes = s.frame.groupby("station").size()
    assert len(s.frame) <= max_rows and (sizes <= k).all()
    # The data is larger than the caps (except the 1000-per-partition case): the caps are reached.
    assert len(s.frame) == min(total, max_rows, 8 * k)
    assert s.rows_read == total
    # Streaming: never more than twice the sample plus one batch held at once, not the whole input.
    assert s.peak_held <= 2 * min(total, 8 * k) + batch_size
    if 2 * 8 * k + batch_size < total:
        assert s.peak_held < total
    # Each partition is one contiguous slice.
    assert [s.frame["station"].iloc[a:b].nunique() for a, b in s.spans] == [1] * len(s.spans)


def test_sample_is_deterministic(data: dict[str, Path]) -> None:
    """The same rows whatever the batch size or file order: a pure function of the data."""
    source = open_source(str(data["big"]))
    files = tuple(range(len(source.files)))
    a = sample_rows(source, ["station"], files, 8, 20, 100, batch_size=16)
    b = sample_rows(source, ["station"], tuple(reversed(files)), 8, 20, 100, batch_size=100_000)
    pd.testing.assert_frame_equal(a.frame, b.frame)
    assert len(a.frame) == 96 and a.frame["trip_id"].is_unique


def test_sample_caps_are_validated(make_spec: Any, tmp_path: Path) -> None:
    spec = make_spec(tmp_path, tmp_path / "registry")
    assert (spec.score.fallback_rows_per_partition, spec.score.fallback_max_rows) == (1000, 1_000_000)
    for key, value in [("fallback_rows_per_partition", 0), ("fallback_max_rows", -1),
                       ("fallback_max_rows", 2.5), ("fallback_rows_per_partition", True)]:
        with pytest.raises(SpecError, match=f"score.{key}"):
            make_spec(tmp_path, tmp_path / "registry", score={key: value})


# ----------------------------------------------------------------------------- lifecycle


def _record(reg: Registry, run_id: str) -> dict[str, Any]:
    record, _ = reg.run(run_id)
    return record


def _fallback_rows(out: Path, run_id: str) -> pd.DataFrame:
    import pyarrow.dataset as ds

    df = ds.dataset(str(out / JOB), partitioning="hive").to_table().to_pandas()
    df = df[df["score_run_id"] == run_id]
    return df[df["station"].isin(["stn-00004", "stn-00005"])]


@pytest.mark.ray
def test_versions_full_runs_only_and_rollback(ray_session: None, make_spec: Any, data: dict[str, Path],
                                              tmp_path: Path) -> None:
    spec = make_spec(data["history"], tmp_path / "registry",
                     score={"fallback": "global", "fallback_rows_per_partition": 40})
    reg = Registry(spec.output.registry)

    first = manymodels.train(spec)
    g = _record(reg, first.run_id)["global_model"]
    assert (g["status"], g["version"], g["promoted"]) == ("trained", 1, True), g
    assert g["sample"]["per_partition_cap"] == 40 and g["sample"]["rows"] == N * 40  # bounded input
    assert g["sample"]["rows_read"] == N * HOURS
    v1 = global_champion(reg, JOB)
    assert v1 is not None and (v1["version"], v1["run_id"], v1["partition"]) == (1, first.run_id,
                                                                               GLOBAL_PARTITION)
    assert v1["rows"] <= N * 40

    # --only / --limit: partitions retrained, the global model left as it is.
    for kw in ({"only": ["station=stn-00000"]}, {"limit": 2}):
        part = manymodels.train(spec, force=True, **kw)
        assert part.trained >= 1
        assert _record(reg, part.run_id)["global_model"] == {"status": "skipped",
                                                             "reason": "--only/--limit run"}
    assert [(r["version"], r["status"]) for r in global_versions(reg, JOB)] == [(1, "champion")]

    # A second full run: version 2 (same data and spec: as good as version 1, so promoted).
    second = manymodels.train(spec, force=True)
    assert _record(reg, second.run_id)["global_model"]["version"] == 2
    assert [(r["version"], r["status"]) for r in global_versions(reg, JOB)] == [(1, "archived"),
                                                                                (2, "champion")]
    # Nothing changed since: the next full run leaves it alone.
    third = manymodels.train(spec)
    assert _record(reg, third.run_id)["global_model"] == {"status": "unchanged", "version": 2}

    # Rollback makes version 1 the champion again, as for a partition.
    assert rollback_global(reg, JOB) == 1
    versions = global_versions(reg, JOB)
    assert [(r["version"], r["status"]) for r in versions] == [(1, "champion"), (2, "archived")]

    # Scoring: unseen stations use the restored global model (model_version 0, its training run).
    out = tmp_path / "scores"
    s = score(make_spec(data["history"], spec.output.registry, score={"fallback": "global"}),
              data=str(data["next"]), output=str(out))
    assert s.scored_rows == (N + 2) * 24
    rows = _fallback_rows(out, s.run_id)
    assert len(rows) == 2 * 24
    assert set(rows["model_version"]) == {0} and set(rows["model_run_id"]) == {first.run_id}
    assert _record(reg, s.run_id)["global_model"] == {"version": 1, "run_id": first.run_id}


@pytest.mark.ray
def test_global_model_failing_the_gate_is_rejected(ray_session: None, make_spec: Any,
                                                   data: dict[str, Path], tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    spec = make_spec(data["history"], registry, score={"fallback": "global"})
    reg = Registry(str(registry))
    first = manymodels.train(spec)
    assert _record(reg, first.run_id)["global_model"]["promoted"] is True

    strict = make_spec(data["history"], registry, score={"fallback": "global"},
                       validation={"max_metric": 1e-9})
    second = manymodels.train(strict, force=True)
    g = _record(reg, second.run_id)["global_model"]
    assert (g["status"], g["version"], g["promoted"]) == ("trained", 2, False), g
    assert "max_metric" in g["reason"]
    versions = global_versions(reg, JOB)
    assert [(r["version"], r["status"], r["run_id"]) for r in versions] == [
        (1, "champion", first.run_id), (2, "rejected", second.run_id)]

    # The rejected model never scores: version 1 still does.
    out = tmp_path / "scores"
    s = score(spec, data=str(data["next"]), output=str(out))
    rows = _fallback_rows(out, s.run_id)
    assert len(rows) == 2 * 24 and set(rows["model_run_id"]) == {first.run_id}
    assert _record(reg, s.run_id)["global_model"] == {"version": 1, "run_id": first.run_id}
