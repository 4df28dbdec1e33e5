"""Load: 100,000 partitions × 50 rows trained and scored on one machine.

Records wall time of ``train`` and ``score`` (embedded Ray included), the driver's peak RSS, the
peak RSS of the Ray worker processes, the registry log size on disk, and the time to list every
champion (``Registry.list``) from a fresh ``Registry`` object. Targets (issue 5): driver peak
< 2 GB, listing < 1 s.

    python benchmarks/scale.py --n 100000 --rows 50

Planning on sorted vs unsorted input (issue 8, item 13): the same rows (``--plan-n`` partitions ×
``--plan-rows`` rows) written key-sorted and shuffled (``--plan-files`` files each), each planned
(``open_source`` + ``plan_partitions``) in a fresh process that reports its wall time and peak RSS.
It also runs after the load above; ``--plan-only`` runs it alone::

    python benchmarks/scale.py --plan-only --plan-n 100000 --plan-rows 20
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

from harness import run_child  # noqa: E402
from memory import peak_rss_mb, reset_peak  # noqa: E402
from train_overhead import TreeRss  # noqa: E402


def plan_child(data: str) -> None:
    """In a fresh process: plan ``data`` by ``station``; print its time and peak RSS."""
    from manymodels.data import open_source, plan_partitions

    base_mb = peak_rss_mb()  # after imports: the interpreter, pyarrow, pandas
    t = time.perf_counter()
    plan = plan_partitions(open_source(data), ["station"])
    wall = time.perf_counter() - t
    multi = sum(len(p.files) > 1 for p in plan.partitions)
    print("RESULT " + json.dumps({"plan_s": wall, "partitions": len(plan.partitions), "rows": plan.total_rows,
                                  "partitions_in_several_files": multi, "import_rss_mb": base_mb,
                                  "peak_rss_mb": peak_rss_mb()}))


def planning(work: Path, n: int, rows: int, row_group: int, files: int = 16) -> dict[str, Any]:
    """Sorted vs shuffled input of the same rows, each planned in its own process."""
    import numpy as np
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    from manymodels.synth import make_transit, write_transit

    root = work / f"plan-{n}x{rows}"
    shutil.rmtree(root, ignore_errors=True)
    t = time.perf_counter()
    write_transit(make_transit(n, rows), str(root / "sorted"), layout="flat", files=files,
                  row_group_size=row_group)
    table = ds.dataset(str(root / "sorted")).to_table()
    table = table.take(np.random.default_rng(0).permutation(table.num_rows))
    (root / "shuffled").mkdir()
    for i, idx in enumerate(np.array_split(np.arange(table.num_rows), files)):
        pq.write_table(table.slice(int(idx[0]), len(idx)), root / "shuffled" / f"part-{i:03d}.parquet",
                       row_group_size=row_group)
    del table
    print(f"generated planning input in {time.perf_counter() - t:.1f}s", flush=True)
    result: dict[str, Any] = {"plan_n": n, "plan_rows": rows, "plan_files": files,
                              "plan_row_group": row_group}
    for layout in ("sorted", "shuffled"):
        r = run_child([sys.executable, __file__, "--plan-child", str(root / layout)], f"planning {layout}")
        assert r["partitions"] == n and r["rows"] == n * rows, r
        result.update({f"plan_{layout}_{k}": v for k, v in r.items() if k not in ("partitions", "rows")})
        print(f"plan {layout}: {r['plan_s']:.2f}s, peak RSS {r['peak_rss_mb']:.0f} MB "
              f"(after imports {r['import_rss_mb']:.0f} MB)", flush=True)
    shutil.rmtree(root, ignore_errors=True)
    return result


def report(result: dict[str, Any], out: Path) -> None:
    print("| metric | value |\n|---|---|")
    for k, v in result.items():
        print(f"| {k} | {v:.2f} |" if isinstance(v, float) else f"| {k} | {v} |")
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--rows", type=int, default=50)
    ap.add_argument("--score-rows", type=int, default=10)
    ap.add_argument("--trees", type=int, default=20)
    ap.add_argument("--workdir", default=str(HERE / "out"))
    ap.add_argument("--out", default=None)
    ap.add_argument("--plan-n", type=int, default=100_000, help="partitions of the planning input")
    ap.add_argument("--plan-rows", type=int, default=20, help="rows per partition of the planning input")
    ap.add_argument("--plan-row-group", type=int, default=50_000, help="Parquet row group size (rows)")
    ap.add_argument("--plan-files", type=int, default=16, help="Parquet files of the planning input")
    ap.add_argument("--plan-only", action="store_true", help="run only sorted vs unsorted planning")
    ap.add_argument("--plan-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.plan_child:
        plan_child(args.plan_child)
        return
    if args.plan_only:
        out = Path(args.out) if args.out else Path(args.workdir) / "scale-planning.json"
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
        report(planning(Path(args.workdir), args.plan_n, args.plan_rows, args.plan_row_group,
                        args.plan_files), out)
        return

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
    result.update(planning(Path(args.workdir), args.plan_n, args.plan_rows, args.plan_row_group,
                        args.plan_files))
    report(result, Path(args.out) if args.out else Path(args.workdir) / "scale.json")


if __name__ == "__main__":
    main()
