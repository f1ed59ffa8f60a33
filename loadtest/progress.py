"""A rich progress bar for a run: requests ended (completed / failed) and elapsed time. Off when disabled."""
from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from loadtest.client import RequestRecord


class RunProgress:
    """`with RunProgress(enabled, label) as p:` then p.start(total) once and p.advance(record) per request."""

    def __init__(self, enabled: bool, label: str):
        self.enabled = enabled
        self.label = label
        self.num_ok = self.num_failed = 0
        self._progress: Progress | None = None
        self._task = None

    def __enter__(self) -> "RunProgress":
        if self.enabled:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("[green]{task.fields[ok]} ok[/] [red]{task.fields[failed]} failed[/]"),
                TimeElapsedColumn(), console=Console(stderr=True), transient=True)
            self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def start(self, total: int | None) -> None:
        self.num_ok = self.num_failed = 0
        if self._progress is not None:
            if self._task is not None:
                self._progress.remove_task(self._task)
            self._task = self._progress.add_task(self.label, total=total, ok=0, failed=0)

    def advance(self, record: RequestRecord) -> None:
        if record.ok:
            self.num_ok += 1
        else:
            self.num_failed += 1
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, advance=1, ok=self.num_ok, failed=self.num_failed)
