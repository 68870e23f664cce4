"""``roost promote`` and ``roost registry ...``: the MLflow Model Registry."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from roost.cli.context import state
from roost.cli.output import JsonFlag, console, emit_json

if TYPE_CHECKING:
    from roost.config import Settings
    from roost.registry import Registry

app = typer.Typer(no_args_is_help=True, help="Inspect versions and move aliases in the registry.")
alias_app = typer.Typer(no_args_is_help=True, help="Set or delete a registered model alias.")
app.add_typer(alias_app, name="alias")

ModelOpt = Annotated[
    str | None,
    typer.Option("--model", help="Registered model (default: sentiment).", show_default=False),
]


def promote(
    ctx: typer.Context,
    run_id: Annotated[
        str | None,
        typer.Option(help="Training run to register (default: the latest).", show_default=False),
    ] = None,
    to: Annotated[
        str | None,
        typer.Option(
            help="Alias to move if the gate passes (default: champion).", show_default=False
        ),
    ] = None,
    metric: Annotated[
        str | None, typer.Option(help="Gate metric: macro_f1 or accuracy.", show_default=False)
    ] = None,
    min_improvement: Annotated[
        float | None,
        typer.Option(help="Required gain over the champion (default: 0).", show_default=False),
    ] = None,
    model: ModelOpt = None,
    json_output: JsonFlag = False,
) -> None:
    """Register a run's model and move the champion alias to it if it beats the champion."""
    settings = state(ctx).settings(
        **{
            "registry.gate_metric": metric,
            "registry.min_improvement": min_improvement,
            "registry.model_name": model,
        }
    )
    from roost import registry as reg

    result = reg.promote(settings, run_id=run_id, alias=to)
    if json_output:
        emit_json(result.summary())
        return
    d = result.decision
    verdict = "[bold green]PASSED[/]" if d.passed else "[bold yellow]REFUSED[/]"
    console.print(
        f"{result.model_name} v{result.version} (run {result.run_id}): gate {verdict} - {d.reason}"
    )
    console.print(f"alias [bold]{result.alias}[/] -> v{result.version}")


def _registry(settings: Settings) -> Registry:
    from roost import tracking
    from roost.registry import Registry

    return Registry(tracking.use(settings), settings.registry.model_name)


@app.command("list")
def list_versions(
    ctx: typer.Context, model: ModelOpt = None, json_output: JsonFlag = False
) -> None:
    """List the versions of a registered model with aliases and gate results."""
    settings = state(ctx).settings(**{"registry.model_name": model})
    registry = _registry(settings)
    aliases = registry.aliases()
    rows = []
    for v in registry.versions():
        tags = dict(v.tags or {})
        rows.append(
            {
                "version": str(v.version),
                "aliases": sorted(a for a, ver in aliases.items() if ver == str(v.version)),
                "run_id": v.run_id,
                "gate": tags.get("roost.gate.decision"),
                "score": tags.get("roost.gate.candidate_score"),
                "rollout": tags.get("roost.rollout"),
                "created": v.creation_timestamp,
            }
        )
    if json_output:
        emit_json({"model": registry.name, "aliases": aliases, "versions": rows})
        return
    table = Table(title=f"registered model {registry.name}")
    for column in ("version", "aliases", "gate", "score", "rollout", "run_id"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row["version"], ", ".join(row["aliases"]), row["gate"] or "", row["score"] or "",
            row["rollout"] or "", row["run_id"] or "",
        )  # fmt: skip
    console.print(table)


@alias_app.command("set")
def alias_set(
    ctx: typer.Context,
    alias: Annotated[str, typer.Argument(help="Alias, e.g. challenger.")],
    version: Annotated[str, typer.Argument(help="Model version.")],
    model: ModelOpt = None,
) -> None:
    """Point an alias at a version (e.g. `challenger` to start a rollout)."""
    settings = state(ctx).settings(**{"registry.model_name": model})
    registry = _registry(settings)
    registry.get_version(version)
    registry.set_alias(alias, version)
    console.print(f"{registry.name}@{alias} -> v{version}")


@alias_app.command("delete")
def alias_delete(
    ctx: typer.Context,
    alias: Annotated[str, typer.Argument(help="Alias to delete.")],
    model: ModelOpt = None,
) -> None:
    """Delete an alias (no-op if absent)."""
    settings = state(ctx).settings(**{"registry.model_name": model})
    registry = _registry(settings)
    registry.delete_alias(alias)
    console.print(f"{registry.name}@{alias} deleted")
