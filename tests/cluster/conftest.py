"""Fixtures of the manifest runner: the kind render and its stack, started once per session."""

from __future__ import annotations

from collections.abc import Iterator

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


@pytest.fixture(scope="package")
def kind_rendered() -> Rendered:
    return rendered_for(KIND_VALUES)


@pytest.fixture(scope="package")
def stack(kind_rendered: Rendered, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """PostgreSQL, S3 (moto), the bucket Job and MLflow, each from its rendered manifest;
    stopped when tests/cluster is done, so the rest of `make test` does not carry them."""
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
        # Shown with a failing test's captured output: where each Service went.
        print("loopback map:", *runner.loopback.table(), sep="\n  ")
        yield Stack(runner, postgresql, s3, bucket, mlflow)
    finally:
        runner.stop_all()


@pytest.fixture(scope="module")
def own_processes(stack: Stack) -> Iterator[None]:
    """Stop what a module started on the shared stack (predictor, controller) when it ends."""
    first = len(stack.runner.started)
    yield
    for running in reversed(stack.runner.started[first:]):
        running.stop()
    del stack.runner.started[first:]
