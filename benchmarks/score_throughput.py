"""Score throughput: ``manymodels score`` end to end against plain in-process ``Booster.predict``.

For each scenario (partitions × rows to score) it trains one model per partition once (setup, not
timed), writes the rows to score as sorted Parquet files, then runs, each in a fresh process:

- ``floor``: plain LightGBM in one process with every booster already loaded and every feature
  matrix already built: only ``Booster.predict`` is timed (best of 1 thread and all threads).
- ``manymodels``: ``manymodels.score`` end to end — embedded Ray start-up, planning, reading,
  prepare, model loads, predict, writing Parquet, publishing — with its driver's peak memory.

Prints a table and writes JSON. Example::

    python benchmarks/score_throughput.py                       # 10,000×100 and 200×50,000
    python benchmarks/score_throughput.py --scenarios 200x25000,200x50000,400x50000
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

TRAIN_HOURS = 240


def _spec(data: str, registry: str, scores: str, trees: int) -> Any:
    import dataclasses

    from manymodels.spec import FrozenMap, load_spec

    spec = load_spec(ROOT / "jobs/transit.toml", data=data, registry=registry, output=scores,
                     prepare=str(ROOT / "jobs/transit.py") + ":prepare")
    params = {**spec.model.params, "n_estimators": trees}
    return dataclasses.replace(spec, model=dataclasses.replace(spec.model, params=FrozenMap(params)))


def setup(work: Path, n: int, rows: int, trees: int) -> tuple[str, str]:
    """Train n models (once per scenario folder) and write n×rows rows to score."""
    from manymodels.synth import make_transit, score_frame, write_transit

    base = work / f"score-{n}x{rows}-t{trees}"
    history, tonight, registry = base / "history", base / "tonight", base / "registry"
    if not (registry / "transit-delays" / "index").exists():
        shutil.rmtree(base, ignore_errors=True)
        write_transit(make_transit(n, TRAIN_HOURS), str(history), layout="flat", files=8)
        import manymodels

        t = time.perf_counter()
        s = manymodels.train(_spec(str(history), str(registry), "", trees), progress=False)
        print(f"setup: trained {s.trained} models in {time.perf_counter() - t:.1f}s", flush=True)
        shutil.rmtree(history)
    if not tonight.exists():
        write_transit(score_frame(n, rows, after_hours=TRAIN_HOURS), str(tonight), layout="flat",
                      files=8)
    return str(tonight), str(registry)


def run_floor(data: str, registry: str, trees: int) -> dict[str, Any]:
    import lightgbm as lgb
    import pandas as pd

    from manymodels.pipeline import load_prepare, model_categories, prepare_features
    from manymodels.registry import Registry

    spec = _spec(data, registry, "", trees)
    prepare = load_prepare(spec)
    reg = Registry(registry)
    models = {m.partition["station"]: m for m in reg.list(spec.name)}
    df = pd.read_parquet(data)
    work = []
    for station, g in df.groupby("station", sort=False):
        m = models[str(station)]
        booster = lgb.Booster(model_str=reg.load_model_text(m))
        prepared = prepare(g) if prepare else g
        fm = prepare_features(prepared, m.features, spec, model_categories(booster))
        work.append((booster, fm.X))
    rows = sum(len(x) for _, x in work)
    best = {}
    for threads in (1, os.cpu_count() or 1):
        t = time.perf_counter()
        for booster, x in work:
            booster.predict(x, num_threads=threads)
        best[threads] = time.perf_counter() - t
    wall = min(best.values())
    return {"wall_s": wall, "rows": rows, "rows_per_s": rows / wall,
            "predict_s_by_threads": {str(k): v for k, v in best.items()}}


def run_manymodels(data: str, registry: str, trees: int, scores: str) -> dict[str, Any]:
    import manymodels

    shutil.rmtree(scores, ignore_errors=True)
    spec = _spec(data, registry, scores, trees)
    t = time.perf_counter()
    s = manymodels.score(spec, progress=False)
    wall = time.perf_counter() - t
    assert s.unscored_rows == 0, s.unscored[:3]
    import pyarrow.dataset as ds

    out_rows = ds.dataset(str(Path(s.output).parent), partitioning="hive").count_rows()
    return {"wall_s": wall, "rows": s.input_rows, "rows_per_s": s.input_rows / wall,
            "scored": s.scored_rows, "output_rows": out_rows,
            "files": len(list(Path(s.output).glob("*.parquet")))}


def child(args: argparse.Namespace) -> None:
    if args.method == "floor":
        result = run_floor(args.data, args.registry, args.trees)
    else:
        result = run_manymodels(args.data, args.registry, args.trees, args.scores)
    from memory import peak_rss_mb  # benchmarks/ is on sys.path

    result["driver_peak_mb"] = peak_rss_mb()
    print("RESULT " + json.dumps(result))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenarios", default="10000x100,200x50000", help="PARTITIONSxROWS,...")
    ap.add_argument("--trees", type=int, default=100)
    ap.add_argument("--workdir", default=str(HERE / "out"))
    ap.add_argument("--out", default=None)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--registry", help=argparse.SUPPRESS)
    ap.add_argument("--scores", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.method:
        child(args)
        return
    work = Path(args.workdir)
    results = []
    for scenario in args.scenarios.split(","):
        n, rows = (int(x) for x in scenario.split("x"))
        data, registry = setup(work, n, rows, args.trees)
        for method in ("floor", "manymodels"):
            cmd = [sys.executable, __file__, "--method", method, "--data", data, "--registry", registry,
                   "--trees", str(args.trees), "--scores", str(work / "scores")]
            r = {"scenario": scenario, "method": method, **run_child(cmd, method)}
            results.append(r)
            print(f"  {scenario} {method:<10} {r['rows_per_s']:>12,.0f} rows/s  wall {r['wall_s']:.1f}s  "
                  f"driver peak {r['driver_peak_mb']:.0f} MB", flush=True)
    print(f"\n{args.trees} trees, {os.cpu_count()} CPUs")
    print("| scenario | method | rows | wall s | rows/s | driver peak MB | ratio to floor |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        floor = next(f for f in results if f["scenario"] == r["scenario"] and f["method"] == "floor")
        print(f"| {r['scenario']} | {r['method']} | {r['rows']:,} | {r['wall_s']:.1f} | "
              f"{r['rows_per_s']:,.0f} | {r['driver_peak_mb']:.0f} | "
              f"{r['rows_per_s'] / floor['rows_per_s']:.2f} |")
    out = Path(args.out) if args.out else work / "score_throughput.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"trees": args.trees, "cpus": os.cpu_count(), "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
