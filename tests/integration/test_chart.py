"""charts/roost rendered with helm-python-sdk for every value set, and checked for what the
cluster would check (Kubernetes 1.33 schemas, KServe v0.20.0 CRD schemas), what a reviewer's
CI checks (helm lint, checkov) and what roost promises (pod security, least privilege,
network policies, the S3 credentials each side needs).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from roost.cli.app import app
from tests.fixtures.k8s import tools
from tests.fixtures.k8s.chart import (
    CHART,
    VALUE_SETS,
    documents,
    find,
    render,
    values_of,
)

pytestmark = pytest.mark.integration

CRD_KINDS = {"InferenceService", "ServingRuntime"}
WORKLOADS = {"Deployment", "StatefulSet", "Job", "DaemonSet", "Pod"}
LABELS = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/component",
    "app.kubernetes.io/part-of",
    "app.kubernetes.io/managed-by",
    "helm.sh/chart",
)


@pytest.fixture(scope="module")
def renders() -> dict[str, dict[str, str]]:
    return {name: render(values_of(files)) for name, files in VALUE_SETS.items()}


@pytest.fixture(scope="module")
def docs(renders: dict[str, dict[str, str]]) -> dict[str, list[dict[str, Any]]]:
    return {name: documents(rendered) for name, rendered in renders.items()}


def embedded(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The manifests in the templates ConfigMap (what `roost deploy` / `train --on k8s` send)."""
    if doc["kind"] != "ConfigMap" or not doc["metadata"]["name"].endswith("-templates"):
        return []
    return [yaml.safe_load(v) for k, v in doc["data"].items() if k.endswith(".yaml")]


def with_embedded(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return objects + [m for d in objects for m in embedded(d)]


# -- lint and schemas ------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_helm_lint_has_no_errors(name: str) -> None:
    import helm_python

    report = helm_python.lint(str(CHART), values_of(VALUE_SETS[name]), strict=True)
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert not problems, problems


def test_every_object_is_valid_for_kubernetes(docs) -> None:
    errors, checked = [], 0
    for objects in docs.values():
        for doc in with_embedded(objects):
            if doc["kind"] in CRD_KINDS:
                continue
            checked += 1
            errors += tools.k8s_errors(doc)
    assert checked > 100 and not errors, "\n".join(errors)


def test_kserve_objects_are_valid_for_the_crds(docs) -> None:
    tools.schema_dir()  # fails under CI, skips with one line elsewhere, if absent
    errors, kinds = [], set()
    for objects in docs.values():
        for doc in with_embedded(objects):
            if doc["kind"] in CRD_KINDS:
                kinds.add(doc["kind"])
                errors += tools.crd_errors(doc)
    assert kinds == CRD_KINDS and not errors, "\n".join(errors)


def test_crd_validation_catches_a_misspelt_field(docs) -> None:
    tools.schema_dir()
    (isvc,) = find(docs["ci-eks"], "InferenceService")
    isvc["spec"]["predictor"]["model"]["storageURI"] = isvc["spec"]["predictor"]["model"].pop(
        "storageUri"
    )
    assert any("storageURI" in e for e in tools.crd_errors(isvc))


def test_checkov_finds_nothing_beyond_the_skip_list(docs, tmp_path: Path) -> None:
    for name, objects in docs.items():
        tools.write_manifests(tmp_path / name, with_embedded(objects))
    report = tools.checkov(tmp_path)
    failed = [f"{f['check_id']} {f['resource']} ({f['file_path']})" for f in report["failed"]]
    assert not failed, "\n".join(failed)
    assert sum(s.get("resource_count", 0) for s in report["summary"]) > 100


# -- values.schema.json -----------------------------------------------------------------------


def schema_error(values: dict[str, Any]) -> str:
    import helm_python

    chart = helm_python.Chart.load(str(CHART))
    with pytest.raises(helm_python.HelmValuesError) as error:
        chart.validate_schema(values)
    with pytest.raises(helm_python.HelmError):
        chart.render(values, name="roost", namespace="roost")  # install refuses them too
    return str(error.value)


def test_mlflow_ingress_needs_a_network_policy_peer() -> None:
    import helm_python

    values = values_of(VALUE_SETS["kind"], {"mlflow": {"ingress": {"enabled": True}}})
    with pytest.raises(helm_python.HelmError, match=r"networkPolicy\.mlflowExtraFrom"):
        render(values)
    (policy,) = find(
        documents(render(values_of(VALUE_SETS["ci-kind"]))), "NetworkPolicy", "roost-mlflow"
    )
    peers = policy["spec"]["ingress"][0]["from"]
    assert {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}
    } in peers


def test_schema_rejects_a_misspelt_key() -> None:
    message = schema_error({"mlflow": {"replica": 2}})
    assert "/mlflow" in message and "replica" in message


def test_schema_rejects_wrong_types_and_values() -> None:
    message = schema_error({"serving": {"inferenceService": {"minReplicas": "one"}}})
    assert "/serving/inferenceService/minReplicas" in message and "integer" in message
    assert "torchserv" in schema_error({"serving": {"runtime": "torchserv"}})
    assert "canaryTrafficPercent" in schema_error(
        {"serving": {"inferenceService": {"canaryTrafficPercent": 150}}}
    )
    assert "pullPolicy" in schema_error({"images": {"pullPolicy": "Sometimes"}})
    # deleting requests (null) leaves limits alone, which the schema refuses
    assert "requests" in schema_error({"mlflow": {"resources": {"requests": None}}})


def _resolve(schema: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in schema:
        return root["$defs"][schema["$ref"].rsplit("/", 1)[-1]]
    return schema


def _unknown(values: Any, schema: dict[str, Any], root: dict[str, Any], at: str = "") -> list[str]:
    """Keys of values.yaml that the schema does not describe."""
    schema = _resolve(schema, root)
    if not isinstance(values, dict) or "properties" not in schema:
        return []
    out = []
    for key, value in values.items():
        if key not in schema["properties"]:
            out.append(f"{at}{key}")
        else:
            out += _unknown(value, schema["properties"][key], root, f"{at}{key}.")
    return out


def _unset(values: Any, schema: dict[str, Any], root: dict[str, Any], at: str = "") -> list[str]:
    """Keys of the schema's own (inline) objects that values.yaml does not set."""
    out = []
    for key, sub in (schema.get("properties") or {}).items():
        if not isinstance(values, dict) or key not in values:
            out.append(f"{at}{key}")
        elif "$ref" not in sub and sub.get("additionalProperties") is False:
            out += _unset(values[key], sub, root, f"{at}{key}.")
    return out


def test_schema_and_values_yaml_describe_the_same_keys() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert _unknown(values, schema, schema) == [], "in values.yaml, not in values.schema.json"
    assert _unset(values, schema, schema) == [], "in values.schema.json, not in values.yaml"


def test_every_value_has_a_helm_docs_comment() -> None:
    """Each key has a `# --` description right above it, or sits under a key that has one."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    undocumented, ancestors = [], []  # ancestors: (indent, documented)
    for index, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", "- ")):
            continue
        indent = len(line) - len(line.lstrip())
        while ancestors and ancestors[-1][0] >= indent:
            ancestors.pop()
        block, above = [], index - 1
        while above >= 0 and lines[above].strip().startswith("#"):
            block.append(lines[above].strip())
            above -= 1
        documented = any(c.startswith("# --") for c in block)
        inherited = any(doc for _, doc in ancestors)
        if not stripped.endswith(":") and not (documented or inherited):
            undocumented.append(f"line {index + 1}: {stripped}")
        ancestors.append((indent, documented or inherited))
    assert not undocumented, undocumented


# -- pod security, resources, labels ----------------------------------------------------------


def pod_specs(objects: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any], list[dict]]]:
    """(where, pod spec, containers) of every pod the objects make, predictors included.

    A predictor's container is its ServingRuntime's container merged with the
    InferenceService's model fields, as KServe merges them.
    """
    runtimes = {d["metadata"]["name"]: d for d in objects if d["kind"] == "ServingRuntime"}
    out = []
    for doc in objects:
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] in WORKLOADS - {"Pod"}:
            spec = dict(doc["spec"]["template"]["spec"])
            claims = [
                {"name": t["metadata"]["name"]} for t in doc["spec"].get("volumeClaimTemplates", [])
            ]
            spec["volumes"] = spec.get("volumes", []) + claims
            out.append((where, spec, spec.get("initContainers", []) + spec["containers"]))
        elif doc["kind"] == "Pod":
            out.append((where, doc["spec"], doc["spec"]["containers"]))
        elif doc["kind"] == "InferenceService":
            predictor = doc["spec"]["predictor"]
            model = predictor["model"]
            runtime = runtimes.get(model.get("runtime", ""))
            if runtime is not None:
                base = dict(runtime["spec"]["containers"][0])
                base.update({k: v for k, v in model.items() if k in ("resources", "env")})
                volumes = runtime["spec"].get("volumes", []) + predictor.get("volumes", [])
            else:  # a ClusterServingRuntime (kserve-torchserve): the model carries it all
                base = {"name": "kserve-container", **model}
                volumes = predictor.get("volumes", [])
            out.append((where, {**predictor, "volumes": volumes}, [base]))
    return out


def all_pods(docs) -> list[tuple[str, str, dict[str, Any], list[dict]]]:
    return [
        (name, where, spec, containers)
        for name, objects in docs.items()
        for where, spec, containers in pod_specs(with_embedded(objects))
    ]


def test_every_pod_is_locked_down(docs) -> None:
    pods = all_pods(docs)
    assert {w.split("/")[0] for _, w, _, _ in pods} >= {
        "Deployment", "StatefulSet", "Job", "Pod", "InferenceService",
    }  # fmt: skip
    problems = []
    for name, where, spec, containers in pods:
        pod = spec.get("securityContext") or {}
        if spec.get("automountServiceAccountToken") is not False:
            problems.append(f"{name} {where}: automountServiceAccountToken is not false")
        if spec.get("serviceAccountName") in (None, "default"):
            problems.append(f"{name} {where}: runs as the default ServiceAccount")
        volumes = {v["name"] for v in spec.get("volumes") or []}
        for c in containers:
            sc = c.get("securityContext") or {}
            seccomp = (sc.get("seccompProfile") or pod.get("seccompProfile") or {}).get("type")
            checks = {
                "runAsNonRoot": sc.get("runAsNonRoot", pod.get("runAsNonRoot")) is True,
                "readOnlyRootFilesystem": sc.get("readOnlyRootFilesystem") is True,
                "allowPrivilegeEscalation false": sc.get("allowPrivilegeEscalation") is False,
                "capabilities drop ALL": "ALL" in (sc.get("capabilities") or {}).get("drop", []),
                "seccomp RuntimeDefault": seccomp == "RuntimeDefault",
                "not privileged": not sc.get("privileged"),
                "writable /tmp": any(m["mountPath"] == "/tmp" for m in c.get("volumeMounts", [])),
            }
            resources = c.get("resources") or {}
            for kind in ("requests", "limits"):
                checks[f"{kind} cpu+memory"] = {"cpu", "memory"} <= set(resources.get(kind) or {})
            checks["mounts name volumes"] = all(
                m["name"] in volumes for m in c.get("volumeMounts") or []
            )
            problems += [f"{name} {where}/{c['name']}: {k}" for k, ok in checks.items() if not ok]
    assert not problems, "\n".join(problems)


def test_every_object_has_the_standard_labels(docs) -> None:
    problems = []
    for name, objects in docs.items():
        for doc in with_embedded(objects):
            labels = doc["metadata"].get("labels") or {}
            missing = [label for label in LABELS if label not in labels]
            if missing:
                problems.append(f"{name} {doc['kind']}/{doc['metadata']['name']}: {missing}")
            selector = ((doc.get("spec") or {}).get("selector") or {}).get("matchLabels")
            if doc["kind"] in WORKLOADS and selector:
                assert set(selector) <= {
                    "app.kubernetes.io/name", "app.kubernetes.io/instance",
                    "app.kubernetes.io/component",
                }, selector  # fmt: skip
    assert not problems, "\n".join(problems)


def test_every_namespaced_object_names_its_namespace(docs) -> None:
    for objects in docs.values():
        for doc in objects:
            assert doc["metadata"].get("namespace") == "roost", doc["metadata"]["name"]


def test_rbac_is_namespaced_and_least_privilege(docs) -> None:
    kinds = {d["kind"] for objects in docs.values() for d in objects}
    assert not kinds & {"ClusterRole", "ClusterRoleBinding"}
    for objects in docs.values():
        for role in find(objects, "Role"):
            for rule in role["rules"]:
                assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"]
                assert not {"delete", "deletecollection", "escalate", "bind"} & set(rule["verbs"])
    # Exactly the calls roost makes (roost/k8s.py, k8s_jobs.py, rollout/backends/kserve.py).
    (rollout,) = find(docs["ci-kind"], "Role", "roost-rollout")
    assert {r["resources"][0]: sorted(r["verbs"]) for r in rollout["rules"]} == {
        "inferenceservices": ["get", "patch"],
        "pods": ["list"],
    }
    (deployer,) = find(docs["ci-kind"], "Role", "roost-deployer")
    assert {r["resources"][0]: sorted(r["verbs"]) for r in deployer["rules"]} == {
        "configmaps": ["get"],
        "jobs": ["create", "get"],
        "pods": ["list"],
        "pods/log": ["get"],
        "inferenceservices": ["create", "get", "patch"],
    }
    cm_rule = next(r for r in deployer["rules"] if r["resources"] == ["configmaps"])
    assert cm_rule["resourceNames"] == ["roost-templates"]


# -- what each component gets ---------------------------------------------------------------


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env") or []}


def training_job(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (cm,) = find(objects, "ConfigMap", "roost-templates")
    return yaml.safe_load(cm["data"]["training-job.yaml"])


def test_training_job_on_gpu_nodes_for_eks_and_on_cpu_for_kind(docs) -> None:
    eks = training_job(docs["eks"])
    pod = eks["spec"]["template"]["spec"]
    (train,) = pod["containers"]
    assert train["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    assert env_of(train)["ROOST_TRAIN__DEVICE"] == "cuda"
    kind = training_job(docs["kind"])
    kind_pod = kind["spec"]["template"]["spec"]
    assert "nodeSelector" not in kind_pod and "tolerations" not in kind_pod
    assert "nvidia.com/gpu" not in kind_pod["containers"][0]["resources"]["limits"]
    assert env_of(kind_pod["containers"][0])["ROOST_TRAIN__DEVICE"] == "cpu"


def test_training_job_retries_resume_from_s3_checkpoints(docs) -> None:
    job = training_job(docs["kind"])
    spec = job["spec"]
    assert spec["backoffLimit"] == 3
    assert spec["activeDeadlineSeconds"] == 21600 and spec["ttlSecondsAfterFinished"] == 86400
    assert spec["template"]["spec"]["restartPolicy"] == "Never"
    fail_fast = spec["podFailurePolicy"]["rules"][0]
    assert fail_fast["action"] == "FailJob" and fail_fast["onExitCodes"]["values"] == [2]
    (train,) = spec["template"]["spec"]["containers"]
    names = [e["name"] for e in train["env"]]
    env = env_of(train)
    # $(ROOST_JOB_NAME) expands only if defined earlier: the checkpoint is per Job, not per pod
    assert names.index("ROOST_JOB_NAME") < names.index("ROOST_TRAIN__CHECKPOINT_DIR")
    assert env["ROOST_TRAIN__CHECKPOINT_DIR"] == "s3://roost/checkpoints/$(ROOST_JOB_NAME)"
    field = env["ROOST_JOB_NAME"]["fieldRef"]["fieldPath"]
    assert field == "metadata.labels['batch.kubernetes.io/job-name']"
    assert env["MLFLOW_TRACKING_URI"] == "http://roost-mlflow.roost.svc.cluster.local:5000"
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://roost-minio.roost.svc.cluster.local:9000"
    assert env["AWS_ACCESS_KEY_ID"]["secretKeyRef"]["name"] == "roost-minio"
    eks_pod = training_job(docs["eks"])["spec"]["template"]["spec"]
    assert "AWS_ACCESS_KEY_ID" not in env_of(eks_pod["containers"][0])  # IRSA instead


def test_training_hook_is_off_by_default(docs) -> None:
    assert not find(docs["default"], "Job", None) or all(
        j["metadata"]["name"] in ("roost-bucket", "roost-tuning-db")
        for j in find(docs["default"], "Job")
    )
    hooks = [
        j for j in find(docs["ci-kind"], "Job") if j["metadata"]["name"].startswith("roost-train")
    ]
    (hook,) = hooks
    assert hook["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"


def test_training_args_go_to_the_hook_job_only() -> None:
    """`roost train --on k8s` sends its own settings; the chart's flags must not override them."""
    extra = {"training": {"args": ["--epochs", "15"], "hook": {"enabled": True}}}
    objects = documents(render(values_of(VALUE_SETS["kind"], extra)))
    (hook,) = [j for j in find(objects, "Job") if j["metadata"]["name"].startswith("roost-train")]
    assert hook["spec"]["template"]["spec"]["containers"][0]["args"] == ["train", "--epochs", "15"]
    template = training_job(objects)["spec"]["template"]["spec"]["containers"][0]
    assert template["args"] == ["train"]


def test_mlflow_server(docs) -> None:
    (deployment,) = find(docs["kind"], "Deployment", "roost-mlflow")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert args[:2] == ["mlflow", "serve"]
    assert args[args.index("--artifacts-destination") + 1] == "s3://roost/mlflow"
    hosts = args[args.index("--allowed-hosts") + 1].split(",")
    assert {"roost-mlflow", "roost-mlflow.roost.svc.cluster.local:*", "localhost:*"} <= set(hosts)
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"
    names = [e["name"] for e in container["env"]]
    assert names.index("POSTGRES_PASSWORD") < names.index("ROOST_TRACKING__BACKEND_STORE_URI")
    uri = env_of(container)["ROOST_TRACKING__BACKEND_STORE_URI"]
    assert (
        uri
        == "postgresql://mlflow:$(POSTGRES_PASSWORD)@roost-postgresql.roost.svc.cluster.local:5432/mlflow"
    )
    (eks,) = find(docs["eks"], "Deployment", "roost-mlflow")
    eks_env = env_of(eks["spec"]["template"]["spec"]["containers"][0])
    assert eks_env["ROOST_TRACKING__BACKEND_STORE_URI"]["secretKeyRef"] == {
        "name": "roost-mlflow-db", "key": "uri",
    }  # fmt: skip
    assert "MLFLOW_S3_ENDPOINT_URL" not in eks_env and "AWS_ACCESS_KEY_ID" not in eks_env
    (sa,) = find(docs["eks"], "ServiceAccount", "roost-mlflow")
    assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].endswith(
        ":role/roost-mlflow"
    )
    assert not find(docs["eks"], "StatefulSet") and not find(
        docs["eks"], "Deployment", "roost-minio"
    )
    assert find(docs["kind"], "StatefulSet", "roost-postgresql")
    assert find(docs["ci-kind"], "Ingress", "roost-mlflow")


def test_serving_runtime_and_inference_service(docs) -> None:
    runtimes = {r["metadata"]["name"]: r for r in find(docs["ci-kind"], "ServingRuntime")}
    rest, grpc = runtimes["roost-predictor"], runtimes["roost-predictor-grpc"]
    assert rest["spec"]["supportedModelFormats"][0]["name"] == "roost-text-classifier"
    (container,) = rest["spec"]["containers"]
    assert container["args"] == [
        "serve", "--model-uri", "/mnt/models", "--model-name", "sentiment",
        "--http-port", "8080", "--grpc-port", "8081",
    ]  # fmt: skip
    assert container["ports"] == [{"name": "http1", "containerPort": 8080, "protocol": "TCP"}]
    assert grpc["spec"]["containers"][0]["ports"] == [
        {"name": "h2c", "containerPort": 8081, "protocol": "TCP"}
    ]
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/models/sentiment/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    isvcs = {i["metadata"]["name"]: i for i in find(docs["ci-kind"], "InferenceService")}
    predictor = isvcs["sentiment"]["spec"]["predictor"]
    assert (
        isvcs["sentiment"]["metadata"]["annotations"]["serving.kserve.io/deploymentMode"]
        == "Knative"
    )
    for isvc in isvcs.values():  # prev/latest tags, so Knative-Serving-Tag pins a side
        assert isvc["metadata"]["annotations"]["serving.kserve.io/enable-tag-routing"] == "true"
    assert predictor["canaryTrafficPercent"] == 25
    assert (predictor["minReplicas"], predictor["maxReplicas"]) == (1, 3)
    assert predictor["serviceAccountName"] == "roost-serving"
    model = predictor["model"]
    assert model["storageUri"] == "s3://roost/mlflow/1/models/m-0123456789abcdef/artifacts"
    assert env_of(model) == {
        "ROOST_SERVING__MAX_BATCH_SIZE": "64",
        "ROOST_SERVING__MAX_BATCH_WAIT_MS": "2",
        "ROOST_SERVING__INTRA_OP_THREADS": "1",
        "ROOST_SERVING__MODEL_VERSION": "1",
    }
    assert (
        isvcs["sentiment-grpc"]["spec"]["predictor"]["model"]["runtime"] == "roost-predictor-grpc"
    )
    assert "canaryTrafficPercent" not in isvcs["sentiment-grpc"]["spec"]["predictor"]
    # no storageUri: the chart renders the template only, `roost deploy` creates the service
    assert not find(docs["kind"], "InferenceService")


def test_torchserve_runtime(docs) -> None:
    assert not find(docs["ci-torchserve"], "ServingRuntime")
    (isvc,) = find(docs["ci-torchserve"], "InferenceService")
    model = isvc["spec"]["predictor"]["model"]
    assert model["modelFormat"] == {"name": "pytorch"} and model["runtime"] == "kserve-torchserve"
    assert model["storageUri"] == "s3://roost/torchserve/sentiment/1"
    (test_pod,) = find(docs["ci-torchserve"], "Pod")
    assert test_pod["spec"]["containers"][0]["args"][0].endswith("/v1/models/sentiment")


def test_s3_credentials_minio_on_kind_irsa_on_eks(docs) -> None:
    (kind_sa,) = find(docs["kind"], "ServiceAccount", "roost-serving")
    annotations = kind_sa["metadata"]["annotations"]
    assert (
        annotations["serving.kserve.io/s3-endpoint"] == "roost-minio.roost.svc.cluster.local:9000"
    )
    assert annotations["serving.kserve.io/s3-usehttps"] == "0"
    assert kind_sa["secrets"] == [{"name": "roost-minio"}]
    (secret,) = find(docs["kind"], "Secret", "roost-minio")
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(secret["data"])
    assert secret["metadata"]["annotations"]["serving.kserve.io/s3-endpoint"].endswith(":9000")
    (eks_sa,) = find(docs["eks"], "ServiceAccount", "roost-serving")
    eks_annotations = eks_sa["metadata"]["annotations"]
    assert eks_annotations["eks.amazonaws.com/role-arn"].endswith(":role/roost-kserve-storage")
    assert eks_annotations["serving.kserve.io/s3-endpoint"] == "s3.us-east-1.amazonaws.com"
    assert eks_annotations["serving.kserve.io/s3-usehttps"] == "1"
    assert "secrets" not in eks_sa


def test_network_policies_admit_only_the_clients(docs) -> None:
    objects = with_embedded(docs["ci-kind"])
    policies = {p["metadata"]["name"]: p for p in find(objects, "NetworkPolicy")}
    mlflow_from = policies["roost-mlflow"]["spec"]["ingress"][0]["from"]
    assert {"podSelector": {"matchLabels": {"roost.io/mlflow-access": "true"}}} in mlflow_from
    minio_from = policies["roost-minio"]["spec"]["ingress"][0]["from"]
    assert {"podSelector": {"matchLabels": {"roost.io/s3-access": "true"}}} in minio_from
    postgres_from = policies["roost-postgresql"]["spec"]["ingress"][0]["from"]
    assert postgres_from[0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "mlflow"

    def pod_labels(kind: str, name: str) -> dict[str, str]:
        (doc,) = [d for d in objects if d["kind"] == kind and d["metadata"]["name"] == name]
        return doc["spec"]["template"]["metadata"]["labels"]

    assert pod_labels("Job", "roost-train")["roost.io/mlflow-access"] == "true"
    assert pod_labels("Job", "roost-train")["roost.io/s3-access"] == "true"
    assert pod_labels("Deployment", "roost-rollout")["roost.io/mlflow-access"] == "true"
    assert pod_labels("Deployment", "roost-mlflow")["roost.io/s3-access"] == "true"
    assert "roost.io/mlflow-access" not in pod_labels("Deployment", "roost-minio")
    # every roost pod is selected by some policy
    for kind in ("Deployment", "StatefulSet", "Job"):
        for doc in find(objects, kind):
            labels = doc["spec"]["template"]["metadata"]["labels"]
            assert any(
                set(p["spec"]["podSelector"].get("matchLabels", {}).items()) <= set(labels.items())
                for p in policies.values()
            ), doc["metadata"]["name"]


def test_rollout_controller(docs) -> None:
    assert not find(docs["default"], "Deployment", "roost-rollout")  # off by default
    (deployment,) = find(docs["ci-kind"], "Deployment", "roost-rollout")
    spec = deployment["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["args"] == ["rollout", "watch", "--backend", "kserve"]
    env = env_of(container)
    assert env["MLFLOW_TRACKING_URI"] == "http://roost-mlflow.roost.svc.cluster.local:5000"
    assert env["ROOST_K8S__NAMESPACE"] == "roost"
    assert env["ROOST_K8S__INFERENCE_SERVICE"] == "sentiment"
    assert env["ROOST_ROLLOUT__PROMETHEUS_URL"] == "http://prometheus-operated.monitoring.svc:9090"
    assert env["ROOST_ROLLOUT__WINDOW_S"] == "60"
    assert json.loads(env["ROOST_ROLLOUT__STEPS"]) == [10, 25, 50, 100]
    assert env["ROOST_TRACKING__ARTIFACTS_DESTINATION"] == "s3://roost/mlflow"
    (eks,) = find(docs["eks"], "Deployment", "roost-rollout")
    assert "ROOST_ROLLOUT__PROMETHEUS_URL" not in env_of(
        eks["spec"]["template"]["spec"]["containers"][0]
    )
    token = next(v for v in spec["volumes"] if v["name"] == "kube-api-access")
    assert token["projected"]["sources"][0]["serviceAccountToken"]["expirationSeconds"] == 3600
    mount = next(m for m in container["volumeMounts"] if m["name"] == "kube-api-access")
    assert mount["mountPath"] == "/var/run/secrets/kubernetes.io/serviceaccount"


def test_rollout_controller_shadows_through_the_charts_receiver(docs) -> None:
    """kind/EKS run the receiver with KServe's logger on: the controller shadows first."""
    for name in ("ci-kind", "eks"):
        (deployment,) = find(docs[name], "Deployment", "roost-rollout")
        template = deployment["spec"]["template"]
        env = env_of(template["spec"]["containers"][0])
        assert env["ROOST_ROLLOUT__MODE"] == "shadow-then-canary", name
        receiver = env["ROOST_ROLLOUT__SHADOW__RECEIVER_URL"]
        assert receiver == "http://roost-monitor.roost.svc.cluster.local:8090", name
        # the receiver's NetworkPolicy admits pods with this label
        assert template["metadata"]["labels"]["roost.io/monitor-access"] == "true", name
    canary = render({"rollout": {"controller": {"enabled": True}}})
    (deployment,) = find(documents(canary), "Deployment", "roost-rollout")
    template = deployment["spec"]["template"]
    env = env_of(template["spec"]["containers"][0])
    assert env["ROOST_ROLLOUT__MODE"] == "canary"  # no receiver, nothing to replay
    assert "ROOST_ROLLOUT__SHADOW__RECEIVER_URL" not in env
    assert "roost.io/monitor-access" not in template["metadata"]["labels"]


def test_a_shadow_mode_without_the_receiver_fails_the_render() -> None:
    import helm_python

    chart = helm_python.Chart.load(str(CHART))
    with pytest.raises(helm_python.HelmError, match=r"needs monitor\.enabled"):
        chart.render(
            {"rollout": {"controller": {"enabled": True, "mode": "shadow"}}},
            name="roost",
            namespace="roost",
        )
    assert "mode" in schema_error({"rollout": {"controller": {"mode": "mirror"}}})


def test_helm_test_calls_the_v2_ready_endpoint(docs) -> None:
    (pod,) = find(docs["kind"], "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    url = pod["spec"]["containers"][0]["args"][0]
    assert url == "http://sentiment-predictor.roost.svc.cluster.local/v2/models/sentiment/ready"


def test_notes_tell_how_to_reach_mlflow_and_call_the_model(renders) -> None:
    notes = renders["kind"]["roost/templates/NOTES.txt"]
    assert "kubectl -n roost port-forward svc/roost-mlflow 5000:5000" in notes
    assert "roost deploy --version" in notes and "/v2/models/sentiment/infer" in notes
    assert "helm test roost -n roost" in notes


def test_every_roost_command_line_in_the_chart_parses(docs) -> None:
    """The args the chart gives roost's images are flags roost accepts."""
    commands = set()
    for objects in docs.values():
        for _, _, containers in pod_specs(with_embedded(objects)):
            for container in containers:
                image = container.get("image", "")
                if "roost-" in image and not container.get("command") and container.get("args"):
                    commands.add(tuple(container["args"]))
        for runtime in find(objects, "ServingRuntime"):
            commands.add(tuple(runtime["spec"]["containers"][0]["args"]))
    assert {c[0] for c in commands} >= {"serve", "mlflow", "train", "rollout", "aws"}
    runner = CliRunner()
    for command in sorted(commands):
        result = runner.invoke(app, [*command, "--help"])
        assert result.exit_code == 0, f"roost {' '.join(command)}: {result.output}"


def test_serving_limits_and_repository_extension(docs) -> None:
    """Issue 17: the server's limits are chart values; the repository extension is off
    unless enabled, then its token comes from a Secret; readiness probes ask the model."""
    runtimes = {r["metadata"]["name"]: r for r in find(docs["ci-kind"], "ServingRuntime")}
    for name in ("roost-predictor", "roost-predictor-grpc"):
        (container,) = runtimes[name]["spec"]["containers"]
        env = env_of(container)
        assert {k: v for k, v in env.items() if k.startswith("ROOST_SERVING__")} == {
            "ROOST_SERVING__MAX_TEXTS_PER_REQUEST": "8192",
            "ROOST_SERVING__HEADER_TIMEOUT_S": "10",
            "ROOST_SERVING__BODY_TIMEOUT_S": "30",
            "ROOST_SERVING__KEEP_ALIVE_TIMEOUT_S": "5",
            "ROOST_SERVING__MAX_CONNECTIONS": "4096",
            "ROOST_SERVING__GRPC_MAX_INFLIGHT": "512",
            "ROOST_SERVING__GRPC_RETRY_PUSHBACK_MS": "100",
            "ROOST_SERVING__GRPC_IDLE_TIMEOUT_S": "300",
        }
    # The gRPC runtime's probes ask the model too (a TCP connect says nothing about it).
    (grpc_container,) = runtimes["roost-predictor-grpc"]["spec"]["containers"]
    for probe in ("readinessProbe", "startupProbe"):
        command = " ".join(grpc_container[probe]["exec"]["command"])
        assert "/v2/models/sentiment/ready" in command, command
    assert "/v2/health/live" in " ".join(grpc_container["livenessProbe"]["exec"]["command"])

    extra = {"serving": {"repositoryExtension": {"enabled": True, "tokenSecret": {"name": "ops"}}}}
    objects = documents(render(values_of(VALUE_SETS["ci-kind"], extra)))
    (runtime, _) = find(objects, "ServingRuntime")
    env = env_of(runtime["spec"]["containers"][0])
    assert env["ROOST_SERVING__REPOSITORY_EXTENSION"] == "true"
    assert env["ROOST_SERVING__REPOSITORY_TOKEN"] == {
        "secretKeyRef": {"name": "ops", "key": "token"}
    }
    # Enabled without a Secret does not render.
    extra["serving"]["repositoryExtension"]["tokenSecret"]["name"] = ""
    with pytest.raises(Exception, match="tokenSecret"):
        render(values_of(VALUE_SETS["ci-kind"], extra))


def test_monitor_receiver_and_the_predictor_logger(docs) -> None:
    """The receiver is off by default; on, every InferenceService logs to it (KServe's agent)."""
    assert not find(docs["default"], "Deployment", "roost-monitor")
    assert all("logger" not in i["spec"]["predictor"] for i in with_embedded(docs["default"])
               if i["kind"] == "InferenceService")  # fmt: skip
    for name in ("kind", "eks", "ci-kind"):
        (deployment,) = find(docs[name], "Deployment", "roost-monitor")
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        assert container["args"][:2] == ["monitor", "serve"]
        assert find(docs[name], "Service", "roost-monitor")
        (policy,) = find(docs[name], "NetworkPolicy", "roost-monitor")
        peers = policy["spec"]["ingress"][0]["from"]
        assert {"podSelector": {"matchLabels": {"roost.io/monitor-access": "true"}}} in peers
    isvcs = [i for i in with_embedded(docs["ci-kind"]) if i["kind"] == "InferenceService"]
    assert len(isvcs) >= 2  # the served one(s) and the template `roost deploy` fills in
    for isvc in isvcs:
        assert isvc["spec"]["predictor"]["logger"] == {
            "mode": "all",
            "url": "http://roost-monitor.roost.svc.cluster.local:8090/",
        }
    (isvc,) = find(docs["ci-eks"], "InferenceService")
    assert isvc["spec"]["predictor"]["logger"] == {
        "mode": "request", "url": "http://collector.observability.svc:8080/events"
    }  # fmt: skip


def test_deploy_log_flags_render_a_valid_logger(docs) -> None:
    """`roost deploy --log-url --log-mode` on the chart's template passes the KServe CRD schema."""
    from roost.monitor.deploy import with_logger

    tools.schema_dir()
    (template,) = [i for i in with_embedded(docs["default"]) if i["kind"] == "InferenceService"]
    assert "logger" not in template["spec"]["predictor"]
    manifest = with_logger(template, "http://receiver.roost.svc:8090/", "response")
    assert manifest["spec"]["predictor"]["logger"] == {
        "url": "http://receiver.roost.svc:8090/", "mode": "response"
    }  # fmt: skip
    assert not tools.crd_errors(manifest)


def test_crd_validation_catches_a_bad_logger_mode() -> None:
    tools.schema_dir()
    (isvc,) = find(documents(render(values_of(VALUE_SETS["ci-eks"]))), "InferenceService")
    assert not tools.crd_errors(isvc)
    isvc["spec"]["predictor"]["logger"]["mode"] = "everything"
    assert any("everything" in e or "mode" in e for e in tools.crd_errors(isvc))


def batch_job(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (cm,) = find(objects, "ConfigMap", "roost-templates")
    return yaml.safe_load(cm["data"]["batch-job.yaml"])


def test_batch_indexed_job_template(docs) -> None:
    """`roost batch --on k8s` starts from this Job (schemas, pod security and checkov above
    cover it with every other embedded template)."""
    job = batch_job(docs["kind"])
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert (spec["completions"], spec["parallelism"], spec["backoffLimitPerIndex"]) == (4, 4, 3)
    assert spec["template"]["spec"]["restartPolicy"] == "Never"
    fail_fast = spec["podFailurePolicy"]["rules"][0]
    assert fail_fast["action"] == "FailJob" and fail_fast["onExitCodes"]["values"] == [2, 3]
    (container,) = spec["template"]["spec"]["containers"]
    assert container["name"] == "batch" and container["args"] == ["batch"]
    env = env_of(container)
    # each pod scores the shard of its completion index
    assert env["ROOST_BATCH__SHARD_INDEX"]["fieldRef"]["fieldPath"] == (
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    )
    assert env["MLFLOW_TRACKING_URI"] == "http://roost-mlflow.roost.svc.cluster.local:5000"
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://roost-minio.roost.svc.cluster.local:9000"
    assert container["resources"]["requests"] == {"cpu": "2", "memory": "2Gi"}
    labels = spec["template"]["metadata"]["labels"]
    assert labels["app.kubernetes.io/component"] == "batch"
    assert labels["roost.io/s3-access"] == "true" and labels["roost.io/mlflow-access"] == "true"
    eks = batch_job(docs["eks"])["spec"]["template"]["spec"]
    assert "AWS_ACCESS_KEY_ID" not in env_of(eks["containers"][0])  # IRSA instead
    assert eks["serviceAccountName"] == "roost-batch"
    (sa,) = find(docs["kind"], "ServiceAccount", "roost-batch")
    assert sa["automountServiceAccountToken"] is False
    # the values' shape is checked by the schema
    assert "/batch/shards" in schema_error({"batch": {"shards": 0}})


def test_monitor_store_on_s3_with_a_journal_claim_minio_on_kind_irsa_on_eks(docs) -> None:
    """monitor.store s3://: MinIO's keys on kind, IRSA on EKS (as MLflow's artifacts); the
    journal on a PersistentVolumeClaim the chart creates (monitor.persistence)."""
    assert not find(docs["default"], "PersistentVolumeClaim", "roost-monitor")
    for name, bucket in (("kind", "roost"), ("eks", "roost-artifacts-123456789012")):
        (deployment,) = find(docs[name], "Deployment", "roost-monitor")
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        args = container["args"]
        assert args[args.index("--store") + 1] == f"s3://{bucket}/monitor"
        assert args[args.index("--journal-dir") + 1] == "/var/lib/roost-monitor"
        env = env_of(container)
        assert env["AWS_REGION"] == "us-east-1"
        assert deployment["spec"]["template"]["metadata"]["labels"]["roost.io/s3-access"] == "true"
        (claim,) = find(docs[name], "PersistentVolumeClaim", "roost-monitor")
        assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
        store = next(v for v in pod["volumes"] if v["name"] == "store")
        assert store == {"name": "store", "persistentVolumeClaim": {"claimName": "roost-monitor"}}
    kind_env = env_of(find(docs["kind"], "Deployment", "roost-monitor")[0]["spec"]["template"]
                      ["spec"]["containers"][0])  # fmt: skip
    assert kind_env["MLFLOW_S3_ENDPOINT_URL"] == "http://roost-minio.roost.svc.cluster.local:9000"
    assert kind_env["AWS_ACCESS_KEY_ID"] == {
        "secretKeyRef": {"name": "roost-minio", "key": "AWS_ACCESS_KEY_ID"}
    }
    (eks_deployment,) = find(docs["eks"], "Deployment", "roost-monitor")
    eks_env = env_of(eks_deployment["spec"]["template"]["spec"]["containers"][0])
    assert "AWS_ACCESS_KEY_ID" not in eks_env and "MLFLOW_S3_ENDPOINT_URL" not in eks_env
    (sa,) = find(docs["eks"], "ServiceAccount", "roost-monitor")
    assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].endswith(
        ":role/roost-monitor"
    )
    # a local store stays a plain directory on the volume
    (plain,) = find(documents(render(values_of([], {"monitor": {"enabled": True}}))),
                    "Deployment", "roost-monitor")  # fmt: skip
    (container,) = plain["spec"]["template"]["spec"]["containers"]
    assert container["args"][container["args"].index("--store") + 1] == "/var/lib/roost-monitor"
    assert "AWS_REGION" not in env_of(container)


def test_monitor_watcher_creates_training_jobs_with_least_privilege(docs) -> None:
    """The watcher Deployment (off by default, on in kind/EKS) runs `roost monitor watch --on
    k8s` with a Role that can create the training Job and follow it, nothing more."""
    assert not find(docs["default"], "Deployment", "roost-monitor-watch")
    for name in ("kind", "eks", "ci-kind", "ci-eks"):
        (deployment,) = find(docs[name], "Deployment", "roost-monitor-watch")
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        args = container["args"]
        assert args[:2] == ["monitor", "watch"]
        assert args[args.index("--on") + 1] == "k8s"
        assert args[args.index("--action") + 1] == "retrain"
        assert args[args.index("--store") + 1].startswith("s3://")
        env = env_of(container)
        assert env["ROOST_K8S__TEMPLATES_CONFIGMAP"] == "roost-templates"
        assert env["MLFLOW_TRACKING_URI"].startswith("http://roost-mlflow.")
        assert env["ROOST_MONITOR__URL"] == "http://roost-monitor.roost.svc.cluster.local:8090"
        assert pod["serviceAccountName"] == "roost-monitor-watch"
        (role,) = find(docs[name], "Role", "roost-monitor-watch")
        assert {r["resources"][0]: sorted(r["verbs"]) for r in role["rules"]} == {
            "configmaps": ["get"],
            "jobs": ["create", "get"],
            "pods": ["list"],
            "pods/log": ["get"],
        }
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert labels["roost.io/s3-access"] == labels["roost.io/mlflow-access"] == "true"
        (policy,) = find(docs[name], "NetworkPolicy", "roost-monitor-watch")
        assert policy["spec"]["ingress"] == []
        (binding,) = find(docs[name], "RoleBinding", "roost-monitor-watch")
        assert binding["subjects"][0]["name"] == "roost-monitor-watch"
    # the watcher and its Job read the store: a local one cannot be shared, so it is refused
    with pytest.raises(Exception, match=r"needs monitor\.store on s3://"):
        render(values_of([], {"monitor": {"enabled": True, "watcher": {"enabled": True}}}))
