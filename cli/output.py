"""What the CLI prints: tables for people on stdout, JSON for scripts (`--json`: valid JSON on
stdout and nothing else), progress and errors on stderr. Money for people is rounded to the
cent; JSON keeps the API's exact micro-USD."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from rich import progress as bar
from rich.console import Console
from rich.table import Table

# The client stays light: no import of the server's core for these constants.
MICROS_PER_USD = 1_000_000
MICROS_PER_CENT = 10_000
CENTS_PER_USD = 100
MIN_WRAP_WIDTH = 12


def when(rfc3339: str | None) -> str:
    """A time for people: to the second ('2026-11-22T08:36:35.199238Z' → '2026-11-22T08:36:35Z')."""
    return "" if rfc3339 is None else re.sub(r"\.\d+Z$", "Z", rfc3339)


def usd(micros: int) -> str:
    """Micro-USD as a person reads it, rounded to the cent (half away from zero):
    4_668_800 → '$4.67', -1_234_567_890 → '-$1,234.57'."""
    cents, rest = divmod(abs(micros), MICROS_PER_CENT)
    cents += 1 if 2 * rest >= MICROS_PER_CENT else 0
    dollars, cents = divmod(cents, CENTS_PER_USD)
    sign = "-" if micros < 0 and (dollars or cents) else ""
    return f"{sign}${dollars:,}.{cents:02d}"


def parse_usd(text: str) -> int:
    """'12.50', '$12.50' or '12' → micro-USD, exactly (no float on the way); ValueError otherwise."""
    digits = text.strip().removeprefix("$")
    whole, _, fraction = digits.partition(".")
    if not whole.isdigit() or not (fraction == "" or fraction.isdigit()) or len(fraction) > 6:
        raise ValueError(f"{text!r} is not an amount in USD with at most 6 decimals (like 12.50)")
    return int(whole) * MICROS_PER_USD + int(fraction.ljust(6, "0"))


class Output:
    """One command's output: JSON for scripts, or Rich tables for people."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.console = Console(soft_wrap=False, highlight=False)
        self.stderr = Console(stderr=True, highlight=False)

    def json(self, body: object) -> None:
        sys.stdout.write(json.dumps(body, indent=2, ensure_ascii=False) + "\n")
        sys.stdout.flush()

    def table(self, title: str | None, columns: list[str], rows: list[list[str]],
              right: tuple[str, ...] = (), wrap: tuple[str, ...] = ()) -> None:
        """`right`: the columns to align right (money, counts). Only the `wrap` columns (free
        text) wrap when the terminal is narrow: ids, times and money stay whole on one line."""
        table = Table(title=title, title_justify="left", header_style="bold")
        for name in columns:
            table.add_column(name, justify="right" if name in right else "left", overflow="fold",
                             no_wrap=name not in wrap, min_width=MIN_WRAP_WIDTH if name in wrap else None)
        for row in rows:
            table.add_row(*row)
        self.console.print(table)

    def fields(self, title: str | None, pairs: list[tuple[str, str]]) -> None:
        """A record as a two-column table: name, value."""
        table = Table(title=title, title_justify="left", show_header=False, box=None, padding=(0, 2, 0, 0))
        table.add_column(style="bold")
        table.add_column(overflow="fold")
        for name, value in pairs:
            table.add_row(name, value)
        self.console.print(table)

    def line(self, text: str) -> None:
        """A plain line for people (markup off: ids and notes print as they are)."""
        self.console.print(text, markup=False, soft_wrap=True)

    @contextmanager
    def progress(self, what: str, total: int | None = None) -> Iterator[Tracker]:
        """A progress bar (a spinner while the total is unknown) on stderr, shown only when
        stderr is a terminal and gone when the work ends."""
        progress = bar.Progress(bar.SpinnerColumn(), bar.TextColumn("{task.description}"), bar.BarColumn(),
                                bar.MofNCompleteColumn(), bar.TimeElapsedColumn(), console=self.stderr,
                                transient=True, disable=not self.stderr.is_terminal, redirect_stdout=False,
                                redirect_stderr=False)
        with progress:
            yield Tracker(progress, progress.add_task(what, total=total))


class Tracker:
    """The running progress bar of one piece of long work."""

    def __init__(self, progress: bar.Progress, task: bar.TaskID) -> None:
        self.progress = progress
        self.task = task

    def advance(self, steps: int = 1, description: str | None = None, total: int | None = None) -> None:
        changes: dict = {"advance": steps}
        if description is not None:
            changes["description"] = description
        if total is not None:
            changes["total"] = total
        self.progress.update(self.task, **changes)

    def say(self, text: str, stderr: bool = False) -> None:
        """A line of output while the bar runs. On a terminal that the bar shares, it goes
        above the bar; otherwise straight to its stream, untouched."""
        stream = sys.stderr if stderr else sys.stdout
        if not self.progress.disable and stream.isatty():
            self.progress.console.print(text, markup=False, highlight=False, soft_wrap=True)
        else:
            stream.write(text + "\n")
            stream.flush()


def error_line(message: str) -> None:
    """The one line a failure prints on stderr."""
    sys.stderr.write(f"error: {' '.join(message.split())}\n")
    sys.stderr.flush()
