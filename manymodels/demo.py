"""``manymodels demo``: sample transit data, a full train (and score) run, and where to look next."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from manymodels.synth import make_transit, score_frame, write_transit

__all__ = ["run_demo"]

JOB = Path("jobs/transit.toml")


def run_demo(*, stations: int = 500, days: int = 28, address: str | None = None,
             console: Console | None = None) -> int:
    """Write the demo data, train and score the demo job; return the exit code."""
    from manymodels.score import score
    from manymodels.spec import SpecError, load_spec
    from manymodels.train import train

    console = console or Console()
    if not JOB.is_file():
        raise SpecError(f"{JOB} not found: run the demo from the manymodels project folder")
    spec = load_spec(JOB)
    hours = 24 * days
    history = make_transit(stations, hours)
    write_transit(history, spec.data.source, layout="hive")
    tonight = "partitions/transit-tonight"
    write_transit(score_frame(stations, 24, after_hours=hours), tonight, layout="flat", files=2)
    console.print(f"wrote {len(history):,} rows for {stations} stations to {spec.data.source}/ "
                  f"and tonight's rows to {tonight}/")
    summary = train(spec, address=address)
    console.print(f"trained {summary.job}: {summary.trained} trained, {summary.promoted} promoted, "
                  f"{summary.skipped} skipped, {summary.failed} failed in {summary.wall_s:.1f}s "
                  f"(run {summary.run_id})", highlight=False)
    scored = score(spec, data=tonight, address=address)
    console.print(f"scored {scored.input_rows:,} rows of tonight's data: {scored.scored_rows:,} scored, "
                  f"{scored.unscored_rows:,} unscored in {scored.wall_s:.1f}s (run {scored.run_id})",
                  highlight=False)
    dataset = str(Path(scored.output).parent)
    sql = (f"SELECT station, ts, prediction, model_version FROM read_parquet('{dataset}/*/*.parquet', "
           f"hive_partitioning = true) WHERE score_run_id = '{scored.run_id}' LIMIT 10")
    console.print(
        f"\nregistry: {summary.registry}\nscores:   {scored.output}\n\n"
        f"query the scores with DuckDB (pip install duckdb; `make demo` installs it):\n"
        f"  .venv/bin/python -c \"import duckdb; print(duckdb.sql(\\\"{sql}\\\"))\"\n"
        f"or with pandas:  pandas.read_parquet('{dataset}')\n\n"
        f"next: .venv/bin/manymodels models list --job {JOB}\n"
        f"      .venv/bin/manymodels runs show {summary.run_id}", highlight=False)
    return max(summary.exit_code, scored.exit_code)
