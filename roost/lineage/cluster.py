"""Lineage facts the cluster holds: the images pods ran, and where a version is served.

The InferenceServices of the namespace are read with their predictor pods: a pod's
revision label ties it to a Knative revision (and so to its traffic share), its
``ROOST_SERVING__MODEL_VERSION`` environment variable to a registry version, and its
container statuses to the image digest the kubelet pulled (``imageID``). A training run
names its Job (tag ``roost.k8s.job``); the Job's pods give the training image.
"""

from __future__ import annotations

import logging
from typing import Any, cast

from roost import k8s
from roost.config import Settings
from roost.errors import NotFound, Unavailable

log = logging.getLogger(__name__)

ISVC_LABEL = "serving.kserve.io/inferenceservice"
REVISION_LABEL = "serving.knative.dev/revision"
NO_CLUSTER = "no cluster configured"


def digest(image_id: str | None) -> str | None:
    """``sha256:...`` from a container status' imageID (``docker-pullable://x@sha256:...``)."""
    if not image_id:
        return None
    if "@" in image_id:
        return image_id.rsplit("@", 1)[1]
    tail = image_id.split("://", 1)[-1]
    return tail if tail.startswith("sha256:") else None


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    """Every container of a pod (init containers too) with its image and digest (pure)."""
    status = pod.get("status") or {}
    spec = pod.get("spec") or {}
    images = {
        c.get("name"): c.get("image")
        for c in (spec.get("initContainers") or []) + (spec.get("containers") or [])
    }
    seen: dict[str, dict[str, Any]] = {}
    for item in (status.get("initContainerStatuses") or []) + (
        status.get("containerStatuses") or []
    ):
        name = item.get("name")
        seen[name] = {
            "pod": pod["metadata"]["name"],
            "container": name,
            "image": item.get("image") or images.get(name),
            "image_id": item.get("imageID") or None,
            "digest": digest(item.get("imageID")),
        }
    for name, image in images.items():  # not started yet: no status, no digest
        seen.setdefault(
            name,
            {
                "pod": pod["metadata"]["name"],
                "container": name,
                "image": image,
                "image_id": None,
                "digest": None,
            },
        )
    return list(seen.values())


def pod_version(pod: dict[str, Any]) -> str | None:
    """The registry version a predictor pod serves, from its environment (pure)."""
    for container in (pod.get("spec") or {}).get("containers") or []:
        for env in container.get("env") or []:
            if env.get("name") == k8s.VERSION_ENV and env.get("value"):
                return str(env["value"])
    return None


def spec_version(isvc: dict[str, Any]) -> str | None:
    model = ((isvc.get("spec") or {}).get("predictor") or {}).get("model") or {}
    for env in model.get("env") or []:
        if env.get("name") == k8s.VERSION_ENV and env.get("value"):
            return str(env["value"])
    return None


def serving_shares(isvc: dict[str, Any], pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per revision with traffic: percent, the version it serves, how we know (pure)."""
    by_revision: dict[str, str] = {}
    for pod in pods:
        revision = ((pod.get("metadata") or {}).get("labels") or {}).get(REVISION_LABEL)
        version = pod_version(pod)
        if revision and version:
            by_revision[revision] = version
    predictor = ((isvc.get("status") or {}).get("components") or {}).get("predictor") or {}
    latest = predictor.get("latestCreatedRevision")
    rows = []
    for entry in k8s.isvc_traffic(isvc):
        revision = entry.get("revisionName")
        version, source = by_revision.get(revision or ""), "pod environment"
        if version is None and revision and revision == latest:
            version, source = spec_version(isvc), "InferenceService spec (latest revision)"
        rows.append(
            {
                "revision": revision,
                "percent": int(entry.get("percent") or 0),
                "latest": bool(entry.get("latestRevision")),
                "version": version,
                "version_from": source if version else "unknown: no pod of this revision",
            }
        )
    return rows


def cluster_facts(
    settings: Settings, model: str, version: str, job: dict[str, Any] | None, api: Any = None
) -> dict[str, Any]:
    """Images and InferenceServices for ``version``; ``configured`` False without a cluster."""
    cfg = settings.k8s
    if api is None:
        try:
            api = k8s.load_client(cfg.context)
        except Unavailable:
            return {"configured": False, "note": NO_CLUSTER, "serving": [], "images": []}
    out: dict[str, Any] = {
        "configured": True,
        "namespace": cfg.namespace,
        "serving": [],
        "images": [],
        "errors": [],
    }
    try:
        services = list_isvcs(api, cfg.namespace)
    except (Unavailable, NotFound) as exc:
        out["errors"].append(str(exc))
        services = []
    for isvc in services:
        name = isvc["metadata"]["name"]
        try:
            pods = list_pods(api, cfg.namespace, f"{ISVC_LABEL}={name}")
        except (Unavailable, NotFound) as exc:
            out["errors"].append(str(exc))
            pods = []
        shares = serving_shares(isvc, pods)
        mine = [row for row in shares if row["version"] == version]
        if mine:
            out["serving"].append(
                {
                    "inference_service": name,
                    "namespace": cfg.namespace,
                    "url": k8s.isvc_url(isvc),
                    "percent": sum(row["percent"] for row in mine),
                    "revisions": shares,
                }
            )
        for pod in pods:
            if pod_version(pod) == version:
                for item in containers(pod):
                    out["images"].append({"workload": f"InferenceService {name}", **item})
    if job and job.get("name"):
        namespace = job.get("namespace") or cfg.namespace
        from roost import k8s_jobs

        try:
            job_pods = k8s_jobs.job_pods(api, namespace, job["name"])
        except (Unavailable, NotFound) as exc:
            out["errors"].append(str(exc))
            job_pods = []
        if not job_pods:
            out["errors"].append(f"no pods of training Job {namespace}/{job['name']} remain")
        for pod in job_pods:
            for item in containers(pod):
                out["images"].append({"workload": f"Job {job['name']}", **item})
    return out


def list_isvcs(api: Any, namespace: str) -> list[dict[str, Any]]:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    what = f"InferenceServices in {namespace}"
    try:
        found = cast(
            dict[str, Any],
            client.CustomObjectsApi(api).list_namespaced_custom_object(
                k8s.KSERVE_GROUP, k8s.KSERVE_VERSION, namespace, k8s.ISVC_PLURAL
            ),
        )
    except ApiException as exc:
        raise k8s._api_error(exc, what) from None
    except HTTPError as exc:
        raise k8s._transport_error(exc, what) from None
    return list(found.get("items") or [])


def list_pods(api: Any, namespace: str, selector: str) -> list[dict[str, Any]]:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    what = f"pods {selector} in {namespace}"
    try:
        pods = client.CoreV1Api(api).list_namespaced_pod(namespace, label_selector=selector)
    except ApiException as exc:
        raise k8s._api_error(exc, what) from None
    except HTTPError as exc:
        raise k8s._transport_error(exc, what) from None
    items: list[dict[str, Any]] = api.sanitize_for_serialization(pods).get("items") or []
    return sorted(items, key=lambda p: p["metadata"]["name"])
