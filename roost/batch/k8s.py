"""``roost batch --on k8s``: an Indexed Job from the chart's template, then the finalize step.

Stages, in order:

1. check what the pods need: ``s3://`` input and output, input files that exist, a model the
   pods can fetch; an alias is resolved to its version here, so every shard (and every retry)
   scores with the same version even if the alias moves during the job;
2. take the chart's ``batch-job.yaml`` from the templates ConfigMap (``roost.k8s_jobs`` path,
   as for training), set completions = shards, parallelism, the container's arguments and the
   caller's non-default ``batch`` settings; each pod reads its shard from the completion index
   (``ROOST_BATCH__SHARD_INDEX``), and a retried pod resumes from its recorded chunks;
3. create the Job, stream the pods' logs, wait for Complete or Failed;
4. finalize: write ``_manifest.json`` and ``_SUCCESS`` under the output prefix.
"""

from __future__ import annotations

from typing import Any

from roost import k8s, k8s_jobs
from roost.batch import runner, sources
from roost.config import BatchSettings, Settings
from roost.errors import ConfigError

TEMPLATE = "batch-job.yaml"
CONTAINER = "batch"
# Settings a pod takes from the caller when they differ from the defaults.
PASSED = (
    "text_column", "id_column", "chunk_rows", "forward_batch_size", "format",
    "max_error_rate", "threads", "experiment",
)  # fmt: skip


def pod_model_uri(settings: Settings, model: str) -> str:
    """A model URI every pod resolves to the same version (alias resolved here)."""
    from roost import registry, tracking

    ref = runner.model_reference(settings, model)
    if ref.startswith("models:/"):
        name, version, alias = registry.parse_models_uri(ref)
        if alias is not None:
            version = registry.Registry(tracking.use(settings), name).require_alias(alias)
        return f"models:/{name}/{version}"
    if ref.startswith(("s3://", "runs:/", "mlflow-artifacts:")):
        return ref
    raise ConfigError(
        f"--model {model}: a batch pod cannot read a local directory; register the model "
        "(models:/NAME/VERSION) or pass an s3:// URI"
    )


def batch_env(cfg: BatchSettings) -> list[dict[str, str]]:
    """The caller's non-default batch settings as ROOST_BATCH__* variables (pure)."""
    defaults = BatchSettings()
    env = []
    for key in PASSED:
        value = getattr(cfg, key)
        if value is None or value == getattr(defaults, key):
            continue
        env.append({"name": f"ROOST_BATCH__{key.upper()}", "value": str(value)})
    return env


def batch_manifest(
    base: dict[str, Any],
    name: str,
    model_uri: str,
    input_uri: str,
    output_uri: str,
    shards: int,
    env: list[dict[str, str]],
) -> dict[str, Any]:
    """The chart's Indexed Job with this job's shards and arguments (pure)."""
    manifest = k8s_jobs.job_manifest(
        base, name, env, {"roost.io/submitted-by": "roost-cli"}, container_name=CONTAINER
    )
    spec = manifest["spec"]
    if spec.get("completionMode") != "Indexed":
        raise ConfigError("the chart's batch Job template is not an Indexed Job")
    spec["completions"] = shards
    spec["parallelism"] = max(1, min(int(spec.get("parallelism") or shards), shards))
    container = next(c for c in spec["template"]["spec"]["containers"] if c["name"] == CONTAINER)
    container["args"] = [
        "batch", "--model", model_uri, "--input", input_uri, "--output", output_uri,
        "--shards", str(shards),
    ]  # fmt: skip
    return manifest


def run_on_k8s(
    settings: Settings,
    input_uri: str,
    output_uri: str,
    on_line: k8s_jobs.LineHandler | None = None,
) -> dict[str, Any]:
    cfg = settings.batch
    for flag, uri in (("--input", input_uri), ("--output", output_uri)):
        if not uri.startswith("s3://"):
            raise ConfigError(f"{flag} {uri}: batch pods cannot read local files; use s3://")
    if cfg.shard_index is not None:
        raise ConfigError("--shard-index is for a pod of the Job, not with --on k8s")
    sources.list_inputs(input_uri)  # a missing input fails here, before the Job exists
    model_uri = pod_model_uri(settings, cfg.model)
    kcfg = settings.k8s
    api = k8s.load_client(kcfg.context)
    templates = k8s.read_templates(api, kcfg.namespace, kcfg.templates_configmap)
    base = k8s.template(templates, TEMPLATE, "Job")
    name = k8s_jobs.job_name(prefix="roost-batch")
    manifest = batch_manifest(
        base, name, model_uri, input_uri, output_uri, cfg.shards, batch_env(cfg)
    )
    result = k8s_jobs.run_job(
        api,
        kcfg.namespace,
        manifest,
        cfg.job_timeout_s,
        kcfg.poll_s,
        on_line=on_line,
        container=CONTAINER,
    )
    document = runner.finalize(settings, output_uri)
    return {
        "job": result.name,
        "namespace": result.namespace,
        "pods": result.pods,
        "shards": cfg.shards,
        "model_uri": model_uri,
        "model": document["job"]["model_name"],
        "model_version": document["job"]["model_version"],
        "output": output_uri,
        "rows": document["rows"],
        "errors": document["errors"],
        "parts": len(document["parts"]),
        "seconds": round(result.seconds, 1),
        "finalized": True,
        "succeeded": True,
        "manifest": f"{output_uri.rstrip('/')}/_manifest.json",
    }
