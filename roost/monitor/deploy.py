"""``roost deploy --log-url/--log-mode``: KServe's payload logger on an InferenceService (pure)."""

from __future__ import annotations

import copy
from typing import Any

from roost.errors import ConfigError

LOG_MODES = ("all", "request", "response")


def with_logger(manifest: dict[str, Any], url: str | None, mode: str | None) -> dict[str, Any]:
    """``manifest`` with ``spec.predictor.logger`` set from the flags given (others kept).

    The chart's template may already carry a logger (``monitor.logger``); a flag replaces
    that field only. A mode without any URL is an error: KServe's agent needs somewhere to send.
    """
    if url is None and mode is None:
        return manifest
    if mode is not None and mode not in LOG_MODES:
        raise ConfigError(f"--log-mode: expected one of {', '.join(LOG_MODES)}, got {mode!r}")
    if url is not None and not url.startswith(("http://", "https://")):
        raise ConfigError(f"--log-url: expected an http(s):// URL, got {url!r}")
    out = copy.deepcopy(manifest)
    predictor = out.setdefault("spec", {}).setdefault("predictor", {})
    logger = dict(predictor.get("logger") or {})
    if url is not None:
        logger["url"] = url
    if not logger.get("url"):
        raise ConfigError("--log-mode: the InferenceService has no logger URL; pass --log-url")
    logger["mode"] = mode or logger.get("mode") or "all"
    predictor["logger"] = logger
    return out
