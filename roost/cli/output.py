"""Output contract: human output on stderr (rich), ``--json`` prints one document on stdout."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

if TYPE_CHECKING:
    from rich.progress import Progress

    from roost.train import EpochStats

console = Console(stderr=True, highlight=False)

# The --json flag of every command: exactly one JSON document on stdout.
JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]


def emit_json(document: Any) -> None:
    sys.stdout.write(json.dumps(document, indent=2, default=str) + "\n")
    sys.stdout.flush()


def interactive(json_output: bool) -> bool:
    return not json_output and console.is_terminal


class EpochProgress:
    """A progress bar per epoch on a terminal; one line per epoch otherwise."""

    def __init__(self, show_bars: bool, quiet: bool = False) -> None:
        self.show_bars = show_bars
        self.quiet = quiet
        self._progress: Progress | None = None
        self._task: Any = None
        self._loss = 0.0

    def __enter__(self) -> EpochProgress:
        if self.show_bars:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self._progress = Progress(
                TextColumn("[bold]epoch {task.fields[epoch]}/{task.fields[epochs]}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f}"),
                TimeElapsedColumn(),
                console=console,
            )
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def epoch_started(self, epoch: int, epochs: int, batches: int) -> None:
        if self._progress is not None:
            self._task = self._progress.add_task(
                "train", total=batches, epoch=epoch, epochs=epochs, loss=0.0
            )

    def batch_done(self, loss: float) -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=1, loss=loss)

    def epoch_done(self, stats: EpochStats) -> None:
        if self.quiet:
            return
        marker = " *" if stats.improved else ""
        console.print(
            f"  epoch {stats.epoch}: train loss {stats.train_loss:.4f}"
            f" acc {stats.train_accuracy:.3f} | val loss {stats.val_loss:.4f}"
            f" acc {stats.val_accuracy:.3f}"
            f" | {stats.seconds:.1f}s{marker}"
        )
