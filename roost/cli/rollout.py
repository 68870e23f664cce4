"""``roost rollout ...``: progressive delivery driven by registry aliases."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from roost.cli.context import state as cli_state
from roost.cli.output import JsonFlag, console, emit_json
from roost.errors import ConfigError, NotFound, RolloutAborted, Unavailable
from roost.rollout import engine
from roost.rollout.backends import make as make_backend
from roost.rollout.state import ACTIONS, MODES, Action, Phase, RolloutState

if TYPE_CHECKING:  # the controller and recorder import httpx and pydantic: only when run
    from roost.config import Settings
    from roost.rollout.backends.base import Backend
    from roost.rollout.controller import Controller

app = typer.Typer(
    no_args_is_help=True,
    help="Canary a model version, analyse it, promote or roll back.",
    epilog="Example: roost rollout start sentiment --version 2 --window 30",
)

ModelArg = Annotated[
    str | None,
    typer.Argument(help="Registered model (default: sentiment).", show_default=False),
]
BackendOpt = Annotated[
    str | None,
    typer.Option("--backend", help="Traffic backend: local (nginx) or kserve (default: local).",
                 show_default=False),
]  # fmt: skip
TimeoutOpt = Annotated[
    float | None,
    typer.Option(help="Give up waiting after this many seconds (the rollout stays in flight).",
                 show_default=False),
]  # fmt: skip


def _settings(ctx: typer.Context, model: str | None, backend: str | None, **flags: Any) -> Settings:
    return cli_state(ctx).settings(
        **{"registry.model_name": model, "rollout.backend": backend, **flags}
    )


def _controller(
    settings: Settings, backend: Backend, json_output: bool, stop: threading.Event | None = None
) -> Controller:
    """A controller that prints each event (none with --json)."""
    from roost.rollout.controller import Controller

    return Controller(
        settings, backend, on_event=printer(json_output), stop=stop,
        notify=(lambda m: None) if json_output else (lambda m: console.print(m)),
    )  # fmt: skip


def _parse_steps(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise ConfigError(f"--steps: expected comma-separated percentages, got {text!r}") from None


def describe_event(event: dict[str, Any]) -> str | None:
    """One human line per history event (None: not worth a line)."""
    kind = event["event"]
    weight = event.get("weight")
    if kind == "started":
        return f"started against champion v{event.get('champion')}"
    if kind == "shadow":
        return "[bold]shadow[/]: the challenger answers a copy of the champion's traffic"
    if kind == "weight":
        return f"[bold]weight {weight}%[/] applied"
    if kind == "serving" and event.get("step") == 0 and weight == 0:
        return f"challenger ready in the dark ({event.get('after_s', 0):.1f}s after start)"
    if kind == "serving":
        return f"canary serves {weight}% ({event.get('after_s', 0):.1f}s after the change)"
    where = "in shadow" if event.get("stage") == "shadow" else f"at {weight}%"
    if kind == "window":
        return f"[green]window passed[/] {where}: {_measured(event.get('analysis'))}"
    if kind == "check":
        analysis = event.get("analysis") or {}
        return f"[yellow]check failed[/] {where}: {analysis.get('reason', '')}"
    if kind == "finished":
        return f"[bold green]shadow passed[/]: {event.get('reason', '')} (mode shadow: ends here)"
    if kind == "hold":
        return f"[yellow]holding[/] {weight}%: {event.get('reason')}"
    if kind in ("pause", "resume", "abort", "promote"):
        return f"{kind} requested{' by ' + event['by'] if event.get('by') else ''}"
    if kind == "promoted":
        return f"[bold green]promoted[/]: {event.get('reason', '')}"
    if kind == "rolled_back":
        return f"[bold red]rolled back[/]: {event.get('reason', '')}"
    return None


def _measured(analysis: dict[str, Any] | None) -> str:
    if not analysis:
        return ""
    row = engine.compact_row({"weight": 0, "analysis": analysis})
    parts = [f"requests {_pair(row.get('requests'))}"]
    for name, label in (("error_rate", "errors"), ("p99_latency_ms", "p99 ms")):
        check = row.get(name) or {}
        parts.append(f"{label} {_num(check.get('challenger'))}/{_num(check.get('champion'))}")
    if row.get("agreement"):
        parts.append(f"agreement {_num((row.get('agreement') or {}).get('value'))}")
        parts.append(f"JS dist {_num((row.get('js_distance') or {}).get('value'))}")
        parts.append(f"conf shift {_num((row.get('confidence_shift') or {}).get('value'))}")
        return ", ".join(parts)
    parts.append(f"JS {_num((row.get('js_divergence') or {}).get('value'))}")
    parts.append(f"conf drop {_num((row.get('confidence_drop') or {}).get('value'))}")
    return ", ".join(parts)


def _num(value: Any) -> str:
    if value is None:
        return "-"
    value = float(value)
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"


def _pair(requests: dict[str, Any] | None) -> str:
    if not requests:
        return "-"
    return f"{requests.get('challenger', 0)}/{requests.get('champion', 0)}"


def printer(json_output: bool) -> Callable[[RolloutState, dict[str, Any]], None]:
    def on_event(state: RolloutState, event: dict[str, Any]) -> None:
        line = describe_event(event)
        if line and not json_output:
            stamp = time.strftime("%H:%M:%S", time.localtime(event["at"]))
            console.print(f"[dim]{stamp}[/] {state.model} v{state.version}  {line}")

    return on_event


def steps_table(rows: list[dict[str, Any]], title: str = "rollout steps") -> Table:
    """The step table: weight, when, time to serve, measured values (canary/primary), verdict.

    A shadow phase is a row of its own (step ``shadow``, weight 0): requests are the replayed
    ones against the champion's, JS is the label distributions' distance over the pairs,
    conf its mean-confidence shift and agree the share of pairs with the same label."""
    table = Table(title=title, box=box.SIMPLE_HEAD, caption="pairs: canary/primary", pad_edge=False)
    for column in ("step", "weight", "at", "serving", "requests", "5xx rate", "p99 ms",
                   "agree", "JS", "conf", "verdict"):  # fmt: skip
        table.add_column(column, justify="left" if column == "verdict" else "right", no_wrap=True)
    for row in rows:
        measured = engine.compact_row(row)
        err = measured.get("error_rate") or {}
        p99 = measured.get("p99_latency_ms") or {}
        verdict = row.get("verdict") or ""
        if row.get("outcome"):
            verdict = f"{verdict} -> {row['outcome']}" if verdict else row["outcome"]
        colour = {"pass": "green", "fail": "red"}.get(str(row.get("verdict")), "white")
        after = row.get("serving_after_s")
        table.add_row(
            str(row["step"] or "-"),
            f"{row['weight']}%",
            time.strftime("%H:%M:%S", time.localtime(row["applied_at"])),
            "-" if after is None else f"{after:.1f}s",
            _pair(measured.get("requests")),
            f"{_fixed(err.get('challenger'), 3)}/{_fixed(err.get('champion'), 3)}" if err else "-",
            f"{_fixed(p99.get('challenger'), 1)}/{_fixed(p99.get('champion'), 1)}" if p99 else "-",
            _fixed((measured.get("agreement") or {}).get("value"), 3),
            _fixed(
                (measured.get("js_divergence") or measured.get("js_distance") or {}).get("value"), 3
            ),
            _fixed(
                (measured.get("confidence_drop") or measured.get("confidence_shift") or {}).get(
                    "value"
                ),
                3,
            ),
            f"[{colour}]{verdict}[/]",
        )
    return table


def _fixed(value: Any, digits: int) -> str:
    return "-" if value is None else f"{float(value):.{digits}f}"


def summary(state: RolloutState, backend: Backend | None = None) -> dict[str, Any]:
    """The JSON document of a rollout: where it is, its steps, its outcome."""
    doc: dict[str, Any] = {
        **engine.document(state),
        "step": state.step + 1,
        "steps": list(state.plan.steps),
        "holding": state.holding,
        "pending": state.pending.to_dict() if state.pending else None,
        "owner": state.owner,
        "run_id": state.run_id,
        "table": [engine.compact_row(row) for row in engine.steps_table(state)],
        "applied": list(state.applied),
    }
    if backend is not None:
        doc["endpoints"] = backend.describe()
    return doc


def print_table(table: Table) -> None:
    """Tables keep their columns in logs too (a non-terminal console is 80 columns wide)."""
    if console.is_terminal:
        console.print(table)
    else:
        Console(stderr=True, highlight=False, width=120).print(table)


def _render_outcome(state: RolloutState, backend: Backend | None) -> None:
    print_table(steps_table(engine.steps_table(state), f"{state.model} v{state.version}"))
    for key, value in (backend.describe() if backend is not None else {}).items():
        console.print(f"{key:<14} {value}")


def _finish(state: RolloutState, backend: Backend, json_output: bool) -> None:
    if json_output:
        emit_json(summary(state, backend))
    else:
        _render_outcome(state, backend)
    if state.phase is Phase.ROLLED_BACK:
        reason = state.history[-1].get("reason", "") if state.history else ""
        raise RolloutAborted(f"{state.model} v{state.version} rolled back: {reason}")


@app.command("start")
def start(
    ctx: typer.Context,
    model: ModelArg = None,
    version: Annotated[
        str | None,
        typer.Option(
            help="Version to canary (default: the @challenger alias).", show_default=False
        ),
    ] = None,
    backend: BackendOpt = None,
    mode: Annotated[
        str | None,
        typer.Option(
            help="shadow | canary | shadow-then-canary (default: rollout.mode, "
            "shadow-then-canary).",
            show_default=False,
        ),
    ] = None,
    steps: Annotated[
        str | None, typer.Option(help="Canary weights, e.g. 10,25,50,100.", show_default=False)
    ] = None,
    window: Annotated[
        float | None,
        typer.Option(help="Seconds each weight is held (default: 60).", show_default=False),
    ] = None,
    min_requests: Annotated[
        int | None,
        typer.Option(help="Canary requests before any verdict (default: 50).", show_default=False),
    ] = None,
    traffic_rps: Annotated[
        float | None,
        typer.Option(
            help="local backend: send this many synthetic predictions/s to the proxy.",
            show_default=False,
        ),
    ] = None,
    timeout: TimeoutOpt = None,
    json_output: JsonFlag = False,
) -> None:
    """Shadow and/or canary a version: judge it on a copy of the champion's traffic, step its
    weight up, analyse each window, promote or roll back."""
    if mode is not None and mode not in MODES:
        raise ConfigError(f"--mode: one of {', '.join(MODES)}, got {mode!r}")
    settings = _settings(
        ctx, model, backend,
        **{"rollout.steps": _parse_steps(steps), "rollout.window_s": window,
           "rollout.min_requests": min_requests, "rollout.mode": mode},
    )  # fmt: skip
    chosen = make_backend(settings)
    stop = threading.Event()
    controller = _controller(settings, chosen, json_output, stop)
    state = controller.start(version)
    traffic = None
    if traffic_rps:
        from roost.rollout import traffic as synthetic
        from roost.rollout.backends.local import LocalBackend

        if not isinstance(chosen, LocalBackend):
            raise ConfigError("--traffic-rps only works with the local backend")
        try:  # the champion's test texts: real request sizes
            registry = controller.recorder.registry()
            texts = synthetic.run_texts(registry, registry.source_run(state.champion), 2000)
        except (NotFound, ConfigError):
            texts = list(synthetic.SAMPLE_TEXTS)
        traffic = synthetic.start_canary_traffic(
            controller, chosen, settings.serving.model_name, texts, traffic_rps
        )
    try:
        final = controller.run(timeout)
    finally:
        if traffic is not None:
            traffic.stop()
    _finish(final, chosen, json_output)


@app.command("watch")
def watch(
    ctx: typer.Context,
    model: Annotated[
        str | None,
        typer.Option("--model", help="Registered model (default: sentiment).", show_default=False),
    ] = None,
    backend: BackendOpt = None,
    once: Annotated[bool, typer.Option(help="One reconcile pass, then exit.")] = False,
    timeout: Annotated[
        float | None,
        typer.Option(
            help="Stop after this many seconds (default: run until SIGTERM).", show_default=False
        ),
    ] = None,
) -> None:
    """Controller: start a rollout whenever @challenger moves to a new version; drive it."""
    settings = _settings(ctx, model, backend)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    controller = _controller(settings, make_backend(settings), False, stop)
    console.print(
        f"watching {settings.registry.model_name}@{settings.registry.challenger_alias} "
        f"(backend {settings.rollout.backend}, every {settings.rollout.poll_s:g}s)"
    )
    controller.watch(timeout, once)


@app.command("status")
def status(
    ctx: typer.Context,
    model: ModelArg = None,
    backend: BackendOpt = None,
    version: Annotated[
        str | None,
        typer.Option(help="The rollout of this version (from the registry).", show_default=False),
    ] = None,
    json_output: JsonFlag = False,
) -> None:
    """Show the current (or last) rollout of a model: phase, weight, every step measured."""
    settings = _settings(ctx, model, backend)
    chosen: Backend | None = None
    current: RolloutState | None = None
    where = f"the {settings.rollout.backend} backend"
    try:
        chosen = make_backend(settings)
        current = chosen.load_state()
    except Unavailable as exc:  # no cluster access: the registry has the same history
        where = f"{where} ({exc})"
    if current is None or (version is not None and current.version != version):
        chosen, registry_note = None, "in MLflow"
        try:
            from roost.rollout.record import Recorder

            current = Recorder(settings).last_rollout(version)
        except Unavailable as exc:
            current, registry_note = None, f"and MLflow is unreachable ({exc})"
        if current is None:
            raise NotFound(
                f"no rollout of {settings.registry.model_name} on {where} {registry_note}"
            )
        if not json_output:
            console.print(f"[dim]from the MLflow registry (nothing on {where})[/]")
    if json_output:
        emit_json(summary(current, chosen))
        return
    console.print(
        f"rollout {current.id}: {current.model} v{current.version} vs champion "
        f"v{current.champion} - [bold]{current.phase.value}[/] at {current.weight}% "
        f"(step {min(current.step + 1, len(current.plan.steps))}/{len(current.plan.steps)}, "
        f"mode {current.plan.mode})"
    )
    if current.holding:
        console.print(f"holding: {current.holding}")
    if current.failure and current.terminal:
        console.print(f"failed metric: {current.failure.get('metric')}")
        if current.failure.get("disagreeing_ids"):
            console.print(f"disagreeing ids: {', '.join(current.failure['disagreeing_ids'])}")
    if current.shadow is not None:
        console.print(f"shadow: {engine.shadow_summary(current)}")
    console.print(f"driven by {current.owner or 'nobody'}; MLflow run {current.run_id or '-'}")
    _render_outcome(current, chosen)


def _override(action: Action) -> Callable[..., None]:
    def command(
        ctx: typer.Context,
        model: ModelArg = None,
        backend: BackendOpt = None,
        wait: Annotated[
            float, typer.Option(help="Seconds to wait for the rollout to act on it.")
        ] = 60.0,
        timeout: TimeoutOpt = None,
        json_output: JsonFlag = False,
    ) -> None:
        settings = _settings(ctx, model, backend)
        chosen = make_backend(settings)
        controller = _controller(settings, chosen, json_output)
        result = controller.request(action, by="cli", wait_s=wait)
        if action == "resume" and not result.terminal:
            result = controller.run(timeout)  # drive it on unless someone else does
        if json_output:
            emit_json(summary(result, chosen))
        else:
            console.print(
                f"{result.model} v{result.version}: {result.phase.value} at {result.weight}%"
            )

    command.__doc__ = {
        "pause": "Hold the canary at its current weight (no verdicts until resumed).",
        "resume": "Resume a paused (or orphaned) rollout and drive it to the end.",
        "abort": "Roll back now: weight 0, @challenger removed, version tagged rolled_back.",
        "promote": "Promote now, skipping the remaining analysis.",
    }[action]
    return command


for _action in ACTIONS:
    app.command(_action)(_override(_action))


@app.command("down")
def down(ctx: typer.Context, model: ModelArg = None) -> None:
    """local backend: stop the nginx proxy and the model servers a rollout started."""
    from roost.rollout.backends.local import LocalBackend

    settings = _settings(ctx, model, "local")
    local = LocalBackend(settings)
    current = local.load_state()
    if current is not None and not current.terminal:
        console.print(
            f"[yellow]note:[/] rollout {current.id} is {current.phase.value}; it resumes later"
        )
    local.shutdown()
    console.print(f"stopped the local proxy and servers of {local.model}")
