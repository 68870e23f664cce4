"""Traffic backends of a rollout: ``local`` (nginx on loopback), ``kserve`` (InferenceService)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from roost.config import Settings
    from roost.rollout.backends.base import Backend


def make(settings: Settings, name: str | None = None) -> Backend:
    """The backend named ``name`` (default: ``rollout.backend``) for the configured model."""
    name = name or settings.rollout.backend
    if name == "local":
        from roost.rollout.backends.local import LocalBackend

        return LocalBackend(settings)
    if name == "kserve":
        from roost import k8s
        from roost.rollout.backends.kserve import KServeBackend, registry_storage_uri

        api = k8s.load_client(settings.k8s.context)
        model = settings.registry.model_name
        return KServeBackend(settings, api, registry_storage_uri(settings, model), model)
    from roost.errors import ConfigError

    raise ConfigError(f"unknown rollout backend {name!r}: expected local or kserve")
