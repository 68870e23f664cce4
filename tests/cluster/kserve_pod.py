"""What KServe and Knative add to a predictor pod, done the way they do it, for the runner.

KServe's controller and webhook build the predictor pod from the InferenceService and its
ServingRuntime; none of that runs here, so these functions write the pod they would write:

- the storage initializer's env from the predictor ServiceAccount's Secrets and their
  ``serving.kserve.io/s3-*`` annotations, after KServe v0.20.0's ``pkg/credentials/s3``
  (``BuildSecretEnvs`` / ``BuildS3EnvVars``; the default ``inferenceservice-config`` names the
  Secret keys ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``);
- the predictor container: the ServingRuntime's container with the InferenceService's
  ``model`` fields on top (env merged by name, the model's winning), the model volume
  read-only at ``/mnt/models``, and Knative's ``PORT``/``K_*`` variables.

The storage initializer itself is not imitated: ``kserve-storage`` from PyPI (the package the
``kserve/storage-initializer`` image runs) downloads the files.
"""

from __future__ import annotations

import copy
from typing import Any

from tests.cluster.runner import Manifest, Rendered

# The kserve-storage release matched to KServe v0.20.0 (pyproject's kserve pin).
KSERVE_STORAGE_VERSION = "0.20.0"
MODEL_DIR = "/mnt/models"
PROVISION_VOLUME = "kserve-provision-location"
S3 = "serving.kserve.io/s3-"

# What the initializer image's entrypoint does with its args: src dest [src dest ...].
INITIALIZER = (
    "import sys\n"
    "from kserve_storage import Storage\n"
    "Storage.download_files(sys.argv[1::2], sys.argv[2::2])\n"
)


def s3_env(annotations: dict[str, str]) -> list[dict[str, Any]]:
    """``BuildS3EnvVars``: the S3 settings of one Secret's (or ServiceAccount's) annotations."""
    env: list[dict[str, Any]] = []
    endpoint = annotations.get(S3 + "endpoint")
    if endpoint is not None:
        https = annotations.get(S3 + "usehttps")
        url = ("http://" if https == "0" else "https://") + endpoint
        if https is not None:
            env.append({"name": "S3_USE_HTTPS", "value": https})
        env += [
            {"name": "S3_ENDPOINT", "value": endpoint},
            {"name": "AWS_ENDPOINT_URL", "value": url},
        ]
    for key, name in (
        ("verifyssl", "S3_VERIFY_SSL"),
        ("useanoncredential", "awsAnonymousCredential"),
        ("region", "AWS_DEFAULT_REGION"),
        ("usevirtualbucket", "S3_USER_VIRTUAL_BUCKET"),
        ("cabundle", "AWS_CA_BUNDLE"),
    ):
        if S3 + key in annotations:
            env.append({"name": name, "value": annotations[S3 + key]})
    return env


def storage_initializer_env(rendered: Rendered, service_account: str) -> list[dict[str, Any]]:
    """The env KServe gives the storage initializer of a predictor run as ``service_account``."""
    sa = rendered.get("ServiceAccount", service_account).doc
    env: list[dict[str, Any]] = []
    for ref in sa.get("secrets") or []:
        secret = rendered.get("Secret", ref["name"]).doc
        annotations = (secret.get("metadata") or {}).get("annotations") or {}
        if not any(k.startswith(S3) for k in annotations):
            continue
        env += [
            {
                "name": name,
                "valueFrom": {"secretKeyRef": {"name": ref["name"], "key": name}},
            }
            for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
        ]
        env += s3_env(annotations)
    if not env:  # IRSA: the ServiceAccount's own annotations, credentials from the pod identity
        env = s3_env((sa.get("metadata") or {}).get("annotations") or {})
    return env


def storage_initializer_pod(
    rendered: Rendered, isvc: Manifest, image: str = "kserve/storage-initializer:v0.20.0"
) -> Manifest:
    """The initializer container KServe's webhook adds to the predictor pod of ``isvc``."""
    predictor = isvc.doc["spec"]["predictor"]
    container = {
        "name": "storage-initializer",
        "image": image,
        "args": [predictor["model"]["storageUri"], MODEL_DIR],
        "env": storage_initializer_env(rendered, predictor["serviceAccountName"]),
        "volumeMounts": [{"name": PROVISION_VOLUME, "mountPath": MODEL_DIR}],
    }
    return Manifest(
        f"{isvc.path} (initContainer storage-initializer, added by KServe)",
        {
            "kind": "Pod",
            "metadata": {"name": f"{isvc.name}-predictor-00001", "labels": {}},
            "spec": {
                "serviceAccountName": predictor["serviceAccountName"],
                "initContainers": [container],
                "containers": [container],
                "volumes": [{"name": PROVISION_VOLUME, "emptyDir": {}}],
            },
        },
    )


def predictor_pod(rendered: Rendered, isvc: Manifest) -> Manifest:
    """The predictor pod KServe derives from ``isvc`` and its ServingRuntime."""
    predictor = isvc.doc["spec"]["predictor"]
    model = predictor["model"]
    runtime = rendered.get("ServingRuntime", model["runtime"])
    container = copy.deepcopy(runtime.doc["spec"]["containers"][0])
    env = {e["name"]: e for e in container.get("env") or []}
    env.update({e["name"]: e for e in model.get("env") or []})
    container["env"] = list(env.values())
    for key in ("resources", "securityContext"):
        if key in model:
            container[key] = model[key]
    container["volumeMounts"] = [
        *(container.get("volumeMounts") or []),
        *(model.get("volumeMounts") or []),
        {"name": PROVISION_VOLUME, "mountPath": MODEL_DIR, "readOnly": True},
    ]
    return Manifest(
        f"{runtime.path} + {isvc.path}",
        {
            "kind": "Pod",
            "metadata": {"name": f"{isvc.name}-predictor-00001-deployment", "labels": {}},
            "spec": {
                "serviceAccountName": predictor.get("serviceAccountName"),
                "securityContext": predictor.get("securityContext"),
                "containers": [container],
                "volumes": [
                    *(runtime.doc["spec"].get("volumes") or []),
                    *(predictor.get("volumes") or []),
                    {"name": PROVISION_VOLUME, "emptyDir": {}},
                ],
            },
        },
    )


def knative_env(isvc: Manifest, http_port: int) -> list[dict[str, Any]]:
    """Variables Knative Serving sets in the user container (PORT: the mapped HTTP port)."""
    name = f"{isvc.name}-predictor"
    return [
        {"name": "PORT", "value": str(http_port)},
        {"name": "K_REVISION", "value": f"{name}-00001"},
        {"name": "K_CONFIGURATION", "value": name},
        {"name": "K_SERVICE", "value": name},
    ]
