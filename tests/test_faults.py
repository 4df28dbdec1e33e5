"""Fault injection: what a run survives (a dying worker, a killed driver, a concurrent run, a hanging
partition) and what the registry looks like afterwards.

Tests that use the session's Ray call :func:`manymodels.train` in-process; the others run the console
script as subprocesses, each starting its own embedded Ray (no ``RAY_ADDRESS`` in their environment).
A score re-run racing a reader of its folder is covered by ``test_score.py``
(``test_readers_never_see_half_a_run``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import psutil
import pytest

import manymodels
from manymodels import Registry
from manymodels.synth import make_transit

ROOT = Path(__file__).resolve().parents[1]
CONSOLE_SCRIPT = ROOT / ".venv" / "bin" / "manymodels"
JOB = "faults"

JOB_TOML = """\
[job]
name = "{job}"

[data]
source = "{data}"
partition_by = ["station"]
target = "delay_min"
time_column = "ts"
exclude = ["trip_id"]

[pipeline]
prepare = "{prepare}:prepare"

[model]
objective = "regression"
params = {{ num_leaves = 7, learning_rate = 0.2, n_estimators = 10, min_data_in_leaf = 5 }}

[validation]
holdout_fraction = 0.2
metric = "mae"
min_rows = 20

[resources]
num_cpus = 1

[output]
registry = "{registry}"

[run]
max_failure_fraction = 0.5
max_retries = 2
{run}
"""


def write_data(tmp_path: Path, stations: int, hours: int = 48) -> Path:
    """``stations`` × ``hours`` rows of transit data as one Parquet file."""
    path = tmp_path / "data.parquet"
    make_transit(stations, hours).to_parquet(path, index=False)
    return path


def write_job(tmp_path: Path, data: Path, prepare_body: str, run: str = "") -> Path:
    """A job spec (TOML) whose ``prepare`` is ``def prepare(df):`` + ``prepare_body``."""
    prepare = tmp_path / "prep.py"
    prepare.write_text("import os\nimport time\n\n\ndef prepare(df):\n" + prepare_body)
    path = tmp_path / "job.toml"
    path.write_text(JOB_TOML.format(job=JOB, data=data, prepare=prepare, registry=tmp_path / "registry",
                                    run=run))
    return path


def versions_by_station(reg: Registry) -> dict[str, list[int]]:
    out: dict[str, list[int]] = defaultdict(list)
    for m in reg.list(JOB, all_versions=True):
        out[m.partition["station"]].append(m.version)
    return {k: sorted(v) for k, v in out.items()}


def assert_one_champion_each(reg: Registry, stations: int) -> None:
    champions = Counter(m.partition["station"] for m in reg.list(JOB))
    assert len(champions) == stations and set(champions.values()) == {1}, champions
    every = reg.list(JOB, all_versions=True)
    assert Counter(m.partition["station"] for m in every if m.status == "champion") == champions


def assert_visible_models_exist(reg: Registry) -> None:
    for m in reg.list(JOB, all_versions=True):
        assert Path(m.model_uri).is_file(), m


def cli_train(job: Path, *extra: str) -> list[str]:
    return [str(CONSOLE_SCRIPT), "train", "--job", str(job), "--json", *extra]


def one_json(stdout: str) -> Any:
    lines = stdout.splitlines()
    assert len(lines) == 1, stdout
    return json.loads(lines[0])


def kill_session(proc: subprocess.Popen[Any]) -> None:
    """SIGKILL a subprocess started with ``start_new_session=True`` and everything it started.

    Its process group first, then any descendant that left it (Ray daemons may), found before the
    kill by walking the tree and after it by session id.
    """
    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    strays = list(tree)
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == proc.pid:
                strays.append(p)
        except (ProcessLookupError, PermissionError):
            continue
    for p in strays:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            continue
    _, alive = psutil.wait_procs(strays, timeout=20)
    assert not alive, alive


# ----------------------------------------------------------------------------- 1. worker dies


@pytest.mark.ray
@pytest.mark.usefixtures("ray_session")
def test_worker_process_killed_mid_task_is_retried(tmp_path: Path) -> None:
    data = write_data(tmp_path, 8)
    marker = tmp_path / "killed-once"
    job = write_job(tmp_path, data, f"""\
    if df["station"].iloc[0] == "stn-00003":
        try:
            os.close(os.open({str(marker)!r}, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return df
        os._exit(1)  # the Ray worker process dies mid-task, once
    return df
""")
    s = manymodels.train(job)
    assert marker.exists()  # the fault did happen
    assert (s.total, s.trained, s.failed, s.skipped) == (8, 8, 0, 0), s.failures
    assert s.status == "succeeded"
    reg = Registry(str(tmp_path / "registry"))
    assert versions_by_station(reg) == {f"stn-{i:05d}": [1] for i in range(8)}
    assert_one_champion_each(reg, 8)
    assert_visible_models_exist(reg)


# ----------------------------------------------------------------------------- 2. driver killed


def test_driver_killed_then_rerun_resumes(tmp_path: Path, clean_env: dict[str, str]) -> None:
    stations = 200
    data = write_data(tmp_path, stations)
    release = tmp_path / "release"
    # Stations from stn-00120 on wait until `release` exists (never, in the run that gets killed):
    # the first run is still busy when it has committed its early chunks, on any number of CPUs.
    job = write_job(tmp_path, data, f"""\
    deadline = time.monotonic() + 120
    while (int(df["station"].iloc[0][4:]) >= 120 and not os.path.exists({str(release)!r})
           and time.monotonic() < deadline):
        time.sleep(0.05)
    return df
""")
    registry = tmp_path / "registry"
    index = registry / JOB / "log"
    cmd = cli_train(job)
    with open(tmp_path / "killed.out", "wb") as out, open(tmp_path / "killed.err", "wb") as err:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=clean_env, stdout=out, stderr=err,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list(index.glob("*.parquet")):
            assert proc.poll() is None, (tmp_path / "killed.err").read_text()[-3000:]
            assert time.monotonic() < deadline, "no registry commit in 120 s"
            time.sleep(0.1)
        assert proc.poll() is None, "the run finished before it was killed"
    finally:
        kill_session(proc)
    assert proc.returncode == -signal.SIGKILL

    reg = Registry(str(registry))
    committed = {m.partition["station"]: m for m in reg.list(JOB, all_versions=True)}
    assert 0 < len(committed) < stations  # killed mid-run, after at least one commit
    assert all(m.version == 1 and m.status == "champion" for m in committed.values())
    killed_run = {m.run_id for m in committed.values()}
    assert len(killed_run) == 1
    # Its run record was never finished: it reads as interrupted, not running forever.
    record, _ = reg.run(next(iter(killed_run)))
    assert record["status"] == "interrupted"
    on_disk_before = {str(p) for p in (registry / JOB / "models").rglob("*.txt")}
    release.touch()

    rerun = subprocess.run(cmd, cwd=tmp_path, env=clean_env, capture_output=True, text=True,
                           timeout=180, check=False)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    s = one_json(rerun.stdout)
    assert s["status"] == "succeeded" and s["failures"] == []
    # What was committed is not redone; everything else (even models the killed run had written
    # but not yet committed) is trained again.
    assert s["partitions"]["skipped"] == len(committed) > 0
    assert s["partitions"]["trained"] == stations - len(committed)
    assert s["partitions"]["failed"] == 0

    reg = Registry(str(registry))
    assert versions_by_station(reg) == {f"stn-{i:05d}": [1] for i in range(stations)}
    assert_one_champion_each(reg, stations)
    after = {m.partition["station"]: m for m in reg.list(JOB, all_versions=True)}
    for station, m in committed.items():
        assert after[station] == m  # the committed version is kept as it was
    assert {m.run_id for st, m in after.items() if st not in committed} == {s["run_id"]}
    # Only indexed models are visible: the killed run's uncommitted model files (orphans on disk)
    # are never listed.
    visible = {m.model_uri for m in after.values()}
    assert_visible_models_exist(reg)
    orphans = on_disk_before - {m.model_uri for m in committed.values()}
    assert not orphans & visible
    assert_checkpointed(index)  # the re-run summarised the log at its end


def assert_checkpointed(log: Path) -> None:
    """The newest checkpoint (live and all) summarises the newest commit."""
    names = [p.name for p in log.iterdir()]
    commits = sorted(n for n in names if re.fullmatch(r"\d{20}\.parquet", n))
    assert commits, names
    head = commits[-1].removesuffix(".parquet")
    assert f"{head}.checkpoint.live.parquet" in names and f"{head}.checkpoint.all.parquet" in names, names


def test_driver_killed_in_the_middle_of_a_commit_does_not_block_the_next(tmp_path: Path) -> None:
    # A driver SIGKILLed inside a commit (right before creating the commit object) leaves nothing
    # that a later writer waits for: there is no lock, only commits that exist or do not.
    registry = tmp_path / "registry"
    script = """\
import datetime as dt, os, signal, sys
from manymodels.registry import NewVersion, Registry
reg = Registry(sys.argv[1])
reg.store.write_bytes("m.txt", b"model")
nv = NewVersion(pid="a-1", partition='{"station":"a"}', run_id="train-x", trained_at=dt.datetime.now(dt.UTC),
                rows=1, metric="mae", metric_value=1.0, metrics={}, fingerprint="f", spec_hash="h",
                model_key="m.txt", features=[], time_min=None, time_max=None, promote=True, reason="")
reg.commit(sys.argv[2], [nv])
Registry.before_create = lambda job, n: os.kill(os.getpid(), signal.SIGKILL)
reg.commit(sys.argv[2], [nv])
"""
    holder = subprocess.run([sys.executable, "-c", script, str(registry), JOB], timeout=60, check=False,
                            capture_output=True, text=True)
    assert holder.returncode == -signal.SIGKILL, holder.stderr[-2000:]
    assert len(Registry(str(registry)).list(JOB, all_versions=True)) == 1
    done: list[float] = []

    def compact() -> None:  # what every later commit, promote and run end does first
        t0 = time.monotonic()
        Registry(str(registry)).compact(JOB)
        done.append(time.monotonic() - t0)

    thread = threading.Thread(target=compact, daemon=True)
    thread.start()
    thread.join(timeout=20)
    assert done, "a dead driver blocked the registry"
    assert_checkpointed(registry / JOB / "log")


# ----------------------------------------------------------------------------- 3. concurrent runs


def test_two_concurrent_runs_share_the_registry(tmp_path: Path, clean_env: dict[str, str]) -> None:
    stations = 12
    data = write_data(tmp_path, stations)
    job = write_job(tmp_path, data, "    return df\n")
    procs = [subprocess.Popen(cli_train(job, "--force"), cwd=tmp_path, env=clean_env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True) for _ in range(2)]
    results = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=180)
            results.append((p.returncode, stdout, stderr))
    finally:
        for p in procs:
            if p.poll() is None:  # pragma: no cover - only when a run hangs
                kill_session(p)
    for rc, stdout, stderr in results:
        assert rc == 0, stderr[-3000:]
        s = one_json(stdout)
        assert s["partitions"]["trained"] == stations and s["partitions"]["failed"] == 0

    reg = Registry(str(tmp_path / "registry"))
    assert versions_by_station(reg) == {f"stn-{i:05d}": [1, 2] for i in range(stations)}
    assert_one_champion_each(reg, stations)
    assert_visible_models_exist(reg)
    runs = {one_json(stdout)["run_id"] for _, stdout, _ in results}
    for station in (f"stn-{i:05d}" for i in range(stations)):
        # the two versions of a partition come from the two runs, one each
        assert {m.run_id for m in reg.list(JOB, partition={"station": station}, all_versions=True)} == runs
    # Whichever run ended last checkpointed every commit of both, which resolves the same as the
    # commits did; checkpointing again changes nothing.
    assert_checkpointed(tmp_path / "registry" / JOB / "log")
    before = [m.to_dict() for m in reg.list(JOB, all_versions=True)]
    reg.compact(JOB)
    assert [m.to_dict() for m in Registry(str(tmp_path / "registry")).list(JOB, all_versions=True)] == before


# ----------------------------------------------------------------------------- 4. a partition hangs


@pytest.mark.ray
@pytest.mark.usefixtures("ray_session")
def test_hanging_partition_times_out(tmp_path: Path) -> None:
    data = write_data(tmp_path, 6)
    job = write_job(tmp_path, data, """\
    if df["station"].iloc[0] == "stn-00002":
        time.sleep(60)
    return df
""", run="timeout_s = 2")
    t0 = time.perf_counter()
    s = manymodels.train(job)
    wall = time.perf_counter() - t0
    assert wall < 30
    assert (s.total, s.trained, s.failed) == (6, 5, 1)
    [failure] = s.failures
    assert failure["partition"] == {"station": "stn-00002"}
    assert failure["reason"].startswith("timeout"), failure
    reg = Registry(str(tmp_path / "registry"))
    assert sorted(versions_by_station(reg)) == [f"stn-{i:05d}" for i in range(6) if i != 2]


# ----------------------------------------------------------------------------- 5. the budget gate


def test_budget_gate_folds_only_new_outcomes(make_spec: Any, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The ``[cost] max_usd`` gate keeps a running total: each call prices only the outcomes added
    since the previous call, so a run of N partitions prices N outcomes in all (not N²/2)."""
    from manymodels.cost import partition_cost
    from manymodels.train import PartitionOutcome, budget_gate

    priced: list[int] = []

    def counting(*args: Any, **kwargs: Any) -> Any:  # the real function, counted
        priced.append(1)
        return partition_cost(*args, **kwargs)

    monkeypatch.setattr(sys.modules["manymodels.train"], "partition_cost", counting)
    spec = make_spec(tmp_path, tmp_path / "registry", cost={"cpu_hour_usd": 3600.0, "max_usd": 1000.0})
    total, step = 2_000, 10
    outcomes: list[PartitionOutcome] = []
    gate = budget_gate(spec, False, {"CPU": 2.0}, time.perf_counter(), outcomes, total)
    assert gate is not None
    answers = []
    for n in range(0, total, step):
        outcomes.extend(PartitionOutcome(pid=str(i), partition="{}", status="trained", wall_s=0.25)
                        for i in range(n, n + step))
        answers.append(gate())
        assert len(priced) == len(outcomes)  # O(new outcomes) per call
    # 2,000 partitions × 0.25 s × 1 CPU × $1/s = $500 projected: within the $1,000 budget throughout.
    assert all(answers)
    spent = sum(partition_cost(o.wall_s, o.num_cpus, o.num_gpus, o.memory_mb, spec.cost).cost_usd
                for o in outcomes)
    assert spent == pytest.approx(500.0)
    # The running total is the same sum: a budget just under it stops the gate.
    tighter = dataclasses.replace(spec, cost=dataclasses.replace(spec.cost, max_usd=499.0))
    tight = budget_gate(tighter, False, {"CPU": 2.0}, 0.0, outcomes, total)
    assert tight is not None and not tight()
