"""``roost batch``: score files (local or S3) with a registry version, resumably.

Heavy libraries (torch, pyarrow, mlflow, pyspark) load inside the command, never at import.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from roost.cli.context import state
from roost.cli.output import JsonFlag, console, emit_json, interactive

app = typer.Typer(help="Batch predictions: score files on disk or S3 with a model version.")

EPILOG = (
    "Examples: roost batch --model models:/sentiment@champion --input 's3://bucket/in/*.parquet' "
    "--output s3://bucket/scores/2026-12-01 | roost batch --model 3 --input tweets.csv "
    "--output out/ --format csv | roost batch --on k8s --shards 8 ... | "
    "roost batch --engine spark --master 'local[*]' ..."
)


@app.callback(invoke_without_command=True, epilog=EPILOG)
def batch(
    ctx: typer.Context,
    model: Annotated[
        str | None,
        typer.Option(
            help="models:/NAME@ALIAS, models:/NAME/VERSION, a version number or a model "
            "directory (default: models:/sentiment@champion).",
            show_default=False,
        ),
    ] = None,
    input_uri: Annotated[
        str | None,
        typer.Option(
            "--input",
            help="File, directory, s3:// prefix or glob of .parquet/.csv/.jsonl files.",
            show_default=False,
        ),
    ] = None,
    output: Annotated[
        str | None,
        typer.Option(
            help="Output directory or s3:// prefix (empty, or this job's).", show_default=False
        ),
    ] = None,
    text_column: Annotated[
        str | None, typer.Option(help="Text column (default: text).", show_default=False)
    ] = None,
    id_column: Annotated[
        str | None,
        typer.Option(
            help="Id column copied to the output (default: id; absent: the row number).",
            show_default=False,
        ),
    ] = None,
    chunk_rows: Annotated[
        int | None,
        typer.Option(
            help="Rows per output file and resume unit (default: 20000).", show_default=False, min=1
        ),
    ] = None,
    fmt: Annotated[
        str | None,
        typer.Option(
            "--format", help="parquet, csv or jsonl (default: parquet).", show_default=False
        ),
    ] = None,
    max_error_rate: Annotated[
        float | None,
        typer.Option(
            help="Fail if bad rows / rows is above this (default: 0.01).",
            show_default=False,
            min=0.0,
            max=1.0,
        ),
    ] = None,
    shards: Annotated[
        int | None,
        typer.Option(
            help="Split the input files into this many shards (default: 1).",
            show_default=False,
            min=1,
        ),
    ] = None,
    shard_index: Annotated[
        int | None,
        typer.Option(
            help="Score only this shard, no manifest (what each Job pod does).",
            show_default=False,
            min=0,
        ),
    ] = None,
    on: Annotated[
        str, typer.Option(help="Where to run: local (this process) or k8s (an Indexed Job).")
    ] = "local",
    engine: Annotated[
        str | None,
        typer.Option(
            help="local (roost's batch kernel) or spark (mlflow.pyfunc.spark_udf).",
            show_default=False,
        ),
    ] = None,
    master: Annotated[
        str | None,
        typer.Option(
            help="Spark master: local[*], spark://HOST:7077, k8s://https://API.", show_default=False
        ),
    ] = None,
    json_output: JsonFlag = False,
) -> None:
    """Score input files with a model version; write scores, errors/, a manifest and _SUCCESS."""
    if ctx.invoked_subcommand is not None:
        return
    if on not in ("local", "k8s"):
        raise typer.BadParameter("expected local or k8s", param_hint="--on")
    if fmt is not None and fmt not in ("parquet", "csv", "jsonl"):
        raise typer.BadParameter("expected parquet, csv or jsonl", param_hint="--format")
    if engine is not None and engine not in ("local", "spark"):
        raise typer.BadParameter("expected local or spark", param_hint="--engine")
    if not input_uri:
        raise typer.BadParameter("required", param_hint="--input")
    if not output:
        raise typer.BadParameter("required", param_hint="--output")
    settings = state(ctx).settings(
        **{
            "batch.model": model,
            "batch.text_column": text_column,
            "batch.id_column": id_column,
            "batch.chunk_rows": chunk_rows,
            "batch.format": fmt,
            "batch.max_error_rate": max_error_rate,
            "batch.shards": shards,
            "batch.shard_index": shard_index,
            "batch.engine": engine,
            "batch.spark_master": master,
        }
    )
    if on == "k8s":
        from roost.batch import k8s as batch_k8s

        summary = batch_k8s.run_on_k8s(
            settings, input_uri, output, on_line=None if json_output else _pod_line
        )
        if json_output:
            emit_json(summary)
        else:
            _print_summary(summary)
        return
    if settings.batch.engine == "spark":
        from roost.batch import spark

        summary = spark.run(settings, input_uri, output)
        if json_output:
            emit_json(summary)
        else:
            _print_summary(summary)
        return
    from roost.batch import runner

    with RowProgress(interactive(json_output)) as progress:
        result = runner.run(settings, input_uri, output, progress=progress.update)
    if json_output:
        emit_json(result.summary())
    else:
        _print_summary(result.summary())


@app.command("finalize")
def finalize(
    ctx: typer.Context,
    output: Annotated[str, typer.Option(help="The job's output directory or s3:// prefix.")],
    max_error_rate: Annotated[
        float | None,
        typer.Option(
            help="Fail if bad rows / rows is above this (default: 0.01).",
            show_default=False,
            min=0.0,
            max=1.0,
        ),
    ] = None,
    json_output: JsonFlag = False,
) -> None:
    """Write the manifest and _SUCCESS once every shard of a job has finished."""
    from roost.batch import runner

    settings = state(ctx).settings(**{"batch.max_error_rate": max_error_rate})
    document = runner.finalize(settings, output)
    if json_output:
        emit_json(document)
        return
    console.print(
        f"{output}: {document['rows']} rows, {document['errors']} bad, "
        f"{len(document['parts'])} part files; manifest and _SUCCESS written"
    )


class RowProgress:
    """A rows/s + ETA bar on a terminal; nothing otherwise (the summary follows)."""

    def __init__(self, show: bool) -> None:
        self.show = show
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> RowProgress:
        if self.show:
            from rich.progress import (
                BarColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                TextColumn("[bold]scoring"),
                BarColumn(),
                TextColumn("{task.completed:,.0f} rows"),
                _rows_per_second(),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=console,
            )
            self._progress.start()
            self._task = self._progress.add_task("batch", total=None)
        return self

    def update(self, rows: int, total: int | None) -> None:
        if self._progress is None:
            return
        self._progress.update(self._task, completed=rows, total=total)

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()


def _rows_per_second() -> Any:
    from rich.progress import ProgressColumn
    from rich.text import Text

    class RowsPerSecond(ProgressColumn):  # type: ignore[misc]
        """rich's own speed estimate (recent updates), in rows/s."""

        def render(self, task: Any) -> Text:
            return Text(f"{task.speed or 0:,.0f} rows/s")

    return RowsPerSecond()


def _pod_line(pod: str, line: str) -> None:
    console.print(f"[dim]{pod[-5:]}[/] {line}", markup=True, highlight=False)


def _print_summary(summary: dict[str, Any]) -> None:
    rows, errors = summary.get("rows", 0), summary.get("errors", 0)
    console.print(
        f"{summary.get('model')} v{summary.get('model_version')}: {rows:,} rows "
        f"({errors:,} bad) -> {summary.get('output')}"
    )
    if summary.get("rows_per_s"):
        console.print(
            f"{summary.get('rows_this_run', rows):,} rows scored in this run at "
            f"{summary['rows_per_s']:,.0f} rows/s; chunks written {summary.get('chunks_written')}"
            f", skipped (already done) {summary.get('chunks_skipped')}"
        )
    if summary.get("run_id"):
        console.print(f"MLflow run {summary['run_id']}")
    if summary.get("succeeded"):
        console.print(f"manifest {summary.get('manifest')} and _SUCCESS written")
    elif summary.get("shards_done") is not None and not summary.get("finalized"):
        console.print(f"shard(s) {summary.get('shards_done')} done; finalize when all are")
