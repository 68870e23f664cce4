"""``roost mlflow up|down|status|serve``: the tracking server."""

from __future__ import annotations

import os
from typing import Annotated
from urllib.parse import urlsplit, urlunsplit

import typer

from roost.cli.context import state
from roost.cli.output import JsonFlag, console, emit_json
from roost.errors import TrackingUnavailable

app = typer.Typer(no_args_is_help=True, help="Run and inspect the MLflow tracking server.")


@app.command()
def up(ctx: typer.Context, json_output: JsonFlag = False) -> None:
    """Start the embedded MLflow server in the background (or reuse the configured one)."""
    from roost import tracking

    settings = state(ctx).settings()
    if settings.tracking.uri:
        tracking.ensure_reachable(settings.tracking.uri)
        doc = {"uri": settings.tracking.uri, "embedded": False, "pid": None}
    else:
        server = tracking.up(settings)
        doc = {
            "uri": server.uri,
            "embedded": True,
            "pid": server.pid,
            "backend_store_uri": server.backend_store_uri,
            "artifacts_destination": server.artifacts_destination,
            "log_file": server.log_file,
        }
    if json_output:
        emit_json(doc)
    else:
        where = "embedded" if doc["embedded"] else "external"
        console.print(f"MLflow ({where}) at [bold]{doc['uri']}[/] (UI and API)")


@app.command()
def down(ctx: typer.Context, json_output: JsonFlag = False) -> None:
    """Stop the embedded MLflow server (its store stays; `up` brings it back)."""
    from roost import tracking

    stopped = tracking.down(state(ctx).settings())
    if json_output:
        emit_json({"stopped": stopped is not None, "pid": stopped.pid if stopped else None})
    elif stopped:
        console.print(f"stopped MLflow server pid {stopped.pid} ({stopped.uri})")
    else:
        console.print("no embedded MLflow server was running")


@app.command()
def status(ctx: typer.Context, json_output: JsonFlag = False) -> None:
    """Show where the tracking server is and whether it answers /health."""
    from roost import tracking

    settings = state(ctx).settings()
    recorded = tracking.read_state(settings)
    uri = settings.tracking.uri or (recorded.uri if recorded else None)
    healthy = bool(uri) and tracking.healthy(uri)  # type: ignore[arg-type]
    doc = {
        "uri": uri,
        "healthy": healthy,
        "embedded": settings.tracking.uri is None,
        "pid": recorded.pid if recorded and settings.tracking.uri is None else None,
    }
    if json_output:
        emit_json(doc)
    elif uri is None:
        console.print("no tracking server configured or running (run `roost mlflow up`)")
    else:
        console.print(f"{uri}: {'healthy' if healthy else 'NOT reachable'}")
    if not healthy:
        raise typer.Exit(TrackingUnavailable.exit_code)


@app.command()
def serve(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="Bind address.")] = "0.0.0.0",
    port: Annotated[int, typer.Option(help="Port.")] = 5000,
    backend_store_uri: Annotated[
        str | None, typer.Option(help="SQLAlchemy URI (e.g. postgresql://...); default SQLite.")
    ] = None,
    artifacts_destination: Annotated[
        str | None, typer.Option(help="Artifact root, e.g. s3://bucket/mlflow.")
    ] = None,
    workers: Annotated[int, typer.Option(help="Server worker processes.")] = 2,
    allowed_hosts: Annotated[
        str | None, typer.Option(help="Host headers to accept (comma-separated).")
    ] = None,
) -> None:
    """Run the MLflow server in the foreground (the container entry point)."""
    from roost import tracking

    settings = state(ctx).settings(
        **{
            "tracking.backend_store_uri": backend_store_uri,
            "tracking.artifacts_destination": artifacts_destination,
        }
    )
    argv = tracking.server_argv(
        settings.tracking,
        tracking.backend_store_uri(settings),
        tracking.artifacts_destination(settings),
        host,
        port,
        workers=workers,
        allowed_hosts=allowed_hosts,
    )
    console.print("exec: " + " ".join(_redact(a) for a in argv))
    os.execve(argv[0], argv, {**os.environ, **tracking.SERVER_ENV})


def _redact(arg: str) -> str:
    """``postgresql://user:secret@host/db`` -> ``postgresql://user:***@host/db`` for printing."""
    parts = urlsplit(arg)
    if parts.scheme and parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
        return urlunsplit(parts._replace(netloc=netloc))
    return arg
