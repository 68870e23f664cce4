"""``roost demo``: the whole loop locally, with a summary of every stage."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from roost.cli.context import state
from roost.cli.output import EpochProgress, JsonFlag, console, emit_json, interactive

if TYPE_CHECKING:
    from roost.demo import DemoReport


def demo(
    ctx: typer.Context,
    max_rows: Annotated[
        int | None, typer.Option(help="Train on a stratified sample (faster).", show_default=False)
    ] = None,
    epochs: Annotated[
        int | None, typer.Option(help="Max epochs (default: 10).", show_default=False)
    ] = None,
    keep_running: Annotated[
        bool, typer.Option(help="Leave MLflow and the model server running at the end.")
    ] = False,
    monitor: Annotated[
        bool, typer.Option(help="Show the monitoring loop instead (make monitor-demo).")
    ] = False,
    json_output: JsonFlag = False,
) -> None:
    """Run MLflow, train, gate, canary, serve and predict on this machine (loopback only)."""
    settings = state(ctx).settings(**{"data.max_rows": max_rows, "train.epochs": epochs})
    if monitor:
        from roost.cli.monitor import monitor_demo

        return monitor_demo(settings, json_output)

    def notify(message: str) -> None:
        if not json_output:
            console.print(f"[bold cyan]==>[/] {message}")

    from roost.demo import run_demo

    with EpochProgress(show_bars=interactive(json_output), quiet=json_output) as progress:
        report = run_demo(settings, notify, progress, keep_running=keep_running)
    if json_output:
        emit_json(report.to_dict())
    else:
        render(report, keep_running)


PROTOCOL_TITLES = {"v1": "REST v1", "v2": "REST v2", "grpc": "gRPC v2"}


def render(report: DemoReport, kept_running: bool = False) -> None:
    console.rule("roost demo summary")
    console.print(f"MLflow UI      {report.tracking_uri}")
    console.print(f"training run   {report.run_id}")
    console.print(
        f"test split     accuracy {report.test_accuracy:.4f} | macro-F1 {report.test_macro_f1:.4f}"
    )
    verdict = "passed" if report.gate_passed else "refused"
    console.print(
        f"registry       {report.model} v{report.version} -> @{report.alias} "
        f"(gate {verdict}: {report.gate_reason})"
    )
    console.print(f"champion       {report.model} v{report.champion_version}")
    for name, url in report.endpoints.items():
        console.print(f"{name:<14} {url}")
    table = Table(title=f"sample predictions of v{report.champion_version} (label / confidence)")
    table.add_column("text", overflow="fold", max_width=56)
    for protocol in report.predictions:
        table.add_column(PROTOCOL_TITLES.get(protocol, protocol))
    first = next(iter(report.predictions.values()), [])
    for i, row in enumerate(first):
        cells = [
            f"{report.predictions[p][i]['label']} {report.predictions[p][i]['confidence']:.2f}"
            for p in report.predictions
        ]
        table.add_row(row["text"], *cells)
    console.print(table)
    if report.rollout is not None:
        render_rollout(report.rollout)
    timing = Table(title="stage wall time")
    timing.add_column("stage")
    timing.add_column("seconds", justify="right")
    for s in report.stages:
        timing.add_row(s.name, f"{s.seconds:.1f}")
    timing.add_row("[bold]total[/]", f"[bold]{report.total_seconds:.1f}[/]")
    console.print(timing)
    if kept_running:
        console.print(
            "MLflow and the model servers keep running; `roost rollout down` and "
            "`roost mlflow down` stop them."
        )
    elif report.started_tracking:
        console.print("MLflow was stopped; `roost mlflow up` brings the same store back.")


def render_rollout(rollout: dict[str, Any]) -> None:
    """The canary's step table (the same one `roost rollout status` prints)."""
    from roost.cli.rollout import print_table, steps_table

    title = (
        f"canary of v{rollout['version']} against v{rollout['champion_before']}: "
        f"{rollout['outcome']}"
    )
    print_table(steps_table(rollout["steps"], title))
    traffic = rollout["traffic"]
    first = rollout.get("first_canary_answer_s")
    console.print(
        f"generated traffic: {traffic['requests']} requests, {traffic['failed']} failed; "
        f"first canary answer {first if first is not None else '-'}s after the rollout started"
    )
    if rollout["outcome"] != "promoted":
        console.print(f"[yellow]not promoted:[/] {rollout['reason']}")
