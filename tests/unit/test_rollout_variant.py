"""A/B pinning by header in the rendered nginx config (pure), checked by ``nginx -t`` too."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from roost.cli.app import app
from roost.rollout.backends.kserve import TAG_ROUTING_ANNOTATION, traffic_manifest, variant_routes
from roost.rollout.backends.nginx import (
    ServerRecord,
    Topology,
    render_config,
    variant_errors,
)
from roost.rollout.variant import KNATIVE_TAG_HEADER, KNATIVE_TAGS, VARIANT_HEADER, headers
from tests.fixtures.k8s import tools

pytestmark = pytest.mark.unit

NGINX = "/usr/sbin/nginx"
WEIGHTS = (0, 10, 25, 50, 100)


def topology(challenger: bool = True) -> Topology:
    return Topology(
        proxy_port=18080, proxy_grpc_port=18081, generation=7,
        champion=ServerRecord("4", 100, 9001, 9002, "c.log"),
        challenger=ServerRecord("5", 101, 9003, 9004, "d.log") if challenger else None,
    )  # fmt: skip


def status_of(text: str) -> dict:  # type: ignore[type-arg]
    return json.loads(text.split("return 200 '", 1)[1].split("';", 1)[0])  # type: ignore[no-any-return]


def refusal(block: str, pin: str) -> str:
    """The body of ``if ($roost_pin = <pin>) { ... }`` in one server's ``location /``."""
    return block.split(f"if ($roost_pin = {pin}) {{", 1)[1].split("\n            }", 1)[0].strip()


def pin_map(text: str) -> dict[str, str]:
    """The ``$roost_pin`` map as {source: value}."""
    block = text.split("$roost_pin {", 1)[1].split("}", 1)[0]
    pairs = (line.strip().rstrip(";").rsplit(" ", 1) for line in block.splitlines())
    return {key: value for key, value in (p for p in pairs if len(p) == 2)}


@pytest.mark.parametrize("weight", WEIGHTS)
def test_a_pinned_challenger_is_an_upstream_at_every_weight(tmp_path: Path, weight: int) -> None:
    text = render_config(tmp_path, topology(), weight, "5", run_as_root=False)
    # Both sides stay upstreams even where the weighted split names only one of them.
    assert "upstream roost_challenger { server 127.0.0.1:9003;" in text
    assert "upstream roost_challenger_grpc { server 127.0.0.1:9004;" in text
    assert "upstream roost_champion { server 127.0.0.1:9001;" in text
    assert pin_map(text) == {
        "default": "bad",
        '""': '""',
        r"~*^\s*champion\s*$": "champion",
        r"~*^\s*challenger\s*$": "challenger",
    }
    # The pin decides first; the split only when there is none.
    assert (
        '$roost_pin $roost_route { "" $roost_side; champion roost_champion; '
        'challenger roost_challenger; default ""; }'
    ) in text
    assert "champion roost_champion_grpc; challenger roost_challenger_grpc;" in text
    assert "proxy_pass http://$roost_route;" in text
    assert "grpc_pass grpc://$roost_grpc_route;" in text
    assert "$roost_side;" in text and "proxy_pass http://$roost_side" not in text
    status = status_of(text)
    assert status["weight"] == weight
    assert status["challenger"] == ("5" if weight else None)  # the split's view is unchanged
    assert status["variants"] == {"champion": "4", "challenger": "5"}


def test_without_a_challenger_a_challenger_pin_is_refused_not_rerouted(tmp_path: Path) -> None:
    text = render_config(tmp_path, topology(challenger=False), 0, None, run_as_root=False)
    assert "roost_challenger {" not in text and "upstream roost_challenger" not in text
    assert pin_map(text)[r"~*^\s*challenger\s*$"] == "none"
    assert status_of(text)["variants"] == {"champion": "4", "challenger": None}
    body = refusal(text, "none")
    assert body.startswith("return 409 '") and body.endswith("';")
    error = json.loads(body.split("'", 2)[1])["error"]
    assert error.startswith(f"{VARIANT_HEADER}: challenger:") and "v4" in error


def test_unknown_values_get_a_json_400_and_grpc_invalid_argument(tmp_path: Path) -> None:
    text = render_config(tmp_path, topology(), 50, "5", run_as_root=False)
    rest, grpc = text.split("location / {", 2)[1:]
    bad_rest = refusal(rest, "bad")
    assert bad_rest.startswith("return 400 '")
    document = json.loads(bad_rest.split("'", 2)[1])
    assert list(document) == ["error"] and document["error"].startswith(VARIANT_HEADER)
    assert "champion or challenger" in document["error"]
    bad_grpc = refusal(grpc, "bad")
    assert "add_header grpc-status 3 always;" in bad_grpc and "return 204;" in bad_grpc
    none_grpc = refusal(grpc, "none")
    assert "add_header grpc-status 9 always;" in none_grpc


def test_refusal_messages_are_safe_inside_nginx_strings() -> None:
    """No quote, ``$`` (nginx variables) or braces can break out of the rendered strings."""
    for http_status, grpc_status, message in variant_errors(topology()).values():
        assert http_status in (400, 409) and grpc_status in (3, 9)
        assert not re.search(r"['\"$;{}\\]", message), message
        assert message.isascii()


def test_the_access_log_records_the_pin_and_the_route(tmp_path: Path) -> None:
    text = render_config(tmp_path, topology(), 25, "5", run_as_root=False)
    assert "$roost_route $roost_pin $upstream_addr" in text


@pytest.mark.skipif(not os.access(NGINX, os.X_OK), reason="nginx not installed (make apt-deps)")
@pytest.mark.parametrize("challenger", [True, False])
def test_nginx_accepts_every_pinning_config(tmp_path: Path, challenger: bool) -> None:
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp_path / "tmp" / sub).mkdir(parents=True, exist_ok=True)
    for weight in WEIGHTS:
        conf = tmp_path / f"nginx-{weight}.conf"
        text = render_config(tmp_path, topology(challenger), weight, "5", os.geteuid() == 0)
        conf.write_text(text)
        argv = [NGINX, "-t", "-q", "-p", str(tmp_path), "-c", str(conf)]
        argv += ["-e", str(tmp_path / "e.log")]
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stderr


# -- KServe: tag routing ---------------------------------------------------------------------

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "rollout"


def fixture(name: str) -> dict:  # type: ignore[type-arg]
    return json.loads((FIXTURES / name).read_text())  # type: ignore[no-any-return]


def apply(obj: dict, manifest: dict) -> dict:  # type: ignore[type-arg]
    """Server-side apply of the traffic manifest on a model-format predictor (merge of maps)."""
    out = copy.deepcopy(obj)
    annotations = out["metadata"].setdefault("annotations", {})
    annotations.update(manifest["metadata"].get("annotations", {}))
    predictor = out["spec"]["predictor"]
    for key, value in manifest["spec"]["predictor"].items():
        if key == "model":
            predictor["model"].update(value)
        else:
            predictor[key] = value
    if "canaryTrafficPercent" not in manifest["spec"]["predictor"]:
        predictor.pop("canaryTrafficPercent", None)  # the manager drops what it left out
    return out


@pytest.mark.parametrize("weight", [*WEIGHTS, None])
def test_every_traffic_apply_turns_tag_routing_on(weight: int | None) -> None:
    isvc = fixture("isvc-sentiment.json")
    manifest = traffic_manifest(isvc, "5", "s3://b/sentiment/5", weight)
    assert manifest["metadata"]["annotations"] == {TAG_ROUTING_ANNOTATION: "true"}
    assert manifest["metadata"]["annotations"][TAG_ROUTING_ANNOTATION] == "true"  # a string
    # The same for a custom-container predictor (the other shape the backend handles).
    isvc["spec"]["predictor"] = {"containers": [{"name": "kserve-container", "image": "x"}]}
    manifest = traffic_manifest(isvc, "5", "s3://b/sentiment/5", weight)
    assert manifest["metadata"]["annotations"] == {TAG_ROUTING_ANNOTATION: "true"}


@pytest.mark.parametrize("weight", [*WEIGHTS, None])
def test_the_applied_inference_service_is_valid_for_the_crd(weight: int | None) -> None:
    tools.schema_dir()  # fails under CI, skips with one line elsewhere, if absent
    isvc = fixture("isvc-sentiment.json")
    isvc.pop("comment", None)
    result = apply(isvc, traffic_manifest(isvc, "5", "s3://b/sentiment/5", weight))
    assert result["metadata"]["annotations"][TAG_ROUTING_ANNOTATION] == "true"
    assert result["spec"]["predictor"].get("canaryTrafficPercent") == weight
    assert not tools.crd_errors(result)
    broken = copy.deepcopy(result)
    broken["spec"]["predictor"]["canaryTrafficPercent"] = "half"
    assert tools.crd_errors(broken)  # the validator does see this part of the object


def test_knative_tags_map_roost_variants_to_kserve_tags() -> None:
    assert KNATIVE_TAGS == {"champion": "prev", "challenger": "latest"}
    assert KNATIVE_TAG_HEADER == "Knative-Serving-Tag"


def test_a_client_pin_sends_both_backends_headers() -> None:
    assert headers("challenger") == {
        "x-roost-variant": "challenger", "Knative-Serving-Tag": "latest"
    }  # fmt: skip
    assert headers("champion") == {"x-roost-variant": "champion", "Knative-Serving-Tag": "prev"}
    assert headers(None) == {}
    with pytest.raises(ValueError, match="Challenger"):
        headers("Challenger")  # the client sends only the canonical names


def test_variant_routes_follow_the_tags_kserve_sets() -> None:
    isvc = fixture("isvc-sentiment.json")
    assert variant_routes(isvc) == {}  # the recorded object predates tag routing: no tags
    isvc["status"] = fixture("isvc-canary-25.json")["status"]
    routes = variant_routes(isvc)
    assert routes["champion"].startswith("Knative-Serving-Tag: prev (sentiment-predictor-00003")
    assert routes["challenger"].startswith("Knative-Serving-Tag: latest (sentiment-predictor-00004")
    # At 100 % KServe drops the prev target: the champion cannot be pinned any more.
    traffic = isvc["status"]["components"]["predictor"]["traffic"]
    traffic[:] = [dict(traffic[0], percent=100)]
    assert set(variant_routes(isvc)) == {"challenger"}


def test_predict_refuses_an_unknown_variant_before_sending_anything() -> None:
    result = CliRunner().invoke(app, ["predict", "hi", "--variant", "prev", "--url", "http://x"])
    assert result.exit_code == 2
    assert "--variant" in result.stderr and "champion" in result.stderr
