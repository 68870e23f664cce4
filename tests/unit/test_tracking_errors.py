"""What counts as "absent" in MLflow's answers, and the exit code of everything else (pure)."""

from __future__ import annotations

import pytest
from mlflow.exceptions import MlflowException, RestException
from mlflow.protos.databricks_pb2 import (
    ENDPOINT_NOT_FOUND,
    PERMISSION_DENIED,
    RESOURCE_DOES_NOT_EXIST,
)

from roost import tracking
from roost.errors import RoostError, TrackingUnavailable

pytestmark = pytest.mark.unit


def rest(code: str, message: str) -> RestException:
    return RestException({"error_code": code, "message": message})


def test_only_the_servers_own_not_found_answers_are_absent() -> None:
    alias_unset = rest("INVALID_PARAMETER_VALUE", "Registered model alias champion not found.")
    assert tracking.is_absent(alias_unset, "alias")
    assert not tracking.is_absent(alias_unset)  # that code means "bad request" elsewhere
    model_absent = rest("RESOURCE_DOES_NOT_EXIST", "Registered Model with name=m not found")
    assert tracking.is_absent(model_absent) and tracking.is_absent(model_absent, "alias")
    bad_name = rest("INVALID_PARAMETER_VALUE", "Invalid alias name: '@x'")
    assert not tracking.is_absent(bad_name, "alias")
    # The client's own errors for a 404 page, a 500 or a reset are never "absent", even where
    # MLflow labels them RESOURCE_DOES_NOT_EXIST (its artifact download does).
    for exc in (
        MlflowException("API request ... failed with error code 404 != 200", ENDPOINT_NOT_FOUND),
        MlflowException("Failed to download artifacts from path 'x'", RESOURCE_DOES_NOT_EXIST),
        MlflowException("API request ... Max retries exceeded"),
    ):
        assert not tracking.is_absent(exc, "alias"), exc


def test_server_failures_are_unavailable_and_refusals_are_errors() -> None:
    down = MlflowException("API request to http://x failed with exception ... Max retries exceeded")
    assert isinstance(tracking.registry_error(down, "reading m@champion"), TrackingUnavailable)
    error = tracking.registry_error(down, "reading m@champion")
    assert str(error).startswith("MLflow failed while reading m@champion: API request")
    assert error.exit_code == 4
    denied = MlflowException("... failed with error code 403 != 200", PERMISSION_DENIED)
    refused = tracking.registry_error(denied, "x")
    assert type(refused) is RoostError and refused.exit_code == 1
