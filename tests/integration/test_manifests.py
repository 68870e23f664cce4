"""manifests/: the kustomize overlays, the kind and eksctl cluster configs, the install and
demo scripts, and the hand-written YAML of the repository (yamllint)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from roost import aws
from roost.config import AwsSettings
from tests.fixtures.k8s import tools
from tests.fixtures.k8s.chart import CHART, documents, find, render, values_of

pytestmark = pytest.mark.integration

ROOT = tools.ROOT
MANIFESTS = ROOT / "manifests"
PINS = {
    "CERT_MANAGER_VERSION": "v1.17.0",
    "KNATIVE_OPERATOR_VERSION": "v1.21.1",
    "KNATIVE_SERVING_VERSION": "1.21.1",
    "KSERVE_VERSION": "v0.20.0",
    "KIND_VERSION": "v0.30.0",
}


def kustomize(overlay: str) -> list[dict[str, Any]]:
    result = subprocess.run(
        [tools.tool("kubectl"), "kustomize", str(MANIFESTS / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


@pytest.fixture(scope="module")
def overlays() -> dict[str, list[dict[str, Any]]]:
    return {name: kustomize(name) for name in ("kind", "eks")}


# -- kustomize -------------------------------------------------------------------------------


def test_overlays_build_what_the_chart_does_not_own(overlays) -> None:
    for name, docs in overlays.items():
        kinds = sorted((d["kind"], d["metadata"]["name"]) for d in docs)
        assert ("Namespace", "roost") in kinds and ("Namespace", "knative-serving") in kinds
        (serving,) = find(docs, "KnativeServing")
        assert str(serving["spec"]["version"]) == PINS["KNATIVE_SERVING_VERSION"]
        assert serving["spec"]["ingress"]["kourier"]["enabled"] is True
        config = serving["spec"]["config"]
        assert config["network"]["ingress-class"] == "kourier.ingress.networking.knative.dev"
        for feature in (
            "kubernetes.podspec-securitycontext",
            "kubernetes.podspec-volumes-emptydir",
            "tag-header-based-routing",  # Knative-Serving-Tag pins a canary's side
        ):
            assert config["features"][feature] == "enabled"
        for doc in docs:
            labels = doc["metadata"]["labels"]
            assert labels["app.kubernetes.io/part-of"] == "roost"
            assert labels["roost.io/platform"] == name
        (namespace,) = find(docs, "Namespace", "roost")
        assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "baseline"
    kind_serving = find(overlays["kind"], "KnativeServing")[0]["spec"]
    assert kind_serving["ingress"]["kourier"]["service-type"] == "NodePort"
    assert kind_serving["config"]["domain"] == {"127.0.0.1.sslip.io": ""}
    eks_serving = find(overlays["eks"], "KnativeServing")[0]["spec"]
    assert eks_serving["ingress"]["kourier"]["service-type"] == "LoadBalancer"
    (monitor,) = find(overlays["eks"], "PodMonitor")
    assert monitor["metadata"]["labels"]["roost.io/optional"] == "prometheus"
    assert monitor["spec"]["podMetricsEndpoints"][0]["path"] == "/metrics"
    assert not find(overlays["kind"], "PodMonitor")


def test_overlay_objects_are_valid_for_kubernetes(overlays) -> None:
    errors = [
        e
        for docs in overlays.values()
        for doc in docs
        if doc["kind"] == "Namespace"
        for e in tools.k8s_errors(doc)
    ]
    assert not errors, errors


def test_checkov_on_the_overlays(overlays, tmp_path: Path) -> None:
    for name, docs in overlays.items():
        tools.write_manifests(tmp_path / name, docs)
    report = tools.checkov(tmp_path)
    assert not report["failed"], [f"{f['check_id']} {f['resource']}" for f in report["failed"]]


# -- cluster configs -------------------------------------------------------------------------


def test_kind_cluster_publishes_the_ingress() -> None:
    config = yaml.safe_load((MANIFESTS / "kind" / "cluster.yaml").read_text())
    assert config["kind"] == "Cluster" and config["apiVersion"] == "kind.x-k8s.io/v1alpha4"
    roles = [n["role"] for n in config["nodes"]]
    assert roles == ["control-plane", "worker"]
    (mapping,) = config["nodes"][0]["extraPortMappings"]
    script = (MANIFESTS / "install-stack.sh").read_text()
    node_port = re.search(r'KOURIER_NODE_PORT="\$\{KOURIER_NODE_PORT:-(\d+)\}"', script)
    assert node_port and mapping["containerPort"] == int(node_port.group(1))
    demo = (MANIFESTS / "kind" / "demo.sh").read_text()
    assert f'INGRESS_PORT="${{INGRESS_PORT:-{mapping["hostPort"]}}}"' in demo


def test_eks_cluster_config() -> None:
    config = yaml.safe_load((MANIFESTS / "eks" / "cluster.yaml").read_text())
    assert config["kind"] == "ClusterConfig" and config["iam"]["withOIDC"] is True
    groups = {g["name"]: g for g in config["managedNodeGroups"]}
    assert groups["gpu"]["instanceType"] == "g5.xlarge"
    assert {"key": "nvidia.com/gpu", "value": "true", "effect": "NoSchedule"} in groups["gpu"][
        "taints"
    ]
    assert "taints" not in groups["system"]
    # the GPU label is what the chart's training Job selects
    eks_values = values_of(["values-eks.yaml"])
    default = yaml.safe_load((CHART / "values.yaml").read_text())
    selector = default["training"]["gpu"]["nodeSelector"]
    assert selector.items() <= groups["gpu"]["labels"].items()
    assert eks_values["training"]["gpu"]["enabled"] is True


def test_eks_irsa_roles_match_the_chart_and_roost_aws_policy() -> None:
    config = yaml.safe_load((MANIFESTS / "eks" / "cluster.yaml").read_text())
    accounts = {a["metadata"]["name"]: a for a in config["iam"]["serviceAccounts"]}
    docs = documents(render(values_of(["values-eks.yaml"])))
    chart_accounts = {
        sa["metadata"]["name"]: sa["metadata"].get("annotations", {})
        for sa in find(docs, "ServiceAccount")
    }
    bucket = values_of(["values-eks.yaml"])["s3"]["bucket"]
    policies = aws.iam_policies(AwsSettings(bucket=bucket))
    for name in ("roost-mlflow", "roost-training", "roost-serving"):
        account = accounts[name]
        assert account["metadata"]["namespace"] == "roost" and account["roleOnly"] is True
        arn = chart_accounts[name]["eks.amazonaws.com/role-arn"]
        assert arn.endswith(f":role/{account['roleName']}")
        assert account["attachPolicy"] == policies[account["roleName"]], name


# -- scripts, pins, lint ---------------------------------------------------------------------


def test_versions_are_pinned_the_same_everywhere() -> None:
    makefile = (ROOT / "Makefile").read_text()
    script = (MANIFESTS / "install-stack.sh").read_text()
    for name, version in PINS.items():
        assert re.search(rf"^{name}\s+\?= {re.escape(version)}$", makefile, re.M), name
        if name != "KIND_VERSION":
            assert f'{name}="${{{name}:-{version}}}"' in script, name
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["annotations"]["roost.io/kserve-version"] == PINS["KSERVE_VERSION"]
    assert (
        chart["annotations"]["roost.io/knative-serving-version"] == PINS["KNATIVE_SERVING_VERSION"]
    )


def test_shell_scripts_pass_shellcheck() -> None:
    scripts = sorted(MANIFESTS.rglob("*.sh"))
    assert len(scripts) == 2
    result = subprocess.run(
        [tools.tool("shellcheck"), "--severity=style", *map(str, scripts)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hand_written_yaml_passes_yamllint() -> None:
    result = subprocess.run(
        [tools.tool("yamllint"), "--strict", "--format", "parsable", "."],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # the config really covers the chart's values and the manifests, not the Go templates
    listed = subprocess.run(
        [tools.tool("yamllint"), "--list-files", "."],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout.split()
    assert "charts/roost/values.yaml" in [str(Path(p)) for p in listed]
    assert "manifests/eks/cluster.yaml" in [str(Path(p)) for p in listed]
    assert not [p for p in listed if "/templates/" in p]


def test_yamllint_catches_a_bad_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: 1\na: 2\nflag: yes\n")
    result = subprocess.run(
        [tools.tool("yamllint"), "-c", str(ROOT / ".yamllint"), "--format", "parsable", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "key-duplicates" in result.stdout and "truthy" in result.stdout
