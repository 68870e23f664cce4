"""`roost promote` and the registry client under injected MLflow faults: the gate fails closed.

The reproducer of issue 9: with @champion on v2 and a candidate run, a 500 on the alias read
made `roost promote` say "first version passes", move @champion to v3 and exit 0. Here every
registry call of a promotion fails in turn (500, a dropped connection, a refused one); each
time the command ends with one `error:` line and exit 4, @champion stays where it was, and
the same command after the fault clears promotes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from roost import tracking
from roost.errors import RoostError, TrackingUnavailable
from roost.train import TrainOutcome
from tests.faults.conftest import Model, cli_env, endpoint, fresh_model, roost
from tests.faults.proxy import FaultProxy

pytestmark = pytest.mark.faults

ALIAS = endpoint("/api/2.0/mlflow/registered-models/alias")
GET_RUN = endpoint("/api/2.0/mlflow/runs/get")
ARTIFACTS = r"/api/2\.0/mlflow-artifacts/artifacts/"
CREATE_VERSION = endpoint("/api/2.0/mlflow/model-versions/create")
GET_VERSION = endpoint("/api/2.0/mlflow/model-versions/get")
SET_TAG = endpoint("/api/2.0/mlflow/model-versions/set-tag")
DOWNLOAD_URI = endpoint("/api/2.0/mlflow/model-versions/get-download-uri")


# -- what MLflow really answers: "absent" versus "failed" ----------------------------------------


def test_absent_alias_and_model_read_as_none_on_a_real_server(
    mlflow_server: tracking.ServerState, small_run: TrainOutcome
) -> None:
    model = fresh_model(mlflow_server, "absent")
    assert model.registry.version_for_alias("champion") is None  # no such model yet
    assert model.registry.aliases() == {}
    version = model.registry.register(small_run.model_uri)
    assert model.registry.version_for_alias("champion") is None  # model, but no alias
    model.registry.delete_alias("champion")  # deleting an absent alias is a no-op
    model.registry.set_alias("champion", version)
    assert model.registry.version_for_alias("champion") == version


@pytest.mark.parametrize(
    ("fault", "error"),
    [
        ("500", TrackingUnavailable),
        ("503", TrackingUnavailable),
        ("404-html", RoostError),  # a 404 page from something in front of MLflow is no answer
        ("403", RoostError),
        ("drop", TrackingUnavailable),
        ("refuse", TrackingUnavailable),
    ],
)
def test_alias_read_failures_raise_never_none(
    mlflow_proxy: FaultProxy, champion_v2: Model, fault: str, error: type[Exception]
) -> None:
    from roost.registry import Registry

    through = Registry(mlflow_proxy.url, champion_v2.name)
    inject(mlflow_proxy, fault, "GET", ALIAS)
    with pytest.raises(error) as raised:
        through.version_for_alias("champion")
    assert type(raised.value) is error  # a refusal is exit 1, not "unavailable"
    assert f"{champion_v2.name}@champion" in str(raised.value)
    # The other reads that once turned any error into "nothing there" fail the same way.
    inject(mlflow_proxy, fault, "GET", endpoint("/api/2.0/mlflow/registered-models/get"))
    inject(mlflow_proxy, fault, "GET", endpoint("/api/2.0/mlflow/model-versions/search"))
    with pytest.raises(error):
        through.aliases()
    with pytest.raises(error):
        through.versions()
    mlflow_proxy.restore()
    assert through.version_for_alias("champion") == "2"


def inject(proxy: FaultProxy, fault: str, method: str | None, path: str) -> None:
    if fault == "drop":
        proxy.drop(method, path)
    elif fault == "refuse":
        proxy.refuse()
    elif fault == "404-html":
        proxy.fail(method, path, 404, body=b"<html><body>404 Not Found</body></html>")
    else:
        proxy.fail(method, path if fault != "403" else ".", int(fault))


# -- roost promote: every registry call fails in turn ---------------------------------------------


def test_reproducer_alias_read_500_keeps_champion_v2(
    mlflow_proxy: FaultProxy, champion_v2: Model, small_run: TrainOutcome, state_dir: Path
) -> None:
    """Issue 9's reproducer: v2 champion, v3 candidate, the alias read answers 500."""
    env = cli_env(state_dir, mlflow_proxy.url)
    args = ("promote", "--run-id", small_run.run_id, "--model", champion_v2.name, "--json")
    mlflow_proxy.fail("GET", ALIAS, 500)

    failed = roost(env, *args)

    line = failed.one_error_line()
    assert failed.code == 4, failed.stderr
    assert "champion" in line and "500" in line and "no alias moved" in line
    assert failed.stdout == ""
    assert champion_v2.aliases() == {"champion": "2"}
    assert champion_v2.versions() == ["1", "2"]  # nothing registered either
    assert mlflow_proxy.hits("GET", ALIAS), "the fault was never reached"

    mlflow_proxy.restore()
    rerun = roost(env, *args)
    assert rerun.code == 0, rerun.stderr[-3000:]
    summary = json.loads(rerun.stdout)
    assert summary["version"] == "3" and summary["promoted"] is True
    assert summary["decision"]["champion_version"] == "2"  # judged against the real champion
    assert champion_v2.aliases() == {"champion": "3"}


# Each registry call of a promotion, in the order promote makes them.
STAGES = [
    pytest.param("GET", GET_RUN, "500", id="get-run-500"),
    pytest.param("GET", ARTIFACTS + r".*test\.parquet", "500", id="test-split-download-500"),
    pytest.param("GET", ALIAS, "drop", id="champion-alias-read-dropped"),
    pytest.param("POST", CREATE_VERSION, "500", id="register-version-500"),
    pytest.param("GET", GET_VERSION, "500", id="version-ready-wait-500"),
    pytest.param("GET", DOWNLOAD_URI, "500", id="model-download-uri-500"),
    pytest.param("POST", SET_TAG, "500", id="gate-tags-500"),
    pytest.param("POST", ALIAS, "500", id="alias-move-500"),
    pytest.param(None, ".", "refuse", id="server-refuses-connections"),
]


@pytest.mark.parametrize(("method", "path", "fault"), STAGES)
def test_promote_fails_closed_at_every_registry_call(
    mlflow_proxy: FaultProxy,
    champion_v2: Model,
    small_run: TrainOutcome,
    state_dir: Path,
    method: str | None,
    path: str,
    fault: str,
) -> None:
    env = cli_env(state_dir, mlflow_proxy.url)
    args = ("promote", "--run-id", small_run.run_id, "--model", champion_v2.name, "--json")
    inject(mlflow_proxy, fault, method, path)

    failed = roost(env, *args)

    line = failed.one_error_line()
    assert failed.code == 4, failed.stderr[-3000:]
    assert "MLflow" in line or "unreachable" in line
    assert failed.stdout == ""
    assert champion_v2.aliases() == {"champion": "2"}  # no alias moved
    if fault != "refuse":
        assert mlflow_proxy.hits(method, path), "the fault was never reached"

    mlflow_proxy.restore()
    rerun = roost(env, *args)
    assert rerun.code == 0, rerun.stderr[-3000:]
    summary = json.loads(rerun.stdout)
    assert summary["promoted"] is True and summary["decision"]["champion_version"] == "2"
    assert champion_v2.aliases() == {"champion": summary["version"]}
