"""Security properties: models are never unpickled, partition values never become paths, and
``pipeline.prepare`` runs only the file the spec names (relative to the working directory)."""

from __future__ import annotations

import ast
import json
import os
import pickle
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.dataset as ds
import pytest
from typer.testing import CliRunner

import manymodels
from manymodels import Registry
from manymodels.cli import app
from manymodels.pipeline import load_prepare

PACKAGE = Path(manymodels.__file__).resolve().parent
runner = CliRunner()


def frame(stations: list[str], n: int = 40, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    parts = []
    for i, station in enumerate(stations):
        x1 = rng.normal(size=n)
        parts.append(pd.DataFrame({"station": station, "x1": x1, "y": 2 * x1 + i + rng.normal(size=n)}))
    return pd.concat(parts, ignore_index=True)


def cli(*args: Any) -> Any:
    return runner.invoke(app, [str(a) for a in args])


def one_json(result: Any) -> Any:
    lines = result.stdout.splitlines()
    assert len(lines) == 1, (result.stdout, result.stderr, result.exception)
    return json.loads(lines[0])


def train(data: Path, registry: Path, *more: Any) -> Any:
    return cli("train", "--data", data, "--partition-by", "station", "--target", "y",
               "--registry", registry, "--json", *more)


def score(data: Path, registry: Path, scores: Path) -> Any:
    return cli("score", "--data", data, "--partition-by", "station", "--target", "y",
               "--registry", registry, "--output", scores, "--json")


# ----------------------------------------------------------------------------- 1. never unpickled


class Planted:
    """A pickle that, when loaded, creates ``marker`` (what a malicious model file would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


def test_manymodels_imports_no_unpickler() -> None:
    banned = {"pickle", "cPickle", "_pickle", "joblib", "dill", "cloudpickle", "shelve", "marshal"}
    sources = sorted(PACKAGE.glob("*.py"))
    assert len(sources) > 10
    for path in sources:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in banned, f"{path.name} imports {name}"
        text = path.read_text()
        for call in ("pickle.load", "joblib.load", "__import__(\"pickle\")", "model_file="):
            assert call not in text, f"{path.name} uses {call}"


@pytest.mark.ray
@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("protocol", [0, pickle.HIGHEST_PROTOCOL], ids=["ascii", "binary"])
def test_planted_pickle_model_is_never_unpickled(tmp_path: Path, protocol: int) -> None:
    # The payload is live: loading it with pickle does create its marker.
    probe = tmp_path / "probe-marker"
    pickle.loads(pickle.dumps(Planted(probe), protocol=protocol))
    assert probe.exists()

    data = tmp_path / "rows.parquet"
    frame(["a", "b", "c"]).to_parquet(data, index=False)
    registry, marker = tmp_path / "registry", tmp_path / "marker"
    assert train(data, registry).exit_code == 0
    mv = one_json(cli("models", "show", "--registry", registry, "--partition", "station=a", "--json"))
    Path(mv["model_uri"]).write_bytes(pickle.dumps(Planted(marker), protocol=protocol))

    result = score(data, registry, tmp_path / "scores")
    assert result.exit_code == 1, (result.stdout, result.stderr)
    s = one_json(result)
    assert s["rows"] == {"input": 120, "scored": 80, "unscored": 40}
    [unscored] = s["unscored"]
    assert unscored["partition"] == {"station": "a"}
    assert unscored["reason"].startswith("LightGBMError: " if protocol == 0 else "UnicodeDecodeError: ")

    with pytest.raises(Exception) as info:
        Registry(str(registry)).load_model("rows", {"station": "a"})
    assert type(info.value).__name__ in ("LightGBMError", "UnicodeDecodeError")

    # Retraining replaces the planted champion (an unparsable champion does not block promotion).
    retrained = train(data, registry, "--force")
    assert retrained.exit_code == 0, retrained.stdout
    assert one_json(retrained)["partitions"]["promoted"] == 3
    assert score(data, registry, tmp_path / "scores2").exit_code == 0
    assert not marker.exists()


# ----------------------------------------------------------------------------- 2. no path escapes


HOSTILE = ["../../escape", "/etc/passwd", "..", ".", "a/../../b", "~", "%2e%2e", "", "..\\..\\win",
           "héllo wörld ✓", "東京/駅", "\u202eevil.txt", "line\nbreak", "${HOME}", "*", "score_run_id=x"]


def _snapshot(root: Path) -> dict[Path, float]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            p = Path(dirpath, name)
            out[p] = p.lstat().st_mtime_ns
    return out


@pytest.mark.ray
@pytest.mark.usefixtures("ray_session")
def test_partition_values_cannot_escape_registry_or_scores(tmp_path_factory: pytest.TempPathFactory,
                                                           tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    base = tmp_path_factory.getbasetemp()
    data = tmp_path / "data" / "hostile.parquet"
    data.parent.mkdir()
    frame(HOSTILE).to_parquet(data, index=False)
    cwd = tmp_path / "deep" / "cwd"
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)  # relative escapes would land beside it
    registry, scores = tmp_path / "out" / "registry", tmp_path / "out" / "scores"
    etc_passwd = Path("/etc/passwd").stat().st_mtime_ns if Path("/etc/passwd").exists() else None
    before = _snapshot(base)

    trained = train(data, registry)
    assert trained.exit_code == 0, trained.stdout
    assert one_json(trained)["partitions"]["trained"] == len(HOSTILE)
    scored = score(data, registry, scores)
    assert scored.exit_code == 0, scored.stdout
    assert one_json(scored)["rows"]["scored"] == 40 * len(HOSTILE)

    after = _snapshot(base)
    new = [p for p in after if p not in before]
    assert new
    roots = (registry.resolve(), scores.resolve())
    for p in new:
        if p in (registry.parent, registry, scores):
            continue
        assert any(p.resolve().is_relative_to(r) for r in roots), p
        rel = p.relative_to(registry if p.is_relative_to(registry) else scores)
        for part in rel.parts:
            assert part not in HOSTILE, p
            assert part.isascii() and part.isprintable(), p
    changed = {p for p, t in before.items() if after.get(p) != t}
    assert changed <= {tmp_path}, changed  # it gained out/; nothing else was touched
    assert list(cwd.iterdir()) == []
    assert not (tmp_path / "escape").exists() and not (base / "escape").exists()
    assert not Path("/escape").exists() and not Path("/b").exists()
    if etc_passwd is not None:
        assert Path("/etc/passwd").stat().st_mtime_ns == etc_passwd

    # Every value round-trips exactly, in the registry and in the scores.
    listed = one_json(cli("models", "list", "--registry", registry, "--json"))
    assert sorted(m["partition"]["station"] for m in listed) == sorted(HOSTILE)
    out = ds.dataset(str(scores / "hostile"), partitioning="hive").to_table()
    assert sorted(set(out.column("station").to_pylist())) == sorted(HOSTILE)
    assert set(out.column("score_run_id").to_pylist()) == {one_json(scored)["run_id"]}


# ----------------------------------------------------------------------------- 3. prepare's origin


PREPARE = """import pandas as pd
from pathlib import Path

{top}

def prepare(df: pd.DataFrame) -> pd.DataFrame:
    return df.assign({column}=df["x1"] * 2)
"""


def _prepare_tree(root: Path, column: str, top: str = "") -> Path:
    (root / "jobs").mkdir(parents=True)
    (root / "jobs" / "transit.py").write_text(PREPARE.format(column=column, top=top))
    return root


def _job(path: Path, data: Path, registry: Path, prepare: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'[job]\nname = "origin"\n[data]\nsource = "{data}"\npartition_by = ["station"]\n'
                    f'target = "y"\n[pipeline]\nprepare = "{prepare}"\n[output]\nregistry = "{registry}"\n')
    return path


@pytest.mark.ray
@pytest.mark.usefixtures("ray_session")
def test_prepare_path_is_relative_to_the_working_directory(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "rows.parquet"
    frame(["a", "b"]).to_parquet(data, index=False)
    one = _prepare_tree(tmp_path / "one", "from_one")
    two = _prepare_tree(tmp_path / "two", "from_two")
    # Beside the spec file: not used (the path is relative to the working directory, not the spec).
    _prepare_tree(tmp_path / "specs", "from_spec_dir")
    # On sys.path, as a package and as a plain module of the same names: never imported instead.
    marker = tmp_path / "imported-marker"
    shadow = _prepare_tree(tmp_path / "shadow", "from_sys_path", top=f"Path({str(marker)!r}).touch()")
    (shadow / "jobs" / "__init__.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).touch()\n")
    (shadow / "transit.py").write_text((shadow / "jobs" / "transit.py").read_text())
    monkeypatch.syspath_prepend(str(shadow))
    modules = set(sys.modules)
    job = _job(tmp_path / "specs" / "job.toml", data, tmp_path / "registry", "jobs/transit.py:prepare")

    for cwd, column in ((one, "from_one"), (two, "from_two"), (one, "from_one")):
        monkeypatch.chdir(cwd)
        spec = manymodels.load_spec(job)
        assert spec.prepare_source == (cwd / "jobs" / "transit.py").read_text()
        prepare = load_prepare(spec)
        assert prepare is not None
        assert column in prepare(frame(["a"])).columns
        result = cli("train", "--job", job, "--force", "--json")
        assert result.exit_code == 0, (result.stdout, result.stderr)
        mv = one_json(cli("models", "show", "--job", job, "--partition", "station=a", "--json"))
        assert mv["features"] == ["x1", column]  # the workers ran this directory's code
    assert not marker.exists()
    assert not {m for m in set(sys.modules) - modules if "jobs" in m or "transit" in m}


@pytest.mark.parametrize("name", ["nope", "CONSTANT"])
def test_prepare_naming_a_missing_function_exits_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   name: str) -> None:
    data = tmp_path / "rows.parquet"
    frame(["a", "b"]).to_parquet(data, index=False)
    cwd = _prepare_tree(tmp_path / "cwd", "from_cwd", top="CONSTANT = 3")
    monkeypatch.chdir(cwd)
    registry = tmp_path / "registry"
    job = _job(tmp_path / "job.toml", data, registry, f"jobs/transit.py:{name}")
    result = cli("train", "--job", job, "--json")
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr == f"error: pipeline.prepare: jobs/transit.py defines no function {name!r}\n"
    assert not registry.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd", "job.toml", "rows.parquet"]


@pytest.mark.parametrize("name", ["../x", "a/b", "..", "/etc"])
def test_job_name_cannot_name_a_folder_outside_the_registry(tmp_path: Path, name: str) -> None:
    """``--job NAME`` for runs/models is a folder of the registry: only plain job names pass."""
    for args in (["models", "list"], ["runs", "list"], ["models", "rollback", "--partition", "k=a"]):
        result = CliRunner().invoke(app, [*args, "--job", name, "--registry", str(tmp_path / "reg")])
        assert result.exit_code == 2, result.output
        assert "neither a job spec file nor a job name" in result.stderr
    assert not (tmp_path / "reg").exists()
