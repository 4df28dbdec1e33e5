"""Peers: a serial loop, a process pool, hand-batched Ray and manymodels, side by side on the same data.

Generates the peer lab's workload (``/work/shared/peer-lab/gen.py``: per station, hourly rows of 8
numeric features and a target with station-specific coefficients; seeded, so the same options give
the same data), writes it as 8 Parquet files sorted by station, and trains one model per station with
each method, each in its own fresh Python process. Every method trains the same model: the job spec
``benchmarks/peers.toml`` (LightGBM parameters, ``ts`` as the time column, the latest 20 % of each
station's rows as holdout, MAE), and the hand-written peers use exactly what manymodels uses
(``manymodels.pipeline.lgb_params``: the spec's parameters plus ``seed=0``, ``deterministic``,
``force_col_wise`` and one thread; the holdout rule of ``pipeline._split``). The mean holdout MAE,
printed to 4 decimals, shows that the models are the same.

Shapes (``--shape``):

- ``uniform``: ``--n`` stations × ``--rows`` rows each (issue 9, goal 2: ``--n 10000 --rows 500``).
- ``skewed``: ``--n`` stations with lognormal row counts (median ``--rows``, default 50; sigma 1.2;
  clipped to 20 … ``--max-rows``, default 3,000), like real fleet data (goal 3: ``--n 4000``).

Methods (``--methods``, each one's wall clock starts after pandas, NumPy, pyarrow and LightGBM are
imported, and ends when every model and metric is in the driver (or, for manymodels, in the
registry)):

- ``serial``: the plain loop: ``pandas.read_parquet``, ``groupby`` station, fit each, model text
  and MAE kept in a dict.
- ``procpool``: ``concurrent.futures.ProcessPoolExecutor`` (fork, one worker per CPU,
  ``chunksize = ceil(N / (4 × CPUs))``) over the same groups: the peer lab's ``ppe`` method. It stands
  in for joblib, which this environment does not have (the lab measured the two within 2 % of each
  other at 10,000 × 500). Its wall includes starting and stopping the pool.
- ``ray_batch``: hand-batched Ray as the lab did it: ``import ray``, ``ray.init`` (local, one CPU per
  core), the driver reads the data, cuts it into 4 × CPUs chunks of whole stations, ``ray.put`` each,
  and one task per chunk returns its models. Its wall includes the ``ray`` import and ``ray.init``
  but not ``ray.shutdown``, which is timed apart (``shutdown_s``), as in the lab.
- ``manymodels``: ``import manymodels``, ``load_spec`` and ``manymodels.train`` into a fresh
  registry: its wall includes its embedded Ray's start *and* shutdown, planning, the registry
  writes (models, index commits, run record) and the import. From its run record and from timers
  put around its phases in that process, the JSON also splits its wall: import, before Ray
  (spec, reading and planning), Ray start, tasks (with the driver's index commits inside; split
  by the per-partition records into the wait for the first partition, the partitions, and the
  tail after the last), shutdown, after (index compaction and the run record).

Prints a table (wall, ratio to the serial loop, driver peak RSS as ``VmHWM``, mean holdout MAE, and,
as signs of other work on a shared machine, the driver's CPU seconds and the 1-minute load average
before and after) and writes JSON (``--out``, default ``benchmarks/out/peers.json``). ``--repeats K``
runs K rounds of every method; each run's ratio is to the serial loop of its own round, and the
medians are printed. Exits 1 when a method's mean MAE differs from the first run's at 4 decimals.
Examples::

    python benchmarks/peers.py --shape uniform --n 10000 --rows 500
    python benchmarks/peers.py --shape skewed --n 4000
    python benchmarks/peers.py --n 300 --methods serial,manymodels
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import math
import os
import shutil
import statistics
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from harness import run_child  # noqa: E402
from memory import peak_rss_mb  # noqa: E402

SPEC = HERE / "peers.toml"
METHODS = ("serial", "procpool", "ray_batch", "manymodels")
FEATURES = ["dow", "hour", "temp", "humidity", "wind", "lag_1", "lag_24", "roll_24"]
KEY, TIME, TARGET = "station_id", "ts", "y"
CPUS = os.cpu_count() or 1
SKEW_SIGMA, SKEW_MIN = 1.2, 20  # SKEW_MIN = the spec's min_rows: no station fails for lack of rows


def loop_params() -> dict[str, Any]:
    """The LightGBM parameters of the hand-written peers: the job spec's, with the same fixed settings
    ``manymodels.pipeline.lgb_params`` adds (read the spec file, as a user's loop would)."""
    model = tomllib.loads(SPEC.read_text())["model"]
    return {"objective": model["objective"], "verbosity": -1, "seed": 0, "deterministic": True,
            "force_col_wise": True, **model["params"], "num_threads": 1}


PARAMS = loop_params()


def holdout_size(n: int) -> int:
    """Rows held out of ``n``: manymodels' rule (``pipeline._split``) for a 20 % time holdout."""
    return min(n - 1, max(1, round(n * 0.2)))


# --- the data ---------------------------------------------------------------------------------------

def row_counts(shape: str, n: int, rows: int, max_rows: int, seed: int) -> Any:
    """Rows per station: ``rows`` each, or lognormal around a median of ``rows`` (seeded)."""
    import numpy as np

    if shape == "uniform":
        return np.full(n, rows, dtype=np.int64)
    draw = np.random.default_rng([seed, n, rows, 11]).lognormal(math.log(rows), SKEW_SIGMA, n)
    return np.clip(np.round(draw), SKEW_MIN, max_rows).astype(np.int64)


def make_frame(counts: Any, seed: int) -> Any:
    """The peer lab's synthetic stations (``gen.make_frame``) with ``counts[i]`` hourly rows for
    station ``i``; rows sorted by station, then time. Lags and the 24-hour rolling mean stay within a
    station (its base level before its first hours)."""
    import numpy as np
    import pandas as pd

    n, total = len(counts), int(counts.sum())
    uniform = bool((counts == counts[0]).all())
    # Uniform: the lab's seeding and draw order, so the data are the lab's bit for bit.
    rng = np.random.default_rng([seed, n, int(counts[0]), 0] if uniform else [seed, n, total, 1])
    coef = np.random.default_rng([seed, 7]).normal(size=(n, 6))
    base, a_hour, b_temp = 50 + 20 * coef[:, 0], 10 + 5 * coef[:, 1], 1.5 * coef[:, 2]
    c_wkend, d_hum, phase = 8 * coef[:, 3], 0.3 * coef[:, 4], np.pi * coef[:, 5]
    sid = np.repeat(np.arange(n, dtype=np.int64), counts)
    start = np.repeat(np.cumsum(counts) - counts, counts)  # each row's station's first row
    t = np.arange(total, dtype=np.int64) - start  # hours since the station's first row
    hour, dow = t % 24, (t // 24) % 7
    temp = 15 + 8 * np.sin(2 * np.pi * (t / 24 - 0.3)) + 5 * coef[sid, 0] + rng.normal(0, 2, total)
    humidity = np.clip(60 + 15 * rng.standard_normal(total), 5, 100)
    wind = np.abs(rng.normal(3, 2, total))
    y = (base[sid] + a_hour[sid] * np.sin(2 * np.pi * hour / 24 + phase[sid]) + b_temp[sid] * temp
         + c_wkend[sid] * (dow >= 5) + d_hum[sid] * (humidity - 60) - 0.8 * wind + rng.normal(0, 3, total))

    def lag(k: int) -> Any:
        out = np.empty(total)
        if k < total:
            out[k:] = y[:-k]
        early = t < k
        out[early] = base[sid[early]]
        return out

    lag_1 = lag(1)
    if uniform:  # running sums per station, as the lab summed them (same rounding)
        r = int(counts[0])
        cs = np.cumsum(np.concatenate([np.zeros((n, 1)), lag_1.reshape(n, r)], axis=1), axis=1)
        k = np.minimum(np.arange(1, r + 1), 24)
        roll_24 = ((cs[:, 1:] - cs[:, np.maximum(np.arange(1, r + 1) - 24, 0)]) / k).ravel()
    else:
        cs = np.concatenate([[0.0], np.cumsum(lag_1)])
        i = np.arange(total)
        lo = np.maximum(i - 23, start)
        roll_24 = (cs[i + 1] - cs[lo]) / (i + 1 - lo)
    return pd.DataFrame({KEY: sid, TIME: t * 3600 + 1_700_000_000, "dow": dow.astype(np.float64),
                         "hour": hour.astype(np.float64), "temp": temp, "humidity": humidity,
                         "wind": wind, "lag_1": lag_1, "lag_24": lag(24), "roll_24": roll_24, TARGET: y})


def write_data(frame: Any, out: Path, files: int = 8) -> None:
    """Write ``frame`` as ``files`` Parquet files of whole stations (row groups of 50,000 rows);
    written beside ``out`` first and renamed, so an interrupted run leaves no half data set."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    sids = frame[KEY].to_numpy()
    for j, block in enumerate(np.array_split(np.unique(sids), files)):
        if len(block):
            lo, hi = np.searchsorted(sids, [block[0], block[-1] + 1])
            pq.write_table(pa.Table.from_pandas(frame.iloc[lo:hi], preserve_index=False),
                           tmp / f"part-{j:03d}.parquet", row_group_size=50_000)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


# --- the unit of work of the hand-written peers -----------------------------------------------------

def fit_station(g: Any) -> tuple[int, float, str]:
    """One station's model: time-ordered holdout (the latest rows), fit, holdout MAE, model text."""
    import lightgbm as lgb
    import numpy as np

    X = g[FEATURES].to_numpy(dtype=np.float64)
    y = g[TARGET].to_numpy(dtype=np.float64)
    n = len(y)
    holdout = np.zeros(n, dtype=bool)
    holdout[np.argsort(g[TIME].to_numpy(), kind="stable")[n - holdout_size(n):]] = True
    params = PARAMS
    booster = lgb.train(params, lgb.Dataset(X[~holdout], label=y[~holdout], feature_name=FEATURES,
                                            params={"verbosity": -1, "seed": params["seed"]}))
    mae = float(np.mean(np.abs(booster.predict(X[holdout], num_threads=1) - y[holdout])))
    return int(g[KEY].iat[0]), mae, booster.model_to_string()


def fit_chunk(frame: Any) -> list[tuple[int, float, str]]:
    """Every station of one chunk (a frame of whole stations)."""
    return [fit_station(g) for _, g in frame.groupby(KEY, sort=False)]


def _groups(frame: Any) -> list[Any]:
    return [g for _, g in frame.groupby(KEY, sort=False)]


def _chunks(frame: Any, k: int) -> list[Any]:
    """``frame`` cut into ``k`` slices of whole stations (it is sorted by station)."""
    import numpy as np

    sids = frame[KEY].to_numpy()
    out = []
    for block in np.array_split(np.unique(sids), k):
        if len(block):
            lo, hi = np.searchsorted(sids, [block[0], block[-1] + 1])
            out.append(frame.iloc[lo:hi])
    return out


# --- one method, in its own process -----------------------------------------------------------------

def run_serial(data: str) -> dict[str, Any]:
    import pandas as pd

    t0 = time.perf_counter()
    models: dict[int, str] = {}
    maes: list[float] = []
    for _, g in pd.read_parquet(data).groupby(KEY, sort=False):
        sid, mae, text = fit_station(g)
        models[sid] = text
        maes.append(mae)
    return {"wall_s": time.perf_counter() - t0, "models": len(models), "maes": maes}


def run_procpool(data: str) -> dict[str, Any]:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import pandas as pd

    t0 = time.perf_counter()
    groups = _groups(pd.read_parquet(data))
    chunksize = math.ceil(len(groups) / (4 * CPUS))
    with ProcessPoolExecutor(CPUS, mp_context=multiprocessing.get_context("fork")) as pool:
        results = list(pool.map(fit_station, groups, chunksize=chunksize))
    wall = time.perf_counter() - t0
    models = {sid: text for sid, _, text in results}
    return {"wall_s": wall, "models": len(models), "maes": [m for _, m, _ in results], "chunksize": chunksize}


def run_ray_batch(data: str) -> dict[str, Any]:
    import pandas as pd

    t0 = time.perf_counter()
    import ray

    t1 = time.perf_counter()
    ray.init(address="local", num_cpus=CPUS, include_dashboard=False, logging_level="ERROR",
             log_to_driver=False)
    init_s = time.perf_counter() - t1
    fit = ray.remote(num_cpus=1)(fit_chunk)
    chunks = _chunks(pd.read_parquet(data), 4 * CPUS)
    results = [r for part in ray.get([fit.remote(ray.put(c)) for c in chunks]) for r in part]
    wall = time.perf_counter() - t0
    t2 = time.perf_counter()
    ray.shutdown()
    shutdown_s = time.perf_counter() - t2
    models = {sid: text for sid, _, text in results}
    return {"wall_s": wall, "models": len(models), "maes": [m for _, m, _ in results],
            "ray_import_s": t1 - t0, "ray_init_s": init_s, "shutdown_s": shutdown_s, "tasks": len(chunks)}


class _Phases:
    """Timers put around manymodels' phases from the outside (the package is not changed): each
    wrapped callable's calls are counted, their seconds summed, and first start / last end kept."""

    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self.calls: dict[str, dict[str, float]] = {}

    def wrap(self, owner: Any, attr: str, name: str) -> None:
        fn = getattr(owner, attr, None)
        if fn is None:  # renamed in the package: that phase is simply not split out
            return

        def timed(*args: Any, **kwargs: Any) -> Any:
            s = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                e = time.perf_counter()
                c = self.calls.setdefault(name, {"n": 0, "s": 0.0, "first": s - self.t0, "last": 0.0})
                c["n"] += 1
                c["s"] += e - s
                c["last"] = e - self.t0

        setattr(owner, attr, timed)

    def split(self, import_s: float, wall: float) -> dict[str, float]:
        """The wall in consecutive phases (seconds), where the timers caught them."""
        c = self.calls
        if "ray_start" not in c or "ray_shutdown" not in c:
            return {}
        start, stop = c["ray_start"], c["ray_shutdown"]
        out = {"import": import_s, "before_ray": start["first"] - import_s, "ray_start": start["s"],
               "tasks": stop["first"] - (start["first"] + start["s"]), "ray_shutdown": stop["s"],
               "after": wall - stop["last"]}
        for name in ("plan_partitions", "index_commits", "run_record", "compact"):
            if name in c:
                out[name] = c[name]["s"]
                out[name + "_calls"] = c[name]["n"]
        return out


def run_manymodels(data: str, registry: str) -> dict[str, Any]:
    shutil.rmtree(registry, ignore_errors=True)
    t0, epoch0 = time.perf_counter(), time.time()  # partitions' start times are epoch seconds
    import manymodels
    from manymodels.engine import Engine
    from manymodels.pipeline import lgb_params
    from manymodels.registry import Registry

    import_s = time.perf_counter() - t0
    phases = _Phases(t0)
    phases.wrap(Engine, "__enter__", "ray_start")
    phases.wrap(Engine, "__exit__", "ray_shutdown")
    # manymodels.train is also the name of the function the package exports (loaded on first use):
    # take the module itself.
    phases.wrap(importlib.import_module("manymodels.train"), "plan_partitions", "plan_partitions")
    phases.wrap(Registry, "commit", "index_commits")
    phases.wrap(Registry, "write_run", "run_record")
    phases.wrap(Registry, "compact", "compact")
    spec = manymodels.load_spec(SPEC, data=data, registry=registry)
    summary = manymodels.train(spec, progress=False)
    wall = time.perf_counter() - t0
    _, parts = Registry(registry).run(summary.run_id)
    assert parts is not None
    trained = parts[parts["status"] == "trained"]
    # From the per-partition records: first partition start to last partition end, and how many
    # partitions ran at once on average over that span (the work's share of the CPUs while tasks ran).
    ends = parts["started_s"] + parts["wall_s"]
    first, last = float(parts["started_s"].min()) - epoch0, float(ends.max()) - epoch0
    span = last - first
    work = float(parts["wall_s"].sum())
    split = phases.split(import_s, wall)
    if split:  # the tasks phase: waiting for the first partition, the partitions, the tail after them
        ray_up = split["import"] + split["before_ray"] + split["ray_start"]
        split.update(to_first_partition=first - ray_up, partitions_span=span,
                     after_last_partition=ray_up + split["tasks"] - last)
    return {"wall_s": wall, "models": summary.trained, "failed": summary.failed,
            "maes": trained["metric"].tolist(), "phases_s": split,
            "partition_work_s": work, "partitions_span_s": span,
            "mean_concurrency": work / span if span else 0.0, "utilisation": summary.cost.utilisation,
            "lgb_params": lgb_params(spec, 1)}


def child(method: str, data: str, registry: str) -> None:
    import lightgbm  # noqa: F401  (imported before every method's clock starts)
    import numpy
    import pandas  # noqa: F401
    import pyarrow  # noqa: F401

    runners: dict[str, Callable[[], dict[str, Any]]] = {
        "serial": lambda: run_serial(data), "procpool": lambda: run_procpool(data),
        "ray_batch": lambda: run_ray_batch(data), "manymodels": lambda: run_manymodels(data, registry)}
    load0, cpu0 = os.getloadavg()[0], time.process_time()
    result = runners[method]()
    maes = result.pop("maes")
    # The machine is shared: the driver's CPU time (for the serial loop, the share of a core it got)
    # and the load average around the run say how much other work competed with it.
    result.update(mean_mae=float(numpy.mean(maes)) if maes else float("nan"), driver_peak_mb=peak_rss_mb(),
                  driver_cpu_s=time.process_time() - cpu0, load_1m=[load0, os.getloadavg()[0]])
    print("RESULT " + json.dumps(result))


# --- the comparison ---------------------------------------------------------------------------------

def data_folder(args: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    """The generated data set for these options (made once, then reused) and facts about its sizes."""
    import numpy as np

    counts = row_counts(args.shape, args.n, args.rows, args.max_rows, args.seed)
    tail = f"-max{args.max_rows}" if args.shape == "skewed" else ""
    folder = Path(args.workdir) / "peers-data" / f"{args.shape}-{args.n}x{args.rows}{tail}-seed{args.seed}"
    if not folder.exists():
        t = time.perf_counter()
        write_data(make_frame(counts, args.seed), folder)
        print(f"generated {len(counts)} stations, {int(counts.sum())} rows in {time.perf_counter() - t:.1f}s "
              f"→ {folder}", flush=True)
    q = np.percentile(counts, [0, 50, 90, 99, 100])
    facts = {"partitions": len(counts), "total_rows": int(counts.sum()),
             "rows_min": int(q[0]), "rows_median": float(q[1]), "rows_p90": float(q[2]),
             "rows_p99": float(q[3]), "rows_max": int(q[4])}
    return folder, facts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=("uniform", "skewed"), default="uniform")
    ap.add_argument("--n", type=int, default=None, help="stations (default 10,000 uniform, 4,000 skewed)")
    ap.add_argument("--rows", type=int, default=None,
                    help="rows per station (uniform, default 500) or their median (skewed, default 50)")
    ap.add_argument("--max-rows", type=int, default=3000, help="skewed: the largest station's rows")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--repeats", type=int, default=1, help="rounds of every method (ratios within a round)")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"any of {', '.join(METHODS)}")
    ap.add_argument("--workdir", default=str(HERE / "out"), help="data and registries go here")
    ap.add_argument("--out", default=None, help="JSON file (default: <workdir>/peers.json)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--registry", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.data, args.registry)
        return
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        ap.error(f"--methods: unknown method {unknown[0]!r} (known: {', '.join(METHODS)})" if unknown
                 else "--methods: none given")
    skewed = args.shape == "skewed"
    args.n = args.n or (4000 if skewed else 10_000)
    args.rows = args.rows or (50 if skewed else 500)
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    if args.n < 1 or args.rows < 1 or args.max_rows < SKEW_MIN:
        ap.error(f"--n and --rows must be at least 1 and --max-rows at least {SKEW_MIN}")
    if not skewed and args.rows < SKEW_MIN:
        ap.error(f"--rows must be at least {SKEW_MIN} (the job's min_rows)")
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    data, facts = data_folder(args)
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    print(f"{when}: {args.shape}, {facts['partitions']} stations, {facts['total_rows']} rows (per station: "
          f"min {facts['rows_min']}, median {facts['rows_median']:g}, max {facts['rows_max']}), {CPUS} CPUs",
          flush=True)
    results: list[dict[str, Any]] = []
    for rep in range(args.repeats):  # rounds of every method: a burst of other work hits one round
        for method in methods:
            cmd = [sys.executable, __file__, "--child", method, "--data", str(data),
                   "--registry", str(work / "peers-registry")]
            r = {"method": method, "repeat": rep, **run_child(cmd, method)}
            results.append(r)
            print(f"  {method:<10} rep {rep}: wall {r['wall_s']:7.1f}s  mean MAE {r['mean_mae']:.4f}",
                  flush=True)
    for r in results:  # side by side: each run against the serial loop of its own round
        serial = next((s for s in results if s["method"] == "serial" and s["repeat"] == r["repeat"]), None)
        r["ratio_to_serial"] = r["wall_s"] / serial["wall_s"] if serial else None
    reference = round(results[0]["mean_mae"], 4)
    same = all(round(r["mean_mae"], 4) == reference for r in results)
    median_ratio = {m: statistics.median(r["ratio_to_serial"] for r in results if r["method"] == m)
                    for m in methods if "serial" in methods}
    print(f"\n{args.shape}: {facts['partitions']} stations × {args.rows} rows"
          f"{' (median)' if skewed else ''}, {CPUS} CPUs, {when}")
    print("| method | rep | wall s | × serial | driver peak MB | mean holdout MAE | models | driver CPU s "
          "| load avg before → after |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        ratio = f"{r['ratio_to_serial']:.2f}" if r["ratio_to_serial"] is not None else "–"
        print(f"| {r['method']} | {r['repeat']} | {r['wall_s']:.1f} | {ratio} | {r['driver_peak_mb']:.0f} | "
              f"{r['mean_mae']:.4f} | {r['models']} | {r['driver_cpu_s']:.1f} | "
              f"{r['load_1m'][0]:.1f} → {r['load_1m'][1]:.1f} |")
    if args.repeats > 1 and median_ratio:
        print("median × serial: " + ", ".join(f"{m} {v:.2f}" for m, v in median_ratio.items()))
    for r in results:
        if r["method"] == "ray_batch":
            print(f"ray_batch rep {r['repeat']}: import ray {r['ray_import_s']:.1f}s, ray.init "
                  f"{r['ray_init_s']:.1f}s (in its wall); ray.shutdown {r['shutdown_s']:.1f}s (not in its "
                  "wall)")
        if r["method"] == "manymodels":
            ph = r["phases_s"]
            if ph:
                print(f"manymodels rep {r['repeat']} wall: " + ", ".join(
                    f"{k} {ph[k]:.1f}s" for k in ("import", "before_ray", "ray_start", "tasks",
                                                   "ray_shutdown", "after")))
                print(f"  tasks: {ph['to_first_partition']:.1f}s to the first partition's start, "
                      f"{ph['partitions_span']:.1f}s of partitions, {ph['after_last_partition']:.1f}s "
                      "from the last partition's end to shutdown")
                print(f"  inside: plan_partitions {ph.get('plan_partitions', math.nan):.1f}s, index commits "
                      f"{ph.get('index_commits', math.nan):.1f}s ({ph.get('index_commits_calls', 0):.0f}), "
                      f"run record writes {ph.get('run_record', math.nan):.1f}s, compaction "
                      f"{ph.get('compact', math.nan):.1f}s")
            print(f"  partition work (sum of per-partition wall) {r['partition_work_s']:.1f}s over "
                  f"{r['partitions_span_s']:.1f}s from first start to last end (mean concurrency "
                  f"{r['mean_concurrency']:.2f}); utilisation of the whole wall {r['utilisation']:.2f}")
            if r["lgb_params"] != PARAMS:
                print(f"NOTE: manymodels' LightGBM parameters {r['lgb_params']} differ from the loop's "
                      f"{PARAMS}")
    out = Path(args.out) if args.out else work / "peers.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"when": when, "shape": args.shape, "n": args.n, "rows": args.rows,
                               "max_rows": args.max_rows if skewed else None, "seed": args.seed,
                               "cpus": CPUS, "data": facts, "loop_params": PARAMS,
                               "same_mean_mae": same, "median_ratio_to_serial": median_ratio,
                               "results": results}, indent=2))
    print(f"wrote {out}")
    if not same:
        print(f"mean holdout MAE differs between methods at 4 decimals ({results[0]['method']}: "
              f"{reference:.4f})",
              file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
