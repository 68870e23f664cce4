"""The training loop and its MLflow record.

``fit`` is plain PyTorch (CPU, or CUDA with AMP). ``run_training`` wraps it in an MLflow
run: every hyper-parameter, per-epoch loss/accuracy, test metrics, a confusion-matrix PNG,
the dataset splits as inputs with digests and row counts, the git commit, the held-out test
split (the promotion gate evaluates on it) and the model as a pyfunc.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
from torch import nn

from roost import config, data, evaluation, proc, storage, tracking
from roost.classifier import TextClassifier
from roost.config import ModelSettings, Settings, TrainSettings
from roost.errors import NotFound, TrackingUnavailable
from roost.k8s_jobs import JOB_NAME_ENV, JOB_TAG
from roost.model import build_model, parameter_count
from roost.monitor import profile as monitor_profile
from roost.tokenizer import Tokenizer

log = logging.getLogger(__name__)

TEST_SPLIT_ARTIFACT = "data/test.parquet"
MODEL_URI_TAG = "roost.model_uri"
EVAL_BATCH = 2048


@dataclass(frozen=True)
class EpochStats:
    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    seconds: float
    improved: bool
    # Macro-averaged F1 on the validation split (the tuning objective); NaN in checkpoints
    # written before it existed.
    val_macro_f1: float = float("nan")


class TrainProgress(Protocol):
    def epoch_started(self, epoch: int, epochs: int, batches: int) -> None: ...
    def batch_done(self, loss: float) -> None: ...
    def epoch_done(self, stats: EpochStats) -> None: ...


class NullProgress:
    def epoch_started(self, epoch: int, epochs: int, batches: int) -> None:
        pass

    def batch_done(self, loss: float) -> None:
        pass

    def epoch_done(self, stats: EpochStats) -> None:
        pass


@dataclass
class FitState:
    """Everything needed to resume after the last completed epoch."""

    epoch: int = 0
    best_val_loss: float = float("inf")
    best_epoch: int = 0
    bad_epochs: int = 0
    best_state: dict[str, torch.Tensor] | None = None
    history: list[EpochStats] = field(default_factory=list)


@dataclass(frozen=True)
class FitResult:
    classifier: TextClassifier
    history: list[EpochStats]
    best_epoch: int
    resumed_from: int | None
    device: str
    seconds: float


@dataclass(frozen=True)
class TrainOutcome:
    run_id: str
    experiment_id: str
    model_uri: str
    tracking_uri: str
    test: evaluation.Report
    counts: dict[str, int]
    labels: list[str]
    history: list[EpochStats]
    best_epoch: int
    resumed_from: int | None
    device: str
    seconds: float

    def summary(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "experiment_id": self.experiment_id,
            "model_uri": self.model_uri,
            "tracking_uri": self.tracking_uri,
            "test_accuracy": self.test.accuracy,
            "test_macro_f1": self.test.macro_f1,
            "rows": self.counts,
            "labels": self.labels,
            "epochs_run": len(self.history),
            "best_epoch": self.best_epoch,
            "resumed_from_epoch": self.resumed_from,
            "device": self.device,
            "seconds": round(self.seconds, 2),
        }


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


class Checkpointer:
    """Per-epoch checkpoints in a local dir or s3:// prefix, keyed by a config fingerprint."""

    NAME = "checkpoint.pt"

    def __init__(self, base: str, fingerprint: str) -> None:
        self.uri = storage.join(base, self.NAME)
        self.fingerprint = fingerprint

    def load(self) -> dict[str, Any] | None:
        try:
            raw = storage.read_bytes(self.uri)
        except NotFound:
            return None
        payload: dict[str, Any] = torch.load(
            io.BytesIO(raw), map_location="cpu", weights_only=False
        )
        if payload.get("fingerprint") != self.fingerprint:
            log.warning("checkpoint ignored uri=%s reason=config-changed", self.uri)
            return None
        return payload

    def save(self, payload: dict[str, Any]) -> None:
        buffer = io.BytesIO()
        torch.save({**payload, "fingerprint": self.fingerprint}, buffer)
        storage.write_bytes(self.uri, buffer.getvalue())


def fingerprint(settings: Settings, source: str) -> str:
    relevant = {
        "data": settings.data.model_dump(mode="json"),
        "source": source,
        "model": settings.model.model_dump(mode="json"),
        "train": settings.train.model_dump(mode="json", exclude={"checkpoint_dir"}),
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def _batches(n: int, size: int, rng: np.random.Generator | None) -> list[np.ndarray]:
    order = rng.permutation(n) if rng is not None else np.arange(n)
    return [order[i : i + size] for i in range(0, n, size)]


def _evaluate_loss(
    module: nn.Module,
    tokenizer: Tokenizer,
    ids: Sequence[Sequence[int]],
    y: torch.Tensor,
    device: torch.device,
    num_classes: int,
) -> tuple[float, float, float]:
    """(mean loss, accuracy, macro-F1) of ``module`` on an encoded split."""
    module.eval()
    total_loss, correct = 0.0, 0
    predicted: list[torch.Tensor] = []
    with torch.inference_mode():
        for idx in _batches(len(ids), EVAL_BATCH, None):
            flat, offsets = tokenizer.encode_ids([ids[i] for i in idx])
            logits = module(flat.to(device), offsets.to(device)).float()
            target = y[idx].to(device)
            total_loss += float(nn.functional.cross_entropy(logits, target, reduction="sum"))
            correct += int((logits.argmax(1) == target).sum())
            predicted.append(logits.argmax(1).cpu())
    module.train()
    n = max(len(ids), 1)
    pred = torch.cat(predicted) if predicted else torch.zeros(0, dtype=torch.long)
    return total_loss / n, correct / n, macro_f1(y, pred, num_classes)


def macro_f1(y_true: torch.Tensor, y_pred: torch.Tensor, num_classes: int) -> float:
    """Unweighted mean of the per-class F1 scores (a class never seen nor predicted: 0)."""
    scores = []
    for c in range(num_classes):
        tp = int(((y_pred == c) & (y_true == c)).sum())
        fp = int(((y_pred == c) & (y_true != c)).sum())
        fn = int(((y_pred != c) & (y_true == c)).sum())
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / max(num_classes, 1)


def fit(
    splits: data.Splits,
    model_cfg: ModelSettings,
    train_cfg: TrainSettings,
    progress: TrainProgress | None = None,
    resume: dict[str, Any] | None = None,
    on_epoch: Callable[[EpochStats, dict[str, Any]], None] | None = None,
) -> FitResult:
    """Train on ``splits.train``, early-stop on ``splits.val`` loss, return the best model.

    ``resume`` is a checkpoint payload from an earlier, interrupted call with the same
    settings; ``on_epoch(stats, checkpoint_payload)`` runs after every epoch.
    """
    progress = progress or NullProgress()
    started = time.perf_counter()
    seed_everything(train_cfg.seed)
    if train_cfg.num_threads:
        torch.set_num_threads(train_cfg.num_threads)
    device = pick_device(train_cfg.device)
    use_amp = device.type == "cuda" and train_cfg.amp

    if resume is not None:
        tokenizer = Tokenizer.from_dict(resume["tokenizer"])
    else:
        tokenizer = Tokenizer.fit(
            splits.train[data.TEXT],
            ngram=model_cfg.ngram,
            min_count=model_cfg.min_count,
            max_vocab=model_cfg.max_vocab,
            max_tokens=model_cfg.max_tokens,
        )
    label_index = {label: i for i, label in enumerate(splits.labels)}
    hparams = {"embed_dim": model_cfg.embed_dim, "dropout": model_cfg.dropout}
    module = build_model(model_cfg.arch, tokenizer.size, len(splits.labels), **hparams).to(device)
    sparse_opt = torch.optim.SparseAdam(module.sparse_parameters(), lr=train_cfg.lr)
    dense_opt = torch.optim.AdamW(
        module.dense_parameters(), lr=train_cfg.lr, weight_decay=train_cfg.weight_decay
    )
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    train_ids = [tokenizer.ids(t) for t in splits.train[data.TEXT]]
    val_ids = [tokenizer.ids(t) for t in splits.val[data.TEXT]]
    y_train = torch.tensor(splits.train[data.LABEL].map(label_index).to_numpy(), dtype=torch.long)
    y_val = torch.tensor(splits.val[data.LABEL].map(label_index).to_numpy(), dtype=torch.long)

    state = FitState()
    resumed_from = None
    if resume is not None:
        module.load_state_dict(resume["model"])
        sparse_opt.load_state_dict(resume["sparse_opt"])
        dense_opt.load_state_dict(resume["dense_opt"])
        state = FitState(
            epoch=resume["epoch"],
            best_val_loss=resume["best_val_loss"],
            best_epoch=resume["best_epoch"],
            bad_epochs=resume["bad_epochs"],
            best_state=resume["best_state"],
            history=[EpochStats(**h) for h in resume["history"]],
        )
        if "rng_state" in resume:
            torch.set_rng_state(resume["rng_state"])  # dropout masks continue as if never stopped
        resumed_from = state.epoch
        log.info("resuming training from epoch=%d", state.epoch)

    module.train()
    epoch = state.epoch
    while epoch < train_cfg.epochs and state.bad_epochs < max(train_cfg.patience, 1):
        epoch += 1
        epoch_start = time.perf_counter()
        rng = np.random.default_rng(train_cfg.seed + epoch)  # same order after a resume
        batches = _batches(len(train_ids), train_cfg.batch_size, rng)
        progress.epoch_started(epoch, train_cfg.epochs, len(batches))
        total_loss, correct = 0.0, 0
        for idx in batches:
            flat, offsets = tokenizer.encode_ids([train_ids[i] for i in idx])
            target = y_train[idx].to(device)
            with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                logits = module(flat.to(device), offsets.to(device))
                loss = nn.functional.cross_entropy(logits.float(), target)
            sparse_opt.zero_grad(set_to_none=True)
            dense_opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()  # type: ignore[no-untyped-call]
            scaler.step(sparse_opt)
            scaler.step(dense_opt)
            scaler.update()
            batch_loss = float(loss.detach())
            total_loss += batch_loss * len(idx)
            correct += int((logits.detach().argmax(1) == target).sum())
            progress.batch_done(batch_loss)
        val_loss, val_acc, val_f1 = _evaluate_loss(
            module, tokenizer, val_ids, y_val, device, len(splits.labels)
        )
        improved = val_loss < state.best_val_loss
        if improved:
            state.best_val_loss, state.best_epoch, state.bad_epochs = val_loss, epoch, 0
            state.best_state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
        else:
            state.bad_epochs += 1
        stats = EpochStats(
            epoch=epoch,
            train_loss=total_loss / len(train_ids),
            train_accuracy=correct / len(train_ids),
            val_loss=val_loss,
            val_accuracy=val_acc,
            seconds=time.perf_counter() - epoch_start,
            improved=improved,
            val_macro_f1=val_f1,
        )
        state.history.append(stats)
        state.epoch = epoch
        progress.epoch_done(stats)
        if on_epoch is not None:
            on_epoch(
                stats,
                {
                    "epoch": epoch,
                    "model": module.state_dict(),
                    "sparse_opt": sparse_opt.state_dict(),
                    "dense_opt": dense_opt.state_dict(),
                    "best_val_loss": state.best_val_loss,
                    "best_epoch": state.best_epoch,
                    "bad_epochs": state.bad_epochs,
                    "best_state": state.best_state,
                    "history": [asdict(h) for h in state.history],
                    "tokenizer": tokenizer.to_dict(),
                    "rng_state": torch.get_rng_state(),
                },
            )

    if state.best_state is not None:
        module.load_state_dict(state.best_state)
    classifier = TextClassifier(tokenizer, module.cpu(), splits.labels, model_cfg.arch, hparams)
    return FitResult(
        classifier=classifier,
        history=state.history,
        best_epoch=state.best_epoch,
        resumed_from=resumed_from,
        device=str(device),
        seconds=time.perf_counter() - started,
    )


def evaluate(classifier: TextClassifier, frame: pd.DataFrame) -> evaluation.Report:
    texts = frame[data.TEXT].tolist()
    predicted: list[str] = []
    for idx in _batches(len(texts), EVAL_BATCH, None):
        names, _ = classifier.predict([texts[i] for i in idx])
        predicted.extend(names)
    return evaluation.classification_report(
        frame[data.LABEL].tolist(), predicted, classifier.labels
    )


def git_dirty() -> bool | None:
    """Whether tracked files differ from the commit (None: not a git checkout).

    ``ROOST_GIT_DIRTY`` (true/false) stands in where there is no checkout (images).
    """
    value = (config.environ("ROOST_GIT_DIRTY") or "").lower()
    if value in ("true", "false"):
        return value == "true"
    if config.environ("ROOST_GIT_COMMIT"):
        return None  # the commit came from outside: so must its state
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10, check=True,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(out.stdout.strip())


def provenance_tags() -> dict[str, str]:
    """Git commit and dirty flag, and the Kubernetes Job that ran training (if any)."""
    tags: dict[str, str] = {}
    commit = proc.git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["roost.git_commit"] = commit
        dirty = git_dirty()
        if dirty is not None:
            tags["roost.git_dirty"] = "true" if dirty else "false"
    job = config.environ(JOB_NAME_ENV)  # set by the chart's Job template
    if job:  # `roost train --on k8s` finds the run by this tag
        tags[JOB_TAG] = job
    return tags


def _params(settings: Settings, splits: data.Splits) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for section in ("data", "model", "train"):
        for key, value in getattr(settings, section).model_dump(mode="json").items():
            params[f"{section}.{key}"] = value
    params["data.source"] = splits.source
    params["data.labels"] = ",".join(splits.labels)
    for name, count in splits.counts.items():
        params[f"data.rows_{name}"] = count
    return params


def _log_inputs(splits: data.Splits) -> None:
    import mlflow
    from mlflow.data.pandas_dataset import from_pandas

    stem = Path(splits.source).stem if not storage.is_s3(splits.source) else splits.source
    splits_by_context = (
        ("training", splits.train), ("validation", splits.val), ("test", splits.test),
    )  # fmt: skip
    for context, frame in splits_by_context:
        with warnings.catch_warnings():
            # MLflow warns that a local path matches two (identical) source types.
            warnings.filterwarnings("ignore", message="The specified dataset source")
            dataset = from_pandas(
                frame, source=splits.source, name=f"{stem}:{context}", targets=data.LABEL
            )
        mlflow.log_input(dataset, context=context)


def run_training(
    settings: Settings,
    progress: TrainProgress | None = None,
    *,
    splits: data.Splits | None = None,
    run_id: str | None = None,
    tags: dict[str, str] | None = None,
    after_epoch: Callable[[EpochStats], None] | None = None,
) -> TrainOutcome:
    """Load data, train, evaluate and record everything as one MLflow run.

    ``splits`` (already loaded), ``run_id`` (an existing run to log into), ``tags`` (added to
    the run's, overriding them) and ``after_epoch`` (called after each epoch's metrics are
    logged; an exception from it stops training and propagates) serve ``roost tune``.

    An MLflow failure at any point (down, 5xx, reset, timeout, a failed artifact upload)
    ends it with :class:`roost.errors.TrackingUnavailable`; a checkpoint, if configured,
    lets the rerun resume from the last finished epoch.
    """
    import requests
    from mlflow.exceptions import MlflowException

    try:
        return _run_training(
            settings, progress, splits=splits, run_id=run_id, tags=tags, after_epoch=after_epoch
        )
    except MlflowException as exc:
        raise tracking.registry_error(exc, "recording the training run") from None
    except requests.RequestException as exc:  # artifact uploads raise requests' own errors
        raise TrackingUnavailable(
            f"MLflow failed while recording the training run: {tracking.error_message(exc)}"
        ) from None


def _run_training(
    settings: Settings,
    progress: TrainProgress | None,
    *,
    splits: data.Splits | None,
    run_id: str | None,
    tags: dict[str, str] | None,
    after_epoch: Callable[[EpochStats], None] | None,
) -> TrainOutcome:
    import mlflow

    from roost import pyfunc

    started = time.perf_counter()
    if splits is None:
        splits = data.load_splits(settings.data)  # bad data fails before anything is logged
    uri = tracking.use(settings)
    checkpointer = (
        Checkpointer(settings.train.checkpoint_dir, fingerprint(settings, splits.source))
        if settings.train.checkpoint_dir
        else None
    )
    resume = checkpointer.load() if checkpointer else None
    experiment = mlflow.set_experiment(settings.tracking.experiment)
    run_id = (resume.get("run_id") if resume else None) or run_id

    with mlflow.start_run(run_id=run_id, run_name=None if run_id else _run_name()) as run:
        run_id = run.info.run_id
        if resume is None:
            mlflow.log_params(_params(settings, splits))
            run_tags = {"roost.kind": "train", "roost.data.source": splits.source}
            mlflow.set_tags({**run_tags, **provenance_tags(), **(tags or {})})
            _log_inputs(splits)

        def on_epoch(stats: EpochStats, payload: dict[str, Any]) -> None:
            mlflow.log_metrics(
                {
                    "train_loss": stats.train_loss,
                    "train_accuracy": stats.train_accuracy,
                    "val_loss": stats.val_loss,
                    "val_accuracy": stats.val_accuracy,
                    "val_macro_f1": stats.val_macro_f1,
                    "epoch_seconds": stats.seconds,
                },
                step=stats.epoch,
            )
            if checkpointer is not None:
                checkpointer.save({**payload, "run_id": run_id})
            if after_epoch is not None:
                after_epoch(stats)

        result = fit(splits, settings.model, settings.train, progress, resume, on_epoch)
        report = evaluate(result.classifier, splits.test)
        mlflow.log_metrics(report.flat("test_"))
        mlflow.log_metrics({"best_epoch": result.best_epoch, "train_seconds": result.seconds})
        mlflow.log_params(
            {
                "model.vocab_size": result.classifier.tokenizer.size,
                "model.parameters": parameter_count(result.classifier.module),
                "train.device_used": result.device,
            }
        )
        fig = evaluation.confusion_figure(report)
        mlflow.log_figure(fig, "confusion_matrix.png")
        mlflow.log_dict(report.to_dict(), "classification_report.json")
        reference = monitor_profile.build(
            result.classifier, splits.train, splits.val, data.TEXT, data.LABEL
        )
        mlflow.log_dict(reference.to_dict(), monitor_profile.PROFILE_ARTIFACT)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(TEST_SPLIT_ARTIFACT).name
            splits.test.to_parquet(path, index=False)
            mlflow.log_artifact(str(path), str(Path(TEST_SPLIT_ARTIFACT).parent))
        examples = splits.test[data.TEXT].head(3).tolist()
        info = pyfunc.log_model(result.classifier, examples)
        mlflow.set_tag(MODEL_URI_TAG, info.model_uri)

    return TrainOutcome(
        run_id=run_id,
        experiment_id=experiment.experiment_id,
        model_uri=info.model_uri,
        tracking_uri=uri,
        test=report,
        counts=splits.counts,
        labels=splits.labels,
        history=result.history,
        best_epoch=result.best_epoch,
        resumed_from=result.resumed_from,
        device=result.device,
        seconds=time.perf_counter() - started,
    )


def _run_name() -> str:
    return time.strftime("train-%Y%m%d-%H%M%S")
