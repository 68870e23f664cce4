"""Kubernetes client wrappers: InferenceServices, the chart's templates, readiness waits.

Everything takes an ``ApiClient`` so tests can hand in one that talks to a server replaying
recorded API responses. Objects are plain dicts, as the API returns them. Training Jobs live
in :mod:`roost.k8s_jobs`.

``roost deploy`` and ``roost train --on k8s`` start from the templates the Helm chart renders
into one ConfigMap (``k8s.templates_configmap``): image, ServiceAccount, resources and
security settings have one source, the chart's values.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlparse

import yaml

from roost import config as roost_config
from roost.errors import ConfigError, Conflict, NotFound, Timeout, Unavailable
from roost.rollout.state import TERMINAL
from roost.rollout.store import STATE_ANNOTATION

log = logging.getLogger(__name__)

KSERVE_GROUP = "serving.kserve.io"
KSERVE_VERSION = "v1beta1"
ISVC_PLURAL = "inferenceservices"
FIELD_MANAGER = "roost"
VERSION_ENV = "ROOST_SERVING__MODEL_VERSION"

# Keys of the chart's templates ConfigMap (charts/roost/templates/templates-configmap.yaml).
TEMPLATE_JOB = "training-job.yaml"
TEMPLATE_ISVC = "inferenceservice.yaml"
TEMPLATE_ISVC_GRPC = "inferenceservice-grpc.yaml"
TEMPLATE_ARTIFACTS = "artifacts-destination"
TEMPLATE_RUNTIME = "runtime"
TEMPLATE_MODEL_NAME = "model-name"


def load_client(context: str | None = None) -> Any:
    """An ApiClient from in-cluster config, else kubeconfig (optionally a named context)."""
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    except ConfigException:
        try:
            # The client reads KUBECONFIG once, at import; read it when asked instead.
            config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=roost_config.environ("KUBECONFIG"), context=context
            )
        except (ConfigException, OSError) as exc:
            raise Unavailable(f"no Kubernetes configuration: {exc}") from None
    return client.ApiClient()


def _conflict_detail(exc: Any) -> str:
    """'.spec.x owned by "roost-rollout"' from a 409 Status (server-side apply conflicts)."""
    try:
        status = json.loads(getattr(exc, "body", "") or "{}")
    except ValueError:
        return str(getattr(exc, "reason", "") or "")
    causes = (status.get("details") or {}).get("causes") or []
    parts = [
        f"{c.get('field', '?')}: {c.get('message', '')}".strip()
        for c in causes
        if c.get("reason") == "FieldManagerConflict"
    ]
    return "; ".join(parts) or str(status.get("message") or getattr(exc, "reason", "") or "")


def _api_error(exc: Any, what: str) -> Exception:
    status = getattr(exc, "status", None)
    if status == 404:
        return NotFound(f"{what} not found")
    if status == 409:
        return Conflict(f"{what}: conflict ({_conflict_detail(exc)})")
    if status in (401, 403):
        return Unavailable(f"{what}: not allowed ({status} {getattr(exc, 'reason', '')})")
    return Unavailable(
        f"{what}: Kubernetes API error {status} {getattr(exc, 'reason', '')}".strip()
    )


def _transport_error(exc: Exception, what: str) -> Unavailable:
    return Unavailable(f"{what}: cannot reach the Kubernetes API ({type(exc).__name__}: {exc})")


def get_isvc(api: Any, namespace: str, name: str) -> dict[str, Any]:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    what = f"InferenceService {namespace}/{name}"
    try:
        obj = cast(
            dict[str, Any],
            client.CustomObjectsApi(api).get_namespaced_custom_object(
                KSERVE_GROUP, KSERVE_VERSION, namespace, ISVC_PLURAL, name
            ),
        )
    except ApiException as exc:
        raise _api_error(exc, what) from None
    except HTTPError as exc:
        raise _transport_error(exc, what) from None
    return obj


def apply_isvc(
    api: Any,
    namespace: str,
    manifest: dict[str, Any],
    force: bool = False,
    field_manager: str = FIELD_MANAGER,
) -> dict[str, Any]:
    """Server-side apply of an InferenceService manifest (create or patch) as ``field_manager``."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    name = manifest["metadata"]["name"]
    what = f"InferenceService {namespace}/{name}"
    try:
        obj = cast(
            dict[str, Any],
            client.CustomObjectsApi(api).patch_namespaced_custom_object(
                KSERVE_GROUP,
                KSERVE_VERSION,
                namespace,
                ISVC_PLURAL,
                name,
                manifest,
                field_manager=field_manager,
                force=force,
                _content_type="application/apply-patch+yaml",
            ),
        )
    except ApiException as exc:
        raise _api_error(exc, what) from None
    except HTTPError as exc:
        raise _transport_error(exc, what) from None
    return obj


def isvc_ready(obj: dict[str, Any]) -> bool:
    conditions = (obj.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def isvc_traffic(obj: dict[str, Any]) -> list[dict[str, Any]]:
    """``status.components.predictor.traffic``: [{revisionName, percent, latestRevision, tag}]."""
    predictor = ((obj.get("status") or {}).get("components") or {}).get("predictor") or {}
    return list(predictor.get("traffic") or [])


# -- the chart's templates ------------------------------------------------------------------


def read_templates(api: Any, namespace: str, name: str) -> dict[str, str]:
    """The data of the chart's templates ConfigMap."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    what = f"ConfigMap {namespace}/{name}"
    try:
        cm = client.CoreV1Api(api).read_namespaced_config_map(name, namespace)
    except ApiException as exc:
        error = _api_error(exc, what)
        if isinstance(error, NotFound):
            raise NotFound(
                f"{what} not found: install the chart first (helm upgrade --install roost "
                f"charts/roost -n {namespace}) or set k8s.templates_configmap / k8s.namespace"
            ) from None
        raise error from None
    except HTTPError as exc:
        raise _transport_error(exc, what) from None
    return dict(cm.data or {})


def template(templates: dict[str, str], key: str, kind: str) -> dict[str, Any]:
    """One manifest from the templates ConfigMap, checked to be of ``kind``."""
    text = templates.get(key)
    if not text:
        raise NotFound(f"the chart's templates have no {key!r} (is the chart up to date?)")
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"template {key!r} is not valid YAML: {exc}") from None
    if not isinstance(doc, dict) or doc.get("kind") != kind:
        raise ConfigError(f"template {key!r} is not a {kind}")
    return doc


# -- InferenceService for a registry version ------------------------------------------------


def s3_storage_uri(download_uri: str, s3_root: str | None) -> str:
    """The S3 location of a registry version's model files, from MLflow's download URI.

    With the proxied artifact store the registry answers ``mlflow-artifacts:/<path>``; the
    server keeps that path under its ``--artifacts-destination`` (``s3_root``). Direct
    ``s3://`` URIs are returned as they are.
    """
    if download_uri.startswith("s3://"):
        return download_uri.rstrip("/")
    parsed = urlparse(download_uri)
    if parsed.scheme == "mlflow-artifacts":
        if not s3_root or not s3_root.startswith("s3://"):
            raise ConfigError(
                f"{download_uri} is in MLflow's proxied artifact store: set k8s.artifacts_s3_root "
                "to the server's --artifacts-destination (s3://bucket/prefix)"
            )
        path = parsed.path.strip("/")
        if not path:
            raise ConfigError(f"no artifact path in {download_uri}")
        return f"{s3_root.rstrip('/')}/{path}"
    raise ConfigError(
        f"the model files are at {download_uri}, which KServe cannot read from a pod: "
        "run the MLflow server with an s3:// --artifacts-destination"
    )


def _set_env(container: dict[str, Any], name: str, value: str) -> None:
    env = [e for e in container.get("env") or [] if e.get("name") != name]
    env.append({"name": name, "value": value})
    container["env"] = env


def isvc_manifest(
    base: dict[str, Any],
    storage_uri: str,
    version: str | None,
    canary_percent: int | None = None,
) -> dict[str, Any]:
    """The chart's InferenceService template serving ``storage_uri`` (pure).

    ``canary_percent`` None leaves ``canaryTrafficPercent`` out, so an apply by the same
    field manager removes it and the latest revision takes all traffic.
    """
    manifest = copy.deepcopy(base)
    metadata = manifest.setdefault("metadata", {})
    for key in ("resourceVersion", "uid", "creationTimestamp", "generation", "managedFields"):
        metadata.pop(key, None)
    manifest.pop("status", None)
    predictor = manifest.setdefault("spec", {}).setdefault("predictor", {})
    model = predictor.setdefault("model", {})
    model["storageUri"] = storage_uri
    if version is not None:
        _set_env(model, VERSION_ENV, str(version))
    if canary_percent is None:
        predictor.pop("canaryTrafficPercent", None)
    else:
        if not 0 <= canary_percent <= 100:
            raise ConfigError(f"canary percent must be 0..100, got {canary_percent}")
        predictor["canaryTrafficPercent"] = canary_percent
    return manifest


@dataclass(frozen=True)
class Readiness:
    ready: bool
    reason: str


def isvc_readiness(obj: dict[str, Any]) -> Readiness:
    """Is the InferenceService Ready *for its current spec*? (pure)

    Ready alone can be stale right after an apply: the status must also have caught up with
    the spec (``observedGeneration``) and the latest created revision must be the ready one.
    """
    generation = (obj.get("metadata") or {}).get("generation")
    status = obj.get("status") or {}
    observed = status.get("observedGeneration")
    if generation is not None and (observed is None or int(observed) < int(generation)):
        return Readiness(False, f"KServe has not reconciled generation {generation} yet")
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    ready = conditions.get("Ready")
    if ready is None or ready.get("status") != "True":
        # Ready repeats the first failing condition's reason; the others only add noise.
        failing = [c for c in conditions.values() if c.get("status") == "False"]
        first = ready if ready is not None and ready.get("reason") else next(iter(failing), None)
        if first is None:
            return Readiness(False, "Ready condition not reported yet")
        text = f"{first.get('type')}: {first.get('reason') or ''} {first.get('message') or ''}"
        return Readiness(False, " ".join(text.split()))
    predictor = (status.get("components") or {}).get("predictor") or {}
    created = predictor.get("latestCreatedRevision")
    latest_ready = predictor.get("latestReadyRevision")
    if created and latest_ready and created != latest_ready:
        return Readiness(False, f"revision {created} is not ready (serving {latest_ready})")
    return Readiness(True, "Ready")


def isvc_url(obj: dict[str, Any]) -> str | None:
    status = obj.get("status") or {}
    url = status.get("url") or ((status.get("components") or {}).get("predictor") or {}).get("url")
    return str(url) if url else None


def wait_isvc_ready(
    api: Any,
    namespace: str,
    name: str,
    timeout_s: float,
    poll_s: float = 2.0,
    on_status: Callable[[Readiness], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> dict[str, Any]:
    """Poll the InferenceService until :func:`isvc_readiness` says Ready; check first."""
    deadline = clock() + timeout_s
    last: Readiness | None = None
    while True:
        obj = get_isvc(api, namespace, name)
        state = isvc_readiness(obj)
        if on_status is not None and state != last:
            on_status(state)
        last = state
        if state.ready:
            return obj
        if clock() >= deadline:
            raise Timeout(
                f"InferenceService {namespace}/{name} not Ready after {timeout_s:.0f}s: "
                f"{state.reason}"
            )
        sleep(poll_s)


@dataclass(frozen=True)
class Deployed:
    name: str
    namespace: str
    storage_uri: str
    version: str | None
    url: str | None
    ready: bool
    generation: int | None

    def summary(self) -> dict[str, Any]:
        return {
            "inference_service": self.name,
            "namespace": self.namespace,
            "storage_uri": self.storage_uri,
            "version": self.version,
            "url": self.url,
            "ready": self.ready,
            "generation": self.generation,
        }


def deploy(
    api: Any,
    namespace: str,
    manifest: dict[str, Any],
    force: bool,
    wait: bool,
    timeout_s: float,
    poll_s: float,
    on_status: Callable[[Readiness], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> Deployed:
    """Apply ``manifest`` (server-side) and, with ``wait``, return once it is Ready.

    Refused while a rollout is in flight on the object: the rollout controller owns
    ``storageUri`` and ``canaryTrafficPercent`` until it promotes or rolls back.
    """
    name = manifest["metadata"]["name"]
    try:
        current: dict[str, Any] | None = get_isvc(api, namespace, name)
    except NotFound:
        current = None
    phase = rollout_phase(current) if current is not None else None
    if phase is not None and phase not in {p.value for p in TERMINAL}:
        raise Conflict(
            f"InferenceService {namespace}/{name} has a rollout in flight ({phase}): "
            "let it finish or run `roost rollout abort` first"
        )
    obj = apply_isvc(api, namespace, manifest, force=force)
    log.info("applied InferenceService %s/%s generation=%s", namespace, name, _generation(obj))
    if wait:
        obj = wait_isvc_ready(api, namespace, name, timeout_s, poll_s, on_status, sleep=sleep)
    env = {
        e.get("name"): e.get("value")
        for e in (manifest["spec"]["predictor"].get("model") or {}).get("env") or []
    }
    return Deployed(
        name=name,
        namespace=namespace,
        storage_uri=manifest["spec"]["predictor"]["model"]["storageUri"],
        version=env.get(VERSION_ENV),
        url=isvc_url(obj),
        ready=isvc_readiness(obj).ready,
        generation=_generation(obj),
    )


def rollout_phase(obj: dict[str, Any]) -> str | None:
    """The phase of the rollout recorded on the object (roost.rollout's annotation), if any."""
    raw = ((obj.get("metadata") or {}).get("annotations") or {}).get(STATE_ANNOTATION)
    if not raw:
        return None
    try:
        phase = json.loads(raw).get("phase")
    except (ValueError, AttributeError):
        return "unreadable"
    return str(phase) if phase else "unknown"


def _generation(obj: dict[str, Any]) -> int | None:
    value = (obj.get("metadata") or {}).get("generation")
    return int(value) if value is not None else None
