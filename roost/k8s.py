"""Kubernetes client wrappers: InferenceServices (and, below, training Jobs).

Everything takes an ``ApiClient`` so tests can hand in one that replays recorded API
responses. Objects are plain dicts, as the API returns them.
"""

from __future__ import annotations

import logging
from typing import Any

from roost.errors import Conflict, NotFound, Unavailable

log = logging.getLogger(__name__)

KSERVE_GROUP = "serving.kserve.io"
KSERVE_VERSION = "v1beta1"
ISVC_PLURAL = "inferenceservices"
FIELD_MANAGER = "roost"


def load_client(context: str | None = None) -> Any:
    """An ApiClient from in-cluster config, else kubeconfig (optionally a named context)."""
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    try:
        config.load_incluster_config()
    except ConfigException:
        try:
            config.load_kube_config(context=context)
        except (ConfigException, OSError) as exc:
            raise Unavailable(f"no Kubernetes configuration: {exc}") from None
    return client.ApiClient()


def _api_error(exc: Any, what: str) -> Exception:
    status = getattr(exc, "status", None)
    if status == 404:
        return NotFound(f"{what} not found")
    if status == 409:
        return Conflict(f"{what}: conflict ({getattr(exc, 'reason', '')})")
    return Unavailable(f"{what}: Kubernetes API error {status} {getattr(exc, 'reason', '')}".strip())


def get_isvc(api: Any, namespace: str, name: str) -> dict[str, Any]:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    try:
        obj: dict[str, Any] = client.CustomObjectsApi(api).get_namespaced_custom_object(
            KSERVE_GROUP, KSERVE_VERSION, namespace, ISVC_PLURAL, name
        )
    except ApiException as exc:
        raise _api_error(exc, f"InferenceService {namespace}/{name}") from None
    return obj


def apply_isvc(
    api: Any, namespace: str, manifest: dict[str, Any], force: bool = False
) -> dict[str, Any]:
    """Server-side apply of an InferenceService manifest (create or patch), field manager roost."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    name = manifest["metadata"]["name"]
    try:
        obj: dict[str, Any] = client.CustomObjectsApi(api).patch_namespaced_custom_object(
            KSERVE_GROUP,
            KSERVE_VERSION,
            namespace,
            ISVC_PLURAL,
            name,
            manifest,
            field_manager=FIELD_MANAGER,
            force=force,
            _content_type="application/apply-patch+yaml",
        )
    except ApiException as exc:
        raise _api_error(exc, f"InferenceService {namespace}/{name}") from None
    return obj


def isvc_ready(obj: dict[str, Any]) -> bool:
    conditions = (obj.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def isvc_traffic(obj: dict[str, Any]) -> list[dict[str, Any]]:
    """``status.components.predictor.traffic``: [{revisionName, percent, latestRevision, tag}]."""
    predictor = ((obj.get("status") or {}).get("components") or {}).get("predictor") or {}
    return list(predictor.get("traffic") or [])
