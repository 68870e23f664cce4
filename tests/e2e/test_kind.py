"""The whole stack on a real kind cluster: `make kind-up kind-demo` (marker kind).

Needs Docker with a running daemon, kind, kubectl and helm, and the network (images, charts,
release manifests); elsewhere it skips with one line saying which is missing. The cluster is
`roost-e2e`, deleted by the fixture whatever the outcome.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

# kind-up (downloads, installs, image builds) and kind-demo get up to an hour, kind-down 10
# minutes: above pyproject's 600 s per-test limit.
pytestmark = [pytest.mark.kind, pytest.mark.timeout(4500)]

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = "roost-e2e"


def _missing() -> str | None:
    for tool in ("docker", "kind", "kubectl", "helm"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    try:
        info = subprocess.run(["docker", "info"], capture_output=True, timeout=30, check=False)
    except subprocess.TimeoutExpired:
        return "the Docker daemon does not answer (docker info hung for 30 s)"
    if info.returncode != 0:
        return "the Docker daemon does not answer"
    return None


@pytest.fixture(scope="module")
def kind_cluster() -> Iterator[str]:
    reason = _missing()
    if reason:
        pytest.skip(f"kind e2e needs Docker and kind: {reason}")
    try:
        yield CLUSTER
    finally:
        subprocess.run(
            ["make", "kind-down", f"KIND_CLUSTER={CLUSTER}"], cwd=ROOT, timeout=600, check=False
        )


def test_kind_up_and_demo(kind_cluster: str) -> None:
    result = subprocess.run(
        ["make", "kind-up", "kind-demo", f"KIND_CLUSTER={kind_cluster}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=3600,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-8000:]
    # the demo's stages each left their mark
    assert "Ready" in output  # roost deploy waited for the InferenceService
    assert "via v2" in output and "via grpc" in output  # predictions over REST and gRPC
    assert "Succeeded" in output  # helm test: the pod in the cluster got HTTP 200
