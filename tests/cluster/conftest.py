"""Fixtures of the manifest runner: the kind render and its stack, started once per session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster.runner import Loopback, Rendered, Runner
from tests.cluster.stack import (
    NAMESPACE,
    Stack,
    run_bucket_job,
    start_mlflow,
    start_postgresql,
    start_s3,
)
from tests.fixtures.k8s.chart import render, values_of

KIND_VALUES = ["values-kind.yaml"]


def rendered_for(files: list[str], extra: dict | None = None, existing=None) -> Rendered:
    values = values_of(files, extra)
    return Rendered(
        render(values), NAMESPACE, values.get("clusterDomain", "cluster.local"), existing
    )


@pytest.fixture(scope="session")
def kind_rendered() -> Rendered:
    return rendered_for(KIND_VALUES)


@pytest.fixture(scope="session")
def stack(kind_rendered: Rendered, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """PostgreSQL, S3 (moto), the bucket Job and MLflow, each from its rendered manifest."""
    runner = Runner(
        kind_rendered,
        Loopback(NAMESPACE, kind_rendered.cluster_domain),
        tmp_path_factory.mktemp("cluster"),
    )
    try:
        postgresql = start_postgresql(runner)
        s3 = start_s3(runner)
        bucket = run_bucket_job(runner)
        mlflow = start_mlflow(runner)
        yield Stack(runner, postgresql, s3, bucket, mlflow)
    finally:
        runner.stop_all()


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    return tmp_path
