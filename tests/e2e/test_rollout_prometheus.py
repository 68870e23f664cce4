"""One KServe canary whose analysis queries a real Prometheus scraping real model servers.

Debian's `prometheus` scrapes two `roost serve` processes on loopback (the champion's
version and the challenger's), labelled as Prometheus' Kubernetes discovery labels predictor
pods (``namespace``, ``pod``). A client thread splits requests between them by the traffic
the recorded InferenceService (``rollout_fakes.FakeKube``) reports, as KServe would. The
rollout controller reads its metrics through ``rollout.prometheus_url`` (the path the chart's
``rollout.controller.prometheusUrl`` sets), so the query, the series names and labels, and
the per-window increases are checked against the real thing rather than recorded replies.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from kubernetes import client as kube_client

from roost import proc, registry
from roost.config import Settings
from roost.rollout.backends.kserve import KServeBackend
from roost.rollout.controller import Controller
from roost.rollout.state import Phase
from roost.serving import local
from tests.conftest import Champion, make_settings
from tests.e2e.rollout_fakes import FakeKube
from tests.e2e.rollout_helpers import load_source, register_copy
from tests.integration.test_monitor_prometheus import query, tool

pytestmark = pytest.mark.e2e

MODEL = "sentiment-prom"
TEMPLATE = "s3://roost-artifacts/models/sentiment/{version}"


def start_prometheus(tmp_path: Path, targets: dict[str, str]) -> tuple[proc.Background, str]:
    """A real Prometheus scraping ``{pod name: host:port}`` every second."""
    port = proc.free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{
            "job_name": "kserve-predictors",
            "static_configs": [{"targets": [target], "labels": {"namespace": "roost", "pod": pod}}
                               for pod, target in targets.items()],
        }],
    }  # fmt: skip
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    argv = [tool("prometheus"), f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}"]  # fmt: skip
    server = proc.start_background(argv, tmp_path / "prometheus.log")
    url = f"http://127.0.0.1:{port}"
    try:
        proc.wait_http(url + "/-/ready", 60, server, what="prometheus")
    except Exception:
        server.stop()
        raise
    return server, url


@pytest.fixture
def servers(
    tmp_path: Path, settings: Settings, champion: Champion
) -> Iterator[tuple[Settings, dict[str, local.LocalServer]]]:
    assert settings.tracking.uri is not None
    rollout_settings = make_settings(
        settings.state_dir, settings.tracking.uri, registry={"model_name": MODEL},
    )  # fmt: skip
    source = load_source(settings, champion.model_uri, champion.outcome.run_id)
    reg = registry.Registry(settings.tracking.uri, MODEL)
    old = reg.version_for_alias("champion") or register_copy(rollout_settings, source)
    reg.set_alias("champion", old)
    new = register_copy(rollout_settings, source)
    started: dict[str, local.LocalServer] = {}
    try:
        for version in (old, new):
            started[version] = local.start(
                rollout_settings, f"models:/{MODEL}/{version}", tmp_path / f"serve-{version}.log",
                name="sentiment", tracking_uri=settings.tracking.uri,
            )  # fmt: skip
        for server in started.values():
            server.wait_ready(timeout=180)
        yield rollout_settings, started
    finally:
        for server in started.values():
            server.stop()


def test_kserve_canary_analysed_through_a_real_prometheus(
    tmp_path: Path, servers: tuple[Settings, dict[str, local.LocalServer]]
) -> None:
    base_settings, started = servers
    old, new = list(started)
    targets = {f"sentiment-predictor-v{v}": s.http_url.split("//")[1] for v, s in started.items()}
    prometheus, prom_url = start_prometheus(tmp_path, targets)
    kube = FakeKube()
    uri_old = TEMPLATE.format(version=old)
    kube.base["spec"]["predictor"]["model"]["storageUri"] = uri_old
    kube.revisions = {uri_old: "sentiment-predictor-00003"}
    settings = base_settings.model_copy(deep=True)
    settings.rollout = settings.rollout.model_copy(update={
        "steps": [50, 100], "window_s": 3.0, "check_interval_s": 0.5, "min_requests": 20,
        "poll_s": 0.2, "prometheus_url": prom_url, "storage_uri": TEMPLATE,
        "mode": "canary",  # the canary's analysis through Prometheus (no shadow phase)
    })  # fmt: skip
    settings.k8s = settings.k8s.model_copy(
        update={"namespace": "roost", "inference_service": "sentiment"}
    )
    api = kube_client.ApiClient(kube_client.Configuration(host=kube.server.url))
    backend = KServeBackend(settings, api, lambda v: TEMPLATE.format(version=v), MODEL)
    stop = threading.Event()
    served: dict[str, int] = {old: 0, new: 0}

    def traffic() -> None:
        rng = random.Random(7)
        body = {"instances": ["a fine day", "this is awful", "nothing much"]}
        with httpx.Client(timeout=30) as http:
            while not stop.is_set():
                split = kube.split()
                version = new if rng.uniform(0, 100) < split.get(new, 0) else old
                url = started[version].http_url + "/v1/models/sentiment:predict"
                if http.post(url, json=body).status_code == 200:
                    served[version] += 1

    sender = threading.Thread(target=traffic, daemon=True)
    sender.start()
    try:
        # Prometheus has scraped both servers before the canary starts.
        proc.wait_until(
            lambda: len(query(prom_url, 'up{job="kserve-predictors"} == 1')) == 2,
            60,
            0.5,
            what="prometheus to scrape both model servers",
        )
        controller = Controller(settings, backend)
        state = controller.start(new)
        final = controller.run(timeout=240)
        # what the analysis read: the challenger's own series, as Prometheus stored them
        stored = query(
            prom_url,
            f'sum by (pod, namespace) (roost_inference_requests_total{{version="{new}",'
            'outcome="ok"})',
        )
    finally:
        stop.set()
        sender.join(timeout=30)
        api.close()
        kube.close()
        prometheus.stop()

    assert final.phase is Phase.PROMOTED and final.id == state.id, final.history
    assert kube.weights_applied() == [50, 100, None]
    assert served[new] > 0 and served[old] > 0
    passed = [e for e in final.history if e["event"] == "window" and e.get("verdict") == "pass"]
    assert 50 in [e["weight"] for e in passed], final.history  # judged on Prometheus' numbers
    assert stored and stored[0]["metric"] == {"pod": f"sentiment-predictor-v{new}",
                                              "namespace": "roost"}  # fmt: skip
    assert float(stored[0]["value"][1]) >= settings.rollout.min_requests
    reg = registry.Registry(settings.tracking.uri or "", MODEL)
    assert reg.aliases().get("champion") == new
