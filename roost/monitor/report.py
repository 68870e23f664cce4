"""``roost monitor report``: logged traffic, window by window, against the reference profile.

Reading (:func:`load_traffic`): the receiver's Parquet events of one model, a request and
its response paired by id (a request stored before its version was known is matched
through its response), one row per text: time, text, predicted label, confidence.
Feedback labels join on the event id (``<id>`` for a one-text request, ``<id>/<i>`` for
the i-th text of a batch).

Judging (:func:`evaluate_window`, pure): each statistic of :mod:`roost.monitor.stats`
against its threshold, ``ok`` or ``breach``; a window with fewer than ``min_events`` texts
is ``insufficient`` for every statistic, and so is live accuracy below ``min_labels``
labels. "Insufficient data" is never a pass.
"""

from __future__ import annotations

import datetime as dt
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from roost.monitor import stats
from roost.monitor.profile import Profile, word_tokens
from roost.monitor.store import PartStore

if TYPE_CHECKING:
    import pandas as pd

    from roost.config import MonitorSettings

OK, BREACH, INSUFFICIENT = "ok", "breach", "insufficient"
STATISTICS = ("js_distance", "confidence_shift", "length_psi", "unseen_token_rate")


@dataclass(frozen=True)
class Thresholds:
    min_events: int = 50
    min_labels: int = 20
    max_js_distance: float = 0.1
    max_confidence_shift: float = 0.1
    max_length_psi: float = 0.2
    max_unseen_rate_increase: float = 0.1
    min_accuracy: float | None = None

    @classmethod
    def from_settings(cls, cfg: MonitorSettings) -> Thresholds:
        return cls(
            cfg.min_events, cfg.min_labels, cfg.max_js_distance, cfg.max_confidence_shift,
            cfg.max_length_psi, cfg.max_unseen_rate_increase, cfg.min_accuracy,
        )  # fmt: skip


@dataclass(frozen=True)
class Statistic:
    value: float | None
    threshold: float
    status: str


@dataclass
class Window:
    start: str
    end: str
    events: int
    requests: int
    statistics: dict[str, Statistic]
    predicted: dict[str, int]
    live: dict[str, Any] = field(default_factory=dict)
    closed: bool = True

    @property
    def verdict(self) -> str:
        states = {s.status for s in self.statistics.values()}
        if self.live.get("status"):
            states.add(self.live["status"])
        if BREACH in states:
            return BREACH
        if self.events == 0 or INSUFFICIENT in {s.status for s in self.statistics.values()}:
            return INSUFFICIENT
        return OK

    def breached(self) -> list[str]:
        out = [n for n, s in self.statistics.items() if s.status == BREACH]
        if self.live.get("status") == BREACH:
            out.append("live_accuracy")
        return out

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["verdict"] = self.verdict
        return doc


def _judge(value: float | None, limit: float, breach: bool, enough: bool) -> Statistic:
    if not enough or value is None:
        return Statistic(None if value is None else round(value, 6), limit, INSUFFICIENT)
    return Statistic(round(value, 6), limit, BREACH if breach else OK)


def evaluate_window(
    profile: Profile,
    texts: list[str],
    labels: list[str],
    confidences: list[float],
    truth: list[tuple[str, str]],
    limits: Thresholds,
    requests: int = 0,
) -> tuple[dict[str, Statistic], dict[str, Any]]:
    """Statistics and live accuracy of one window (pure). ``truth``: (true, predicted) pairs."""
    enough = max(len(texts), len(labels)) >= limits.min_events
    js = stats.js_distance(profile.predicted, Counter(labels))
    shift = stats.confidence_shift(profile.mean_confidence, confidences)
    psi = stats.length_psi(
        profile.length_edges, profile.length_shares, [float(len(t)) for t in texts]
    )
    unseen = stats.unseen_rate(set(profile.vocabulary), word_tokens(texts)) if texts else None
    unseen_limit = profile.unseen_token_rate + limits.max_unseen_rate_increase
    statistics = {
        "js_distance": _judge(js, limits.max_js_distance,
                              js is not None and js > limits.max_js_distance, enough),
        "confidence_shift": _judge(shift, limits.max_confidence_shift,
                                   shift is not None and abs(shift) > limits.max_confidence_shift,
                                   enough),
        "length_psi": _judge(psi, limits.max_length_psi,
                             psi is not None and psi > limits.max_length_psi, enough),
        "unseen_token_rate": _judge(unseen, round(unseen_limit, 6),
                                    unseen is not None and unseen > unseen_limit, enough),
    }  # fmt: skip
    live: dict[str, Any] = {"labels": len(truth)}
    if truth:
        y_true = [t for t, _ in truth]
        y_pred = [p for _, p in truth]
        live["accuracy"] = round(stats.accuracy(y_true, y_pred) or 0.0, 6)
        live["macro_f1"] = round(stats.macro_f1(y_true, y_pred) or 0.0, 6)
    if len(truth) < limits.min_labels:
        live["status"] = INSUFFICIENT
    elif limits.min_accuracy is not None and live["accuracy"] < limits.min_accuracy:
        live["status"] = BREACH
    else:
        live["status"] = OK
    return statistics, live


# -- reading the store ---------------------------------------------------------------------
def load_traffic(store: str | Path | PartStore, model: str, since: dt.datetime) -> pd.DataFrame:
    """One row per logged text of ``model`` since ``since``: id, key, time, version, text,
    label, confidence (pairs of request and response joined by id). ``store``: a local
    directory or an ``s3://`` prefix."""
    import pandas as pd

    parts = PartStore.of(store)
    columns = ["id", "type", "time", "version", "texts", "labels", "confidences"]
    frames = []
    for path in parts.parts(f"events/model={model}"):
        hour = path.rsplit("/", 2)[-2].removeprefix("hour=")
        try:
            hour_end = dt.datetime.strptime(hour, "%Y-%m-%dT%H").replace(tzinfo=dt.UTC)
        except ValueError:
            hour_end = None
        if hour_end is not None and hour_end + dt.timedelta(hours=1) < since:
            continue
        frames.append(parts.read(path, columns=columns).to_pandas())
    empty = pd.DataFrame(columns=["id", "key", "time", "version", "text", "label", "confidence"])
    if not frames:
        return empty
    events = pd.concat(frames, ignore_index=True)
    requests = events[events.type == "request"].drop_duplicates("id")
    responses = events[events.type == "response"].drop_duplicates("id")
    pairs = requests[["id", "time", "version", "texts"]].merge(
        responses[["id", "time", "version", "labels", "confidences"]],
        on="id", how="outer", suffixes=("_req", "_resp"),
    )  # fmt: skip
    rows = []
    for rec in pairs.itertuples(index=False):
        time = rec.time_req if not pd.isna(rec.time_req) else rec.time_resp
        if time < since:
            continue
        version = rec.version_resp if isinstance(rec.version_resp, str) else rec.version_req
        texts = list(rec.texts) if rec.texts is not None and not _na(rec.texts) else []
        labels = list(rec.labels) if rec.labels is not None and not _na(rec.labels) else []
        confs = (
            list(rec.confidences)
            if rec.confidences is not None and not _na(rec.confidences)
            else []
        )
        n = max(len(texts), len(labels))
        for i in range(n):
            rows.append(
                {
                    "id": rec.id,
                    "key": rec.id if n == 1 else f"{rec.id}/{i}",
                    "time": time,
                    "version": version,
                    "text": texts[i] if i < len(texts) else None,
                    "label": labels[i] if i < len(labels) else None,
                    "confidence": float(confs[i]) if i < len(confs) else math.nan,
                }
            )
    return pd.DataFrame(rows) if rows else empty


def _na(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def load_feedback(store: str | Path | PartStore) -> dict[str, str]:
    """Feedback labels by event id (the first one stored for an id)."""
    parts = PartStore.of(store)
    out: dict[str, str] = {}
    for path in parts.parts("feedback"):
        table = parts.read(path, columns=["id", "label"])
        for event_id, label in zip(
            table.column("id").to_pylist(), table.column("label").to_pylist(), strict=True
        ):
            out.setdefault(event_id, label)
    return out


def window_bounds(
    since: dt.datetime, now: dt.datetime, window_s: float
) -> list[tuple[dt.datetime, dt.datetime]]:
    """Windows aligned to multiples of ``window_s`` (UTC), from the one holding ``since`` to now."""
    step = dt.timedelta(seconds=window_s)
    first = math.floor(since.timestamp() / window_s) * window_s
    start = dt.datetime.fromtimestamp(first, dt.UTC)
    out = []
    while start < now:
        out.append((start, start + step))
        start += step
    return out


def build_windows(
    profile: Profile,
    traffic: pd.DataFrame,
    feedback: dict[str, str],
    since: dt.datetime,
    now: dt.datetime,
    window_s: float,
    limits: Thresholds,
) -> list[Window]:
    windows = []
    for start, end in window_bounds(since, now, window_s):
        part = traffic[(traffic.time >= start) & (traffic.time < end)] if len(traffic) else traffic
        texts = [t for t in part.text.tolist() if isinstance(t, str)]
        labels = [x for x in part.label.tolist() if isinstance(x, str)]
        confidences = [c for c in part.confidence.tolist() if not math.isnan(c)]
        truth = [
            (feedback[k], p)
            for k, p in zip(part.key.tolist(), part.label.tolist(), strict=True)
            if k in feedback and isinstance(p, str)
        ]
        statistics, live = evaluate_window(
            profile, texts, labels, confidences, truth, limits, part.id.nunique()
        )
        windows.append(
            Window(
                start=start.isoformat(), end=end.isoformat(),
                events=max(len(texts), len(labels)), requests=int(part.id.nunique()),
                statistics=statistics, predicted=dict(Counter(labels)), live=live,
                closed=end <= now,
            )
        )  # fmt: skip
    return windows


@dataclass
class Report:
    model: str
    version: str
    run_id: str
    since: str
    window_s: float
    windows: list[Window]
    reference: dict[str, Any]
    mlflow_run_id: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "version": self.version,
            "reference_run_id": self.run_id,
            "since": self.since,
            "window_s": self.window_s,
            "reference": self.reference,
            "windows": [w.to_dict() for w in self.windows],
            "mlflow_run_id": self.mlflow_run_id,
        }


def make_report(
    root: str | Path | PartStore,
    model: str,
    version: str,
    run_id: str,
    profile: Profile,
    since: dt.datetime,
    now: dt.datetime,
    window_s: float,
    limits: Thresholds,
) -> Report:
    root = PartStore.of(root)
    traffic = load_traffic(root, model, since)
    if len(traffic):
        traffic = traffic[(traffic.version == version) | (traffic.version == "unknown")]
    windows = build_windows(profile, traffic, load_feedback(root), since, now, window_s, limits)
    reference = {
        "predicted": profile.predicted,
        "mean_confidence": round(profile.mean_confidence, 6),
        "length_quantiles": profile.length_quantiles,
        "unseen_token_rate": round(profile.unseen_token_rate, 6),
        "texts": profile.texts,
    }
    return Report(model, version, run_id, since.isoformat(), window_s, windows, reference)


# -- where a report goes -------------------------------------------------------------------
REPORT_ARTIFACT = "monitor/report.json"
PLOT_ARTIFACT = "monitor/report.png"
VERSION_TAG = "roost.monitor"


def resolve_version(
    tracking_uri: str, model: str, version: str | None, alias: str | None
) -> tuple[str, str, Profile]:
    """(version, training run id, reference profile) of ``--version`` or ``--alias``."""
    from roost.monitor import profile as reference
    from roost.registry import Registry

    registry = Registry(tracking_uri, model)
    if version is None:
        version = registry.require_alias(alias or "champion")
    run_id = registry.source_run(version)
    return version, run_id, reference.load(tracking_uri, run_id)


def figure(report: Report) -> Any:
    """Per-window statistics against their thresholds, and label shares against the reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    x = list(range(len(report.windows)))
    for name in STATISTICS:
        values = [w.statistics[name].value for w in report.windows]
        axes[0].plot(x, [math.nan if v is None else v for v in values], marker="o", label=name)
    axes[0].axhline(report.windows[0].statistics["js_distance"].threshold if report.windows
                    else 0.1, color="grey", linestyle="--", label="JS threshold")  # fmt: skip
    axes[0].set_xlabel("window")
    axes[0].set_title(f"{report.model} v{report.version}: drift per window")
    axes[0].legend(fontsize=7)
    labels = sorted(report.reference["predicted"])
    ref_total = sum(report.reference["predicted"].values()) or 1
    last = next((w for w in reversed(report.windows) if w.events), None)
    width = 0.4
    axes[1].bar([i - width / 2 for i in range(len(labels))],
                [report.reference["predicted"][k] / ref_total for k in labels], width,
                label="reference (validation)")  # fmt: skip
    if last is not None:
        total = sum(last.predicted.values()) or 1
        axes[1].bar([i + width / 2 for i in range(len(labels))],
                    [last.predicted.get(k, 0) / total for k in labels], width,
                    label=f"window {last.start}")  # fmt: skip
    axes[1].set_xticks(range(len(labels)), labels)
    axes[1].set_title("predicted labels")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    return fig


def log_to_mlflow(tracking_uri: str, experiment: str, report: Report, kind: str = "report") -> str:
    """Log ``report`` as a run of ``experiment`` and tag the model version with it."""
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(experiment)
    closed = [w for w in report.windows if w.closed]
    last = closed[-1] if closed else None
    with mlflow.start_run(run_name=f"{kind}-{report.model}-v{report.version}") as run:
        mlflow.set_tags({
            "roost.kind": f"monitor-{kind}", "roost.model": report.model,
            "roost.version": report.version, "roost.reference_run": report.run_id,
            "roost.verdict": last.verdict if last else INSUFFICIENT,
        })  # fmt: skip
        for step, window in enumerate(report.windows):
            values = {n: s.value for n, s in window.statistics.items() if s.value is not None}
            values["events"] = window.events
            if "accuracy" in window.live:
                values["live_accuracy"] = window.live["accuracy"]
                values["live_macro_f1"] = window.live["macro_f1"]
            mlflow.log_metrics(values, step=step)
        mlflow.log_dict(report.as_dict(), REPORT_ARTIFACT)
        fig = figure(report)
        mlflow.log_figure(fig, PLOT_ARTIFACT)
        import matplotlib.pyplot as plt

        plt.close(fig)
        run_id = str(run.info.run_id)
    tags = {f"{VERSION_TAG}.last_{kind}_run": run_id,
            f"{VERSION_TAG}.verdict": last.verdict if last else INSUFFICIENT}  # fmt: skip
    for key, value in tags.items():
        client.set_model_version_tag(report.model, report.version, key, value)
    report.mlflow_run_id = run_id
    return run_id


def push_gauges(url: str, report: Report, timeout: float = 10.0) -> bool:
    """Publish the last closed window with traffic as gauges; False if the receiver is down."""
    import httpx

    doc = report.as_dict()
    closed = [w for w in doc["windows"] if w["closed"]]
    doc["windows"] = [w for w in closed if w["events"]] or closed  # the last one with traffic
    try:
        response = httpx.put(url.rstrip("/") + "/v1/drift", json=doc, timeout=timeout)
    except httpx.HTTPError:
        return False
    return response.status_code == 200


def flush_receiver(url: str, timeout: float = 60.0) -> bool:
    """Ask the receiver to compact what it holds, so the report sees every stored event."""
    import httpx

    try:
        return httpx.post(url.rstrip("/") + "/v1/flush", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False
