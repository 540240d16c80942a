"""Progress bars for long steps: rich in a terminal, nothing in tests and workers."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Protocol

Advance = Callable[[int], None]


class ProgressFactory(Protocol):
    """`with progress("stage 1", total) as advance: advance(1)`."""

    def __call__(self, description: str, total: int) -> AbstractContextManager[Advance]: ...


@contextlib.contextmanager
def no_progress(description: str, total: int) -> Iterator[Advance]:
    yield lambda n: None


class RichProgress:
    """One rich bar per long step (pretraining, sampling, each stage), on stderr."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
        )

    @contextlib.contextmanager
    def __call__(self, description: str, total: int) -> Iterator[Advance]:
        task = self._progress.add_task(description, total=total)
        self._progress.start()
        try:
            yield lambda n: self._progress.advance(task, n)
        finally:
            # a step that ends early (target reached, KL budget) shows as done, and its clock stops
            done = self._progress.tasks[task].completed
            self._progress.update(task, total=done, completed=done)
            self._progress.stop_task(task)
            self._progress.stop()
