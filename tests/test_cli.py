"""Tests of the command line (manymodels.cli): in-process with CliRunner, plus one real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import fsspec
import lightgbm as lgb
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from manymodels.cli import app
from manymodels.synth import make_transit

ROOT = Path(__file__).resolve().parents[1]
CONSOLE_SCRIPT = ROOT / ".venv" / "bin" / "manymodels"
JOB = "transit-delays"
TRAIN_KEYS = {"run_id", "job", "status", "partitions", "failures", "cost", "registry"}
COUNT_KEYS = {"total", "trained", "promoted", "skipped", "failed"}
COST_KEYS = {"total_usd", "cpu_seconds", "gpu_seconds"}
MODEL_KEYS = {"partition", "version", "status", "metrics", "run_id", "trained_at", "rows", "model_uri"}

runner = CliRunner()


def write_job(tmp_path: Path, data: Path, extra: str = "") -> Path:
    """The demo job spec as a TOML file with absolute paths (data, prepare, registry)."""
    text = (ROOT / "jobs" / "transit.toml").read_text()
    text = text.replace('source = "partitions/transit"', f'source = "{data}"')
    text = text.replace('prepare = "jobs/transit.py:prepare"', f'prepare = "{ROOT}/jobs/transit.py:prepare"')
    text = text.replace('registry = "registry"', f'registry = "{tmp_path / "registry"}"')
    path = tmp_path / "job.toml"
    path.write_text(text + extra)
    return path


def run(*args: str) -> Any:
    return runner.invoke(app, [str(a) for a in args])


def one_json(result: Any) -> Any:
    """The single JSON value a --json command printed: stdout holds it and nothing else."""
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    return json.loads(lines[0])


def assert_usage_error(result: Any, *needles: str) -> None:
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert result.stdout == ""
    err = result.stderr.strip()
    assert err.startswith("error:") and "\n" not in err, err
    for needle in needles:
        assert needle in err, err


@pytest.mark.ray
@pytest.mark.usefixtures("ray_session")
def test_train_and_registry_commands(transit_dir: Path, tmp_path: Path) -> None:
    job = write_job(tmp_path, transit_dir)
    registry = tmp_path / "registry"

    trained = run("train", "--job", job, "--json")
    assert trained.exit_code == 0, trained.stderr
    summary = one_json(trained)
    assert set(summary) >= TRAIN_KEYS
    assert set(summary["partitions"]) >= COUNT_KEYS and set(summary["cost"]) >= COST_KEYS
    assert summary["partitions"] == {"total": 12, "trained": 12, "promoted": 12, "skipped": 0,
                                     "failed": 0}
    assert summary["job"] == JOB and summary["status"] == "succeeded" and summary["failures"] == []
    assert summary["registry"] == str(registry)
    run_id = summary["run_id"]

    listed = run("models", "list", "--registry", registry, "--json")
    assert listed.exit_code == 0, listed.stderr
    models = one_json(listed)
    assert isinstance(models, list) and len(models) == 12
    assert all(set(m) >= MODEL_KEYS and m["status"] == "champion" for m in models)
    assert all(m["run_id"] == run_id and m["version"] == 1 for m in models)
    by_job = one_json(run("models", "list", "--job", job, "--json",
                          "--partition", "station=stn-00002"))
    assert [m["partition"] for m in by_job] == [{"station": "stn-00002"}]

    shown = run("models", "show", "--registry", registry, "--partition", "station=stn-00001", "--json")
    assert shown.exit_code == 0, shown.stderr
    mv = one_json(shown)
    assert set(mv) >= MODEL_KEYS and mv["partition"] == {"station": "stn-00001"}
    assert isinstance(mv["metrics"], dict) and "mae" in mv["metrics"]
    assert mv["environment"]["lightgbm"] == lgb.__version__ and mv["environment"]["python"]
    with fsspec.open(mv["model_uri"], "r") as f:
        assert lgb.Booster(model_str=f.read()).feature_name() == mv["features"]

    runs = one_json(run("runs", "list", "--registry", registry, "--json"))
    assert [r["run_id"] for r in runs] == [run_id]
    assert runs[0]["status"] == "succeeded" and "spec" not in runs[0]
    detail = one_json(run("runs", "show", run_id, "--registry", registry, "--json"))
    assert detail["run_id"] == run_id and detail["status"] == "succeeded"
    assert set(detail["cost"]) >= {*COST_KEYS, "attributed_usd", "overhead_usd"}
    assert len(detail["partitions"]) == 12
    for p in detail["partitions"]:
        assert set(p) >= {"partition", "status", "reason", "rows", "wall_s", "cpu_seconds",
                          "gpu_seconds", "cost_usd"}
        assert p["status"] == "trained" and p["rows"] == 24 * 7
    assert sorted(p["partition"]["station"] for p in detail["partitions"]) == \
        sorted(m["partition"]["station"] for m in models)

    # A forced second run: every partition gets version 2, which becomes champion.
    forced = run("train", "--job", job, "--force", "--json")
    assert forced.exit_code == 0, forced.stderr
    assert one_json(forced)["partitions"]["promoted"] == 12
    every = one_json(run("models", "list", "--registry", registry, "--all", "--json"))
    assert sorted((m["version"], m["status"]) for m in every) == \
        [(1, "archived")] * 12 + [(2, "champion")] * 12

    part = ("--registry", registry, "--partition", "station=stn-00001", "--json")
    back = run("models", "rollback", *part)
    assert back.exit_code == 0, back.stderr
    assert one_json(back)["version"] == 1 and one_json(back)["status"] == "champion"
    assert one_json(run("models", "show", *part))["version"] == 1
    assert one_json(run("models", "show", *part, "--version", "2"))["status"] == "archived"
    again = run("models", "promote", "--version", "2", *part)
    assert again.exit_code == 0, again.stderr
    assert one_json(again)["version"] == 2
    assert one_json(run("models", "show", *part, "--version", "1"))["status"] == "archived"
    # Other partitions were not touched.
    assert one_json(run("models", "show", "--registry", registry, "--partition", "station=stn-00003",
                        "--json"))["version"] == 2

    assert_usage_error(run("runs", "show", "nope", "--registry", registry, "--json"), "no run")
    assert_usage_error(run("models", "show", "--registry", registry, "--json"), "--partition")
    assert_usage_error(run("models", "show", "--registry", registry, "--partition", "station=zzz"),
                       "zzz")


@pytest.mark.ray
@pytest.mark.usefixtures("ray_session")
def test_train_exit_1_when_too_many_partitions_fail(tmp_path: Path) -> None:
    df = make_transit(4, 48)
    df = df[(df["station"] != "stn-00002") | (df["ts"] < df["ts"].min() + pd.Timedelta(hours=10))]
    data = tmp_path / "short.parquet"
    df.to_parquet(data, index=False)
    result = run("train", "--data", data, "--partition-by", "station", "--target", "delay_min",
                 "--registry", tmp_path / "registry", "--json")
    assert result.exit_code == 1, result.stderr
    summary = one_json(result)
    assert summary["job"] == "short" and summary["status"] == "failed"
    assert summary["partitions"]["failed"] == 1 and summary["partitions"]["trained"] == 3
    assert summary["failures"] == [{"partition": {"station": "stn-00002"},
                                    "reason": "only 10 usable rows (min_rows = 30)"}]


def test_usage_errors_exit_2(transit_dir: Path, tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    bad = write_job(tmp_path, transit_dir)
    bad.write_text(bad.read_text().replace('target = "delay_min"', 'target = "delay_min"\nbogus = 1'))
    assert_usage_error(run("train", "--job", bad, "--json"), "data.bogus", str(bad))
    assert_usage_error(run("train", "--data", tmp_path / "nowhere", "--partition-by", "station",
                           "--target", "delay_min", "--registry", registry, "--json"),
                       "does not exist")
    assert_usage_error(run("train", "--data", transit_dir, "--partition-by", "station",
                           "--target", "late_min", "--registry", registry, "--json"),
                       "'late_min'", "target")
    assert_usage_error(run("train", "--data", transit_dir, "--partition-by", "region",
                           "--target", "delay_min", "--registry", registry), "'region'")
    assert_usage_error(run("train", "--job", tmp_path / "missing.toml"), "missing.toml")
    assert not registry.exists()


def test_console_script_subprocess(transit_dir: Path, tmp_path: Path, clean_env: dict[str, str]) -> None:
    assert "RAY_ADDRESS" not in clean_env
    registry = tmp_path / "registry"
    proc = subprocess.run(
        [str(CONSOLE_SCRIPT), "train", "--data", str(transit_dir), "--partition-by", "station",
         "--target", "delay_min", "--registry", str(registry), "--json"],
        cwd=tmp_path, env=clean_env, capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, proc.stdout
    summary = json.loads(lines[0])
    assert set(summary) >= TRAIN_KEYS
    assert summary["job"] == transit_dir.name  # named after the data folder
    assert summary["status"] == "succeeded"
    assert summary["partitions"] == {"total": 12, "trained": 12, "promoted": 12, "skipped": 0,
                                     "failed": 0}
    assert summary["registry"] == str(registry)
    # The embedded Ray held this machine's CPUs for the job's wall time.
    cost = summary["cost"]
    assert cost["cpu_seconds"] >= 0.999 * cost["wall_s"] > 0 and cost["gpu_seconds"] >= 0
    assert summary["cost"]["total_usd"] == 0  # no rates given
    assert not (tmp_path / "scores").exists()
    models = list((registry / transit_dir.name / "models").iterdir())
    assert len(models) == 12
    model = next(models[0].glob("*.txt"))  # (beside it: its compact form, *.txt.forest)
    assert np.isfinite(lgb.Booster(model_file=str(model)).num_trees())


def test_json_stdout_stays_one_object_when_workers_print(transit_dir: Path, tmp_path: Path,
                                                          clean_env: dict[str, str]) -> None:
    """Ray forwards worker output to the driver's stdout; with --json it goes to stderr instead."""
    prep = tmp_path / "noisy.py"
    prep.write_text("def prepare(df):\n    print('hello from prepare', len(df), flush=True)\n    return df\n")
    job = tmp_path / "noisy.toml"
    job.write_text(f'[data]\nsource = "{transit_dir}"\npartition_by = ["station"]\ntarget = "delay_min"\n'
                   f'[pipeline]\nprepare = "{prep}:prepare"\n[output]\nregistry = "{tmp_path / "reg"}"\n')
    proc = subprocess.run([str(CONSOLE_SCRIPT), "train", "--job", str(job), "--json"], cwd=tmp_path,
                          env=clean_env, capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, proc.stdout
    assert json.loads(lines[0])["partitions"]["trained"] == 12
    assert "hello from prepare" in proc.stderr


@pytest.mark.ray
@pytest.mark.usefixtures("ray_session")
def test_unreachable_ray_address_exits_2_and_leaves_no_run_record(transit_dir: Path, tmp_path: Path,
                                                                  clean_env: dict[str, str]) -> None:
    """A Ray that cannot be joined is a one-line error (exit 2, in seconds, not after minutes of
    retries) that leaves no "running" run record behind, for train and for score."""
    from manymodels import Registry, train

    job = write_job(tmp_path, transit_dir)
    registry = Registry(str(tmp_path / "registry"))
    train(job, only=["station=stn-00000"])  # a model to score with (on the session's Ray)
    [before] = registry.runs(JOB)
    for command in ("train", "score"):
        proc = subprocess.run(
            [str(CONSOLE_SCRIPT), command, "--job", str(job), "--address", "127.0.0.1:1", "--json",
             "--only", "station=stn-00000"],
            cwd=tmp_path, env=clean_env, capture_output=True, text=True, timeout=90, check=False)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert proc.stdout == ""
        err = proc.stderr.strip()
        assert err.startswith("error:") and "\n" not in err and "127.0.0.1:1" in err, err
        assert [r["run_id"] for r in registry.runs(JOB)] == [before["run_id"]], command
    assert not (tmp_path / "scores" / JOB).exists()


HEAVY = ("ray", "lightgbm", "pandas", "pyarrow", "numpy", "rich")


def _python(code: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True,
                          timeout=120, check=False)


def test_help_imports_no_heavy_library(clean_env: dict[str, str]) -> None:
    """`import manymodels`, the CLI module and `manymodels --help` load neither Ray, LightGBM, pandas,
    pyarrow nor Rich (each costs a noticeable part of a second)."""
    code = ("import json, sys\nimport manymodels, manymodels.cli\n"
            f"heavy = {HEAVY!r}\n"
            "imported = [m for m in heavy if m in sys.modules]\n"
            "try:\n    manymodels.cli.app(['--help'])\nexcept SystemExit as exc:\n    code = exc.code\n"
            "print('RESULT ' + json.dumps([imported, code, [m for m in heavy if m in sys.modules]]))")
    proc = _python(code, clean_env)
    assert proc.returncode == 0, proc.stderr
    [line] = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert json.loads(line.removeprefix("RESULT ")) == [[], 0, []]
    assert "Usage: " in proc.stdout and "Train and batch-score" in proc.stdout

    proc = subprocess.run([str(CONSOLE_SCRIPT), "--help"], env=clean_env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0 and "Usage: manymodels" in proc.stdout, proc.stderr


def test_package_names_load_on_first_use(clean_env: dict[str, str]) -> None:
    """The package's names are imported lazily, and `manymodels.train` / `manymodels.score` stay the
    functions even when their modules were imported first (as a Ray worker does, without Rich)."""
    code = ("import sys\nimport manymodels.train, manymodels.score\nimport manymodels\n"
            "assert 'rich' not in sys.modules  # a worker's first task does not wait for the progress bar\n"
            "from manymodels import Registry, RunSummary, InputError, load_spec\n"
            "assert manymodels.train.__module__ == 'manymodels.train' and callable(manymodels.train)\n"
            "assert manymodels.score.__module__ == 'manymodels.score' and callable(manymodels.score)\n"
            "assert sys.modules['manymodels.train'].train is manymodels.train\n"
            "assert set(manymodels.__all__) <= set(dir(manymodels))\n"
            "try:\n    manymodels.nope\nexcept AttributeError as exc:\n    print(exc)\n")
    proc = _python(code, clean_env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "module 'manymodels' has no attribute 'nope'"


EXIT_SCRIPT = """
import atexit, sys, threading, time
from manymodels.cli import _exit_now
atexit.register(lambda: print("exit handler ran"))
if sys.argv[1] == "thread":  # a thread still running: the normal exit, which waits for it
    def work():
        time.sleep(0.3)
        print("thread finished", flush=True)
    threading.Thread(target=work).start()
    _exit_now(3)
_exit_now("a message")  # as SystemExit("a message"): printed on stderr, exit 1
"""


def test_exit_now_keeps_exit_codes_handlers_and_running_threads(clean_env: dict[str, str]) -> None:
    """The CLI's way out runs the exit handlers, flushes, exits with SystemExit's code, and waits
    for a thread that is still running (through the normal exit)."""
    proc = _python(EXIT_SCRIPT, clean_env, "thread")
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout.splitlines() == ["thread finished", "exit handler ran"]
    proc = _python(EXIT_SCRIPT, clean_env, "message")
    assert proc.returncode == 1
    assert proc.stdout == "exit handler ran\n" and proc.stderr == "a message\n"


def test_bad_input_through_the_entry_point_exits_2_before_ray(tmp_path: Path,
                                                              clean_env: dict[str, str]) -> None:
    """Through the real entry point (main, with its quick exit): a bad spec and a missing data
    source are one line on stderr, exit 2, before Ray is even imported, and nothing is written."""
    code = ("import sys\nfrom manymodels.cli import main\nimport atexit\n"
            "atexit.register(lambda: print('ray imported' if 'ray' in sys.modules else 'no ray'))\n"
            "sys.argv[0] = 'manymodels'\nmain()")
    for args in (["train", "--job", str(tmp_path / "nope.toml")],
                 ["train", "--data", str(tmp_path / "nowhere"), "--partition-by", "station", "--target", "y",
                  "--registry", str(tmp_path / "registry")],
                 ["score", "--data", str(tmp_path / "nowhere"), "--partition-by", "station", "--target", "y",
                  "--registry", str(tmp_path / "registry")]):
        proc = _python(code, clean_env, *args)
        assert proc.returncode == 2, proc.stderr
        assert proc.stdout == "no ray\n"
        err = proc.stderr.strip()
        assert err.startswith("error:") and "\n" not in err, err
    assert list(tmp_path.iterdir()) == []
