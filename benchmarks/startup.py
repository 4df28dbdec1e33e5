"""Start-up: a one-partition ``manymodels train`` and ``score`` against Ray's own start and stop.

Each method runs in a fresh process, timed from outside (launch to exit, as a user or a scheduler
sees it), interleaved and repeated; the table shows medians:

- ``python``: ``python -c pass``, the interpreter alone.
- ``ray``: ``ray.init(address="local"); ray.shutdown()`` with the options manymodels starts its
  embedded Ray with (no dashboard, 256 MB object store, usage stats off), so the difference to it is
  what manymodels adds: its imports, reading and planning, the worker's LightGBM import, training,
  the registry writes, the run record and the way out.
- ``ray_default``: the same two calls with Ray's defaults (its dashboard if installed; usage stats
  off), for reference: the stricter baseline is ``ray``.
- ``train``: ``manymodels train --job <one-partition job> --force`` (the console script; ``--force``
  so that every repeat trains instead of skipping unchanged data).
- ``score``: ``manymodels score --job <the same job>``.
- ``help``: ``manymodels --help``.

With ``--before DIR`` (a source tree of an earlier version, e.g. ``git archive <rev> | tar -x -C
DIR``), ``train_before``, ``score_before`` and ``help_before`` run the same commands on that tree's
package, interleaved with the rest, each with its own registry.

Every command must exit 0; the goal (issue 9) is train and score within ``ray`` + 0.5 s, help ≤ 0.3 s.
Prints a table and writes JSON (``--out``). Example::

    python benchmarks/startup.py --repeats 5 --before /tmp/manymodels-before
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from harness import clean_env  # noqa: E402

# The options of manymodels.engine.Engine's embedded start, so that the baseline is Ray doing the same.
RAY_ONLY = ("import logging, os; os.environ.setdefault('RAY_USAGE_STATS_ENABLED', '0'); import ray; "
            "ray.init(address='local', include_dashboard=False, logging_level=logging.WARNING, "
            "object_store_memory=256 * 1024 * 1024); ray.shutdown()")
RAY_DEFAULT = ("import os; os.environ.setdefault('RAY_USAGE_STATS_ENABLED', '0'); import ray; "
               "ray.init(address='local'); ray.shutdown()")
METHODS = ("python", "ray", "ray_default", "train", "score", "help")


def _console_script() -> list[str]:
    """``manymodels`` as installed beside this interpreter, else the same entry point via ``-c``."""
    script = Path(sys.executable).parent / "manymodels"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from manymodels.cli import main; main()"]


def _write_job(work: Path, hours: int, root: Path) -> Path:
    """One station's hourly rows and the demo job spec (``root``'s) over them, all under ``work``."""
    from manymodels.synth import make_transit, write_transit

    data = work / "data"
    write_transit(make_transit(1, hours), str(data), layout="flat", files=1)
    text = (root / "jobs" / "transit.toml").read_text()
    text = (text.replace('source = "partitions/transit"', f'source = "{data}"')
            .replace('prepare = "jobs/transit.py:prepare"', f'prepare = "{root}/jobs/transit.py:prepare"')
            .replace('registry = "registry"', f'registry = "{work / "registry"}"')
            .replace('scores = "scores"', f'scores = "{work / "scores"}"'))
    job = work / "job.toml"
    job.write_text(text)
    return job


def _commands(job: Path, suffix: str = "") -> dict[str, list[str]]:
    mm = _console_script()
    cmds = {"train": [*mm, "train", "--job", str(job), "--force"],
            "score": [*mm, "score", "--job", str(job)],
            "help": [*mm, "--help"]}
    if not suffix:
        cmds |= {"python": [sys.executable, "-c", "pass"], "ray": [sys.executable, "-c", RAY_ONLY],
                 "ray_default": [sys.executable, "-c", RAY_DEFAULT]}
    return {f"{m}{suffix}": c for m, c in cmds.items()}


def _run(cmd: list[str], label: str, root: Path = ROOT) -> float:
    """Wall seconds of ``cmd`` (importing ``root``'s package) from launch to exit; exits naming
    ``label`` if it fails."""
    env = clean_env()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"{label} failed (exit {proc.returncode})")
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hours", type=int, default=24 * 28, help="rows of the one partition (hours)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--workdir", default=str(HERE / "out" / "startup"))
    ap.add_argument("--out", default=None, help="JSON file (default: benchmarks/out/startup.json)")
    ap.add_argument("--before", default=None, help="source tree of an earlier version to run beside")
    args = ap.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown methods: {', '.join(sorted(unknown))}")

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    (work / "now").mkdir(parents=True)
    cmds = _commands(_write_job(work / "now", args.hours, ROOT))
    roots = {m: ROOT for m in cmds}
    # Untimed: the first train makes the models that score reads, and warms the file cache.
    _run(cmds["train"], "train (untimed first run)")
    if args.before:
        before = Path(args.before).resolve()
        (work / "before").mkdir()
        more = _commands(_write_job(work / "before", args.hours, before), "_before")
        cmds |= more
        roots |= {m: before for m in more}
        _run(cmds["train_before"], "train_before (untimed first run)", before)
        methods += [m for m in more if m.removesuffix("_before") in methods]
    walls: dict[str, list[float]] = {m: [] for m in methods}
    for rep in range(args.repeats):
        for m in methods:
            walls[m].append(_run(cmds[m], m, roots[m]))
        print(f"rep {rep}: " + "  ".join(f"{m} {walls[m][-1]:.2f}s" for m in methods), flush=True)

    med = {m: statistics.median(w) for m, w in walls.items()}
    # On a busy machine one repeat's Ray start can take twice another's; a repeat runs its methods
    # back to back, so the difference within each repeat is steadier than the difference of medians.
    def paired(base: str) -> dict[str, float]:
        return {m: statistics.median(a - b for a, b in zip(walls[m], walls[base], strict=True))
                for m in ("train", "score", "train_before", "score_before") if m in walls and base in walls}

    over, over_default = paired("ray"), paired("ray_default")
    print(f"\none partition × {args.hours} rows, {args.repeats} repeats, {os.cpu_count()} CPUs; "
          "each a fresh process, timed launch to exit")
    print("| method | median s | min s | max s | median of (method − ray) per repeat, s "
          "| same, − ray_default |")
    print("|---|---|---|---|---|---|")
    for m in methods:
        diff = f"{over[m]:+.2f}" if m in over else ""
        diff_default = f"{over_default[m]:+.2f}" if m in over_default else ""
        print(f"| {m} | {med[m]:.2f} | {min(walls[m]):.2f} | {max(walls[m]):.2f} | {diff} | {diff_default} |")
    result: dict[str, Any] = {"hours": args.hours, "repeats": args.repeats, "cpus": os.cpu_count(),
                              "commands": {m: cmds[m] for m in methods}, "walls_s": walls,
                              "median_s": med, "over_ray_s": over, "over_ray_default_s": over_default}
    out = Path(args.out) if args.out else HERE / "out" / "startup.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
