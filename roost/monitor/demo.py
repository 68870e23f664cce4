"""``roost demo --monitor`` / ``make monitor-demo``: the monitoring loop end to end, locally.

serve with payload logging -> receiver -> normal traffic (windows pass, no alert) ->
shifted traffic (texts of one class, three joined into one) -> drift report -> the watcher
retrains -> the new version lands as ``challenger`` (the offline gate decides; the rollout,
not the watcher, promotes). Everything runs on loopback; the model is trained here (a small
sample, so that the whole demo takes a few minutes).

Windows are short (``DEMO_WINDOW_S``) so that the demo does not wait 15 minutes per window;
every threshold is the default one.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from roost.config import Settings

Notify = Callable[[str], None]

DEMO_MODEL = "sentiment-monitor-demo"
DEMO_WINDOW_S = 8.0
DEMO_MIN_EVENTS = 100
DEMO_MAX_ROWS = 4000
DEMO_EPOCHS = 3
TEXTS_PER_REQUEST = 4
REQUESTS_PER_S = 20.0


@dataclass
class MonitorDemoReport:
    model: str
    tracking_uri: str = ""
    receiver_url: str = ""
    store: str = ""
    champion: str = ""
    normal: dict[str, Any] = field(default_factory=dict)  # the report of the calm windows
    shifted: dict[str, Any] = field(default_factory=dict)  # the report with the drift
    trigger: dict[str, Any] = field(default_factory=dict)
    challenger: str | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "tracking_uri": self.tracking_uri,
            "receiver_url": self.receiver_url, "store": self.store, "champion": self.champion,
            "normal_report": self.normal, "shifted_report": self.shifted,
            "trigger": self.trigger, "challenger": self.challenger, "timings": self.timings,
        }  # fmt: skip


class _Traffic(threading.Thread):
    """v2 requests of TEXTS_PER_REQUEST texts at a steady pace (the demo's clients)."""

    def __init__(self, url: str, receiver: str, texts: list[str], labels: list[str]) -> None:
        super().__init__(daemon=True)
        self.url, self.receiver, self.texts, self.labels = url, receiver, texts, labels
        self.stop = threading.Event()
        self.sent = self.errors = 0

    def run(self) -> None:
        import httpx

        from roost.monitor.events import EVENT_ID_HEADER

        i = 0
        with httpx.Client(timeout=30) as c:
            while not self.stop.is_set():
                picks = [(i + k) % len(self.texts) for k in range(TEXTS_PER_REQUEST)]
                i += TEXTS_PER_REQUEST
                body = {"inputs": [{"name": "text", "shape": [len(picks)], "datatype": "BYTES",
                                    "data": [self.texts[j] for j in picks]}]}  # fmt: skip
                try:
                    r = c.post(f"{self.url}/v2/models/{DEMO_MODEL}/infer", json=body)
                    if r.is_success:  # the client learns the truth: feedback by event id
                        event_id = r.headers[EVENT_ID_HEADER]
                        labels = [{"id": f"{event_id}/{k}", "label": self.labels[j]}
                                  for k, j in enumerate(picks)]  # fmt: skip
                        c.post(f"{self.receiver}/v1/feedback", json={"feedback": labels})
                    ok = r.is_success
                except httpx.HTTPError:
                    ok = False
                self.sent += ok
                self.errors += not ok
                self.stop.wait(1.0 / REQUESTS_PER_S)  # the clients' pace

    def finish(self) -> None:
        self.stop.set()
        self.join(30)


def demo_settings(settings: Settings) -> Settings:
    """The caller's settings with the demo's model, sample, short windows and retraining."""
    out = settings.model_copy(deep=True)
    out.registry.model_name = DEMO_MODEL
    out.serving.model_name = DEMO_MODEL
    out.data.max_rows = out.data.max_rows or DEMO_MAX_ROWS
    out.train.epochs = min(out.train.epochs, DEMO_EPOCHS)
    out.monitor.window_s = DEMO_WINDOW_S
    out.monitor.min_events = DEMO_MIN_EVENTS
    out.monitor.action = "retrain"
    out.monitor.consecutive = 2
    out.monitor.segment_s = 1.0
    out.monitor.url = None
    return out


def _closed_windows(report: dict[str, Any], minimum: int) -> list[dict[str, Any]]:
    return [w for w in report["windows"] if w["closed"] and w["events"] >= minimum]


def run_monitor_demo(
    settings: Settings, notify: Notify, train_progress: Any = None
) -> MonitorDemoReport:
    from roost import proc, registry, tracking
    from roost.monitor import local
    from roost.monitor import report as reports
    from roost.monitor.watch import Watcher, WatchState
    from roost.serving import local as serving
    from roost.train import run_training

    settings = demo_settings(settings)
    out = MonitorDemoReport(model=DEMO_MODEL)
    started_tracking = False
    server = None
    receiver_started = False
    try:
        notify("starting MLflow tracking server")
        if settings.tracking.uri is None and tracking.running_server(settings) is None:
            tracking.up(settings)
            started_tracking = True
        out.tracking_uri = tracking.use(settings)
        reg = registry.Registry(out.tracking_uri, DEMO_MODEL)
        champion = reg.version_for_alias(settings.registry.champion_alias)
        if champion is None:
            notify(f"training the champion of {DEMO_MODEL} ({settings.data.max_rows} rows)")
            outcome = run_training(settings, train_progress)
            champion = registry.promote(settings, run_id=outcome.run_id).version
        out.champion = champion
        run_id = reg.get_version(champion).run_id
        test = reg.test_split(run_id)

        notify("starting the payload receiver (roost monitor up)")
        receiver = local.up(settings)
        receiver_started = True
        out.receiver_url, out.store = receiver.url, receiver.store
        settings.monitor.url = receiver.url

        notify(f"serving {DEMO_MODEL}@champion (v{champion}) with payload logging on")
        server = serving.start(
            settings, f"models:/{DEMO_MODEL}@{settings.registry.champion_alias}",
            local.store_dir(settings) / "demo-serve.log", tracking_uri=out.tracking_uri,
            env={"ROOST_SERVING__LOGGING__URL": receiver.url,
                 "ROOST_SERVING__LOGGING__FLUSH_INTERVAL_S": "0.05"},
        ).wait_ready(timeout=180)  # fmt: skip

        watcher = Watcher(settings, local.store_uri(settings), local.store_dir(settings),
                          receiver.url)  # fmt: skip
        _, _, profile = reports.resolve_version(out.tracking_uri, DEMO_MODEL, champion, None)
        limits = reports.Thresholds.from_settings(settings.monitor)
        started = time.time()

        def report_since(since: float) -> dict[str, Any]:
            reports.flush_receiver(receiver.url)
            now = dt.datetime.now(dt.UTC)
            return reports.make_report(
                local.store_uri(settings), DEMO_MODEL, champion, run_id, profile,
                dt.datetime.fromtimestamp(since, dt.UTC), now, DEMO_WINDOW_S, limits,
            ).as_dict()  # fmt: skip

        notify(f"normal traffic (test-split texts) for two full {DEMO_WINDOW_S:g}s windows")
        normal = _Traffic(
            server.http_url, receiver.url, test["text"].tolist(), test["label"].tolist()
        )
        normal.start()
        try:
            proc.wait_until(
                lambda: len(_closed_windows(report_since(started), DEMO_MIN_EVENTS)) >= 2,
                300, 1.0, what="two full windows of normal traffic",
            )  # fmt: skip
            watcher.step()  # judges them: they pass, nothing is triggered
        finally:
            normal.finish()
        out.normal = report_since(started)

        notify(
            "shifted traffic (one class only, three texts joined into one); the watcher "
            "judges each window and retrains after two breached windows in a row"
        )
        positive = test[test["label"] == "positive"]["text"].tolist()
        shifted = [" ".join(positive[i : i + 3]) for i in range(0, len(positive) - 2, 3)]
        shift = _Traffic(server.http_url, receiver.url, shifted, ["positive"] * len(shifted))
        shifted_at = time.time()
        shift.start()

        def on_decision() -> None:
            # The clients stop once the watcher has decided; the report shows what it saw.
            proc.wait_until(
                lambda: (s := watcher.states.load()).pending is not None or s.history,
                900, 0.2, what="the decision",
            )  # fmt: skip
            shift.finish()
            out.shifted = report_since(started)

        reporter = threading.Thread(target=on_decision, daemon=True)
        reporter.start()

        def acted() -> WatchState | None:
            # Each step judges the windows closed since the last; the one that sees the
            # second breached window in a row saves its decision, then retrains and gates.
            s = watcher.step()
            return s if s is not None and s.history else None

        try:
            state = proc.wait_until(
                acted, 900, 0.5, what="the watcher to detect the drift and retrain"
            )
            reporter.join(120)
        finally:
            shift.finish()
        entry = state.history[-1]
        out.timings["shift_to_trigger_s"] = round(entry["decided_at"] - shifted_at, 1)
        out.challenger = entry.get("new_version")
        out.trigger = {
            "id": entry["id"], "action": entry["action"], "breached": entry["breached"],
            "values": entry["values"], "windows": entry["windows"],
            "aliases": entry.get("aliases"), "gate": entry.get("gate"),
        }  # fmt: skip
        out.timings["shift_to_challenger_s"] = round(entry["finished_at"] - shifted_at, 1)
        out.timings["total_s"] = round(time.time() - started, 1)
    finally:
        if server is not None:
            server.stop()
        if receiver_started:
            local.down(settings)
        if started_tracking:
            tracking.down(settings)
    return out
