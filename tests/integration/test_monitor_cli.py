"""`roost monitor up|down|feedback|report` as a user runs them (a real receiver, real MLflow)."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from typer.testing import CliRunner

from roost import registry
from roost.cli.app import app
from roost.config import Settings
from roost.monitor import events

pytestmark = pytest.mark.integration


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def roost(settings: Settings, *args: str) -> Result:
    """The CLI in-process (CliRunner), as the user types it; the receiver is a real process."""
    env = {"MLFLOW_TRACKING_URI": str(settings.tracking.uri), "COLUMNS": "200"}
    result = CliRunner().invoke(app, ["--state-dir", str(settings.state_dir), *args], env=env)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    return Result(result.exit_code, result.stdout, result.stderr)


def pair(
    event_id: str, texts: list[str], labels: list[str], version: str, time: str
) -> list[dict[str, Any]]:
    """A request and its response as structured CloudEvents (as KServe's agent would log)."""
    base = {"specversion": "1.0", "id": event_id, "source": "/test", "time": time,
            "inferenceservicename": "sentiment"}  # fmt: skip
    request = {"inputs": [{"name": "text", "shape": [len(texts)], "datatype": "BYTES",
                           "data": texts}]}  # fmt: skip
    response = {"model_name": "sentiment", "model_version": version, "id": event_id,
                "outputs": [{"name": "label", "shape": [len(labels)], "datatype": "BYTES",
                             "data": labels},
                            {"name": "confidence", "shape": [len(labels)], "datatype": "FP32",
                             "data": [0.9] * len(labels)}]}  # fmt: skip
    return [
        {**base, "type": events.REQUEST_TYPE, "data": request},
        {**base, "type": events.RESPONSE_TYPE, "data": response},
    ]


def test_up_feedback_report_down(settings: Settings, champion: Any, tmp_path: Path) -> None:
    up = roost(settings, "monitor", "up", "--json")
    assert up.returncode == 0, up.stderr
    receiver = json.loads(up.stdout)
    try:
        assert httpx.get(receiver["url"] + "/healthz", timeout=10).status_code == 200
        # 60 one-class, long inferences 20 minutes ago: a one-sided window, closed by now
        past = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=20)
        stamp = past.isoformat().replace("+00:00", "Z")
        batch = []
        for i in range(60):
            text = "the delayed flight and the rude crew and the lost bags " * 3
            batch += pair(f"cli-{i}", [text], ["negative"], champion.version, stamp)
        r = httpx.post(receiver["url"], content=orjson.dumps(batch),
                       headers={"content-type": events.BATCH_CONTENT}, timeout=30)  # fmt: skip
        assert r.json() == {"stored": 120, "duplicates": 0}
        labels = tmp_path / "labels.csv"
        labels.write_text("id,label\n" + "".join(f"cli-{i},negative\n" for i in range(60)))
        fed = roost(settings, "monitor", "feedback", str(labels), "--json")
        assert fed.returncode == 0, fed.stderr
        assert json.loads(fed.stdout)["stored"] == 60
        bad = tmp_path / "bad.csv"
        bad.write_text("event,label\nx,positive\n")
        refused = roost(settings, "monitor", "feedback", str(bad))
        assert refused.returncode == 2 and "column 'id' missing" in refused.stderr
        assert refused.stderr.count("error:") == 1

        report = roost(settings, "monitor", "report", "--version", champion.version,
                       "--since", "1h", "--window", "10m", "--json")  # fmt: skip
        assert report.returncode == 0, report.stderr
        doc = json.loads(report.stdout)
        windows = [w for w in doc["windows"] if w["events"]]
        assert len(windows) == 1 and windows[0]["events"] == 60
        window = windows[0]
        assert window["closed"] and window["start"] <= past.isoformat() < window["end"]
        assert window["verdict"] == "breach"
        assert window["statistics"]["js_distance"]["status"] == "breach"
        assert window["statistics"]["length_psi"]["status"] == "breach"
        assert window["live"]["labels"] == 60 and window["live"]["accuracy"] == 1.0
        assert doc["mlflow_run_id"]
        reg = registry.Registry(str(settings.tracking.uri), "sentiment")
        tags = reg.get_version(champion.version).tags
        assert tags["roost.monitor.last_report_run"] == doc["mlflow_run_id"]
        metrics = httpx.get(receiver["url"] + "/metrics", timeout=10).text
        series = f'model="sentiment",statistic="js_distance",version="{champion.version}"'
        assert f"roost_drift_breached{{{series}}} 1.0" in metrics

        assert all(w["verdict"] == "insufficient" for w in doc["windows"] if not w["events"])
        table = roost(settings, "monitor", "report", "--version", champion.version, "--since",
                      "1h", "--window", "10m", "--no-log")  # fmt: skip
        assert table.returncode == 0 and "breach" in table.stderr and not table.stdout
    finally:
        down = roost(settings, "monitor", "down", "--json")
    assert json.loads(down.stdout) == {"stopped": True, "pid": receiver["pid"]}


def test_bad_durations_and_no_receiver(settings: Settings, tmp_path: Path) -> None:
    r = roost(settings, "monitor", "report", "--since", "soon")
    assert r.returncode == 2 and "--since" in r.stderr
    labels = tmp_path / "l.csv"
    labels.write_text("id,label\na,positive\n")
    r = roost(settings, "--state-dir", str(tmp_path), "monitor", "feedback", str(labels))
    assert r.returncode == 4 and "no monitor receiver" in r.stderr
