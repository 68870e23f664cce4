"""Training as a Kubernetes Job: build it from the chart's template, submit, follow, report.

``roost train --on k8s`` renames the chart's Job template (ConfigMap ``k8s.templates_configmap``,
key ``training-job.yaml``), adds the caller's training settings as ``ROOST_*`` environment
variables, creates it, streams its pods' logs (a retried pod's too: it resumes from the last
checkpoint on S3) and waits for ``Complete`` or ``Failed``. The training process tags its MLflow
run with the Job's name (``roost.k8s.job``, from ``ROOST_JOB_NAME`` that the chart sets with the
downward API); the CLI then finds the run with a tag search, never by reading the pod's log.
"""

from __future__ import annotations

import copy
import json
import re
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from roost.config import Settings
from roost.errors import ConfigError, RoostError, Timeout, Unavailable
from roost.k8s import _api_error, _transport_error

JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
CONTAINER = "train"
# Sections of the settings a training pod needs; anything else is the cluster's business.
TRAINING_SECTIONS = ("data", "model", "train")

# The run tag that ties a training run to its Job, and the variable the pod reads it from.
JOB_TAG = "roost.k8s.job"
JOB_NAME_ENV = "ROOST_JOB_NAME"
EXPERIMENT_ENV = "ROOST_TRACKING__EXPERIMENT"

# `roost train`'s epoch line, for the progress display only (roost/cli/output.py).
EPOCH_LINE = re.compile(r"^\s*epoch (?P<epoch>\d+): train loss (?P<loss>[0-9.]+)")

Phase = Literal["running", "succeeded", "failed"]


class JobFailed(RoostError):
    """A Kubernetes Job ended in the Failed condition."""

    exit_code = 1
    http_status = 500


def job_name(now: float | None = None, prefix: str = "roost-train") -> str:
    """A fresh, sortable Job name: roost-train-20250101-120000-ab12."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now if now is not None else time.time()))
    return f"{prefix}-{stamp}-{secrets.token_hex(2)}"


def _env_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | dict):
        return json.dumps(value)
    return str(value)


def training_env(settings: Settings) -> list[dict[str, str]]:
    """The caller's training settings as ROOST_* variables for the pod (pure).

    Only values that differ from the defaults travel, so the chart's template keeps its say
    on the rest (device, checkpoint prefix). Local paths cannot: the pod cannot read them.
    """
    uri = settings.data.uri
    if uri is not None and not uri.startswith("s3://"):
        raise ConfigError(
            f"--data {uri}: a training pod cannot read local files; upload it to S3 and pass "
            "the s3:// URI"
        )
    checkpoint = settings.train.checkpoint_dir
    if checkpoint is not None and not checkpoint.startswith("s3://"):
        raise ConfigError(
            f"--checkpoint-dir {checkpoint}: a training pod needs an s3:// prefix "
            "(default: the chart's, per Job)"
        )
    env: list[dict[str, str]] = []
    for section in TRAINING_SECTIONS:
        values = getattr(settings, section).model_dump(mode="json", exclude_defaults=True)
        for key, value in sorted(values.items()):
            if value is None:
                continue
            env.append(
                {"name": f"ROOST_{section.upper()}__{key.upper()}", "value": _env_value(value)}
            )
    if settings.tracking.experiment != type(settings.tracking)().experiment:
        env.append({"name": "ROOST_TRACKING__EXPERIMENT", "value": settings.tracking.experiment})
    return env


def job_manifest(
    base: dict[str, Any],
    name: str,
    env: list[dict[str, str]],
    labels: dict[str, str],
    container_name: str = CONTAINER,
) -> dict[str, Any]:
    """The chart's Job template renamed, with ``env`` on the train container (pure).

    A variable already in the template is replaced in place, so the pod sees one value.
    """
    manifest = copy.deepcopy(base)
    metadata = manifest.setdefault("metadata", {})
    metadata["name"] = name
    for key in ("resourceVersion", "uid", "creationTimestamp", "generateName"):
        metadata.pop(key, None)
    annotations = {
        k: v for k, v in (metadata.get("annotations") or {}).items() if not k.startswith("helm.sh/")
    }
    if annotations:
        metadata["annotations"] = annotations
    else:
        metadata.pop("annotations", None)
    metadata["labels"] = {**(metadata.get("labels") or {}), **labels}
    manifest.pop("status", None)
    pod = manifest["spec"]["template"]
    pod.setdefault("metadata", {})["labels"] = {
        **(pod.get("metadata", {}).get("labels") or {}),
        **labels,
    }
    containers = pod["spec"]["containers"]
    container = next((c for c in containers if c.get("name") == container_name), None)
    if container is None:
        raise ConfigError(f"the Job template has no container named {container_name!r}")
    current = list(container.get("env") or [])
    for item in env:
        index = next((i for i, e in enumerate(current) if e.get("name") == item["name"]), None)
        if index is None:
            current.append(dict(item))
        else:
            current[index] = dict(item)
    container["env"] = current
    return manifest


@dataclass(frozen=True)
class JobState:
    phase: Phase
    reason: str = ""
    message: str = ""


def job_state(obj: dict[str, Any]) -> JobState:
    """Running, succeeded or failed, from the Job's conditions (pure)."""
    for condition in (obj.get("status") or {}).get("conditions") or []:
        if condition.get("status") != "True":
            continue
        if condition.get("type") == "Complete":
            return JobState(
                "succeeded", condition.get("reason") or "", condition.get("message") or ""
            )
        if condition.get("type") == "Failed":
            return JobState("failed", condition.get("reason") or "", condition.get("message") or "")
    return JobState("running")


def pod_waiting_reason(pod: dict[str, Any]) -> str:
    """Why a pod is not running yet: 'ImagePullBackOff: ...', 'Unschedulable: ...' (pure)."""
    status = pod.get("status") or {}
    for container in status.get("containerStatuses") or status.get("initContainerStatuses") or []:
        waiting = (container.get("state") or {}).get("waiting")
        if waiting:
            return f"{waiting.get('reason', 'Waiting')}: {waiting.get('message', '')}".rstrip(": ")
    for condition in status.get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
            return f"{condition.get('reason', 'Unschedulable')}: {condition.get('message', '')}"
    return str(status.get("phase") or "Pending")


@dataclass
class TrainingReport:
    """Progress seen in the logs (display only: the run's facts come from MLflow)."""

    epoch: int | None = None
    loss: float | None = None

    def feed(self, line: str) -> bool:
        """Read one log line; True when it changed the report (pure)."""
        if m := EPOCH_LINE.match(line):
            self.epoch, self.loss = int(m["epoch"]), float(m["loss"])
            return True
        return False


@dataclass(frozen=True)
class TrainedRun:
    """The MLflow run a Job recorded, found by its ``roost.k8s.job`` tag."""

    run_id: str
    experiment_id: str
    status: str
    test_accuracy: float | None
    macro_f1: float | None


@dataclass
class JobResult:
    name: str
    namespace: str
    state: JobState
    pods: list[str] = field(default_factory=list)
    report: TrainingReport = field(default_factory=TrainingReport)
    last_lines: list[str] = field(default_factory=list)
    seconds: float = 0.0
    run: TrainedRun | None = None

    def summary(self) -> dict[str, Any]:
        run = self.run
        return {
            "job": self.name,
            "namespace": self.namespace,
            "succeeded": self.state.phase == "succeeded",
            "reason": self.state.reason or None,
            "pods": self.pods,
            "run_id": run.run_id if run else None,
            "experiment_id": run.experiment_id if run else None,
            "test_accuracy": run.test_accuracy if run else None,
            "test_macro_f1": run.macro_f1 if run else None,
            "epochs_seen": self.report.epoch,
            "seconds": round(self.seconds, 1),
        }


def job_experiment(manifest: dict[str, Any]) -> str | None:
    """The MLflow experiment the Job's pod logs to (its ROOST_TRACKING__EXPERIMENT)."""
    for container in manifest["spec"]["template"]["spec"]["containers"]:
        if container.get("name") != CONTAINER:
            continue
        for item in container.get("env") or []:
            if item.get("name") == EXPERIMENT_ENV and item.get("value"):
                return str(item["value"])
    return None


def find_run(tracking_uri: str, experiment: str, job: str) -> TrainedRun:
    """The finished run tagged ``roost.k8s.job=<job>`` in ``experiment`` (a tag search).

    A retried pod resumes the same run from its checkpoint, so there is one; if a restart
    without a checkpoint made two, the latest finished one is the Job's result.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from roost.errors import NotFound
    from roost.tracking import registry_error

    client = MlflowClient(tracking_uri=tracking_uri)
    doing = f"looking up the run of Job {job} (tag {JOB_TAG})"
    try:
        exp = client.get_experiment_by_name(experiment)
        runs = (
            client.search_runs(
                [exp.experiment_id],
                filter_string=f"tags.`{JOB_TAG}` = '{job}' and attributes.status = 'FINISHED'",
                order_by=["attributes.start_time DESC"],
                max_results=1,
            )
            if exp is not None
            else []
        )
    except MlflowException as exc:
        raise registry_error(exc, doing) from None
    if not runs:
        raise NotFound(
            f"Job {job} succeeded but experiment {experiment!r} at {tracking_uri} has no finished "
            f"run tagged {JOB_TAG}={job}: is this the MLflow server the Job logs to?"
        )
    run = runs[0]
    metrics = run.data.metrics
    return TrainedRun(
        run_id=str(run.info.run_id),
        experiment_id=str(run.info.experiment_id),
        status=str(run.info.status),
        test_accuracy=metrics.get("test_accuracy"),
        macro_f1=metrics.get("test_macro_f1"),
    )


# -- API calls -------------------------------------------------------------------------------


def submit_job(api: Any, namespace: str, manifest: dict[str, Any]) -> dict[str, Any]:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    what = f"Job {namespace}/{manifest['metadata']['name']}"
    try:
        obj = client.BatchV1Api(api).create_namespaced_job(
            namespace, cast(Any, manifest), field_manager="roost"
        )
    except ApiException as exc:
        raise _api_error(exc, what) from None
    except HTTPError as exc:
        raise _transport_error(exc, what) from None
    result: dict[str, Any] = api.sanitize_for_serialization(obj)
    return result


def get_job(api: Any, namespace: str, name: str) -> dict[str, Any]:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        obj = client.BatchV1Api(api).read_namespaced_job(name, namespace)
    except ApiException as exc:
        raise _api_error(exc, f"Job {namespace}/{name}") from None
    except HTTPError as exc:
        raise _transport_error(exc, f"Job {namespace}/{name}") from None
    result: dict[str, Any] = api.sanitize_for_serialization(obj)
    return result


def job_pods(api: Any, namespace: str, name: str) -> list[dict[str, Any]]:
    """The Job's pods, oldest first."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        pods = client.CoreV1Api(api).list_namespaced_pod(
            namespace, label_selector=f"{JOB_NAME_LABEL}={name}"
        )
    except ApiException as exc:
        raise _api_error(exc, f"pods of Job {namespace}/{name}") from None
    except HTTPError as exc:
        raise _transport_error(exc, f"pods of Job {namespace}/{name}") from None
    items: list[dict[str, Any]] = api.sanitize_for_serialization(pods).get("items") or []
    return sorted(
        items,
        key=lambda p: (p["metadata"].get("creationTimestamp") or "", p["metadata"]["name"]),
    )


def follow_log(
    api: Any, namespace: str, pod: str, timeout_s: float, container: str = CONTAINER
) -> Iterator[str]:
    """The container's log, line by line, until it ends (follow=True)."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError, ReadTimeoutError

    what = f"log of pod {namespace}/{pod}"
    try:
        response: Any = client.CoreV1Api(api).read_namespaced_pod_log(
            pod,
            namespace,
            container=container,
            follow=True,
            _preload_content=False,
            _request_timeout=(10, max(timeout_s, 1.0)),
        )
    except ApiException as exc:
        raise _api_error(exc, what) from None
    except ReadTimeoutError:
        return  # no answer in the time left: the caller's deadline (see below)
    except HTTPError as exc:
        raise _transport_error(exc, what) from None
    buffer = b""
    try:
        for chunk in response.stream(4096):
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                yield line.decode("utf-8", "replace").rstrip("\r")
        if buffer:
            yield buffer.decode("utf-8", "replace").rstrip("\r")
    except ReadTimeoutError:
        # The read timeout is the time left: the caller's deadline, not the API, ran out.
        return
    except HTTPError as exc:
        raise _transport_error(exc, what) from None
    finally:
        response.release_conn()


# -- the whole run ---------------------------------------------------------------------------

LineHandler = Callable[[str, str], None]  # (pod, line)
StatusHandler = Callable[[str], None]


def run_job(
    api: Any,
    namespace: str,
    manifest: dict[str, Any],
    timeout_s: float,
    poll_s: float = 2.0,
    on_line: LineHandler | None = None,
    on_status: StatusHandler | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    container: str = CONTAINER,
) -> JobResult:
    """Create the Job, stream every pod's log in turn, return when it completes or fails.

    Raises :class:`JobFailed` (the reason and the last log lines in the message) or
    :class:`Timeout` (with the last pod state) after ``timeout_s``.
    """
    started = clock()
    submit_job(api, namespace, manifest)
    name = manifest["metadata"]["name"]
    try:
        return _follow_job(
            api, namespace, name, started, timeout_s, poll_s, on_line, on_status, sleep, clock,
            container,
        )  # fmt: skip
    except Unavailable as exc:
        # The Job outlives this client: say so, and how to stop it, in the one error line.
        raise type(exc)(
            f"{exc}; Job {namespace}/{name} keeps running: kubectl -n {namespace} get job "
            f"{name} to check on it, kubectl -n {namespace} delete job {name} to stop it"
        ) from None


def _follow_job(
    api: Any,
    namespace: str,
    name: str,
    started: float,
    timeout_s: float,
    poll_s: float,
    on_line: LineHandler | None,
    on_status: StatusHandler | None,
    sleep: Callable[[float], None],
    clock: Callable[[], float],
    container: str,
) -> JobResult:
    deadline = started + timeout_s
    result = JobResult(name, namespace, JobState("running"))
    seen: dict[str, int] = {}  # pod -> log lines already shown (a re-follow skips them)
    finished: set[str] = set()
    last_status = ""

    def status(text: str) -> None:
        nonlocal last_status
        if text != last_status and on_status is not None:
            on_status(text)
        last_status = text

    while True:
        job = get_job(api, namespace, name)
        state = job_state(job)
        pods = job_pods(api, namespace, name)
        for pod in pods:
            pod_name = pod["metadata"]["name"]
            if pod_name not in result.pods:
                result.pods.append(pod_name)
            if pod_name in finished:
                continue
            phase = (pod.get("status") or {}).get("phase") or "Pending"
            if phase == "Pending":
                status(f"pod {pod_name}: {pod_waiting_reason(pod)}")
                break
            attempt = result.pods.index(pod_name) + 1
            status(f"pod {pod_name} ({phase.lower()}, attempt {attempt})")
            count = 0
            time_left = max(deadline - clock(), 1.0)
            for line in follow_log(api, namespace, pod_name, time_left, container):
                count += 1
                if count <= seen.get(pod_name, 0):
                    continue
                seen[pod_name] = count
                result.report.feed(line)
                result.last_lines = [*result.last_lines[-19:], line]
                if on_line is not None:
                    on_line(pod_name, line)
            if phase in ("Succeeded", "Failed"):
                finished.add(pod_name)
        if state.phase != "running" and all(
            p["metadata"]["name"] in finished for p in pods if _done(p)
        ):
            result.state = state
            result.seconds = clock() - started
            break
        if clock() >= deadline:
            raise Timeout(
                f"Job {namespace}/{name} still running after {timeout_s:.0f}s "
                f"({last_status or 'no pod yet'}); it keeps running: kubectl -n {namespace} "
                f"delete job {name} to stop it"
            )
        sleep(poll_s)
    if state.phase == "failed":
        tail = next((line for line in reversed(result.last_lines) if line.strip()), "")
        raise JobFailed(
            f"Job {namespace}/{name} failed: {state.reason or 'Failed'}"
            + (f" ({state.message})" if state.message else "")
            + (f"; last log line: {tail.strip()}" if tail else "")
        )
    return result


def _done(pod: dict[str, Any]) -> bool:
    return (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")
