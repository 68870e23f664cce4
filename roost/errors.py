"""One error hierarchy for roost.

Core code raises these; only the edges (``roost.cli.app`` and ``roost.serving``)
catch them and turn them into an exit code or an HTTP status.
"""

from __future__ import annotations


class RoostError(Exception):
    """Base class: something the user can act on, with a one-line message."""

    exit_code = 1
    http_status = 500


class ConfigError(RoostError):
    """A setting, flag or config file is invalid."""

    exit_code = 2
    http_status = 400


class DataError(RoostError):
    """A dataset is missing, unreadable or lacks the named columns."""

    exit_code = 2
    http_status = 400


class ModelUnreadable(RoostError):
    """A model's files are there but cannot be read (truncated, corrupt, wrong format)."""

    exit_code = 2
    http_status = 500


class NotFound(RoostError):
    """A model, version, alias, run or object does not exist."""

    exit_code = 3
    http_status = 404


class AliasNotFound(NotFound):
    """A registered model has no version under the requested alias."""


class Unavailable(RoostError):
    """A dependency (tracking server, cluster, Prometheus) cannot be reached."""

    exit_code = 4
    http_status = 503


class TrackingUnavailable(Unavailable):
    """The MLflow tracking server is not reachable."""


class Timeout(RoostError):
    """A wait ran past its deadline."""

    exit_code = 4
    http_status = 504


class Conflict(RoostError):
    """The request conflicts with the current state (e.g. a rollout already in flight)."""

    exit_code = 1
    http_status = 409


class RolloutAborted(RoostError):
    """A rollout ended without promoting its version."""

    exit_code = 5
    http_status = 409


class MissingTool(RoostError):
    """An external program roost needs (nginx, torchserve, kubectl...) is not installed."""

    exit_code = 1
    http_status = 500
