"""The monitoring loop end to end, on real processes.

model server (payload logging on) -> receiver -> Parquet -> `roost monitor watch`:

1. traffic drawn from the test split: windows pass, nothing is triggered;
2. shifted traffic (texts of one class, three joined into one: much longer) with feedback
   labels: detected within two windows, the watcher decides to retrain, is SIGKILLed right
   after the decision, and a restarted watcher finishes it: one training run, one new
   version, landed as `challenger`, the trigger recorded on the judged version.

Timings (shift start -> trigger decided -> challenger) go to ``$MONITOR_TIMINGS_JSON``
(default: ``<state dir>/monitor-timings.json``) and are printed.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from roost import proc, registry
from roost.config import Settings
from roost.monitor import events
from roost.monitor.report import Thresholds, load_feedback, make_report, resolve_version
from roost.monitor.watch import ACTION_TAG, TRIGGER_TAG, StateFile
from tests.conftest import Champion, make_settings, serve_champion
from tests.integration.test_monitor import Receiver, start_receiver

pytestmark = pytest.mark.e2e

MODEL = "sentiment-monitor"
WINDOW_S = 5.0
MIN_EVENTS = 150
TEXTS_PER_REQUEST = 4
REQUESTS_PER_S = 25.0


class Sender(threading.Thread):
    """Sends v2 requests of ``TEXTS_PER_REQUEST`` texts at a steady rate; keeps event ids."""

    def __init__(self, url: str, texts: list[str], labels: list[str] | None = None) -> None:
        super().__init__(daemon=True)
        self.url, self.texts, self.labels = url, texts, labels
        self.stop = threading.Event()
        self.sent: list[tuple[str, list[str]]] = []  # (event id, true labels)
        self.errors = 0

    def run(self) -> None:
        i = 0
        with httpx.Client(timeout=30) as c:
            while not self.stop.is_set():
                chunk = [(i + k) % len(self.texts) for k in range(TEXTS_PER_REQUEST)]
                i += TEXTS_PER_REQUEST
                body = {"inputs": [{"name": "text", "shape": [len(chunk)], "datatype": "BYTES",
                                    "data": [self.texts[j] for j in chunk]}]}  # fmt: skip
                r = c.post(f"{self.url}/v2/models/{MODEL}/infer", json=body)
                if r.status_code != 200:
                    self.errors += 1
                else:
                    truth = [self.labels[j] for j in chunk] if self.labels else []
                    self.sent.append((r.headers[events.EVENT_ID_HEADER], truth))
                self.stop.wait(1.0 / REQUESTS_PER_S)  # pacing the load, not waiting on a result

    def finish(self) -> None:
        self.stop.set()
        self.join(30)


@pytest.fixture(scope="module")
def loop(
    settings: Settings, champion: Champion, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Settings, Receiver, str, dict[str, str]]]:
    """A registered copy of the champion's run under MODEL, a receiver, a logging server."""
    base = tmp_path_factory.mktemp("monitor")
    monitored = make_settings(
        settings.state_dir, settings.tracking.uri,
        registry={"model_name": MODEL}, serving={"model_name": MODEL},
    )  # fmt: skip
    registry.promote(monitored, run_id=champion.outcome.run_id)
    receiver = start_receiver(base / "store", env={"ROOST_MONITOR__SEGMENT_S": "1"})
    env = {
        "ROOST_STATE_DIR": str(settings.state_dir),
        "MLFLOW_TRACKING_URI": str(settings.tracking.uri),
        "ROOST_REGISTRY__MODEL_NAME": MODEL,
        "ROOST_SERVING__MODEL_NAME": MODEL,
        "ROOST_DATA__MAX_ROWS": "6000",
        "ROOST_TRAIN__EPOCHS": "4",
        # Two models trained on same-sized samples differ by noise on the gate's held-out split,
        # so a strict gate (+0.0) refused the retrained model in 1 of ~4 runs (it landed as
        # `candidate`). This test is about the loop (detect, decide once, retrain, hand over),
        # not about retraining beating the champion, so the gate tolerates a small regression.
        "ROOST_REGISTRY__MIN_IMPROVEMENT": "-0.05",
        "ROOST_MONITOR__STORE": str(receiver.store),
        "ROOST_MONITOR__URL": receiver.url,
        "ROOST_MONITOR__MIN_EVENTS": str(MIN_EVENTS),
        "ROOST_MONITOR__LEASE_S": "3",
        "ROOST_SERVING__LOGGING__URL": receiver.url,
        "ROOST_SERVING__LOGGING__FLUSH_INTERVAL_S": "0.05",
    }
    try:
        server = serve_champion(monitored, base / "server.log", env=env)
        with_server = next(server)
        try:
            yield monitored, receiver, with_server.http_url, env
        finally:
            server.close()
    finally:
        receiver.process.stop()


def start_watcher(env: dict[str, str], log: Path) -> proc.Background:
    argv = [sys.executable, "-m", "roost", "-v", "monitor", "watch", "--action", "retrain",
            "--window", f"{WINDOW_S:g}s", "--consecutive", "2", "--poll", "0.5s",
            "--cooldown", "1h"]  # fmt: skip
    return proc.start_background(argv, log, env=env)


def test_drift_is_detected_and_retraining_lands_a_challenger(
    loop: tuple[Settings, Receiver, str, dict[str, str]], champion: Champion, tmp_path: Path
) -> None:
    monitored, receiver, url, env = loop
    reg = registry.Registry(str(monitored.tracking.uri), MODEL)
    judged = reg.require_alias("champion")
    test = reg.test_split(champion.outcome.run_id)
    states = StateFile(receiver.store / "watch", MODEL)
    watcher = start_watcher(env, tmp_path / "watch-1.log")
    try:
        # 1. like the test split: the watcher judges full windows, they pass, no trigger
        proc.wait_until(lambda: states.load().owner, 120, 0.2, what="the watcher to start",
                        describe=lambda: watcher.log_tail(5))  # fmt: skip
        normal = Sender(url, test["text"].tolist())
        normal.start()
        try:
            full = proc.wait_until(
                lambda: (ends := _full_windows(monitored, receiver, judged))[1:]
                and (states.load().last_window_end or "") >= ends[1] and ends,
                120, 0.5, what="the watcher to judge two full windows of test-split traffic",
                describe=lambda: watcher.log_tail(5),
            )  # fmt: skip
        finally:
            normal.finish()
        assert normal.errors == 0
        calm = states.load()
        assert calm.pending is None and not calm.history and calm.consecutive == 0, calm
        assert calm.last_window_end is not None and calm.last_window_end >= full[1]
        # 2. shifted: one class, three texts joined into one
        positive = test[test["label"] == "positive"]["text"].tolist()
        shifted = [" ".join(positive[i : i + 3]) for i in range(0, len(positive) - 2, 3)]
        shift = Sender(url, shifted, ["positive"] * len(shifted))
        shifted_at = time.monotonic()
        shift.start()
        try:
            decided = proc.wait_until(
                lambda: states.load().pending, 120, 0.05, what="the retrain decision",
                describe=lambda: watcher.log_tail(10),
            )  # fmt: skip
            decided_after = time.monotonic() - shifted_at
            os.kill(watcher.pid, signal.SIGKILL)  # right after the decision was saved
            watcher.popen.wait(10)  # type: ignore[union-attr]
        finally:
            shift.finish()
        assert decided.action == "retrain" and decided.version == judged
        assert {"js_distance", "length_psi"} <= set(decided.breached)
        assert len(decided.windows) == 2
        _send_feedback(monitored, receiver, shift.sent, tmp_path)
        # the restarted watcher waits out the dead one's lease, then finishes the action
        watcher = start_watcher(env, tmp_path / "watch-2.log")
        done = proc.wait_until(
            lambda: (s := states.load()).history and s.pending is None and s,
            420, 1.0, what="the retraining to finish", describe=lambda: watcher.log_tail(10),
        )  # fmt: skip
        landed_after = time.monotonic() - shifted_at
    finally:
        watcher.stop()
    (entry,) = done.history
    new_version = entry["new_version"]
    assert entry["id"] == decided.id
    assert reg.aliases().get("challenger") == new_version, (reg.aliases(), entry)
    assert reg.aliases()["champion"] == judged  # the rollout, not the watcher, promotes
    client = reg.client
    versions = client.search_model_versions(
        f"name='{MODEL}' and tags.`{ACTION_TAG}` = '{decided.id}'"
    )
    assert [v.version for v in versions] == [new_version]  # one retraining, not two
    exp = client.get_experiment_by_name(monitored.tracking.experiment)
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`{ACTION_TAG}` = '{decided.id}' and attributes.status = 'FINISHED'",
    )
    assert len(runs) == 1
    tags = reg.get_version(judged).tags
    assert tags[TRIGGER_TAG] == decided.id and tags[f"{TRIGGER_TAG}.action"] == "retrain"
    assert "js_distance" in tags[f"{TRIGGER_TAG}.metrics"]
    assert entry["feedback_rows"] is None or entry["feedback_rows"] > 0
    timings = {"decided_after_s": round(decided_after, 1),
               "challenger_after_s": round(landed_after, 1), "window_s": WINDOW_S}  # fmt: skip
    out = Path(
        os.environ.get("MONITOR_TIMINGS_JSON") or monitored.state_dir / "monitor-timings.json"
    )
    out.write_text(json.dumps(timings, indent=2))
    print(f"\nmonitor loop timings: {timings}")


def _full_windows(settings: Settings, receiver: Receiver, version: str) -> list[str]:
    """Ends of the closed windows with at least MIN_EVENTS texts; each must pass."""
    import datetime as dt

    receiver.flush()
    _, run_id, profile = resolve_version(str(settings.tracking.uri), MODEL, version, None)
    now = dt.datetime.now(dt.UTC)
    report = make_report(
        receiver.store, MODEL, version, run_id, profile, now - dt.timedelta(seconds=60), now,
        WINDOW_S, Thresholds(min_events=MIN_EVENTS),
    )  # fmt: skip
    full = [w for w in report.windows if w.closed and w.events >= MIN_EVENTS]
    assert all(w.verdict == "ok" for w in full), [w.to_dict() for w in full]
    return [w.end for w in full]


def _send_feedback(
    settings: Settings, receiver: Receiver, sent: list[tuple[str, list[str]]], tmp_path: Path
) -> None:
    """True labels for the shifted traffic, through `roost monitor feedback FILE.csv`."""
    import subprocess

    path = tmp_path / "feedback.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "label"])
        for event_id, labels in sent:
            for i, label in enumerate(labels):
                writer.writerow([f"{event_id}/{i}", label])
    result = subprocess.run(
        [sys.executable, "-m", "roost", "monitor", "feedback", str(path), "--url", receiver.url,
         "--json"], capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["stored"] == sum(len(x) for _, x in sent)
    receiver.flush()
    assert len(load_feedback(receiver.store)) >= sum(len(x) for _, x in sent)
