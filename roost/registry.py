"""The MLflow Model Registry: register, aliases, tags, and the promotion gate.

The gate (:func:`decide`) is a pure function; :func:`promote` registers a run's model,
scores it and the current champion on the candidate's held-out test split, records the
decision as tags on the new version and moves an alias only if the gate passes.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from roost import data, descriptions, evaluation, proc, tracking, validation
from roost.config import Settings
from roost.errors import AliasNotFound, NotFound, RoostError, TrackingUnavailable
from roost.tracking import is_absent, registry_error

log = logging.getLogger(__name__)

GATE_TAG = "roost.gate"


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    metric: str
    candidate_score: float
    champion_score: float | None
    champion_version: str | None
    min_improvement: float
    reason: str

    def tags(self) -> dict[str, str]:
        return {
            f"{GATE_TAG}.decision": "passed" if self.passed else "refused",
            f"{GATE_TAG}.metric": self.metric,
            f"{GATE_TAG}.candidate_score": f"{self.candidate_score:.6f}",
            f"{GATE_TAG}.champion_score": (
                "none" if self.champion_score is None else f"{self.champion_score:.6f}"
            ),
            f"{GATE_TAG}.champion_version": self.champion_version or "none",
            f"{GATE_TAG}.min_improvement": f"{self.min_improvement:g}",
            f"{GATE_TAG}.reason": self.reason,
        }


def decide(
    metric: str,
    candidate_score: float,
    champion_score: float | None,
    champion_version: str | None,
    min_improvement: float,
) -> GateDecision:
    """Pass if there is no champion, or candidate >= champion + min_improvement."""
    if champion_score is None:
        return GateDecision(
            True, metric, candidate_score, None, None, min_improvement,
            f"no champion yet; first version passes with {metric}={candidate_score:.4f}",
        )  # fmt: skip
    needed = champion_score + min_improvement
    delta = candidate_score - champion_score
    if candidate_score >= needed:
        reason = (
            f"{metric} {candidate_score:.4f} >= champion v{champion_version} "
            f"{champion_score:.4f} + {min_improvement:g} (delta {delta:+.4f})"
        )
        passed = True
    else:
        reason = (
            f"{metric} {candidate_score:.4f} < champion v{champion_version} "
            f"{champion_score:.4f} + {min_improvement:g} (delta {delta:+.4f})"
        )
        passed = False
    return GateDecision(
        passed, metric, candidate_score, champion_score, champion_version, min_improvement, reason
    )


@dataclass(frozen=True)
class PromoteResult:
    model_name: str
    version: str
    run_id: str
    alias: str
    decision: GateDecision
    candidate_report: evaluation.Report
    champion_report: evaluation.Report | None

    def summary(self) -> dict[str, Any]:
        return {
            "model": self.model_name,
            "version": self.version,
            "run_id": self.run_id,
            "alias": self.alias,
            "promoted": self.decision.passed,
            "decision": asdict(self.decision),
        }


class Registry:
    """Thin wrapper over MlflowClient for one registered model."""

    def __init__(self, tracking_uri: str, model_name: str) -> None:
        from mlflow import MlflowClient

        self.uri = tracking_uri
        self.name = model_name
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    def register(self, model_uri: str, tags: dict[str, str] | None = None) -> str:
        """Register ``model_uri`` as a new version (creating the model on first use)."""
        import mlflow

        self._point_globals()
        version = mlflow.register_model(model_uri, self.name, tags=tags or {})
        _wait_ready(self.client, self.name, str(version.version))
        return str(version.version)

    def _point_globals(self) -> None:
        """mlflow's module-level calls (register, pyfunc load) use its globals: this server."""
        import mlflow

        mlflow.set_tracking_uri(self.uri)
        mlflow.set_registry_uri(self.uri)

    def version_for_alias(self, alias: str) -> str | None:
        """The version ``alias`` points at; None only when MLflow says the alias is not set.

        Any other failure (a 5xx, a dropped connection, a timeout) raises: an unreadable
        ``@champion`` must never read as "no champion", or the gate would pass anything.
        """
        from mlflow.exceptions import MlflowException

        try:
            return str(self.client.get_model_version_by_alias(self.name, alias).version)
        except MlflowException as exc:
            if is_absent(exc, "alias"):
                return None
            raise registry_error(exc, f"reading {self.name}@{alias}") from None

    def require_alias(self, alias: str) -> str:
        version = self.version_for_alias(alias)
        if version is None:
            raise AliasNotFound(
                f"registered model {self.name!r} has no version with alias {alias!r}"
            )
        return version

    def set_alias(self, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(self.name, alias, version)

    def delete_alias(self, alias: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.delete_registered_model_alias(self.name, alias)
        except MlflowException as exc:
            if is_absent(exc, "alias"):
                return  # deleting an absent alias is a no-op, as for any idempotent operation
            raise registry_error(exc, f"deleting {self.name}@{alias}") from None

    def set_tags(self, version: str, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_model_version_tag(self.name, version, key, value)

    def get_version(self, version: str) -> Any:
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_model_version(self.name, version)
        except MlflowException as exc:
            if is_absent(exc):
                raise NotFound(f"registered model {self.name!r} has no version {version}") from None
            raise registry_error(exc, f"reading {self.name} v{version}") from None

    def versions(self) -> list[Any]:
        from mlflow.exceptions import MlflowException

        try:
            found = self.client.search_model_versions(f"name='{self.name}'")
        except MlflowException as exc:
            raise registry_error(exc, f"listing the versions of {self.name}") from None
        return sorted(found, key=lambda v: int(v.version))

    def aliases(self) -> dict[str, str]:
        from mlflow.exceptions import MlflowException

        try:
            model = self.client.get_registered_model(self.name)
        except MlflowException as exc:
            if is_absent(exc):
                return {}  # no such model yet: it has no aliases
            raise registry_error(exc, f"reading the aliases of {self.name}") from None
        return {alias: str(version) for alias, version in (model.aliases or {}).items()}

    def model_uri(self, version: str) -> str:
        return f"models:/{self.name}/{version}"

    def source_run(self, version: str) -> str:
        return str(self.get_version(version).run_id)

    def test_split(self, run_id: str) -> pd.DataFrame:
        """The held-out test split that training logged with ``run_id``."""

        from roost.train import TEST_SPLIT_ARTIFACT

        with tempfile.TemporaryDirectory() as tmp:
            path = tracking.download_artifact(self.client, run_id, TEST_SPLIT_ARTIFACT, tmp)
            if path is None:
                raise NotFound(f"run {run_id} has no {TEST_SPLIT_ARTIFACT} artifact")
            return pd.read_parquet(path)

    def predict(self, version: str, frame: pd.DataFrame) -> list[str]:
        """A version's labels for ``frame`` through ``mlflow.pyfunc``, as users load it."""
        import mlflow

        self._point_globals()
        model = mlflow.pyfunc.load_model(self.model_uri(version))
        output = model.predict(pd.DataFrame({"text": frame[data.TEXT].tolist()}))
        return [str(label) for label in output["label"].tolist()]

    def evaluate(self, version: str, frame: pd.DataFrame) -> evaluation.Report:
        """Score a registered version through ``mlflow.pyfunc``, exactly as users load it."""
        return _report(frame[data.LABEL].tolist(), self.predict(version, frame))


def _report(truth: list[str], predicted: list[str]) -> evaluation.Report:
    return evaluation.classification_report(truth, predicted, sorted(set(truth) | set(predicted)))


def _wait_ready(client: Any, name: str, version: str, timeout: float = 60.0) -> None:
    def ready() -> bool:
        status = client.get_model_version(name, version).status
        if status == "FAILED_REGISTRATION":
            raise RoostError(f"registration of {name} v{version} failed")
        return bool(status == "READY")

    proc.wait_until(ready, timeout, 0.2, what=f"{name} v{version} to be READY")


def latest_run_id(tracking_uri: str, experiment: str) -> str:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise NotFound(f"no experiment {experiment!r}: run `roost train` first")
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string="tags.`roost.kind` = 'train' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        raise NotFound(f"no finished training run in experiment {experiment!r}")
    return str(runs[0].info.run_id)


def promote(
    settings: Settings, run_id: str | None = None, alias: str | None = None
) -> PromoteResult:
    """Register ``run_id``'s model and move ``alias`` (default: champion) to it if the gate passes.

    A refused version gets the candidate alias instead. Decision, scores and reason are
    written as ``roost.gate.*`` tags on the new version.
    """
    from roost.train import MODEL_URI_TAG

    cfg = settings.registry
    uri = tracking.use(settings)
    registry = Registry(uri, cfg.model_name)
    run_id = run_id or latest_run_id(uri, settings.tracking.experiment)
    from mlflow.exceptions import MlflowException

    try:
        run = registry.client.get_run(run_id)
    except MlflowException as exc:
        if is_absent(exc):
            raise NotFound(f"no MLflow run {run_id!r}") from None
        raise registry_error(exc, f"reading run {run_id}") from None
    model_uri = run.data.tags.get(MODEL_URI_TAG) or f"runs:/{run_id}/model"
    test = registry.test_split(run_id)

    try:
        champion = registry.version_for_alias(cfg.champion_alias)
    except RoostError as exc:
        # Fail closed: an unreadable champion is not "no champion".
        exc.args = (f"{exc}; promotion stopped, nothing was registered and no alias moved",)
        raise
    version = registry.register(model_uri, tags={"roost.source_run": run_id})
    truth = [str(label) for label in test[data.LABEL].tolist()]
    candidate_labels = registry.predict(version, test)
    champion_labels = registry.predict(champion, test) if champion else None
    candidate_report = _report(truth, candidate_labels)
    champion_report = _report(truth, champion_labels) if champion_labels is not None else None
    decision = decide(
        cfg.gate_metric,
        candidate_report.metric(cfg.gate_metric),
        champion_report.metric(cfg.gate_metric) if champion_report else None,
        champion,
        cfg.min_improvement,
    )
    # The same comparison through MLflow's evaluation and model validation (its own run).
    checked = validation.evaluate(
        settings.tracking.experiment, cfg.model_name, version, champion, truth,
        candidate_labels, champion_labels, cfg.gate_metric, cfg.min_improvement,
    )  # fmt: skip
    if checked.passed != decision.passed:
        raise RoostError(
            f"gate: MLflow's validation ({checked.message}) disagrees with roost's rule "
            f"({decision.reason}); version {version} keeps no alias"
        )
    registry.set_tags(
        version,
        {
            **decision.tags(),
            f"{GATE_TAG}.test_rows": str(len(test)),
            f"{GATE_TAG}.evaluated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            f"{GATE_TAG}.run_id": checked.run_id,
            f"{GATE_TAG}.validation": checked.message[:4900],
        },
    )
    target = alias or cfg.champion_alias
    if decision.passed:
        registry.set_alias(target, version)
        if registry.version_for_alias(cfg.candidate_alias) == version:
            registry.delete_alias(cfg.candidate_alias)
        applied = target
    else:
        registry.set_alias(cfg.candidate_alias, version)
        applied = cfg.candidate_alias
    descriptions.ensure_model(registry.client, cfg)
    descriptions.refresh_version(registry.client, cfg.model_name, version)
    log.info(
        "gate decision model=%s version=%s passed=%s alias=%s reason=%s",
        cfg.model_name, version, decision.passed, applied, decision.reason,
    )  # fmt: skip
    return PromoteResult(
        cfg.model_name, version, run_id, applied, decision, candidate_report, champion_report
    )


def download(model_uri: str, dst: Path) -> Path:
    """Download a ``models:/`` (or ``runs:/``) URI to ``dst``; returns the local directory."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst)))
    except MlflowException as exc:
        if is_absent(exc):  # the server said: no such version / run
            raise NotFound(f"cannot resolve {model_uri}: {exc.message}") from None
        # MLflow words a failed file download (5xx, reset) as "does not exist": it is not.
        raise TrackingUnavailable(
            f"MLflow failed while downloading {model_uri}: {tracking.error_message(exc)}"
        ) from None


@dataclass(frozen=True)
class LocalModel:
    path: Path
    name: str | None
    version: str | None
    alias: str | None


def parse_models_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/name@alias`` -> (name, None, alias); ``models:/name/3`` -> (name, "3", None)."""
    rest = uri.removeprefix("models:/").strip("/")
    if "@" in rest:
        name, alias = rest.split("@", 1)
        if not name or not alias:
            raise NotFound(f"malformed model URI {uri!r}: expected models:/NAME@ALIAS")
        return name, None, alias
    if "/" in rest:
        name, version = rest.split("/", 1)
        if not name or not version:
            raise NotFound(f"malformed model URI {uri!r}: expected models:/NAME/VERSION")
        return name, version, None
    raise NotFound(
        f"malformed model URI {uri!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION"
    )


def fetch_model(settings: Settings, uri: str) -> LocalModel:
    """A local directory for ``uri``: a directory as is, or a registry model downloaded once.

    Registry downloads are cached under ``state_dir/cache/models/NAME/VERSION`` (versions are
    immutable), so a restart does not download again.
    """
    if not uri.startswith(("models:/", "runs:/", "mlflow-artifacts:", "s3://")):
        path = Path(uri.removeprefix("file://"))
        if not path.is_dir():
            raise NotFound(f"model directory not found: {path}")
        return LocalModel(path, None, None, None)
    tracking_uri = tracking.use(settings)
    if not uri.startswith("models:/"):
        target = Path(tempfile.mkdtemp(prefix="roost-model-"))
        return LocalModel(download(uri, target), None, None, None)
    name, version, alias = parse_models_uri(uri)
    registry = Registry(tracking_uri, name)
    if alias is not None:
        version = registry.require_alias(alias)
    assert version is not None
    registry.get_version(version)  # NotFound if absent
    cache = (settings.state_dir / "cache" / "models" / name / version).resolve()
    if not (cache / "MLmodel").is_file():
        staging = Path(tempfile.mkdtemp(prefix=".download-", dir=_mkdir(cache.parent)))
        download(registry.model_uri(version), staging)
        if cache.exists():
            import shutil

            shutil.rmtree(cache)
        staging.rename(cache)
    return LocalModel(cache, name, version, alias)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
