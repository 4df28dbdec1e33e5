"""Train overhead: manymodels against the same fits in one plain in-process loop, side by side.

Generates N stations × R hourly rows of the synthetic transit data (sorted Parquet files), then runs,
each in its own fresh Python process so that memory and imports are measured honestly:

- ``loop``: what a user writes by hand: pandas reads the files, ``groupby`` the station, and for
  each one runs the job's prepare, picks the same feature columns (strings as pandas categoricals),
  a time-ordered 80/20 split, ``lightgbm.train`` with the job's parameters (1 thread), the holdout
  MAE and ``model_to_string``; models stay in a dict.
- ``manymodels``: ``manymodels.train`` on the same data and spec into a fresh registry, embedded Ray
  started and stopped inside the timed region (start-up included).

Prints a table and writes JSON (``--out``). Example::

    python benchmarks/train_overhead.py --n 10000 --rows 200 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from harness import run_child  # noqa: E402


def _spec(data: str, registry: str, trees: int) -> Any:
    from manymodels.spec import load_spec

    spec = load_spec(ROOT / "jobs/transit.toml", data=data, registry=registry,
                     prepare=str(ROOT / "jobs/transit.py") + ":prepare")
    import dataclasses

    from manymodels.spec import FrozenMap

    params = dict(spec.model.params)
    params["n_estimators"] = trees
    # 200 rows = 8 days: the demo gate (min_rows 48) and metric gate are kept as they are.
    return dataclasses.replace(spec, model=dataclasses.replace(spec.model, params=FrozenMap(params)))


class TreeRss:
    """Samples the RSS of this process's descendants (Ray's raylet, GCS and workers) every 0.2 s."""

    def __init__(self) -> None:
        import psutil

        self.proc = psutil.Process()
        self.peak_tree_mb = 0.0
        self.peak_worker_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            total, worker = 0.0, 0.0
            try:
                for child in self.proc.children(recursive=True):
                    try:
                        rss = child.memory_info().rss / 2**20
                    except psutil.Error:
                        continue
                    total += rss
                    if "ray::" in " ".join(child.cmdline()[:1]) or "default_worker" in " ".join(
                            child.cmdline()):
                        worker = max(worker, rss)
            except psutil.Error:
                pass
            self.peak_tree_mb = max(self.peak_tree_mb, total)
            self.peak_worker_mb = max(self.peak_worker_mb, worker)
            self._stop.wait(0.2)

    def __enter__(self) -> TreeRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_loop(data: str, trees: int) -> dict[str, Any]:
    """The plain loop (see module docstring)."""
    import lightgbm as lgb
    import numpy as np
    import pandas as pd

    from manymodels.pipeline import load_prepare

    spec = _spec(data, "unused", trees)
    prepare = load_prepare(spec)
    assert prepare is not None
    params = {"objective": spec.model.objective, "verbosity": -1, "num_threads": 1,
              "seed": 0, "deterministic": True, "force_col_wise": True, **spec.model.params}
    skip = {"station", "ts", "delay_min", *spec.data.exclude}
    t0 = time.perf_counter()
    df = pd.read_parquet(data)
    models: dict[str, str] = {}
    maes = []
    fit_s = 0.0
    for station, g in df.groupby("station", sort=False):
        g = prepare(g).sort_values("ts", kind="stable")
        X = g[[c for c in g.columns if c not in skip]]
        X = X.astype({c: "category" for c in X.columns if X[c].dtype == object or X[c].dtype == "str"})
        y = g["delay_min"].to_numpy(dtype=np.float64)
        k = len(y) - round(len(y) * 0.2)
        f0 = time.perf_counter()
        bst = lgb.train(params, lgb.Dataset(X.iloc[:k], y[:k], params={"verbosity": -1}))
        fit_s += time.perf_counter() - f0
        maes.append(float(np.mean(np.abs(bst.predict(X.iloc[k:]) - y[k:]))))
        models[str(station)] = bst.model_to_string()
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "partitions": len(models), "fit_s": fit_s, "mean_mae": float(np.mean(maes))}


def run_manymodels(data: str, trees: int, registry: str) -> dict[str, Any]:
    """``manymodels.train`` end to end, embedded Ray start-up and shutdown included."""
    shutil.rmtree(registry, ignore_errors=True)
    spec = _spec(data, registry, trees)
    import manymodels

    with TreeRss() as tree:
        t0 = time.perf_counter()
        summary = manymodels.train(spec, progress=False)
        wall = time.perf_counter() - t0
    from manymodels.registry import Registry

    t1 = time.perf_counter()
    champions = Registry(registry).list(spec.name)
    list_s = time.perf_counter() - t1
    metrics = [m.metric_value for m in champions if m.metric_value is not None]
    # Cost accounting is a fold over the per-partition measurements; time it on this run's rows to
    # show what it adds to the wall time (issue 4).
    from manymodels.cost import Held, job_cost, partition_cost

    _, parts = Registry(registry).run(summary.run_id)
    assert parts is not None
    t2 = time.perf_counter()
    costs = [partition_cost(w, c, g, m, spec.cost) for w, c, g, m in zip(
        parts["wall_s"], parts["num_cpus"], parts["num_gpus"], parts["memory_mb"], strict=True)]
    job_cost(wall, Held(cpus=2.0), costs, spec.cost)
    cost_fold_s = time.perf_counter() - t2
    return {"wall_s": wall, "partitions": summary.total, "trained": summary.trained,
            "failed": summary.failed, "promoted": summary.promoted,
            "ray_tree_peak_mb": tree.peak_tree_mb, "worker_peak_mb": tree.peak_worker_mb,
            "list_champions_s": list_s, "mean_mae": sum(metrics) / max(1, len(metrics)),
            "utilisation": summary.cost.utilisation, "cost_fold_s": cost_fold_s}


def child(args: argparse.Namespace) -> None:
    if args.method == "loop":
        result = run_loop(args.data, args.trees)
    else:
        result = run_manymodels(args.data, args.trees, args.registry)
    from memory import peak_rss_mb  # benchmarks/ is on sys.path

    result["driver_peak_mb"] = peak_rss_mb()
    print("RESULT " + json.dumps(result))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000, help="partitions (stations)")
    ap.add_argument("--rows", type=int, default=200, help="rows per partition (hours)")
    ap.add_argument("--trees", type=int, default=100, help="n_estimators (the demo job's is 100)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--methods", default="loop,manymodels")
    ap.add_argument("--workdir", default=str(HERE / "out"))
    ap.add_argument("--out", default=None, help="JSON file (default: <workdir>/train_overhead.json)")
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--registry", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.method:
        child(args)
        return
    from manymodels.synth import make_transit, write_transit

    work = Path(args.workdir)
    data = work / f"data-{args.n}x{args.rows}"
    if not data.exists():
        t = time.perf_counter()
        write_transit(make_transit(args.n, args.rows), str(data), layout="flat", files=8)
        print(f"generated {args.n}×{args.rows} in {time.perf_counter() - t:.1f}s → {data}", flush=True)
    results: list[dict[str, Any]] = []
    for rep in range(args.repeats):
        for method in args.methods.split(","):
            cmd = [sys.executable, __file__, "--method", method, "--data", str(data), "--trees",
                   str(args.trees), "--registry", str(work / "registry")]
            r = {"method": method, "repeat": rep, **run_child(cmd, method)}
            results.append(r)
            print(f"  {method:<11} rep {rep}: wall {r['wall_s']:.1f}s  driver peak "
                  f"{r['driver_peak_mb']:.0f} MB", flush=True)
    loops = [r["wall_s"] for r in results if r["method"] == "loop"]
    ours = [r["wall_s"] for r in results if r["method"] == "manymodels"]
    ratio = (sorted(ours)[len(ours) // 2] / sorted(loops)[len(loops) // 2]) if loops and ours else None
    print(f"\n{args.n} partitions × {args.rows} rows, {args.trees} trees, {os.cpu_count()} CPUs")
    print("| method | rep | wall s | driver peak MB | Ray processes peak MB | worker peak MB | mean MAE |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['method']} | {r['repeat']} | {r['wall_s']:.1f} | {r['driver_peak_mb']:.0f} | "
              f"{r.get('ray_tree_peak_mb', 0):.0f} | {r.get('worker_peak_mb', 0):.0f} | "
              f"{r['mean_mae']:.3f} |")
    if ratio is not None:
        print(f"\nratio manymodels / loop (median walls): {ratio:.3f}")
    out = Path(args.out) if args.out else work / "train_overhead.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"n": args.n, "rows": args.rows, "trees": args.trees,
                               "cpus": os.cpu_count(), "results": results, "ratio": ratio}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
