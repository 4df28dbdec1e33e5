"""A year of nightly runs: the registry read paths at 10,000 partitions × 365 versions (issue 8 item 10).

Generates, without training, the registry log a job has after 365 nightly runs over 10,000
partitions (3.65 M versions): each night every partition gets a new version, promoted with
probability ``--promote`` (the previous champion archived) or rejected. The files are exactly what
``Registry`` writes after its routine checkpoints and clean-ups: the two newest checkpoints (live and
all, at commits 350 and 360) and the commits after the older one (351..365). One champion gets a
real (tiny) LightGBM model file. Then it times, each from a fresh ``Registry`` (the OS file cache is
warm, this process's caches are not):

- ``state()``: what ``train`` planning reads; ``list()``: the champions (``models list``);
- ``load_model()`` of one champion (cold: a fresh Registry; warm: the same Registry again);
  (these three: the median of 5 tries)
- ``list(all_versions=True)`` (``models list --all``);
- ``gc(keep)`` dry run, then for real, then ``state()`` and ``list()`` again.

Targets: planning and list < 1 s, load_model < 50 ms.

    python benchmarks/index_history.py --partitions 10000 --versions 365
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from manymodels.registry import (  # noqa: E402
    CHECKPOINT_EVERY,
    INDEX_SCHEMA,
    SEQ_STRIDE,
    Registry,
    _by_partition,
    _parquet,
    encode_partition,
    partition_id,
)

JOB = "nightly"
FEATURES = json.dumps(["hour", "dow", "lag_1", "lag_24"])


class History:
    """The synthetic history: which version of which partition was promoted."""

    def __init__(self, partitions: int, versions: int, promote: float, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.n, self.v = partitions, versions
        self.promoted = rng.random((partitions, versions + 1)) < promote  # [:, v] for version v
        self.promoted[:, 0] = False
        self.promoted[:, 1] = True
        self.metric = rng.uniform(0.5, 3.0, (partitions, versions + 1))
        stamp = np.where(self.promoted, np.arange(versions + 1), 0)
        self.champ = np.maximum.accumulate(stamp, axis=1)  # [:, n] = champion after night n
        keys = [f"stn-{i:05d}" for i in range(partitions)]
        self.pid = pa.array([partition_id(["station"], [k]) for k in keys], pa.string())
        self.partition = pa.array([encode_partition(["station"], [k]) for k in keys], pa.string())
        self.run = pa.array([f"train-night-{v:03d}" for v in range(versions + 1)], pa.string())

    def rows(self, p: np.ndarray, v: np.ndarray, status: np.ndarray, prev: np.ndarray,
             seq: np.ndarray) -> pa.Table:
        """Index rows for (partition, version) pairs, built column by column."""
        n = len(p)
        pid = self.pid.take(pa.array(p))
        run = self.run.take(pa.array(v))
        value = pa.array(self.metric[p, v])
        start = np.datetime64("2025-01-01T02:00:00", "us")
        trained = pa.array(start + v.astype("timedelta64[D]"), pa.timestamp("us")).cast(
            pa.timestamp("us", tz="UTC"))
        metrics = pc.binary_join_element_wise('{"mae":', pc.cast(value, pa.string()), "}", "")
        model_key = pc.binary_join_element_wise(f"{JOB}/models/", pid, "/", run, ".txt", "")
        reason = pc.if_else(pa.array(status == "rejected"), "worse than champion", "")
        return pa.table({
            "pid": pid, "partition": self.partition.take(pa.array(p)), "version": pa.array(v, pa.int64()),
            "status": pa.array(status, pa.string()), "run_id": run, "trained_at": trained,
            "rows": pa.array(np.full(n, 8760), pa.int64()), "metric": pa.array(["mae"] * n, pa.string()),
            "metric_value": value, "metrics": metrics,
            "fingerprint": pc.binary_join_element_wise("fp-", pid, run, ""),
            "spec_hash": pa.array(["0123456789abcdef"] * n, pa.string()), "model_key": model_key,
            "features": pa.array([FEATURES] * n, pa.string()),
            "time_min": pa.nulls(n, pa.string()), "time_max": pa.nulls(n, pa.string()),
            "previous_version": pa.array(np.where(prev > 0, prev, 0), pa.int64(), mask=prev <= 0),
            "reason": reason, "comparison": pa.array([""] * n, pa.string()),
            "seq": pa.array(seq, pa.int64()),
        }, schema=INDEX_SCHEMA)

    def status(self, p: np.ndarray, v: np.ndarray, night: int) -> np.ndarray:
        """Each version's status after ``night``."""
        champion = self.champ[p, night] == v
        return np.where(champion, "champion", np.where(self.promoted[p, v], "archived", "rejected"))

    def checkpoint_all(self, night: int) -> pa.Table:
        p, v = np.meshgrid(np.arange(self.n), np.arange(1, night + 1), indexing="ij")
        p, v = p.ravel(), v.ravel()
        prev = self.champ[p, v - 1]
        return self.rows(p, v, self.status(p, v, night), prev, v * SEQ_STRIDE + p)

    def checkpoint_live(self, night: int) -> pa.Table:
        p = np.arange(self.n)
        champ = self.champ[p, night]
        latest = np.full(self.n, night)
        both_p = np.concatenate([p, p[champ != latest]])
        both_v = np.concatenate([latest, champ[champ != latest]])
        return self.rows(both_p, both_v, self.status(both_p, both_v, night), self.champ[both_p, both_v - 1],
                         both_v * SEQ_STRIDE + both_p)

    def commit(self, night: int) -> pa.Table:
        p = np.arange(self.n)
        up = self.promoted[:, night]
        before = self.champ[:, night - 1]
        # the archive of the previous champion comes first, then the new version
        arch_p = p[up]
        new_status = np.where(up, "champion", "rejected")
        ps = np.concatenate([arch_p, p])
        vs = np.concatenate([before[up], np.full(self.n, night)])
        status = np.concatenate([np.full(len(arch_p), "archived"), new_status])
        prev = np.concatenate([self.champ[arch_p, before[up] - 1], before])
        seq = night * SEQ_STRIDE + np.arange(len(ps))
        return self.rows(ps, vs, status, prev, seq)


def generate(registry: Path, h: History) -> dict[str, Any]:
    store = Registry(str(registry)).store
    newest = (h.v // CHECKPOINT_EVERY) * CHECKPOINT_EVERY
    older = newest - CHECKPOINT_EVERY
    # Written as Registry writes them: sorted by partition, in small row groups.
    for night in (older, newest):
        store.write_bytes(Registry.checkpoint_key(JOB, night, "all"),
                          _parquet(_by_partition(h.checkpoint_all(night))))
        store.write_bytes(Registry.checkpoint_key(JOB, night, "live"),
                          _parquet(_by_partition(h.checkpoint_live(night))))
    for night in range(older + 1, h.v + 1):
        table = _by_partition(h.commit(night))
        seq = night * SEQ_STRIDE + np.arange(table.num_rows)
        table = table.set_column(INDEX_SCHEMA.get_field_index("seq"), "seq", pa.array(seq, pa.int64()))
        assert store.create_exclusive(Registry.commit_key(JOB, night), _parquet(table))
    log = registry / JOB / "log"
    return {"log_files": len(list(log.iterdir())),
            "log_mb": round(sum(f.stat().st_size for f in log.iterdir()) / 2**20, 1),
            "checkpoints": [older, newest], "commits_after": [older + 1, h.v]}


def real_model(registry: Path, h: History) -> dict[str, Any]:
    """Write a tiny real model for partition 0's champion; its key and partition."""
    import lightgbm as lgb

    x = np.arange(400, dtype=float).reshape(100, 4)
    booster = lgb.train({"objective": "regression", "verbosity": -1, "min_data_in_leaf": 5,
                         "num_threads": 1}, lgb.Dataset(x, x[:, 0]), num_boost_round=3)
    night = int(h.champ[0, h.v])
    key = f"{JOB}/models/{h.pid[0].as_py()}/train-night-{night:03d}.txt"
    Registry(str(registry)).store.write_bytes(key, booster.model_to_string().encode())
    return {"station": "stn-00000"}


def timed(fn: Any) -> tuple[float, Any]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--partitions", type=int, default=10_000)
    ap.add_argument("--versions", type=int, default=365)
    ap.add_argument("--promote", type=float, default=0.7)
    ap.add_argument("--keep", type=int, default=7)
    ap.add_argument("--workdir", default=str(HERE / "out"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    work = Path(args.workdir) / f"index-history-{args.partitions}x{args.versions}"
    shutil.rmtree(work, ignore_errors=True)
    registry = work / "registry"
    result: dict[str, Any] = {"partitions": args.partitions, "versions": args.versions,
                              "index_rows": args.partitions * args.versions, "cpus": os.cpu_count()}
    t = time.perf_counter()
    h = History(args.partitions, args.versions, args.promote)
    result.update(generate(registry, h))
    partition = real_model(registry, h)
    result["generate_s"] = round(time.perf_counter() - t, 1)
    print(f"generated {result['index_rows']:,} versions in {result['generate_s']}s "
          f"({result['log_files']} log files, {result['log_mb']} MB)", flush=True)
    url = str(registry)

    # The fast paths: the median of 5 tries, each from a fresh Registry.
    def median(fn: Any) -> tuple[float, Any]:
        runs = [timed(fn) for _ in range(5)]
        return float(np.median([t for t, _ in runs])), runs[-1][1]

    s, state = median(lambda: Registry(url).state(JOB))
    assert len(state) == args.partitions
    result["state_s"] = s
    s, champs = median(lambda: Registry(url).list(JOB))
    assert len(champs) == args.partitions
    assert [m.version for m in champs] == h.champ[:, args.versions].tolist()  # the history as generated
    result["list_s"] = s
    s, booster = median(lambda: Registry(url).load_model(JOB, partition))
    assert booster.num_trees() == 3
    result["load_model_cold_s"] = s
    reg = Registry(url)
    reg.load_model(JOB, partition)
    s, _ = median(lambda: reg.load_model(JOB, partition))
    result["load_model_warm_s"] = s
    s, everything = timed(lambda: Registry(url).list(JOB, all_versions=True))
    assert len(everything) == result["index_rows"]
    result["list_all_s"] = s
    del everything
    s, dry = timed(lambda: Registry(url).gc(JOB, args.keep, dry_run=True))
    result["gc_dry_run_s"] = s
    s, report = timed(lambda: Registry(url).gc(JOB, args.keep))
    result["gc_s"] = s
    result.update(gc_removed=report.removed, gc_kept=report.kept)
    assert dry.removed == report.removed
    s, state = timed(lambda: Registry(url).state(JOB))
    result["state_after_gc_s"] = s
    s, champs = timed(lambda: Registry(url).list(JOB))
    result["list_after_gc_s"] = s
    s, everything = timed(lambda: Registry(url).list(JOB, all_versions=True))
    result["list_all_after_gc_s"] = s
    result["versions_after_gc"] = len(everything)

    print("| measure | value |\n|---|---|")
    for k, v in result.items():
        print(f"| {k} | {v:.3f} |" if isinstance(v, float) else f"| {k} | {v} |")
    out = Path(args.out) if args.out else Path(args.workdir) / "index_history.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**result, "at": dt.datetime.now(dt.UTC).isoformat()}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
