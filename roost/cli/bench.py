"""``roost bench``: roost vs TorchServe, the peers and the raw model, measured in one run."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from roost.cli.context import state
from roost.cli.output import JsonFlag, console, emit_json

if TYPE_CHECKING:
    from roost.config import Settings

app = typer.Typer(
    help="Benchmark serving (roost vs TorchServe, KServe, MLServer, BentoML, PyTriton and the "
    "raw model) and export for TorchServe.",
)

VersionOpt = Annotated[
    str | None,
    typer.Option(
        "--version", help="Registry version (default: the champion alias).", show_default=False
    ),
]
AliasOpt = Annotated[
    str | None,
    typer.Option(help="Registry alias, if no --version (default: champion).", show_default=False),
]


def model_uri(settings: Settings, version: str | None, alias: str | None) -> str:
    name = settings.registry.model_name
    if version:
        return f"models:/{name}/{version}"
    return f"models:/{name}@{alias or settings.registry.champion_alias}"


@app.callback(
    invoke_without_command=True,
    epilog="Example: roost bench --quick --out bench-out  (then open bench-out/bench.md)",
)
def bench(
    ctx: typer.Context,
    quick: Annotated[
        bool, typer.Option("--quick", help="Short ladders, one TorchServe config (~1 min).")
    ] = False,
    out: Annotated[
        Path | None,
        typer.Option(help="Output directory (default: bench-out).", show_default=False),
    ] = None,
    version: VersionOpt = None,
    alias: AliasOpt = None,
    json_output: JsonFlag = False,
    layers: Annotated[
        bool | None,
        typer.Option(
            "--layers/--no-layers",
            help="Also run roost with each fast-path layer off (default: on, off with --quick).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Load roost's predictor, TorchServe and the peers on loopback with the same model version."""
    if ctx.invoked_subcommand is not None:
        return
    from roost.bench import report, run

    settings = state(ctx).settings(**{"bench.out_dir": out})
    out_dir = settings.bench.out_dir
    progress = (lambda message: None) if json_output else _progress
    result = run.run(
        settings, out_dir, quick, model_uri(settings, version, alias), progress=progress,
        layers=layers,
    )  # fmt: skip
    flags = ["--quick"] if quick else []
    flags += [] if layers is None else (["--layers"] if layers else ["--no-layers"])
    flags += ["--out", str(out_dir)]
    flags += ["--version", version] if version else (["--alias", alias] if alias else [])
    paths = report.write(result, out_dir, "roost bench " + shlex.join(flags))
    if json_output:
        emit_json(result)
        return
    _summary(result)
    console.print(f"wrote {paths['json']}, {paths['table']}, {paths['plot']}")


@app.command("batch")
def batch(
    ctx: typer.Context,
    out: Annotated[
        Path | None,
        typer.Option(help="Output directory (default: bench-out).", show_default=False),
    ] = None,
    sizes: Annotated[
        str, typer.Option(help="Comma-separated input sizes (rows) of generated Parquet files.")
    ] = "100000,1000000",
    version: VersionOpt = None,
    alias: AliasOpt = None,
    json_output: JsonFlag = False,
) -> None:
    """Only the batch section: `roost batch` texts/s and peak RSS against the raw forward pass.

    The section goes into OUT/bench.json (key "batch"), next to a full run's results.
    """
    import json

    from roost.bench import batch as bench_batch
    from roost.bench import report

    try:
        rows = sorted({int(s) for s in sizes.split(",") if s.strip()})
    except ValueError:
        raise typer.BadParameter(
            "expected numbers like 100000,1000000", param_hint="--sizes"
        ) from None
    if not rows or rows[0] <= 0:
        raise typer.BadParameter("expected positive numbers", param_hint="--sizes")
    settings = state(ctx).settings(**{"bench.out_dir": out})
    progress = (lambda message: None) if json_output else _progress
    section = bench_batch.run(
        settings, model_uri(settings, version, alias), rows, progress=progress
    )
    flags = ["--out", str(settings.bench.out_dir), "--sizes", ",".join(map(str, rows))]
    flags += ["--version", version] if version else (["--alias", alias] if alias else [])
    section["command"] = "roost bench batch " + shlex.join(flags)
    path = settings.bench.out_dir / report.JSON_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    document = json.loads(path.read_text()) if path.is_file() else {}
    document["batch"] = section
    path.write_text(json.dumps(document, indent=2) + "\n")
    if json_output:
        emit_json(section)
        return
    _batch_summary(section)
    console.print(f"wrote the batch section to {path}")


@app.command("export-torchserve")
def export_torchserve(
    ctx: typer.Context,
    out: Annotated[
        Path, typer.Option(help="Directory for config/ and model-store/ (KServe's layout).")
    ],
    version: VersionOpt = None,
    alias: AliasOpt = None,
    workers: Annotated[int, typer.Option(help="TorchServe workers (min = max).")] = 2,
    batch_size: Annotated[int | None, typer.Option(help="TorchServe batchSize.")] = None,
    max_batch_delay_ms: Annotated[
        int | None, typer.Option(help="TorchServe maxBatchDelay (ms).")
    ] = None,
    json_output: JsonFlag = False,
) -> None:
    """Export a registry version for TorchServe: config/config.properties + model-store/*.mar."""
    from roost import registry
    from roost.bench import torchserve

    settings = state(ctx).settings()
    model = registry.fetch_model(settings, model_uri(settings, version, alias))
    name = model.name or settings.registry.model_name
    tuning = torchserve.Tuning(
        workers=workers,
        batch_size=batch_size or settings.bench.torchserve_batch_size,
        max_batch_delay_ms=(
            settings.bench.torchserve_max_batch_delay_ms
            if max_batch_delay_ms is None
            else max_batch_delay_ms
        ),
    )
    export = torchserve.export(model.path, out, name, model.version or "1", tuning)
    if json_output:
        emit_json(export.to_dict())
        return
    console.print(
        f"{name} v{export.model_version}: {export.mar} and {export.config}\n"
        f"storageUri: the directory {export.root} (modelFormat pytorch, protocol v1)"
    )


@app.command("install-peers")
def install_peers(
    ctx: typer.Context,
    names: Annotated[
        list[str] | None,
        typer.Argument(help="Peers to install (default: bench.peers).", show_default=False),
    ] = None,
    venvs: Annotated[
        Path | None,
        typer.Option(
            "--dir", help="Where the venvs go (default: bench.peers_venvs).", show_default=False
        ),
    ] = None,
) -> None:
    """Build the peers' own virtual environments (reused by `roost bench`; `make peers`)."""
    from roost.bench import peers
    from roost.errors import RoostError

    settings = state(ctx).settings()
    chosen = names or list(settings.bench.peers)
    unknown = sorted(set(chosen) - set(peers.PEERS))
    if unknown:
        raise typer.BadParameter(
            f"unknown peer(s) {', '.join(unknown)}; known: {', '.join(peers.PEERS)}",
            param_hint="NAMES",
        )
    root = venvs or settings.bench.peers_venvs
    for name in chosen:
        try:
            python = peers.environment(
                peers.PEERS[name], root, settings.bench.peer_install_timeout_s, _progress
            )
        except peers.PeerUnavailable as exc:
            raise RoostError(str(exc)) from None
        console.print(f"{name}: {python}")


@app.command("profile")
def profile(
    ctx: typer.Context,
    out: Annotated[
        Path, typer.Option(help="Directory for the summary (samples go to state_dir/bench).")
    ],
    rate: Annotated[float, typer.Option(help="Open-loop load, requests/s.", min=1.0)] = 10000.0,
    protocol: Annotated[str, typer.Option(help="rest-v2, grpc-v2 or grpc-v2-stream.")] = "rest-v2",
    seconds: Annotated[
        float,
        typer.Option(help="Seconds of load while sampling (py-spy takes whole seconds).", min=1.0),
    ] = 5.0,
    version: VersionOpt = None,
    alias: AliasOpt = None,
    json_output: JsonFlag = False,
) -> None:
    """Profile roost's server under load with py-spy --gil: GIL microseconds per request."""
    if protocol not in ("rest-v2", "grpc-v2", "grpc-v2-stream"):
        raise typer.BadParameter(
            "expected rest-v2, grpc-v2 or grpc-v2-stream", param_hint="--protocol"
        )
    from roost.bench import profile as bench_profile

    settings = state(ctx).settings()
    result = bench_profile.run(
        settings, model_uri(settings, version, alias), out, protocol, rate, seconds
    )
    if json_output:
        emit_json(result.to_dict())
        return
    console.print(result.text(), markup=False)


def _progress(message: str) -> None:
    console.print(message, markup=False)


def _batch_summary(section: dict[str, Any]) -> None:
    table = Table(title=f"roost batch (model v{section['model_version']})")
    for column in ("rows", "texts/s", "wall s", "peak RSS MB"):
        table.add_column(column)
    for size, run in section["sizes"].items():
        table.add_row(
            f"{int(size):,}", f"{run['texts_per_s']:,.0f}", f"{run['wall_s']:.1f}",
            f"{run['peak_rss_mb']:.0f}",
        )  # fmt: skip
    table.add_row("raw forward", f"{section['raw_forward_texts_per_s']:,.0f}", "-", "-")
    console.print(table)
    for key, target in section["targets"].items():
        verdict = "met" if target["met"] else "NOT met"
        console.print(f"batch {key}: {target['value']} (target {target['target']}, {verdict})")


def _summary(result: dict[str, Any]) -> None:
    slo = result["slo_p99_ms"]
    table = Table(title=f"{result['model_name']} v{result['model_version']} ({result['mode']})")
    for column in ("server", "protocol", "texts/req", f"req/s @ p99≤{slo:g}ms", "cold start s"):
        table.add_column(column)
    for s in result["servers"]:
        table.add_row(
            s["name"], s["protocol"], str(s["texts_per_request"]),
            f"{s['max_rps_p99_50ms']:.0f}", f"{s['cold_start_s']:.2f}",
        )  # fmt: skip
    raw = result["raw_forward"]
    table.add_row("raw forward", "-", str(raw["batch_size"]), f"{raw['max_seq_per_s']:.0f}", "-")
    console.print(table)
    for key, target in result["targets"].items():
        verdict = (
            f"not measured: {target.get('reason')}"
            if target["met"] is None
            else ("met" if target["met"] else "NOT met")
        )
        console.print(f"{key}: {target['value']} (target {target['target']}, {verdict})")
    from roost.bench.report import logging_colocated

    colocated = logging_colocated(result)
    if colocated:
        console.print(colocated)
    if "batch" in result:
        _batch_summary(result["batch"])
