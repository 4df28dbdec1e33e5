"""Tiny-partition scoring: ``manymodels score`` end to end against a hand loop, with identical predictions.

Tonight's forecasts for a fleet of small stations: one model per station, 24 rows each. The
champions are trained once (setup, not timed; the largest scenario's registry serves the smaller
ones), then, each in a fresh process:

- ``loop``: what a user writes by hand, in one process: read tonight's rows, list the champions with
  the registry's API, and per station load its champion's text into ``lightgbm.Booster(model_str=...)``,
  run the job's prepare, make the string columns pandas categoricals and ``Booster.predict``
  (a station whose model failed the metric gate has no champion: both leave it unscored).
- ``manymodels``: ``manymodels.score`` end to end (embedded Ray start and stop, planning, reading,
  model loads, predict, Parquet output, publishing).

Both find the registry's files in the page cache (read once before each, not timed). Every station's
predictions must be bitwise identical between the two (it fails loudly otherwise).
Prints a table (wall, rows/s, loop wall / manymodels wall) and writes JSON. Example::

    python benchmarks/tiny_score.py                          # 16000x24 and 4000x24
    python benchmarks/tiny_score.py --scenarios 400x24       # a quick check
    python benchmarks/tiny_score.py --per-partition 1000     # + per-partition cost without Ray
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from harness import run_child  # noqa: E402

TRAIN_HOURS = 24 * 7
JOB = "transit-delays"


def _spec(data: str, registry: str, scores: str) -> Any:
    from manymodels.spec import load_spec

    return load_spec(ROOT / "jobs/transit.toml", data=data, registry=registry, output=scores,
                     prepare=str(ROOT / "jobs/transit.py") + ":prepare")


def setup(work: Path, largest: int, n: int, rows: int) -> tuple[str, str]:
    """Train ``largest`` champions once; write n stations × rows to score."""
    from manymodels.synth import make_transit, score_frame, write_transit

    base = work / f"tiny-{largest}"
    history, registry = base / "history", base / "registry"
    if not (registry / JOB / "log").exists():
        shutil.rmtree(base, ignore_errors=True)
        write_transit(make_transit(largest, TRAIN_HOURS), str(history), layout="flat", files=8)
        import manymodels

        t = time.perf_counter()
        s = manymodels.train(_spec(str(history), str(registry), ""), progress=False)
        print(f"setup: trained {s.trained} models in {time.perf_counter() - t:.1f}s", flush=True)
        shutil.rmtree(history)
    tonight = base / f"tonight-{n}x{rows}"
    if not tonight.exists():
        write_transit(score_frame(n, rows, after_hours=TRAIN_HOURS), str(tonight), layout="flat", files=8)
    return str(tonight), str(registry)


def _warm(registry: str) -> None:
    """Read every model file once (not timed), so both methods find the registry in the page cache
    (training wrote it minutes ago; otherwise whichever runs first pays the disk reads)."""
    for path in Path(registry, JOB, "models").rglob("*"):
        if path.is_file():
            path.read_bytes()


def run_loop(data: str, registry: str, predictions: str) -> dict[str, Any]:
    import lightgbm as lgb
    import numpy as np
    import pandas as pd

    from manymodels.registry import Registry

    sys.path.insert(0, str(ROOT / "jobs"))
    from transit import prepare

    t = time.perf_counter()
    reg = Registry(registry)
    champions = {m.partition["station"]: m for m in reg.list(JOB)}
    df = pd.read_parquet(data)
    out = []
    for station, rows in df.groupby("station", sort=False):
        m = champions.get(str(station))
        if m is None:  # no champion (its model failed the metric gate): nothing to score it with
            continue
        booster = lgb.Booster(model_str=reg.load_model_text(m))
        X = prepare(rows)[list(m.features)]
        for col in X.columns:
            if not pd.api.types.is_numeric_dtype(X[col]):
                X[col] = X[col].astype("category")
        pred = np.asarray(booster.predict(X, num_threads=1), dtype=np.float64)
        out.append(pd.DataFrame({"trip_id": rows["trip_id"].to_numpy(), "prediction": pred}))
    result = pd.concat(out, ignore_index=True)
    wall = time.perf_counter() - t
    result.to_parquet(predictions)
    return {"wall_s": wall, "rows": len(result), "partitions": len(out), "rows_per_s": len(result) / wall}


def run_manymodels(data: str, registry: str, scores: str) -> dict[str, Any]:
    import manymodels

    shutil.rmtree(scores, ignore_errors=True)
    spec = _spec(data, registry, scores)
    t = time.perf_counter()
    s = manymodels.score(spec, progress=False)
    wall = time.perf_counter() - t
    assert s.status == "succeeded" and all(u["reason"] == "no champion" for u in s.unscored), s.unscored[:3]
    return {"wall_s": wall, "rows": s.scored_rows, "input_rows": s.input_rows,
            "partitions": s.partitions_scored, "no_champion": len(s.unscored),
            "rows_per_s": s.scored_rows / wall, "output": s.output}


def check_identical(loop_file: str, output: str) -> dict[str, int]:
    """Every row's prediction, bitwise, per station; raises on any difference."""
    import numpy as np
    import pandas as pd
    import pyarrow.dataset as ds

    loop = pd.read_parquet(loop_file).set_index("trip_id")["prediction"]
    mine = ds.dataset(output).to_table(columns=["station", "trip_id", "prediction"]).to_pandas()
    mine = mine.set_index("trip_id")
    if len(mine) != len(loop) or not mine.index.is_unique or not mine.index.isin(loop.index).all():
        raise SystemExit(f"EXACTNESS: manymodels scored {len(mine)} rows, the loop {len(loop)}")
    theirs = loop.loc[mine.index].to_numpy()
    same = mine["prediction"].to_numpy().view(np.int64) == theirs.view(np.int64)
    bad = mine.loc[~same, "station"].unique()
    if len(bad):
        raise SystemExit(f"EXACTNESS: {len(bad)} stations differ from the loop, e.g. {list(bad[:5])}")
    return {"rows_checked": len(mine), "partitions_checked": int(mine["station"].nunique())}


def run_per_partition(data: str, registry: str, n: int, reps: int = 3) -> dict[str, Any]:
    """One process, no Ray: the loop's body and ``score_chunk`` on the same ``n`` stations, taking
    turns ``reps`` times (so that a busy machine slows both alike); the best time of each."""
    import importlib

    import lightgbm as lgb
    import numpy as np
    import pandas as pd

    from manymodels.data import open_source, plan_partitions
    from manymodels.engine import TaskResources
    from manymodels.registry import Registry, encode_partition, partition_id
    from manymodels.runinfo import utc_now

    sys.path.insert(0, str(ROOT / "jobs"))
    from transit import prepare

    S = importlib.import_module("manymodels.score")
    spec = _spec(data, registry, "")
    source = open_source(spec.data.source, spec.data.format, spec.data.key_types, spec.data.partition_by)
    plan = plan_partitions(source, spec.data.partition_by, None)
    reg = Registry(registry)
    refs = S._model_refs(reg, spec, plan.keys, plan.partitions, None, None)
    parts = [S.ScorePartition(key=p.key, partition=encode_partition(plan.keys, p.key), rows=p.rows,
                              model=ref, files=p.files)
             for p in plan.partitions
             if isinstance(ref := refs[partition_id(plan.keys, p.key)], S.ModelRef)][:n]
    files = tuple(sorted({f for p in parts for f in p.files}))
    task = S.ScoreTask(chunk=0, partitions=tuple(parts), files=files, resources=TaskResources())
    staging = Path(registry).parent / "per-partition-staging"
    ctx = S.ScoreContext(spec=spec, source=source, keys=plan.keys, columns=None,
                         keep=("station", "trip_id", "ts"), registry_url=reg.url, staging_url=str(staging),
                         run_id="per-partition", scored_at=utc_now())
    champions = {m.partition["station"]: m for m in reg.list(JOB)}
    wanted = {p.key[0] for p in parts}
    df = pd.read_parquet(data)
    df = df[df["station"].isin(wanted)]

    def loop() -> None:
        for station, rows in df.groupby("station", sort=False):
            m = champions[str(station)]
            booster = lgb.Booster(model_str=reg.load_model_text(m))
            X = prepare(rows)[list(m.features)]
            for col in X.columns:
                if not pd.api.types.is_numeric_dtype(X[col]):
                    X[col] = X[col].astype("category")
            np.asarray(booster.predict(X, num_threads=1))

    best = {"loop": float("inf"), "score_chunk": float("inf")}
    for _ in range(reps):
        for name, fn in (("loop", loop), ("score_chunk", lambda: S.score_chunk(task, ctx))):
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    shutil.rmtree(staging, ignore_errors=True)
    return {"partitions": len(parts), "loop_ms": best["loop"] / len(parts) * 1e3,
            "score_chunk_ms": best["score_chunk"] / len(parts) * 1e3,
            "ratio": best["loop"] / best["score_chunk"]}


def child(args: argparse.Namespace) -> None:
    if args.method == "loop":
        result = run_loop(args.data, args.registry, args.predictions)
    elif args.method == "per-partition":
        result = run_per_partition(args.data, args.registry, args.per_partition)
    else:
        result = run_manymodels(args.data, args.registry, args.scores)
    from memory import peak_rss_mb  # benchmarks/ is on sys.path

    result["driver_peak_mb"] = peak_rss_mb()
    print("RESULT " + json.dumps(result))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenarios", default="16000x24,4000x24", help="PARTITIONSxROWS,...")
    ap.add_argument("--workdir", default=str(HERE / "out"))
    ap.add_argument("--out", default=None)
    ap.add_argument("--per-partition", type=int, default=0, metavar="N",
                    help="also time the loop's body and score_chunk on N stations (one process, no Ray)")
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--registry", help=argparse.SUPPRESS)
    ap.add_argument("--scores", help=argparse.SUPPRESS)
    ap.add_argument("--predictions", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.method:
        child(args)
        return
    work = Path(args.workdir)
    scenarios = [tuple(int(x) for x in s.split("x")) for s in args.scenarios.split(",")]
    largest = max(n for n, _ in scenarios)
    results: list[dict[str, Any]] = []
    per_partition: list[dict[str, Any]] = []
    for n, rows in scenarios:
        data, registry = setup(work, largest, n, rows)
        scenario = f"{n}x{rows}"
        predictions, scores = work / f"tiny-loop-{scenario}.parquet", work / "tiny-scores"
        by = {}
        for method in ("loop", "manymodels"):
            _warm(registry)
            cmd = [sys.executable, __file__, "--method", method, "--data", data, "--registry", registry,
                   "--scores", str(scores), "--predictions", str(predictions)]
            by[method] = r = {"scenario": scenario, "method": method, **run_child(cmd, method)}
            results.append(r)
            print(f"  {scenario} {method:<10} {r['rows_per_s']:>10,.0f} rows/s  wall {r['wall_s']:.2f}s",
                  flush=True)
        check = check_identical(str(predictions), str(Path(by["manymodels"].pop("output")).parent))
        by["manymodels"].update(check)
        print(f"  {scenario} identical predictions: {check['partitions_checked']} partitions, "
              f"{check['rows_checked']} rows", flush=True)
        os.remove(predictions)
        if args.per_partition:
            _warm(registry)
            cmd = [sys.executable, __file__, "--method", "per-partition", "--data", data,
                   "--registry", registry, "--per-partition", str(args.per_partition)]
            pp = {"scenario": scenario, **run_child(cmd, "per-partition")}
            per_partition.append(pp)
            print(f"  {scenario} per partition, one process: loop {pp['loop_ms']:.2f} ms, score_chunk "
                  f"{pp['score_chunk_ms']:.2f} ms ({pp['ratio']:.2f}x)", flush=True)
    print(f"\n{os.cpu_count()} CPUs, jobs/transit.toml (100 trees, 15 leaves), {TRAIN_HOURS} h of history")
    print("| scenario | method | rows | wall s | rows/s | driver peak MB | loop wall / this wall |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        loop = next(f for f in results if f["scenario"] == r["scenario"] and f["method"] == "loop")
        print(f"| {r['scenario']} | {r['method']} | {r['rows']:,} | {r['wall_s']:.2f} | "
              f"{r['rows_per_s']:,.0f} | {r['driver_peak_mb']:.0f} | {loop['wall_s'] / r['wall_s']:.2f} |")
    out = Path(args.out) if args.out else work / "tiny_score.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpus": os.cpu_count(), "train_hours": TRAIN_HOURS, "results": results,
                               "per_partition": per_partition}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
