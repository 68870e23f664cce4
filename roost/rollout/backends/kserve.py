"""The KServe backend: canary weights on an InferenceService, metrics from Prometheus or pods.

Weights: server-side apply of ``spec.predictor.canaryTrafficPercent`` with the challenger's
``storageUri`` (and ``ROOST_SERVING__MODEL_VERSION`` in the predictor's env, so its metrics and
headers carry the version). KServe creates a revision for the new spec and
splits traffic between it and the last rolled-out revision; readiness is read back from
``status.components.predictor.traffic`` once ``status.observedGeneration`` caught up.
Promotion and clean-up apply the final ``storageUri`` *without* ``canaryTrafficPercent`` (the
field manager drops it), so the spec left behind is an ordinary one.

State: the rollout document in the annotation ``rollout.roost.io/state``, written by
server-side apply with a ``resourceVersion`` precondition (compare-and-swap; a 409 is re-read
and retried while the stored revision is still ours). Manual overrides go to
``rollout.roost.io/command``. Each kind of write has its own field manager, because an apply
removes the fields its manager applied before and left out this time.

Pinning a side (A/B by header): every traffic apply also carries the annotation
``serving.kserve.io/enable-tag-routing: "true"``. With it KServe tags the predictor's Knative
traffic targets: ``latest`` (the challenger's revision, at every ``canaryTrafficPercent``, 0
included) and ``prev`` (the last rolled-out revision, the champion; KServe sets that target
only while the canary has less than 100 %). With Knative's ``tag-header-based-routing``
feature on (``manifests/base/knative-serving.yaml``), a request with the header
``Knative-Serving-Tag: latest|prev`` goes to that revision; :data:`KNATIVE_TAGS` maps roost's
``x-roost-variant`` values onto those tags. Knative routes a tag it does not know to the
weighted split, so in the cluster an unknown value is ignored, not refused.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import httpx

from roost import k8s
from roost.config import Settings
from roost.errors import Conflict, RoostError
from roost.rollout.analysis import SERIES, Snapshot, parse_exposition, parse_query_result
from roost.rollout.backends.base import Backend, MetricsUnavailable, Readiness
from roost.rollout.state import Command, RolloutState
from roost.rollout.store import (
    COMMAND_ANNOTATION,
    STATE_ANNOTATION,
    check_revision,
    refuse_if_in_flight,
)
from roost.rollout.variant import KNATIVE_TAG_HEADER, KNATIVE_TAGS

log = logging.getLogger(__name__)

TRAFFIC_MANAGER = "roost-rollout"
STATE_MANAGER = "roost-rollout-state"
COMMAND_MANAGER = "roost-rollout-command"
VERSION_ENV = k8s.VERSION_ENV
PREDICTOR_CONTAINER = "kserve-container"
CAS_RETRIES = 5
TAG_ROUTING_ANNOTATION = "serving.kserve.io/enable-tag-routing"

StorageUri = Callable[[str], str]


def traffic_manifest(
    obj: dict[str, Any], version: str, storage_uri: str, weight: int | None
) -> dict[str, Any]:
    """The apply configuration for one weight (None: no canary field, i.e. all to latest).

    Pure; works for both predictor shapes: ``predictor.model`` (a model format) and
    ``predictor.containers`` (a custom container, where the storage URI is the
    ``STORAGE_URI`` environment variable).
    """
    predictor_spec = (obj.get("spec") or {}).get("predictor") or {}
    # The pod serves what the storage initializer downloads (/mnt/models); the version
    # travels by env so metrics and response headers are attributable.
    env = [{"name": VERSION_ENV, "value": version}]
    predictor: dict[str, Any] = {}
    if weight is not None:
        predictor["canaryTrafficPercent"] = weight
    if "model" in predictor_spec or not predictor_spec.get("containers"):
        predictor["model"] = {"storageUri": storage_uri, "env": env}
    else:
        # predictor.containers is an atomic list in KServe's CRD (no list-map keys): an apply
        # replaces it whole, so it carries every container as it is, with the env changed.
        containers = copy.deepcopy(predictor_spec["containers"])
        target = next(
            (c for c in containers if c.get("name") == PREDICTOR_CONTAINER), containers[0]
        )
        ours = [{"name": "STORAGE_URI", "value": storage_uri}, *env]
        names = {e["name"] for e in ours}
        kept = [e for e in target.get("env") or [] if e.get("name") not in names]
        target["env"] = [*kept, *ours]
        predictor["containers"] = containers
    return {
        "apiVersion": f"{k8s.KSERVE_GROUP}/{k8s.KSERVE_VERSION}",
        "kind": "InferenceService",
        "metadata": {
            "name": obj["metadata"]["name"],
            "namespace": obj["metadata"]["namespace"],
            # Tags prev/latest on the traffic targets, so a request can pin a side.
            "annotations": {TAG_ROUTING_ANNOTATION: "true"},
        },
        "spec": {"predictor": predictor},
    }


def tag_targets(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The tagged traffic targets in the status: ``{"latest": {...}, "prev": {...}}``."""
    return {str(t["tag"]): t for t in k8s.isvc_traffic(obj) if t.get("tag")}


def variant_routes(obj: dict[str, Any]) -> dict[str, str]:
    """How a client pins each side now: ``{"champion": "<tag> <revision> <url>", ...}``.

    Only the sides KServe has tagged (no ``prev`` at 100 % or without a canary).
    """
    tags = tag_targets(obj)
    out = {}
    for variant, tag in KNATIVE_TAGS.items():
        target = tags.get(tag)
        if target is not None:
            revision = target.get("revisionName") or "?"
            out[variant] = f"{KNATIVE_TAG_HEADER}: {tag} ({revision} {target.get('url', '')})"
    return out


def storage_uri_of(obj: dict[str, Any]) -> str | None:
    """The storage URI the spec serves now (model format or custom container env)."""
    predictor = (obj.get("spec") or {}).get("predictor") or {}
    model = predictor.get("model")
    if isinstance(model, dict) and model.get("storageUri"):
        return str(model["storageUri"])
    for container in predictor.get("containers") or []:
        for item in container.get("env") or []:
            if item.get("name") == "STORAGE_URI":
                return str(item.get("value"))
    return None


def spec_weight(obj: dict[str, Any], challenger_uri: str) -> int:
    """The weight the spec gives the challenger (0 if the spec is not the challenger's)."""
    if storage_uri_of(obj) != challenger_uri:
        return 0
    percent = ((obj.get("spec") or {}).get("predictor") or {}).get("canaryTrafficPercent")
    return 100 if percent is None else int(percent)


def traffic_ready(obj: dict[str, Any], weight: int) -> Readiness:
    """Does the status show the latest revision ready and serving ``weight`` percent?"""
    generation = (obj.get("metadata") or {}).get("generation")
    status = obj.get("status") or {}
    observed = status.get("observedGeneration")
    if generation is not None and (observed is None or int(observed) < int(generation)):
        return Readiness(False, f"KServe has not reconciled generation {generation} yet")
    if not k8s.isvc_ready(obj):
        return Readiness(False, "InferenceService is not Ready")
    predictor = (status.get("components") or {}).get("predictor") or {}
    created, ready = predictor.get("latestCreatedRevision"), predictor.get("latestReadyRevision")
    if weight > 0 and created and ready and created != ready:
        return Readiness(False, f"revision {created} is not ready (latest ready: {ready})")
    latest = sum(
        int(t.get("percent") or 0) for t in k8s.isvc_traffic(obj) if t.get("latestRevision")
    )
    if latest != weight:
        return Readiness(False, f"latest revision gets {latest}%, expected {weight}%")
    return Readiness(True)


def shadow_url(obj: dict[str, Any]) -> str:
    """The URL of the latest (challenger) revision from the status' traffic block."""
    from roost.rollout.backends.base import NotReady

    component = ((obj.get("status") or {}).get("components") or {}).get("predictor") or {}
    for target in component.get("traffic") or []:
        if target.get("tag") == "latest" and target.get("url"):
            return str(target["url"])
    raise NotReady(
        "no `latest` tag URL in status.components.predictor.traffic: the shadow phase needs "
        'tag routing (annotation serving.kserve.io/enable-tag-routing: "true")'
    )


def prometheus_query(model: str, selector: str) -> str:
    names = "|".join(SERIES)
    extra = f",{selector}" if selector else ""
    return f'{{__name__=~"{names}",model="{model}"{extra}}}'


class KServeBackend(Backend):
    """One InferenceService; state in its annotations."""

    name = "kserve"

    def __init__(
        self,
        settings: Settings,
        api: Any,
        storage_uri: StorageUri,
        model: str | None = None,
        http: httpx.Client | None = None,
    ) -> None:
        self.settings = settings
        self.cfg = settings.rollout
        self.api = api
        self.namespace = settings.k8s.namespace
        self.isvc = settings.k8s.inference_service
        self.model = model or settings.registry.model_name
        self.served_name = settings.serving.model_name
        self.storage_uri = storage_uri
        self.http = http or httpx.Client(timeout=self.cfg.prometheus_timeout_s)

    # -- the object ---------------------------------------------------------------------------
    def get(self) -> dict[str, Any]:
        return k8s.get_isvc(self.api, self.namespace, self.isvc)

    def _apply(self, manifest: dict[str, Any], manager: str, force: bool = True) -> dict[str, Any]:
        return k8s.apply_isvc(self.api, self.namespace, manifest, force, field_manager=manager)

    def _annotation_manifest(
        self, obj: dict[str, Any], key: str, value: str, precondition: bool
    ) -> dict[str, Any]:
        metadata: dict[str, Any] = {
            "name": self.isvc,
            "namespace": self.namespace,
            "annotations": {key: value},
        }
        if precondition:
            metadata["resourceVersion"] = obj["metadata"]["resourceVersion"]
        return {
            "apiVersion": f"{k8s.KSERVE_GROUP}/{k8s.KSERVE_VERSION}",
            "kind": "InferenceService",
            "metadata": metadata,
        }

    @staticmethod
    def _state_of(obj: dict[str, Any]) -> RolloutState | None:
        text = ((obj.get("metadata") or {}).get("annotations") or {}).get(STATE_ANNOTATION)
        return RolloutState.loads(text) if text else None

    # -- state ------------------------------------------------------------------------------
    def load_state(self) -> RolloutState | None:
        return self._state_of(self.get())

    def _cas(
        self, state: RolloutState, check: Callable[[RolloutState | None], int]
    ) -> RolloutState:
        """Write ``state`` under the revision ``check`` returns; retry 409s while still valid."""
        for _ in range(CAS_RETRIES):
            obj = self.get()
            revision = check(self._state_of(obj))
            stored = dataclasses.replace(state, revision=revision)
            manifest = self._annotation_manifest(obj, STATE_ANNOTATION, stored.dumps(), True)
            try:
                self._apply(manifest, STATE_MANAGER)
            except Conflict:
                continue  # the object changed (status, command...): re-read and re-check
            return stored
        raise Conflict(f"InferenceService {self.namespace}/{self.isvc} kept changing; try again")

    def create_state(self, state: RolloutState) -> RolloutState:
        return self._cas(state, lambda current: refuse_if_in_flight(current, state))

    def save_state(self, state: RolloutState) -> RolloutState:
        def check(current: RolloutState | None) -> int:
            check_revision(current, state)
            return state.revision + 1

        return self._cas(state, check)

    def read_command(self) -> Command | None:
        annotations = (self.get().get("metadata") or {}).get("annotations") or {}
        text = annotations.get(COMMAND_ANNOTATION)
        return Command.from_dict(json.loads(text)) if text else None

    def write_command(self, command: Command) -> None:
        obj = self.get()
        manifest = self._annotation_manifest(
            obj, COMMAND_ANNOTATION, json.dumps(command.to_dict()), False
        )
        self._apply(manifest, COMMAND_MANAGER)

    # -- traffic ----------------------------------------------------------------------------
    def preflight(self) -> None:
        self.get()  # NotFound / Unavailable before a rollout is created

    def prepare(self, state: RolloutState) -> None:
        self.get()  # KServe creates the canary's revision on set_weight

    def current_weight(self, state: RolloutState) -> int | None:
        return spec_weight(self.get(), self.storage_uri(state.version))

    def set_weight(self, state: RolloutState, weight: int) -> None:
        obj = self.get()
        uri = self.storage_uri(state.version)
        self._apply(traffic_manifest(obj, state.version, uri, weight), TRAFFIC_MANAGER)
        log.info("canaryTrafficPercent=%d version=%s isvc=%s", weight, state.version, self.isvc)

    def ready(self, state: RolloutState) -> Readiness:
        return traffic_ready(self.get(), state.weight)

    def start_shadow(self, state: RolloutState) -> None:
        """The challenger's revision at ``canaryTrafficPercent: 0`` (KServe creates it, and
        Knative gives it no traffic) unless the spec already serves it."""
        if storage_uri_of(self.get()) != self.storage_uri(state.version):
            self.set_weight(state, 0)

    def shadow_endpoint(self, state: RolloutState) -> str:
        """The challenger revision's own URL: Knative's ``latest`` tag, which KServe publishes
        in ``status.components.predictor.traffic`` when tag routing is on
        (``serving.kserve.io/enable-tag-routing: "true"``)."""
        return shadow_url(self.get())

    def logged_model(self) -> str:
        return self.isvc

    def promote(self, state: RolloutState) -> None:
        obj = self.get()
        uri = self.storage_uri(state.version)
        self._apply(traffic_manifest(obj, state.version, uri, None), TRAFFIC_MANAGER)

    def retire(self, state: RolloutState) -> None:
        obj = self.get()
        if storage_uri_of(obj) != self.storage_uri(state.version):
            return
        uri = self.storage_uri(state.champion)
        manifest = traffic_manifest(obj, state.champion, uri, None)
        self._apply(manifest, TRAFFIC_MANAGER)

    # -- metrics ------------------------------------------------------------------------------
    def scrape(self, state: RolloutState) -> Snapshot:
        if self.cfg.prometheus_url:
            return self._query_prometheus()
        return self._scrape_pods()

    def _query_prometheus(self) -> Snapshot:
        assert self.cfg.prometheus_url is not None
        selector = self.cfg.prometheus_selector.format(namespace=self.namespace)
        query = prometheus_query(self.served_name, selector)
        url = f"{self.cfg.prometheus_url.rstrip('/')}/api/v1/query?query={quote(query)}"
        try:
            response = self.http.get(url)
            response.raise_for_status()
            payload = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise MetricsUnavailable(f"Prometheus at {self.cfg.prometheus_url}: {exc}") from None
        if payload.get("status") != "success":
            raise MetricsUnavailable(f"Prometheus query failed: {payload.get('error', payload)}")
        return parse_query_result(payload)

    def _scrape_pods(self) -> Snapshot:
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        selector = f"serving.kserve.io/inferenceservice={self.isvc},component=predictor"
        try:
            pods = client.CoreV1Api(self.api).list_namespaced_pod(
                self.namespace, label_selector=selector
            )
        except ApiException as exc:
            raise MetricsUnavailable(
                f"cannot list predictor pods: {exc.status} {exc.reason}"
            ) from None
        except HTTPError as exc:
            raise MetricsUnavailable(f"cannot list predictor pods: {exc}") from None
        snapshot: Snapshot = {}
        for pod in pods.items:
            status, meta = pod.status, pod.metadata
            ip = status.pod_ip if status is not None else None
            if not ip or status is None or status.phase != "Running":
                continue
            name = str(meta.name if meta is not None else ip)
            url = f"http://{ip}:{self.cfg.metrics_port}/metrics"
            try:
                response = self.http.get(url)
                response.raise_for_status()
            except httpx.HTTPError as exc:
                raise MetricsUnavailable(f"pod {name} {url}: {exc}") from None
            snapshot.update(parse_exposition(response.text, name, self.served_name))
        return snapshot

    def describe(self) -> dict[str, str]:
        out = {"inference_service": f"{self.namespace}/{self.isvc}"}
        out["metrics"] = (
            self.cfg.prometheus_url or f"predictor pods :{self.cfg.metrics_port}/metrics"
        )
        try:
            routes = variant_routes(self.get())
        except RoostError:  # status output must not fail on an unreachable API server
            routes = {}
        out.update({f"pin_{variant}": how for variant, how in routes.items()})
        return out


def registry_storage_uri(settings: Settings, model: str) -> StorageUri:
    """storageUri of a version: ``rollout.storage_uri`` template, else the registry's URI."""
    template = settings.rollout.storage_uri
    cache: dict[str, str] = {}

    def resolve(version: str) -> str:
        if template:
            return template.format(model=model, version=version)
        if version not in cache:
            from roost import tracking
            from roost.registry import Registry

            registry = Registry(tracking.use(settings), model)
            uri = str(registry.client.get_model_version_download_uri(model, version))
            root = settings.k8s.artifacts_s3_root or settings.tracking.artifacts_destination
            cache[version] = k8s.s3_storage_uri(uri, root)
        return cache[version]

    return resolve
