"""Fixtures of the e2e suites: the shared demo store (tests/e2e/demo_store.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from roost.proc import http_ok
from tests.e2e.demo_store import DemoStore, run, stop_demo_servers


@pytest.fixture(scope="session")
def demo_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoStore]:
    """Two demo runs on one store: the first plain, the second with --keep-running.

    Whatever a run left serving is stopped at the end (test_lineage_ui stops it as soon as
    its module is done), and whatever a failed or timed-out demo left running too.
    """
    state = tmp_path_factory.mktemp("demo") / "state"
    store: DemoStore | None = None
    try:
        first = run(state)
        after_first = {
            "server_json": (state / "mlflow" / "server.json").exists(),
            "mlflow": http_ok(first["mlflow_ui"] + "/health"),
            "metrics": http_ok(first["endpoints"]["metrics"]),
        }
        second = run(state, "--keep-running")
        store = DemoStore(state, first, after_first, second)
        yield store
    finally:
        if store is not None:
            store.stop()
        else:
            stop_demo_servers(state)
