"""The ``manymodels`` command line: thin typer commands over the Python API.

Each command parses its flags, calls the library and prints either a short human summary or, with
``--json``, exactly one JSON object on stdout. Bad usage, spec or input exits 2 with a one-line
error on stderr; a run with too many failed partitions exits 1.
"""

from __future__ import annotations

import atexit
import functools
import json
import math
import os
import re
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Column, Table

    from manymodels.registry import Registry

# Only typer is imported with this module: `manymodels --help` and a bad flag answer at once. Each
# command imports what it uses (pandas, pyarrow, Ray and LightGBM come with the library modules).

__all__ = ["app", "main"]

# rich_markup_mode=None: plain help and usage errors. Typer's Rich formatting imports Markdown support
# (about 0.15 s, half of what `manymodels --help` would take); our own output still uses Rich.
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None,
                  help="Train and batch-score one LightGBM model per partition, fanned out with Ray.")
runs_app = typer.Typer(no_args_is_help=True, help="Past train and score runs.")
models_app = typer.Typer(no_args_is_help=True, help="The model registry.")
app.add_typer(runs_app, name="runs")
app.add_typer(models_app, name="models")


@functools.cache
def _console(stderr: bool = False) -> Console:
    """The console for stdout (or stderr), made on first use.

    markup=False: messages, partition values and reasons hold user text ("[/]" would crash Rich's
    markup parser, "[bogus]" would vanish); styling goes through Text instead. The console writes to
    whatever ``sys.stdout``/``sys.stderr`` is when it prints, so one made once serves every call.
    """
    from rich.console import Console

    return Console(stderr=stderr, soft_wrap=True, markup=False)


def _out() -> Console:
    return _console(False)


def _err() -> Console:
    return _console(True)


JobOpt = Annotated[Path | None, typer.Option("--job", help="Job spec TOML file.", dir_okay=False)]
DataOpt = Annotated[str | None, typer.Option("--data", help="Input data URL (overrides data.source).")]
RegistryOpt = Annotated[str | None, typer.Option(
    "--registry", help="Registry URL (overrides output.registry).")]
AddressOpt = Annotated[str | None, typer.Option(
    "--address", help="Ray to join: auto, HOST:PORT or ray://HOST:PORT (default: RAY_ADDRESS, else "
                      "a new embedded local Ray).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
JobRefOpt = Annotated[str | None, typer.Option("--job", help="Job spec file or job name.")]


def _fail(message: str, code: int = 2) -> typer.Exit:
    from rich.text import Text

    _err().print(Text.assemble(("error:", "bold red"), f" {message}"), highlight=False)
    return typer.Exit(code)


@contextmanager
def _errors() -> Iterator[None]:
    """Turn the library's input errors into one line on stderr and exit code 2."""
    from manymodels.data import InputError
    from manymodels.engine import EngineError
    from manymodels.registry import RegistryError
    from manymodels.spec import SpecError
    from manymodels.storage import StorageError

    try:
        yield
    except (SpecError, InputError, StorageError, RegistryError, EngineError) as exc:
        raise _fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None


@contextmanager
def _stdout_to_stderr(enabled: bool) -> Iterator[None]:
    """While a run works, send what would reach stdout (Ray's forwarded worker output, a user's
    prints in ``prepare``, native libraries) to stderr, so ``--json`` prints one object and nothing
    else on stdout."""
    if not enabled:
        yield
        return
    sys.stdout.flush()
    try:
        saved: int | None = os.dup(1)
        os.dup2(2, 1)
    except OSError:
        saved = None
    real = sys.stdout
    sys.stdout = sys.stderr
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stdout = real
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)


def _strict(obj: Any) -> Any:
    """``obj`` with NaN and infinities as ``None``: bare ``NaN`` is not JSON, strict parsers reject it."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_strict(v) for v in obj]
    return obj


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(_strict(obj), default=str, allow_nan=False) + "\n")
    sys.stdout.flush()


def _split_cols(value: str | None) -> list[str] | None:
    return [c.strip() for c in value.split(",") if c.strip()] if value else None


def _registry_for(job: str | None, registry: str | None) -> tuple[Registry, str | None]:
    """The registry (and job name) named by ``--job`` (a spec file or a name) and ``--registry``."""
    from manymodels.registry import Registry
    from manymodels.spec import SpecError, load_spec

    name = job
    url = registry
    if job and (job.endswith(".toml") or Path(job).is_file()):
        spec = load_spec(job)
        name = spec.name
        url = url or spec.output.registry
    elif name and not re.fullmatch(r"[a-z0-9_-]{1,64}", name):  # a name is a folder of the registry
        raise SpecError(f"--job {name!r} is neither a job spec file nor a job name ([a-z0-9_-]+)")
    return Registry(url or "registry"), name


@app.command()
def train(
    job: JobOpt = None,
    data: DataOpt = None,
    partition_by: Annotated[str | None, typer.Option(
        "--partition-by", help="Partition key column(s), comma-separated.")] = None,
    target: Annotated[str | None, typer.Option("--target", help="Target column.")] = None,
    registry: RegistryOpt = None,
    address: AddressOpt = None,
    only: Annotated[list[str] | None, typer.Option(
        "--only", help="Train only partitions with COL=VALUE (repeatable).")] = None,
    limit: Annotated[int | None, typer.Option("--limit", help="Train at most N partitions.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Retrain unchanged partitions too.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Train one model per partition and register the new versions."""
    from rich.text import Text

    from manymodels.train import train as run_train

    with _errors(), _stdout_to_stderr(as_json):
        summary = run_train(job, data=data, partition_by=_split_cols(partition_by), target=target,
                            registry=registry, address=address, only=only, limit=limit, force=force)
    for warning in summary.warnings:  # once per run, whatever the number of partitions concerned
        _err().print(f"warning: {warning}", highlight=False)
    if as_json:
        _print_json(summary.to_dict())
    else:
        s = summary
        _out().print(Text.assemble((s.job, "bold"), f" run {s.run_id}: {s.status} in {s.wall_s:.1f}s — "
                  f"{s.total} partitions: {s.trained} trained ({s.promoted} promoted), "
                  f"{s.skipped} skipped, {s.failed} failed"), highlight=False)
        for f in s.failures[:10]:
            _out().print(f"  failed {json.dumps(f['partition'])}: {f['reason']}", highlight=False)
        if len(s.failures) > 10:
            _out().print(f"  … and {len(s.failures) - 10} more (manymodels runs show {s.run_id})")
        _out().print(f"registry: {s.registry}   cost: ${s.cost.total_usd:.4f}", highlight=False)
    raise typer.Exit(summary.exit_code)


@app.command()
def score(
    job: JobOpt = None,
    data: DataOpt = None,
    output: Annotated[str | None, typer.Option(
        "--output", help="Scores URL (overrides output.scores).")] = None,
    registry: RegistryOpt = None,
    address: AddressOpt = None,
    partition_by: Annotated[str | None, typer.Option(
        "--partition-by", help="Partition key column(s), comma-separated (without --job).")] = None,
    target: Annotated[str | None, typer.Option("--target", help="Target column (without --job).")] = None,
    model_version: Annotated[int | None, typer.Option(
        "--model-version", help="Score with this version of every partition, not its champion.")] = None,
    train_run: Annotated[str | None, typer.Option(
        "--train-run", help="Score with the versions this train run produced.")] = None,
    run_id: Annotated[str | None, typer.Option(
        "--run-id", help="Re-run this score run id (its rows are replaced atomically).")] = None,
    only: Annotated[list[str] | None, typer.Option(
        "--only", help="Score only partitions with COL=VALUE (repeatable).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Score every row with its partition's champion and write Parquet."""
    from rich.text import Text

    from manymodels.score import score as run_score

    with _errors(), _stdout_to_stderr(as_json):
        summary = run_score(job, data=data, output=output, registry=registry, address=address,
                            partition_by=_split_cols(partition_by), target=target,
                            model_version=model_version, train_run=train_run, run_id=run_id, only=only)
    if as_json:
        _print_json(summary.to_dict())
    else:
        s = summary
        _out().print(Text.assemble((s.job, "bold"), f" run {s.run_id}: {s.status} in {s.wall_s:.1f}s — "
                  f"{s.input_rows:,} rows: {s.scored_rows:,} scored in {s.partitions_scored} partitions, "
                  f"{s.unscored_rows:,} unscored"), highlight=False)
        for u in s.unscored[:10]:
            _out().print(f"  unscored {json.dumps(u['partition'])} ({u['rows']} rows): {u['reason']}",
                      highlight=False)
        if len(s.unscored) > 10:
            _out().print(f"  … and {len(s.unscored) - 10} more (manymodels runs show {s.run_id})")
        _out().print(f"output: {s.output}", highlight=False)
    raise typer.Exit(summary.exit_code)


def _ident(header: str) -> Column:
    """A column of identifiers (run ids, partitions): wrapped on narrow terminals, never cut with "…"."""
    from rich.table import Column

    return Column(header, overflow="fold", min_width=24)


def _runs_table(rows: list[dict[str, Any]]) -> Table:
    from rich.table import Table

    table = Table(_ident("run_id"), "job", "kind", "status", "started_at", "partitions / rows", "failed",
                  "wall_s", "total_usd")
    for r in rows:
        parts = r.get("partitions") or {}
        rws = r.get("rows") or {}
        size = parts.get("total", rws.get("input", "")) if isinstance(parts, dict) else ""
        failed = parts.get("failed", rws.get("unscored", "")) if isinstance(parts, dict) else ""
        table.add_row(r.get("run_id", ""), r.get("job", ""), r.get("kind", ""), r.get("status", ""),
                      str(r.get("started_at", ""))[:19], str(size), str(failed),
                      str(r.get("wall_s", "")), f"{(r.get('cost') or {}).get('total_usd', 0):.4f}")
    return table


@runs_app.command("list")
def runs_list(job: JobRefOpt = None, registry: RegistryOpt = None, as_json: JsonOpt = False) -> None:
    """List past runs, newest first."""
    with _errors():
        reg, name = _registry_for(job, registry)
        rows = reg.runs(name)
    if as_json:
        _print_json([{k: v for k, v in r.items() if k not in ("spec", "environment")} for r in rows])
    elif not rows:
        _out().print(f"no runs in {reg.url}")
    else:
        _out().print(_runs_table(rows))


@runs_app.command("show")
def runs_show(run_id: Annotated[str, typer.Argument(help="The run id.")], registry: RegistryOpt = None,
              as_json: JsonOpt = False) -> None:
    """Show one run: counts, failures with reasons, cost and its most expensive partitions."""
    from rich.table import Table

    from manymodels.registry import Registry

    with _errors():
        reg = Registry(registry or "registry")
        record, parts = reg.run(run_id)
    part_rows: list[dict[str, Any]] = []
    if parts is not None:
        for r in parts.to_dict("records"):
            row = {str(k): (None if isinstance(v, float) and v != v else v) for k, v in r.items()}
            row["partition"] = json.loads(str(row["partition"]))
            part_rows.append(row)
    if as_json:
        # The contract's "partitions" here is the per-partition list; a train summary's counts object
        # of the same name moves to "partition_counts".
        counts = record.get("partitions")
        _print_json({**record, "partition_counts": counts, "partitions": part_rows})
        return
    _out().print(_runs_table([record]))
    cost = record.get("cost") or {}
    if cost:
        _out().print(f"cost: total ${cost.get('total_usd', 0):.6f} = attributed "
                  f"${cost.get('attributed_usd', 0):.6f} + overhead ${cost.get('overhead_usd', 0):.6f}; "
                  f"cpu_seconds {cost.get('cpu_seconds', 0):.1f},"
                  f" gpu_seconds {cost.get('gpu_seconds', 0):.1f}, utilisation "
                  f"{cost.get('utilisation', 0):.0%}", highlight=False)
    failures = record.get("failures") or record.get("unscored") or []
    for f in failures[:20]:
        _out().print(f"  {json.dumps(f.get('partition'))}: {f.get('reason')}", highlight=False)
    if part_rows and "cost_usd" in part_rows[0]:
        top = sorted(part_rows, key=lambda r: r.get("cost_usd") or 0.0, reverse=True)[:10]
        table = Table(_ident("partition"), "status", "rows", "wall_s", "cpu_seconds", "gpu_seconds",
                      "cost_usd", title="most expensive partitions")
        for t in top:
            table.add_row(json.dumps(t["partition"]), t["status"], str(t["rows"]), f"{t['wall_s']:.3f}",
                          f"{t['cpu_seconds']:.3f}", f"{t['gpu_seconds']:.3f}", f"{t['cost_usd']:.8f}")
        _out().print(table)


def _parse_partition(items: list[str] | None) -> dict[str, str] | None:
    if not items:
        return None
    parsed: dict[str, str] = {}
    for item in items:
        col, sep, value = item.partition("=")
        if not sep:
            raise _fail(f"--partition {item!r} must be COL=VALUE")
        parsed[col] = value
    return parsed


PartitionOpt = Annotated[list[str] | None, typer.Option(
    "--partition", help="COL=VALUE of the partition (repeat for several key columns).")]


@models_app.command("list")
def models_list(job: JobRefOpt = None, registry: RegistryOpt = None, partition: PartitionOpt = None,
                all_versions: Annotated[bool, typer.Option("--all", help="Every version, not only "
                                                           "champions.")] = False,
                as_json: JsonOpt = False) -> None:
    """List each partition's champion (or every version with --all)."""
    from rich.table import Table

    with _errors():
        reg, name = _registry_for(job, registry)
        jobs = [name] if name else reg.jobs()
        models = [m for j in jobs for m in reg.list(j, partition=_parse_partition(partition),
                                                    all_versions=all_versions)]
    if as_json:
        _print_json([m.to_dict() for m in models])
        return
    table = Table("job", _ident("partition"), "version", "status", "metric", "rows", _ident("run_id"),
                  "trained_at")
    for m in models[:200]:
        value = "" if m.metric_value is None else f"{m.metric}={m.metric_value:.4g}"
        table.add_row(m.job, json.dumps(m.partition), str(m.version), m.status, value, str(m.rows),
                      m.run_id, m.trained_at[:19])
    _out().print(table)
    if len(models) > 200:
        _out().print(f"… {len(models) - 200} more (use --json or --partition)")


def _one_job(reg: Registry, name: str | None) -> str:
    from manymodels.registry import RegistryError

    if name:
        return name
    jobs = reg.jobs()
    if len(jobs) != 1:
        raise RegistryError(f"the registry holds {len(jobs)} jobs: pass --job")
    return jobs[0]


@models_app.command("show")
def models_show(partition: PartitionOpt = None, job: JobRefOpt = None, registry: RegistryOpt = None,
                version: Annotated[int | None, typer.Option("--version", help="A version (default: "
                                                            "the champion).")] = None,
                as_json: JsonOpt = False) -> None:
    """Show one partition's champion (or a version): metrics, lineage and its model_uri."""
    from rich.text import Text

    with _errors():
        reg, name = _registry_for(job, registry)
        parts = _parse_partition(partition)
        if not parts:
            raise _fail("models show needs --partition COL=VALUE")
        mv = reg.get(_one_job(reg, name), parts, version)
    if as_json:
        _print_json(mv.to_dict())
        return
    for k, v in mv.to_dict().items():
        _out().print(Text.assemble((k, "bold"), f": {json.dumps(v) if isinstance(v, dict | list) else v}"),
                  highlight=False)


@models_app.command("promote")
def models_promote(version: Annotated[int, typer.Option("--version", help="The version to make champion.")],
                   partition: PartitionOpt = None, job: JobRefOpt = None, registry: RegistryOpt = None,
                   as_json: JsonOpt = False) -> None:
    """Make a version the partition's champion (the current champion is archived)."""
    _change(lambda reg, name, parts: reg.promote(name, parts, version), partition, job, registry, as_json)


@models_app.command("rollback")
def models_rollback(partition: PartitionOpt = None, job: JobRefOpt = None, registry: RegistryOpt = None,
                    as_json: JsonOpt = False) -> None:
    """Restore the partition's previous good version as champion."""
    _change(lambda reg, name, parts: reg.rollback(name, parts), partition, job, registry, as_json)


def _change(action: Callable[[Registry, str, dict[str, str]], Any], partition: list[str] | None,
            job: str | None, registry: str | None, as_json: bool) -> None:
    with _errors():
        reg, name = _registry_for(job, registry)
        parts = _parse_partition(partition)
        if not parts:
            raise _fail("needs --partition COL=VALUE")
        mv = action(reg, _one_job(reg, name), parts)
    if as_json:
        _print_json(mv.to_dict())
    else:
        _out().print(f"{json.dumps(mv.partition)}: champion is now version {mv.version}", highlight=False)


@models_app.command("gc")
def models_gc(keep: Annotated[int, typer.Option("--keep", help="Versions to keep per partition besides "
                                                "its champion (the newest ones).")],
              job: JobRefOpt = None, registry: RegistryOpt = None,
              dry_run: Annotated[bool, typer.Option("--dry-run", help="Only say what would be removed.")]
              = False,
              as_json: JsonOpt = False) -> None:
    """Remove old versions (never a champion, nor one a score run of the last 7 days used) and model
    files that no version names (killed runs)."""
    with _errors():
        reg, name = _registry_for(job, registry)
        report = reg.gc(_one_job(reg, name), keep, dry_run=dry_run)
    if as_json:
        _print_json(report.to_dict())
        return
    verb = "would remove" if dry_run else "removed"
    _out().print(f"{report.job}: {verb} {report.removed} versions and {report.orphan_files_removed} orphaned "
              f"model files ({report.bytes_freed} bytes); {report.kept} versions kept", highlight=False)


@app.command()
def demo(
    stations: Annotated[int, typer.Option(help="How many stations (partitions) to generate.")] = 500,
    days: Annotated[int, typer.Option(help="Days of hourly history per station.")] = 28,
    address: AddressOpt = None,
) -> None:
    """Write sample transit data under partitions/, train and score it locally, say where outputs are."""
    from manymodels.demo import run_demo

    with _errors():
        code = run_demo(stations=stations, days=days, address=address, console=_out())
    raise typer.Exit(code)


def main() -> None:
    """Console entry point: run the command, then leave without tearing the interpreter down."""
    try:
        app()
    except SystemExit as exc:
        _exit_now(exc.code)
    _exit_now(0)


def _exit_now(code: object) -> NoReturn:
    """Exit with ``code`` (as ``SystemExit(code)`` would) once the command has finished.

    A normal exit then frees every object of pandas, pyarrow, LightGBM and Ray's core worker one by
    one: 0.3 to 0.8 s after a run, longer than anything the run itself still does. Nothing of ours
    needs that teardown: the run's files are written and closed, Ray's processes have exited
    (``Engine`` shuts them down before the command returns), and the exit handlers that a normal
    exit runs (logging, temporary files, Ray's own) are run here first. Skipping the teardown also
    means no library's native thread can abort the process during it. With another thread still
    running (none of ours is), the normal exit waits for it, so it is taken instead.
    """
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:  # SystemExit("message"): printed, exit 1
        print(code, file=sys.stderr)
        status = 1
    if any(t is not threading.main_thread() and not t.daemon for t in threading.enumerate()):
        sys.exit(status)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with suppress(OSError, ValueError):  # a closed pipe (`manymodels ... | head`) or stream
            stream.flush()
    os._exit(status)
