"""Progress bars for long stages (rich), silent under --quiet."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from . import distributed

Advance = Callable[..., None]


class Reporter:
    def __init__(self, quiet: bool = False, console: Console | None = None) -> None:
        # In a distributed run only rank 0 talks to the user.
        self.quiet = quiet or not distributed.is_main()
        self.console = console or Console(stderr=True)

    @contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Advance]:
        """A progress bar; the yielded callable advances it, and given a `note` (a loss, a rate)
        shows it after the description."""
        if self.quiet:
            yield lambda note=None: None
            return
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn()]
        with Progress(*columns, console=self.console, transient=False) as progress:
            task_id = progress.add_task(description, total=total)

            def advance(note: str | None = None) -> None:
                progress.update(task_id, advance=1, description=f"{description} ({note})" if note else description)

            yield advance

    def say(self, message: str, style: str | None = None) -> None:
        # Plain text: messages carry paths and lists such as "mi-prun[renyi]" that rich would read as markup.
        if not self.quiet:
            self.console.print(message, style=style, markup=False, highlight=False)

    def warn(self, message: str) -> None:
        """A warning about the numbers a run will give: shown even under --quiet."""
        print(f"WARNING: {message}", file=sys.stderr, flush=True)


QUIET = Reporter(quiet=True)
