"""Kubernetes and AWS commands: ``roost deploy``, ``roost aws ...``, ``roost train --on k8s``."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Annotated

import typer
from rich import box
from rich.table import Table

from roost.cli.context import state
from roost.cli.output import JsonFlag, console, emit_json, interactive
from roost.errors import ConfigError, RoostError
from roost.monitor.deploy import with_logger

if TYPE_CHECKING:
    from roost.config import Settings

aws_app = typer.Typer(
    no_args_is_help=True,
    help="AWS set-up for EKS (S3 artifact bucket, IAM policy).",
    epilog="Example: roost aws bootstrap --bucket roost-artifacts-123456789012 --dry-run",
)

BucketOpt = Annotated[
    str | None, typer.Option(help="Bucket name (also aws.bucket).", show_default=False)
]
RegionOpt = Annotated[
    str | None, typer.Option(help="AWS region (default: us-east-1).", show_default=False)
]

RUNTIME_ROOST = "roost"
RUNTIME_TORCHSERVE = "torchserve"


# -- roost train --on k8s --------------------------------------------------------------------


def train_on_k8s(settings: Settings, json_output: bool) -> None:
    """Run training as a Job from the chart's template; stream logs; report the MLflow run."""
    from roost import k8s, k8s_jobs, tracking

    cfg = settings.k8s
    env = k8s_jobs.training_env(settings)  # bad flags fail before anything is created
    api = k8s.load_client(cfg.context)
    templates = k8s.read_templates(api, cfg.namespace, cfg.templates_configmap)
    base = k8s.template(templates, k8s.TEMPLATE_JOB, "Job")
    name = k8s_jobs.job_name()
    manifest = k8s_jobs.job_manifest(base, name, env, {"roost.io/submitted-by": "roost-cli"})
    epochs = settings.train.epochs
    quiet = json_output
    if not quiet:
        console.print(
            f"Job [bold]{cfg.namespace}/{name}[/]: up to {epochs} epochs"
            + (f", settings {', '.join(e['name'] for e in env)}" if env else "")
        )
    report = k8s_jobs.TrainingReport()
    started = time.monotonic()
    status_text = ["submitting"]
    spinner = console.status("submitting") if interactive(json_output) else None

    def progress() -> str:
        epoch = f"epoch {report.epoch}/{epochs}" if report.epoch else "starting"
        loss = f", loss {report.loss:.4f}" if report.loss is not None else ""
        return f"{name}: {status_text[0]} | {epoch}{loss} | {time.monotonic() - started:.0f}s"

    def on_line(pod: str, line: str) -> None:
        report.feed(line)
        if quiet:
            return
        console.print(f"[dim]{pod[-5:]}[/] {line}", markup=True, highlight=False)
        if spinner is not None:
            spinner.update(progress())

    def on_status(text: str) -> None:
        status_text[0] = text
        if quiet:
            return
        if spinner is not None:
            spinner.update(progress())
        else:
            console.print(f"[dim]{progress()}[/]")

    if spinner is not None:
        spinner.start()
    try:
        result = k8s_jobs.run_job(
            api, cfg.namespace, manifest, cfg.job_timeout_s, cfg.poll_s, on_line, on_status
        )
    finally:
        if spinner is not None:
            spinner.stop()
    # The run is found by its tag in MLflow (the Job's name), never read from the log.
    experiment = k8s_jobs.job_experiment(manifest) or settings.tracking.experiment
    try:
        uri = tracking.resolve_uri(settings)
    except RoostError as exc:
        raise type(exc)(f"Job {cfg.namespace}/{name} succeeded, but {exc}") from None
    result.run = k8s_jobs.find_run(uri, experiment, name)
    if json_output:
        emit_json(result.summary())
        return
    run = result.run
    console.print(
        f"Job [bold]{name}[/] succeeded in {result.seconds:.0f}s"
        + (f" after {len(result.pods)} attempts" if len(result.pods) > 1 else "")
    )
    accuracy = "?" if run.test_accuracy is None else f"{run.test_accuracy:.4f}"
    macro_f1 = "?" if run.macro_f1 is None else f"{run.macro_f1:.4f}"
    console.print(
        f"MLflow run [bold]{run.run_id}[/]: test accuracy {accuracy}, macro-F1 {macro_f1} "
        f"({uri}/#/experiments/{run.experiment_id}/runs/{run.run_id})"
    )
    console.print(f"next: roost promote --run-id {run.run_id}")


# -- roost deploy ----------------------------------------------------------------------------


def deploy(
    ctx: typer.Context,
    version: Annotated[
        str,
        typer.Option("--version", "-V", help="Registry version to serve.", show_default=False),
    ],
    model: Annotated[
        str | None,
        typer.Option(help="Registered model (default: sentiment).", show_default=False),
    ] = None,
    storage_uri: Annotated[
        str | None,
        typer.Option(
            help="Serve this s3:// URI instead of the registry's location of the version "
            "(a TorchServe export with the torchserve runtime).",
            show_default=False,
        ),
    ] = None,
    protocol: Annotated[
        str, typer.Option(help="rest, or grpc for the <name>-grpc InferenceService (h2c).")
    ] = "rest",
    canary: Annotated[
        int | None,
        typer.Option(
            help="Send only this percent to the new revision (canaryTrafficPercent); "
            "default: all of it.",
            min=0,
            max=100,
            show_default=False,
        ),
    ] = None,
    name: Annotated[
        str | None,
        typer.Option(help="InferenceService name (default: the chart's).", show_default=False),
    ] = None,
    namespace: Annotated[
        str | None, typer.Option(help="Namespace (default: roost).", show_default=False)
    ] = None,
    context: Annotated[
        str | None, typer.Option(help="kubeconfig context (default: current).", show_default=False)
    ] = None,
    timeout: Annotated[
        float | None,
        typer.Option(help="Seconds to wait for Ready (default: 600).", show_default=False),
    ] = None,
    wait: Annotated[bool, typer.Option(help="Wait until the InferenceService is Ready.")] = True,
    force: Annotated[
        bool,
        typer.Option(help="Take over fields another manager owns (server-side apply conflicts)."),
    ] = False,
    log_url: Annotated[
        str | None,
        typer.Option(
            help="KServe's logger sends each request and response as a CloudEvent here "
            "(e.g. the `roost monitor serve` Service; default: the chart's monitor.logger).",
            show_default=False,
        ),
    ] = None,
    log_mode: Annotated[
        str | None,
        typer.Option(
            help="Which payloads KServe logs: all, request or response.", show_default=False
        ),
    ] = None,
    json_output: JsonFlag = False,
) -> None:
    """Serve a registry version on KServe: server-side apply, wait for Ready, print the URL.

    Example: roost deploy --version 3 --canary 10   (10 % to version 3, the rest stays)
    """
    from roost import k8s

    if protocol not in ("rest", "grpc"):
        raise typer.BadParameter("expected rest or grpc", param_hint="--protocol")
    settings = state(ctx).settings(
        **{
            "registry.model_name": model,
            "k8s.namespace": namespace,
            "k8s.context": context,
            "k8s.inference_service": name,
            "k8s.ready_timeout_s": timeout,
        }
    )
    cfg = settings.k8s
    api = k8s.load_client(cfg.context)
    templates = k8s.read_templates(api, cfg.namespace, cfg.templates_configmap)
    key = k8s.TEMPLATE_ISVC_GRPC if protocol == "grpc" else k8s.TEMPLATE_ISVC
    if protocol == "grpc" and key not in templates:
        raise ConfigError(
            "the chart renders no gRPC InferenceService: install it with serving.grpc.enabled=true"
        )
    base = k8s.template(templates, key, "InferenceService")
    if "inference_service" in cfg.model_fields_set:
        suffix = "-grpc" if protocol == "grpc" else ""
        base["metadata"]["name"] = cfg.inference_service + suffix
    runtime = templates.get(k8s.TEMPLATE_RUNTIME, RUNTIME_ROOST)
    uri = resolve_storage_uri(settings, version, runtime, storage_uri, templates)
    manifest = with_logger(k8s.isvc_manifest(base, uri, version, canary), log_url, log_mode)
    target = f"{cfg.namespace}/{manifest['metadata']['name']}"
    if not json_output:
        console.print(f"InferenceService [bold]{target}[/]: version {version} from {uri}")

    def on_status(readiness: k8s.Readiness) -> None:
        if not json_output:
            console.print(f"[dim]{target}: {readiness.reason}[/]")

    result = k8s.deploy(
        api, cfg.namespace, manifest, force, wait, cfg.ready_timeout_s, cfg.poll_s, on_status
    )
    if json_output:
        emit_json({**result.summary(), "model": settings.registry.model_name, "canary": canary})
        return
    if not wait:
        console.print(f"applied {target} (generation {result.generation}); not waiting")
        return
    console.print(f"[bold green]Ready[/]: {target} serves version {version} at {result.url}")
    host = (result.url or "").split("://", 1)[-1]
    served = templates.get(k8s.TEMPLATE_MODEL_NAME, settings.serving.model_name)
    if protocol == "rest" and host:
        console.print(
            f'call it: curl -H "Host: {host}" http://<ingress>/v2/models/{served}/infer '
            '-d \'{"inputs":[{"name":"text","shape":[1],"datatype":"BYTES",'
            '"data":["the flight was great"]}]}\''
        )


def resolve_storage_uri(
    settings: Settings,
    version: str,
    runtime: str,
    explicit: str | None,
    templates: dict[str, str],
) -> str:
    """Where KServe's storage initializer downloads version ``version`` from."""
    from roost import k8s

    if explicit:
        if "://" not in explicit:
            raise ConfigError(f"--storage-uri {explicit}: expected a URI such as s3://bucket/key")
        return explicit.rstrip("/")
    model = settings.registry.model_name
    if runtime == RUNTIME_TORCHSERVE:
        pattern = settings.k8s.torchserve_storage_uri
        if not pattern:
            raise ConfigError(
                "the chart serves with TorchServe: pass --storage-uri of a `roost bench "
                "export-torchserve` export (config/config.properties + model-store/*.mar) or "
                "set k8s.torchserve_storage_uri, e.g. s3://bucket/torchserve/{model}/{version}"
            )
        return pattern.format(model=model, version=version)
    from roost import tracking
    from roost.registry import Registry

    registry = Registry(tracking.use(settings), model)
    registry.get_version(version)  # NotFound with the model and version named
    download = str(registry.client.get_model_version_download_uri(model, version))
    root = settings.k8s.artifacts_s3_root or templates.get(k8s.TEMPLATE_ARTIFACTS)
    return k8s.s3_storage_uri(download, root)


# -- roost aws ... ---------------------------------------------------------------------------


@aws_app.command()
def bootstrap(
    ctx: typer.Context,
    bucket: BucketOpt = None,
    region: RegionOpt = None,
    endpoint_url: Annotated[
        str | None,
        typer.Option(help="S3 endpoint (MinIO); default: AWS.", show_default=False),
    ] = None,
    s3_compatible: Annotated[
        bool,
        typer.Option(
            "--s3-compatible", help="An S3-compatible store: skip what it does not implement."
        ),
    ] = False,
    kms_key_id: Annotated[
        str | None,
        typer.Option(help="Encrypt with this KMS key (default: SSE-S3).", show_default=False),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Read the bucket and print the plan; change nothing.")
    ] = False,
    json_output: JsonFlag = False,
) -> None:
    """Create or fix the artifact bucket: versioning, encryption, public-access block, lifecycle."""
    from roost import aws

    settings = state(ctx).settings(
        **{
            "aws.bucket": bucket,
            "aws.region": region,
            "aws.endpoint_url": endpoint_url,
            "aws.s3_compatible": s3_compatible or None,
            "aws.kms_key_id": kms_key_id,
        }
    )
    plan = aws.bootstrap(settings.aws, dry_run=dry_run)
    policies = aws.iam_policies(settings.aws)
    if json_output:
        emit_json({**plan.summary(), "policies": policies})
        return
    verb = "would" if dry_run else "did"
    table = Table(
        title=f"s3://{plan.bucket} ({'dry run' if dry_run else 'bootstrap'})",
        box=box.SIMPLE_HEAD,
    )
    for column in ("step", "action", "detail"):
        table.add_column(column)
    colours = {"create": "green", "update": "yellow", "skipped": "dim", "unknown": "red"}
    for step in plan.steps:
        colour = colours.get(step.action, "white")
        table.add_row(step.name, f"[{colour}]{step.action}[/]", step.detail)
    console.print(table)
    console.print(f"{verb} change: {'yes' if plan.changed else 'nothing'}")
    console.print(
        "IAM policies of the IRSA roles (manifests/eks/cluster.yaml attaches them; "
        "`roost aws policy --role NAME` prints one as JSON on stdout):"
    )
    for role, document in policies.items():
        console.print(f"[bold]{role}[/]")
        console.print_json(json.dumps(document))


@aws_app.command()
def policy(
    ctx: typer.Context,
    bucket: BucketOpt = None,
    role: Annotated[
        str | None,
        typer.Option(
            help="One role: roost-mlflow, roost-training or roost-kserve-storage "
            "(default: all, by role name).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Print the IAM policy document(s) the IRSA roles need, as JSON on stdout."""
    from roost import aws

    settings = state(ctx).settings(**{"aws.bucket": bucket})
    policies = aws.iam_policies(settings.aws)
    if role is None:
        emit_json(policies)
        return
    if role not in policies:
        raise typer.BadParameter(f"expected one of {', '.join(policies)}", param_hint="--role")
    emit_json(policies[role])
