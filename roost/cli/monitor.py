"""``roost monitor serve|up|down|feedback|report|watch``: watch the served model."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from roost.cli.context import state
from roost.cli.output import EpochProgress, JsonFlag, console, emit_json, interactive
from roost.errors import ConfigError, Unavailable

if TYPE_CHECKING:
    from roost.config import Settings

app = typer.Typer(
    no_args_is_help=True,
    help="Watch the served model: payload events, drift, live accuracy, retraining.",
)


@app.command()
def serve(
    ctx: typer.Context,
    host: Annotated[str | None, typer.Option(help="Bind address.", show_default=False)] = None,
    port: Annotated[
        int | None, typer.Option(help="Port (default: 8090).", show_default=False)
    ] = None,
    store: Annotated[
        str | None,
        typer.Option(
            help="Event store: a directory or s3://bucket/prefix (default: STATE_DIR/monitor).",
            show_default=False,
        ),
    ] = None,
    journal_dir: Annotated[
        str | None,
        typer.Option(
            help="Local journal directory (default: the store directory, or "
            "STATE_DIR/monitor for an s3:// store).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Run the event receiver in the foreground (CloudEvents in, Parquet out)."""
    settings = state(ctx).settings(
        **{
            "monitor.host": host,
            "monitor.port": port,
            "monitor.store": store,
            "monitor.journal_dir": journal_dir,
        }
    )
    from roost.monitor import local, receiver

    cfg = settings.monitor
    root = local.store_dir(settings)
    root.mkdir(parents=True, exist_ok=True)
    receiver.serve(
        root, cfg.host, cfg.port, cfg.max_body_bytes, cfg.segment_s, cfg.segment_bytes,
        local.store_uri(settings), cfg.dedupe_window_s,
    )  # fmt: skip


@app.command()
def up(
    ctx: typer.Context,
    port: Annotated[int, typer.Option(help="Port (0: a free one).")] = 0,
    json_output: JsonFlag = False,
) -> None:
    """Start the receiver in the background (or reuse the running one)."""
    from roost.monitor import local

    receiver = local.up(state(ctx).settings(), port)
    doc = {"url": receiver.url, "pid": receiver.pid, "store": receiver.store,
           "log_file": receiver.log_file}  # fmt: skip
    if json_output:
        emit_json(doc)
    else:
        console.print(f"monitor receiver at [bold]{receiver.url}[/] storing in {receiver.store}")
        console.print(f"log payloads to it: roost serve --log-url {receiver.url}")


@app.command()
def down(ctx: typer.Context, json_output: JsonFlag = False) -> None:
    """Stop the background receiver (its store stays)."""
    from roost.monitor import local

    stopped = local.down(state(ctx).settings())
    if json_output:
        emit_json({"stopped": stopped is not None, "pid": stopped.pid if stopped else None})
    elif stopped:
        console.print(f"stopped monitor receiver pid {stopped.pid} ({stopped.url})")
    else:
        console.print("no monitor receiver was running")


def read_feedback_csv(path: Path) -> list[dict[str, str]]:
    """Rows ``id,label`` of a CSV file with a header; raises ConfigError naming the line."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            fields = reader.fieldnames or []
            for needed in ("id", "label"):
                if needed not in fields:
                    raise ConfigError(f"{path}: column {needed!r} missing (header: {fields})")
            rows = []
            for line, row in enumerate(reader, start=2):
                event_id, label = (row.get("id") or "").strip(), (row.get("label") or "").strip()
                if not event_id or not label:
                    raise ConfigError(f"{path}:{line}: id and label are required")
                rows.append({"id": event_id, "label": label})
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    if not rows:
        raise ConfigError(f"{path}: no feedback rows")
    return rows


@app.command()
def feedback(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="CSV with columns id,label (header line).")],
    url: Annotated[
        str | None,
        typer.Option(
            help="Receiver URL (default: monitor.url or `monitor up`'s).", show_default=False
        ),
    ] = None,
    json_output: JsonFlag = False,
) -> None:
    """Send true labels for logged inferences (ids from x-roost-event-id / the v2 id)."""
    import httpx

    from roost.monitor import local

    settings = state(ctx).settings(**{"monitor.url": url})
    rows = read_feedback_csv(file)
    target = local.receiver_url(settings)
    if target is None:
        raise Unavailable("no monitor receiver: pass --url or run `roost monitor up`")
    stored = duplicates = 0
    try:
        with httpx.Client(timeout=30) as client:
            for start in range(0, len(rows), 5000):
                response = client.post(
                    target.rstrip("/") + "/v1/feedback",
                    json={"feedback": rows[start : start + 5000]},
                )
                if response.status_code != 200:
                    raise ConfigError(f"receiver: {response.json().get('error', response.text)}")
                doc = response.json()
                stored += doc["stored"]
                duplicates += doc["duplicates"]
    except httpx.HTTPError as exc:
        raise Unavailable(f"monitor receiver {target}: {exc}") from None
    if json_output:
        emit_json({"stored": stored, "duplicates": duplicates, "url": target})
    else:
        console.print(f"stored {stored} labels ({duplicates} already known) at {target}")


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str, option: str) -> float:
    """``90s``, ``15m``, ``6h``, ``1d`` or plain seconds -> seconds."""
    value = text.strip().lower()
    unit = _UNITS.get(value[-1:]) if value else None
    number = value[:-1] if unit else value
    try:
        seconds = float(number) * (unit or 1)
    except ValueError:
        raise typer.BadParameter(f"expected a duration such as 15m or 6h, got {text!r}",
                                 param_hint=option) from None  # fmt: skip
    if seconds <= 0:
        raise typer.BadParameter("must be positive", param_hint=option)
    return seconds


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render_report(doc: dict[str, object]) -> None:
    from rich.table import Table

    colour = {"ok": "green", "breach": "bold red", "insufficient": "yellow"}
    reference = doc["reference"]
    assert isinstance(reference, dict)
    table = Table(
        title=f"{doc['model']} v{doc['version']}: traffic against the training reference "
        f"(windows of {float(doc['window_s']):g}s)",  # type: ignore[arg-type]
        caption="JS: predicted-label Jensen-Shannon distance (base 2); conf: mean-confidence "
        "shift; PSI: text-length stability index; unseen: unseen-token rate "
        f"(reference {reference['unseen_token_rate']:.3f}); insufficient: too few texts",
    )
    for column in ("window (UTC)", "texts", "JS", "conf", "PSI", "unseen", "accuracy (n)",
                   "macro-F1", "verdict"):  # fmt: skip
        table.add_column(column, justify="left" if column.startswith("window") else "right")
    windows = doc["windows"]
    assert isinstance(windows, list)
    for w in windows:
        s = w["statistics"]

        def cell(name: str, s: dict = s) -> str:  # type: ignore[type-arg]
            stat = s[name]
            text = _fmt(stat["value"])
            return f"[red]{text}[/]" if stat["status"] == "breach" else text

        live = w["live"]
        accuracy = (f"{live['accuracy']:.3f} ({live['labels']})" if "accuracy" in live
                    else f"- ({live['labels']})")  # fmt: skip
        verdict = w["verdict"] + ("" if w["closed"] else " (open)")
        table.add_row(
            w["start"][:16].replace("T", " "), str(w["events"]), cell("js_distance"),
            cell("confidence_shift"), cell("length_psi"), cell("unseen_token_rate"),
            accuracy, _fmt(live.get("macro_f1")),
            f"[{colour.get(w['verdict'], 'white')}]{verdict}[/]",
        )  # fmt: skip
    console.print(table)
    if doc.get("mlflow_run_id"):
        console.print(f"logged to MLflow run {doc['mlflow_run_id']} (experiment roost-monitoring)")


@app.command()
def report(
    ctx: typer.Context,
    model: Annotated[
        str | None, typer.Option(help="Registered model (default: sentiment).", show_default=False)
    ] = None,
    version: Annotated[
        str | None, typer.Option(help="Model version to judge.", show_default=False)
    ] = None,
    alias: Annotated[
        str | None,
        typer.Option(
            help="...or the version under this alias (default: champion).", show_default=False
        ),
    ] = None,
    since: Annotated[str, typer.Option(help="How far back: 90s, 15m, 6h, 1d.")] = "6h",
    window: Annotated[str, typer.Option(help="Window length.")] = "15m",
    store: Annotated[
        str | None,
        typer.Option(
            help="Event store (default: monitor.store or STATE_DIR/monitor).", show_default=False
        ),
    ] = None,
    log: Annotated[
        bool, typer.Option(help="Log the report to MLflow (experiment roost-monitoring).")
    ] = True,
    json_output: JsonFlag = False,
) -> None:
    """Compare logged traffic, window by window, with the version's training reference.

    Example: roost monitor report --alias champion --since 6h --window 15m
    """
    import datetime as dt

    from roost import tracking
    from roost.monitor import local
    from roost.monitor import report as reports

    settings = state(ctx).settings(**{"registry.model_name": model, "monitor.store": store})
    since_s = parse_duration(since, "--since")
    window_s = parse_duration(window, "--window")
    uri = tracking.use(settings)
    name = settings.registry.model_name
    resolved, run_id, reference = reports.resolve_version(uri, name, version, alias)
    receiver = local.receiver_url(settings)
    if receiver:
        reports.flush_receiver(receiver)
    now = dt.datetime.now(dt.UTC)
    result = reports.make_report(
        local.store_uri(settings), name, resolved, run_id, reference,
        now - dt.timedelta(seconds=since_s), now, window_s,
        reports.Thresholds.from_settings(settings.monitor),
    )  # fmt: skip
    if log:
        reports.log_to_mlflow(uri, settings.monitor.experiment, result)
    if receiver:
        reports.push_gauges(receiver, result)
    doc = result.as_dict()
    if json_output:
        emit_json(doc)
    else:
        render_report(doc)


@app.command()
def watch(
    ctx: typer.Context,
    model: Annotated[
        str | None, typer.Option(help="Registered model (default: sentiment).", show_default=False)
    ] = None,
    action: Annotated[
        str | None,
        typer.Option(
            help="alert or retrain (default: monitor.action = alert).", show_default=False
        ),
    ] = None,
    consecutive: Annotated[
        int | None,
        typer.Option(
            help="Breached windows in a row that trigger (default: 2).", show_default=False, min=1
        ),
    ] = None,
    window: Annotated[
        str | None, typer.Option(help="Window length (default: 15m).", show_default=False)
    ] = None,
    cooldown: Annotated[
        str | None,
        typer.Option(help="Quiet time after an action (default: 1h).", show_default=False),
    ] = None,
    poll: Annotated[
        str | None,
        typer.Option(help="Seconds between evaluations (default: 10s).", show_default=False),
    ] = None,
    store: Annotated[
        str | None,
        typer.Option(
            help="Event store: a directory or s3://bucket/prefix (default: STATE_DIR/monitor).",
            show_default=False,
        ),
    ] = None,
    journal_dir: Annotated[
        str | None,
        typer.Option(
            help="Local directory of the watch state (default: as for `monitor serve`).",
            show_default=False,
        ),
    ] = None,
    on: Annotated[
        str | None,
        typer.Option(
            help="Where retraining runs: local (in-process) or k8s (the training Job, as "
            "`roost train --on k8s`; needs an s3:// store). Default: monitor.train_on = local.",
            show_default=False,
        ),
    ] = None,
    once: Annotated[bool, typer.Option(help="Evaluate (and act) once, then exit.")] = False,
    json_output: JsonFlag = False,
) -> None:
    """Judge each closed window of the champion; after K breaches in a row, alert or retrain.

    Example: roost monitor watch --action retrain --window 15m --consecutive 2
    """
    import dataclasses

    from roost.monitor import local
    from roost.monitor.watch import Watcher

    if action is not None and action not in ("alert", "retrain"):
        raise typer.BadParameter("expected alert or retrain", param_hint="--action")
    if on is not None and on not in ("local", "k8s"):
        raise typer.BadParameter("expected local or k8s", param_hint="--on")
    settings = state(ctx).settings(
        **{
            "registry.model_name": model,
            "monitor.action": action,
            "monitor.consecutive": consecutive,
            "monitor.window_s": parse_duration(window, "--window") if window else None,
            "monitor.cooldown_s": parse_duration(cooldown, "--cooldown") if cooldown else None,
            "monitor.poll_s": parse_duration(poll, "--poll") if poll else None,
            "monitor.store": store,
            "monitor.journal_dir": journal_dir,
            "monitor.train_on": on,
        }
    )
    cfg = settings.monitor
    if cfg.action == "retrain" and cfg.train_on == "k8s":
        from roost.monitor.k8s_retrain import data_uri

        data_uri(local.store_uri(settings), "check")  # an s3:// store, or one error line now
    watcher = Watcher(
        settings, local.store_uri(settings), local.store_dir(settings), local.receiver_url(settings)
    )
    if not json_output:
        console.print(
            f"watching {settings.registry.model_name}@{settings.registry.champion_alias}: "
            f"windows of {cfg.window_s:g}s, {cfg.consecutive} breached in a row -> {cfg.action}, "
            f"cooldown {cfg.cooldown_s:g}s"
        )
    result = watcher.run(once=once)
    if json_output:
        emit_json(
            dataclasses.asdict(result) if result is not None else {"lease": "held by another"}
        )


def monitor_demo(settings: Settings, json_output: bool) -> None:
    """`roost demo --monitor`: run the loop (roost.monitor.demo) and print what it saw."""
    from roost.monitor.demo import run_monitor_demo

    def notify(message: str) -> None:
        if not json_output:
            console.print(f"[bold cyan]==>[/] {message}")

    with EpochProgress(show_bars=interactive(json_output), quiet=json_output) as progress:
        result = run_monitor_demo(settings, notify, progress)
    if json_output:
        emit_json(result.to_dict())
        return
    console.rule("normal traffic: the report")
    render_report(result.normal)
    console.rule("shifted traffic: the report")
    render_report(result.shifted)
    console.rule("roost monitor demo summary")
    trigger = result.trigger
    console.print(f"MLflow UI       {result.tracking_uri}")
    console.print(f"events stored   {result.store} (receiver {result.receiver_url})")
    console.print(
        f"trigger         {trigger.get('action')} on v{result.champion}: "
        f"{', '.join(trigger.get('breached') or [])} breached in "
        f"{len(trigger.get('windows') or [])} windows in a row"
    )
    console.print(
        f"challenger      v{result.challenger} -> @{', @'.join(trigger.get('aliases') or [])} "
        f"(gate: {trigger.get('gate')})"
    )
    t = result.timings
    console.print(
        f"timings         shift -> trigger {t.get('shift_to_trigger_s')}s, "
        f"shift -> challenger {t.get('shift_to_challenger_s')}s, total {t.get('total_s')}s"
    )
