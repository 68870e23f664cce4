"""The ``roost`` command: global options, sub-command groups, and the one error handler.

Every ``RoostError`` becomes one line on stderr and its exit code (0 ok, 1 unexpected,
2 usage/bad input, 3 not found, 4 timeout/unavailable, 5 rollout aborted).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from roost import __version__, logs
from roost.cli.context import CliState
from roost.cli.context import state as state  # old import path; commands use cli.context
from roost.errors import RoostError


class RoostGroup(TyperGroup):
    """Maps RoostError (and MLflow's own errors) to one line and an exit code."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except RoostError as exc:
            _fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except Exception as exc:
            mlflow_errors = sys.modules.get("mlflow.exceptions")
            if mlflow_errors is not None and isinstance(exc, mlflow_errors.MlflowException):
                from roost.tracking import registry_error

                error = registry_error(exc, "answering")  # exit 4 if the server failed
                _fail(f"MLflow: {exc.message}", error.exit_code)
            raise


def _fail(message: str, code: int) -> None:
    from roost.cli.output import console

    first_line = message.strip().splitlines()[0] if message.strip() else "failed"
    console.print(f"[bold red]error:[/] {first_line}", markup=True, highlight=False, soft_wrap=True)
    raise typer.Exit(code)


app = typer.Typer(
    cls=RoostGroup,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="roost: train, register, promote and canary-serve PyTorch models "
    "(MLflow registry, KServe serving).",
    epilog="Example: roost mlflow up && roost train && roost promote && roost serve",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"roost {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", "-c", help="YAML config file (also ROOST_CONFIG).", show_default=False
        ),
    ] = None,
    state_dir: Annotated[
        Path | None,
        typer.Option(
            help="Local state directory (default .roost; also ROOST_STATE_DIR).", show_default=False
        ),
    ] = None,
    verbose: Annotated[
        int, typer.Option("--verbose", "-v", count=True, help="-v info, -vv debug logs.")
    ] = 0,
    log_format: Annotated[
        str, typer.Option(help="Log format: auto, rich, json or plain.")
    ] = "auto",
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """roost command line."""
    if log_format not in ("auto", "rich", "json", "plain"):
        raise typer.BadParameter("expected auto, rich, json or plain", param_hint="--log-format")
    logs.configure(verbose, log_format)  # type: ignore[arg-type]
    logs.quiet_libraries()
    ctx.obj = CliState(config_file=config, state_dir=state_dir)


def _register() -> None:
    # One line per command or group; each module (roost/cli/<name>.py) owns its own commands.
    # Every module named here is imported on every start, `roost --version` included, so at
    # module level it imports only typer, rich and light roost modules (cli.context, config,
    # errors); torch, mlflow, pandas, kserve, kubernetes, boto3, ... are imported inside the
    # command function that needs them (annotations: under TYPE_CHECKING).
    # tests/unit/test_cli_startup.py fails when a start imports one of them.
    from roost.cli import (
        batch,
        bench,
        cluster,
        demo,
        lineage,
        monitor,
        registry,
        rollout,
        serve,
        tracking,
        train,
        tune,
    )

    app.command("train")(train.train)
    app.command("promote")(registry.promote)
    app.command("serve")(serve.serve)
    app.command("predict")(serve.predict)
    app.command("demo")(demo.demo)
    app.add_typer(tracking.app, name="mlflow")
    app.add_typer(registry.app, name="registry")
    app.add_typer(rollout.app, name="rollout")
    app.add_typer(cluster.aws_app, name="aws")
    app.command("deploy")(cluster.deploy)
    app.add_typer(bench.app, name="bench")
    app.command("tune", epilog=tune.EPILOG)(tune.tune)
    app.command("tune-worker", hidden=True)(tune.worker)
    app.command("lineage", epilog=lineage.EPILOG)(lineage.lineage)
    app.add_typer(monitor.app, name="monitor")
    app.add_typer(batch.app, name="batch")


_register()


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point."""
    if argv is None:
        # KServe parses sys.argv when first imported (kserve.model_server, at module level)
        # and exits on an option it owns with a value it does not know: `roost predict
        # --protocol grpc`, `roost bench profile --protocol rest-v2`. The arguments are
        # roost's: typer gets them, KServe sees none.
        argv = sys.argv[1:]
        del sys.argv[1:]
    try:
        result = app(args=argv, prog_name="roost", standalone_mode=False)
    except typer.Exit as exc:
        return int(exc.exit_code)
    except typer.Abort:
        return 130
    except Exception as exc:
        show = getattr(exc, "show", None)  # usage errors (click's ClickException)
        if callable(show):
            show()
            return int(getattr(exc, "exit_code", 2))
        raise
    return result if isinstance(result, int) else 0
