"""The operator's view with a real Prometheus (Debian's `prometheus` package, with promtool).

- the chart's PrometheusRule passes `promtool check rules` and its own `promtool test rules`;
- a real Prometheus scrapes a real receiver on loopback and sees the monitor's series,
  including the drift gauges a report publishes.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
import yaml

from roost import proc
from tests.fixtures.k8s.chart import documents, find, render, values_of
from tests.integration.test_monitor import Receiver, headers, start_receiver

pytestmark = pytest.mark.integration

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "monitor"


def tool(name: str) -> str:
    path = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
    if path is None:
        pytest.fail(f"{name} is missing: `make apt-deps` installs Debian's prometheus package")
    return path


@pytest.fixture(scope="module")
def rules_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    docs = documents(render(values_of([], {"monitor": {"prometheusRule": {"enabled": True}}})))
    (rule,) = find(docs, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    out = tmp_path_factory.mktemp("rules")
    (out / "rules.yaml").write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    shutil.copy(FIXTURES / "rules_test.yaml", out / "rules_test.yaml")
    return out


def test_prometheus_rule_is_off_by_default() -> None:
    assert not find(documents(render(values_of([]))), "PrometheusRule")


def test_promtool_check_rules(rules_dir: Path) -> None:
    result = subprocess.run([tool("promtool"), "check", "rules", "rules.yaml"], cwd=rules_dir,
                            capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 rules found" in result.stdout


def test_promtool_test_rules(rules_dir: Path) -> None:
    result = subprocess.run([tool("promtool"), "test", "rules", "rules_test.yaml"], cwd=rules_dir,
                            capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    r = start_receiver(tmp_path / "store")
    try:
        yield r
    finally:
        r.process.stop()


@pytest.fixture
def prometheus(receiver: Receiver, tmp_path: Path) -> Iterator[str]:
    port = proc.free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "roost-monitor",
                            "static_configs": [{"targets": [receiver.url.split("//")[1]]}]}],
    }  # fmt: skip
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    argv = [
        tool("prometheus"),
        f"--config.file={tmp_path / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    server = proc.start_background(argv, tmp_path / "prometheus.log")
    url = f"http://127.0.0.1:{port}"
    try:
        proc.wait_http(url + "/-/ready", 60, server, what="prometheus")
        yield url
    finally:
        server.stop()


def query(url: str, expr: str) -> list[dict]:
    doc = httpx.get(url + "/api/v1/query", params={"query": expr}, timeout=10).json()
    assert doc["status"] == "success", doc
    return list(doc["data"]["result"])


def test_prometheus_scrapes_the_receiver(prometheus: str, receiver: Receiver) -> None:
    body = orjson.dumps({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES",
                                     "data": ["x"]}]})  # fmt: skip
    for i in range(5):
        assert httpx.post(receiver.url, content=body, headers=headers(f"p-{i}")).status_code == 200
    report = {"model": "sentiment", "version": "3", "windows": [{
        "events": 200, "closed": True, "live": {"accuracy": 0.5, "macro_f1": 0.4, "labels": 30},
        "statistics": {"js_distance": {"value": 0.25, "status": "breach"},
                       "length_psi": {"value": 0.05, "status": "ok"}}}]}  # fmt: skip
    assert httpx.put(receiver.url + "/v1/drift", json=report, timeout=10).status_code == 200

    def scraped() -> list[dict] | None:
        stored = query(prometheus, 'roost_monitor_events_total{type="request"}')
        drift = query(prometheus, 'roost_drift_breached{statistic="js_distance"}')
        return [*stored, *drift] if stored and drift and stored[0]["value"][1] == "5" else None

    found = proc.wait_until(scraped, 60, 0.5, what="prometheus to scrape the receiver")
    assert found[1]["metric"]["version"] == "3" and found[1]["value"][1] == "1"
    assert query(prometheus, "roost_live_accuracy")[0]["value"][1] == "0.5"
    assert query(prometheus, 'up{job="roost-monitor"}')[0]["value"][1] == "1"
