"""``roost serve`` (the KServe predictor) and ``roost predict`` (its client)."""

from __future__ import annotations

import gc
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from roost import client
from roost.cli.context import state
from roost.cli.output import JsonFlag, console, emit_json
from roost.errors import ConfigError
from roost.rollout import variant as pin


def serve(
    ctx: typer.Context,
    model_uri: Annotated[
        str | None,
        typer.Option(
            help="models:/NAME@ALIAS, models:/NAME/VERSION or a local model directory "
            "[default: models:/sentiment@champion].",
            show_default=False,
        ),
    ] = None,
    model_name: Annotated[
        str | None,
        typer.Option(help="Name on the endpoints (default: sentiment).", show_default=False),
    ] = None,
    http_port: Annotated[
        int | None, typer.Option(help="REST port (default: 8080).", show_default=False)
    ] = None,
    grpc_port: Annotated[
        int | None, typer.Option(help="gRPC port (default: 8081).", show_default=False)
    ] = None,
    model_version: Annotated[
        str | None,
        typer.Option(help="Version to report (a local directory has none).", show_default=False),
    ] = None,
    max_body_bytes: Annotated[
        int | None, typer.Option(help="Request body limit (default: 1 MiB).", show_default=False)
    ] = None,
    max_batch_size: Annotated[
        int | None, typer.Option(help="Texts per forward pass (default: 64).", show_default=False)
    ] = None,
    max_batch_wait_ms: Annotated[
        float | None,
        typer.Option(help="Batch fill wait under load (default: 2).", show_default=False),
    ] = None,
    max_texts_per_request: Annotated[
        int | None,
        typer.Option(
            help="Texts per request; more get HTTP 413 (default: 8192).", show_default=False
        ),
    ] = None,
    repository_extension: Annotated[
        bool | None,
        typer.Option(
            "--repository-extension/--no-repository-extension",
            help="Serve model load/unload over REST and gRPC, behind the bearer token in "
            "ROOST_SERVING__REPOSITORY_TOKEN (default: off).",
            show_default=False,
        ),
    ] = None,
    log_url: Annotated[
        str | None,
        typer.Option(
            help="Send each inference as CloudEvents (KServe's logger format) to this URL, "
            "e.g. `roost monitor serve`'s (default: off).",
            show_default=False,
        ),
    ] = None,
    log_sample_rate: Annotated[
        float | None,
        typer.Option(help="Fraction of inferences logged (default: 1.0).", show_default=False),
    ] = None,
) -> None:
    """Serve the model with KServe: REST v1 + v2 (Open Inference Protocol), gRPC v2, /metrics.

    The one entry point of the model server: pods (the image's ENTRYPOINT is ``roost``, the
    chart's args ``serve ...``), ``python -m roost serve`` and every local server.
    """
    # Python's cyclic collector would walk the growing heap of module objects again and again
    # while torch and kserve import (about 0.4 s of 1.7 s on 2 CPUs): off until serve() has
    # loaded the model; it then freezes what start-up allocated and turns the collector on.
    gc.disable()
    settings = state(ctx).settings(
        **{
            "serving.model_uri": model_uri,
            "serving.model_name": model_name,
            "serving.http_port": http_port,
            "serving.grpc_port": grpc_port,
            "serving.model_version": model_version,
            "serving.max_body_bytes": max_body_bytes,
            "serving.max_batch_size": max_batch_size,
            "serving.max_batch_wait_ms": max_batch_wait_ms,
            "serving.max_texts_per_request": max_texts_per_request,
            "serving.repository_extension": repository_extension,
            "serving.logging.url": log_url,
            "serving.logging.sample_rate": log_sample_rate,
        }
    )
    from roost.serving.server import serve as run_server

    run_server(settings)


def predict(
    texts: Annotated[
        list[str] | None, typer.Argument(help="Texts to classify.", show_default=False)
    ] = None,
    file: Annotated[
        Path | None,
        typer.Option(help="Read texts from a file, one per line ('-': stdin).", show_default=False),
    ] = None,
    protocol: Annotated[
        client.Protocol, typer.Option(help="v1, v2 (REST) or grpc.")
    ] = client.Protocol.V2,
    url: Annotated[str, typer.Option(help="REST base URL.")] = "http://127.0.0.1:8080",
    grpc_target: Annotated[str, typer.Option(help="gRPC host:port.")] = "127.0.0.1:8081",
    model: Annotated[str, typer.Option(help="Model name on the server.")] = "sentiment",
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the answer.")] = 30.0,
    variant: Annotated[
        pin.Variant | None,
        typer.Option(
            help="During a rollout: pin the request to the champion or the challenger "
            "(sends x-roost-variant for the local proxy and Knative-Serving-Tag for KServe).",
            show_default=False,
        ),
    ] = None,
    json_output: JsonFlag = False,
) -> None:
    """Classify texts with a running model server; prints label and confidence."""
    items = list(texts or [])
    if file is not None:
        source = sys.stdin if str(file) == "-" else None
        try:
            lines = (source.read() if source else file.read_text()).splitlines()
        except OSError as exc:
            raise ConfigError(f"cannot read {file}: {exc.strerror}") from None
        items += [line for line in lines if line.strip()]
    if not items:
        raise typer.BadParameter("give texts as arguments or --file", param_hint="TEXTS")
    result = client.predict(
        items, protocol, url, grpc_target, model, timeout, headers=pin.headers(variant)
    )
    if json_output:
        emit_json(
            {
                "protocol": result.protocol.value,
                "model_version": result.model_version,
                "predictions": [p.__dict__ for p in result.predictions],
            }
        )
        return
    table = Table(title=f"{model} v{result.model_version or '?'} via {result.protocol.value}")
    table.add_column("text", overflow="fold", max_width=60)
    table.add_column("label")
    table.add_column("confidence", justify="right")
    for p in result.predictions:
        table.add_row(p.text, p.label, f"{p.confidence:.3f}")
    console.print(table)
