"""Backend pieces without servers: the state file, the nginx config, KServe manifests/status."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
from pathlib import Path

import pytest

from roost.errors import Conflict, MissingTool
from roost.rollout import engine
from roost.rollout.backends.kserve import (
    prometheus_query,
    spec_weight,
    storage_uri_of,
    traffic_manifest,
    traffic_ready,
)
from roost.rollout.backends.nginx import ServerRecord, Topology, find_nginx, render_config
from roost.rollout.state import Command, Phase, Plan, RolloutState
from roost.rollout.store import FileStore

pytestmark = pytest.mark.unit

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "rollout"
NGINX = "/usr/sbin/nginx"


def fixture(name: str) -> dict:  # type: ignore[type-arg]
    return json.loads((FIXTURES / name).read_text())  # type: ignore[no-any-return]


def new_state(rollout_id: str = "r1", version: str = "2") -> RolloutState:
    return engine.start(Plan(), "sentiment", version, "1", "local", 0.0, rollout_id)


# -- the state file ------------------------------------------------------------------------


def test_file_store_refuses_a_second_rollout_in_flight(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    first = store.create(new_state("r1"))
    assert first.revision == 1 and store.load() == first
    with pytest.raises(Conflict, match="already in flight"):
        store.create(new_state("r2", version="3"))


def test_file_store_saves_compare_and_swap(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    stored = store.create(new_state())
    saved = store.save(dataclasses.replace(stored, weight=10))
    assert saved.revision == stored.revision + 1
    with pytest.raises(Conflict, match="changed since it was read"):
        store.save(dataclasses.replace(stored, weight=25))  # a stale copy loses
    assert store.load() == saved


def test_a_finished_rollout_is_archived_when_the_next_starts(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    done = store.save(dataclasses.replace(store.create(new_state("r1")), phase=Phase.PROMOTED))
    second = store.create(new_state("r2", version="3"))
    assert second.revision == done.revision + 1
    assert json.loads((tmp_path / "history" / "r1.json").read_text())["phase"] == "promoted"


def test_commands_live_beside_the_state(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    assert store.read_command() is None
    command = Command("c1", "r1", "pause", 1.0, "ops")
    store.write_command(command)
    assert store.read_command() == command


# -- the nginx config ----------------------------------------------------------------------


def topology(challenger: bool = True) -> Topology:
    return Topology(
        proxy_port=18080, proxy_grpc_port=18081, generation=3,
        champion=ServerRecord("1", 100, 9001, 9002, "c.log"),
        challenger=ServerRecord("2", 101, 9003, 9004, "d.log") if challenger else None,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("weight", "rule"),
    [
        (0, "{ * roost_champion; }"),
        (25, "{ 25% roost_challenger; * roost_champion; }"),
        (100, "{ * roost_challenger; }"),
    ],
)
def test_nginx_config_splits_rest_and_grpc_by_weight(
    tmp_path: Path, weight: int, rule: str
) -> None:
    text = render_config(tmp_path, topology(), weight, "2", run_as_root=False)
    assert f'split_clients "${{request_id}}" $roost_side {rule}' in text
    grpc_rule = rule.replace("roost_challenger;", "roost_challenger_grpc;").replace(
        "roost_champion;", "roost_champion_grpc;"
    )
    assert f"$roost_grpc_side {grpc_rule}" in text
    status = json.loads(text.split("return 200 '", 1)[1].split("';", 1)[0])
    variants = {"champion": "1", "challenger": "2"}
    assert status == {"weight": weight, "challenger": "2" if weight else None, "champion": "1",
                      "generation": 3, "variants": variants}  # fmt: skip
    assert "listen 127.0.0.1:18080;" in text and "listen 127.0.0.1:18081 http2;" in text
    assert "user root" not in text
    assert str(tmp_path / "access.log") in text and str(tmp_path / "tmp" / "body") in text


def test_nginx_config_without_a_challenger_routes_to_the_champion(tmp_path: Path) -> None:
    text = render_config(tmp_path, topology(challenger=False), 50, "2", run_as_root=True)
    assert "upstream roost_challenger" not in text and "user root root;" in text
    assert "roost_challenger;" not in text.split("map $http_x_roost_variant")[0]  # no split
    assert '"weight": 0' in text


@pytest.mark.skipif(not os.access(NGINX, os.X_OK), reason="nginx not installed (make apt-deps)")
def test_nginx_accepts_the_generated_config(tmp_path: Path) -> None:
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp_path / "tmp" / sub).mkdir(parents=True)
    for weight in (0, 10, 100):
        conf = tmp_path / f"nginx-{weight}.conf"
        conf.write_text(render_config(tmp_path, topology(), weight, "2", os.geteuid() == 0))
        argv = [NGINX, "-t", "-q", "-p", str(tmp_path), "-c", str(conf)]
        argv += ["-e", str(tmp_path / "e.log")]
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stderr


def test_missing_nginx_names_the_package(tmp_path: Path) -> None:
    with pytest.raises(MissingTool, match="nginx-light"):
        find_nginx(str(tmp_path / "nginx"))


# -- KServe manifests and status -----------------------------------------------------------


def test_traffic_manifest_for_a_model_format_predictor() -> None:
    isvc = fixture("isvc-sentiment.json")
    manifest = traffic_manifest(isvc, "2", "s3://b/sentiment/2", 25)
    assert manifest["metadata"] == {
        "name": "sentiment", "namespace": "roost",
        "annotations": {"serving.kserve.io/enable-tag-routing": "true"},
    }  # fmt: skip
    predictor = manifest["spec"]["predictor"]
    assert predictor["canaryTrafficPercent"] == 25
    assert predictor["model"]["storageUri"] == "s3://b/sentiment/2"
    assert {"name": "ROOST_SERVING__MODEL_VERSION", "value": "2"} in predictor["model"]["env"]
    assert "modelFormat" not in predictor["model"]  # only the fields this manager owns
    final = traffic_manifest(isvc, "2", "s3://b/sentiment/2", None)
    assert "canaryTrafficPercent" not in final["spec"]["predictor"]


def test_traffic_manifest_for_a_custom_container_predictor() -> None:
    isvc = fixture("isvc-sentiment.json")
    isvc["spec"]["predictor"] = {
        "containers": [
            {"name": "kserve-container", "image": "x", "args": ["serve"],
             "env": [{"name": "STORAGE_URI", "value": "s3://b/1"}, {"name": "LOG", "value": "1"}]},
            {"name": "sidecar", "image": "y"},
        ]
    }  # fmt: skip
    manifest = traffic_manifest(isvc, "2", "s3://b/2", 10)
    # The list is atomic in KServe's CRD: the apply carries every container, whole.
    containers = manifest["spec"]["predictor"]["containers"]
    assert [c["name"] for c in containers] == ["kserve-container", "sidecar"]
    container = containers[0]
    assert (container["image"], container["args"]) == ("x", ["serve"])
    assert container["env"] == [
        {"name": "LOG", "value": "1"},
        {"name": "STORAGE_URI", "value": "s3://b/2"},
        {"name": "ROOST_SERVING__MODEL_VERSION", "value": "2"},
    ]
    assert containers[1] == {"name": "sidecar", "image": "y"}
    assert storage_uri_of(merged(isvc, manifest)) == "s3://b/2"
    assert isvc["spec"]["predictor"]["containers"][0]["env"][0]["value"] == "s3://b/1"  # a copy


def merged(isvc: dict, manifest: dict) -> dict:  # type: ignore[type-arg]
    out = copy.deepcopy(isvc)
    out["spec"]["predictor"]["containers"][0].update(manifest["spec"]["predictor"]["containers"][0])
    return out


def test_spec_weight_reads_the_challengers_share() -> None:
    isvc = fixture("isvc-sentiment.json")
    assert spec_weight(isvc, "s3://roost-artifacts/models/sentiment/2") == 0  # champion's spec
    isvc["spec"]["predictor"]["model"]["storageUri"] = "s3://roost-artifacts/models/sentiment/2"
    assert spec_weight(isvc, "s3://roost-artifacts/models/sentiment/2") == 100
    isvc["spec"]["predictor"]["canaryTrafficPercent"] = 25
    assert spec_weight(isvc, "s3://roost-artifacts/models/sentiment/2") == 25


def test_traffic_ready_follows_the_recorded_status() -> None:
    isvc = fixture("isvc-sentiment.json")
    assert traffic_ready(isvc, 100).ok
    isvc["metadata"]["generation"] = 4  # spec changed, KServe not there yet
    stale = traffic_ready(isvc, 25)
    assert not stale.ok and "not reconciled" in stale.reason
    isvc["status"] = fixture("isvc-canary-25.json")["status"]
    assert traffic_ready(isvc, 25).ok
    wrong = traffic_ready(isvc, 50)
    assert not wrong.ok and "gets 25%, expected 50%" in wrong.reason
    isvc["status"]["conditions"][-1]["status"] = "False"
    assert not traffic_ready(isvc, 25).ok


def test_prometheus_query_selects_the_roost_series() -> None:
    query = prometheus_query("sentiment", 'namespace="roost"')
    assert query.startswith('{__name__=~"roost_inference_requests_total|')
    assert query.endswith(',model="sentiment",namespace="roost"}')


def test_an_owner_with_this_pid_is_judged_by_its_lease() -> None:
    """A restarted container: same hostname, PID 1 again, new token; or a second driver here."""
    import socket

    from roost.rollout.backends.base import owner_alive_here, owner_id

    host = socket.gethostname()
    earlier = f"{host}:{os.getpid()}:earlier1"
    assert owner_alive_here(earlier) is None  # not "alive" because our own pid is
    claim = engine.claim  # a stale lease is taken over, a fresh one is kept
    stale = dataclasses.replace(new_state(), owner=earlier, heartbeat=0.0)
    assert claim(stale, owner_id(), 100.0, 30.0, owner_alive_here(earlier)) is not None
    fresh = dataclasses.replace(stale, heartbeat=90.0)
    assert claim(fresh, owner_id(), 100.0, 30.0, owner_alive_here(earlier)) is None
    assert owner_alive_here(f"{host}:{os.getppid()}:parent01") is True
    assert owner_alive_here(f"other-{host}:{os.getpid()}:x") is None
    assert owner_id().startswith(f"{host}:{os.getpid()}:")
