"""Load: 100,000 partitions × 50 rows trained and scored on one machine.

Records wall time of ``train`` and ``score`` (embedded Ray included), the driver's peak RSS, the
peak RSS of the Ray worker processes, the registry log size on disk, and the time to list every
champion (``Registry.list``) from a fresh ``Registry`` object. Targets (issue 5): driver peak
< 2 GB, listing < 1 s.

    python benchmarks/scale.py --n 100000 --rows 50
"""

from __future__ import annotations

import argparse
import gc
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

from memory import peak_rss_mb, reset_peak  # noqa: E402
from train_overhead import TreeRss  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--rows", type=int, default=50)
    ap.add_argument("--score-rows", type=int, default=10)
    ap.add_argument("--trees", type=int, default=20)
    ap.add_argument("--workdir", default=str(HERE / "out"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import dataclasses

    import manymodels
    from manymodels.registry import Registry
    from manymodels.spec import FrozenMap, load_spec
    from manymodels.synth import make_transit, score_frame, write_transit

    work = Path(args.workdir) / f"scale-{args.n}x{args.rows}"
    shutil.rmtree(work, ignore_errors=True)
    t = time.perf_counter()
    write_transit(make_transit(args.n, args.rows), str(work / "history"), layout="flat", files=16)
    write_transit(score_frame(args.n, args.score_rows, after_hours=args.rows), str(work / "tonight"),
                  layout="flat", files=16)
    print(f"generated in {time.perf_counter() - t:.1f}s", flush=True)
    gc.collect()
    reset_peak()  # the driver's peak, not the generator's
    spec = load_spec(ROOT / "jobs/transit.toml", data=str(work / "history"), registry=str(work / "registry"),
                     output=str(work / "scores"), prepare=str(ROOT / "jobs/transit.py") + ":prepare")
    params = {**spec.model.params, "n_estimators": args.trees, "min_data_in_leaf": 5}
    spec = dataclasses.replace(
        spec, model=dataclasses.replace(spec.model, params=FrozenMap(params)),
        validation=dataclasses.replace(spec.validation, min_rows=20, max_metric=None))
    result: dict[str, Any] = {"n": args.n, "rows": args.rows, "score_rows": args.score_rows,
                              "trees": args.trees, "cpus": os.cpu_count()}
    with TreeRss() as tree:
        t = time.perf_counter()
        s = manymodels.train(spec, progress=False)
        result["train_wall_s"] = time.perf_counter() - t
    result.update(train_trained=s.trained, train_failed=s.failed, train_ray_tree_peak_mb=tree.peak_tree_mb,
                  train_worker_peak_mb=tree.peak_worker_mb)
    print(f"train: {s.trained} trained, {s.failed} failed in {result['train_wall_s']:.1f}s", flush=True)
    log = work / "registry" / spec.name / "log"  # commits and checkpoints
    result["index_files"] = len(list(log.glob("*.parquet")))
    result["index_mb"] = sum(f.stat().st_size for f in log.glob("*.parquet")) / 2**20
    t = time.perf_counter()
    champions = Registry(str(work / "registry")).list(spec.name)
    result["list_champions_s"] = time.perf_counter() - t
    result["champions"] = len(champions)
    print(f"listed {len(champions)} champions in {result['list_champions_s']:.2f}s", flush=True)
    with TreeRss() as tree:
        t = time.perf_counter()
        sc = manymodels.score(spec, data=str(work / "tonight"), progress=False)
        result["score_wall_s"] = time.perf_counter() - t
    result.update(score_rows_in=sc.input_rows, score_scored=sc.scored_rows, score_unscored=sc.unscored_rows,
                  score_ray_tree_peak_mb=tree.peak_tree_mb, score_worker_peak_mb=tree.peak_worker_mb)
    print(f"score: {sc.scored_rows} of {sc.input_rows} rows in {result['score_wall_s']:.1f}s", flush=True)
    result["driver_peak_mb"] = peak_rss_mb()
    print("| metric | value |\n|---|---|")
    for k, v in result.items():
        print(f"| {k} | {v:.2f} |" if isinstance(v, float) else f"| {k} | {v} |")
    out = Path(args.out) if args.out else Path(args.workdir) / "scale.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
