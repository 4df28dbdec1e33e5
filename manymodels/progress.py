"""A progress bar for long runs: partitions done / total, failures, elapsed, ETA (terminals only)."""

from __future__ import annotations

import sys
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

__all__ = ["RunProgress"]


class RunProgress:
    """Shows progress on stderr when it is a terminal (or when forced); otherwise does nothing.

    Args:
        label: what is being done, e.g. ``"train transit-delays"``.
        total: partitions in the run.
        enabled: ``None`` to decide by whether stderr is a terminal.
    """

    def __init__(self, label: str, total: int, enabled: bool | None = None) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.total = total
        self.label = label
        self._progress: Progress | None = None
        self._task: TaskID | None = None

    def __enter__(self) -> RunProgress:
        if self.enabled:
            self._progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("[red]{task.fields[failed]} failed"), TimeElapsedColumn(),
                TextColumn("ETA"), TimeRemainingColumn(),
                console=Console(stderr=True), transient=False)
            self._progress.start()
            self._task = self._progress.add_task(self.label, total=self.total, failed=0)
        return self

    def update(self, done: int, failed: int) -> None:
        """Set the counts of finished (any outcome) and failed partitions."""
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=done, failed=failed)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._progress is not None:
            self._progress.stop()
