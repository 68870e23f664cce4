"""The runner's own rules, on small inputs: Kubernetes' $(VAR) expansion, the loopback map,
the Dockerfile reading. Pure and fast; the other modules run the chart."""

from __future__ import annotations

import pytest

from tests.cluster.runner import Loopback, expand, image_of

pytestmark = pytest.mark.cluster


def test_expand_follows_kubernetes_rules() -> None:
    defined = {"A": "1", "POSTGRES_PASSWORD": "s3cret"}
    assert expand("x:$(POSTGRES_PASSWORD)@h", defined) == "x:s3cret@h"
    assert expand("$(UNDEFINED)-$(A)", defined) == "$(UNDEFINED)-1"  # unknown stays as written
    assert expand("$$(A) costs $$5", defined) == "$(A) costs $5"  # $$ escapes


def test_loopback_rewrites_every_service_form_with_its_port_and_nothing_else() -> None:
    loopback = Loopback("roost")
    local = loopback.bind("roost-mlflow", 5000, 41000)
    assert local == 41000
    for host in (
        "roost-mlflow.roost.svc.cluster.local",
        "roost-mlflow.roost.svc",
        "roost-mlflow.roost",
        "roost-mlflow",
    ):
        assert loopback.rewrite(f"http://{host}:5000/api") == "http://127.0.0.1:41000/api"
    # Another port, a longer name, a host list without ports: left alone.
    for text in (
        "http://roost-mlflow:5001",
        "http://roost-mlflow-canary:5000",
        "roost-mlflow,roost-mlflow:*",
    ):
        assert loopback.rewrite(text) == text


def test_loopback_maps_port_80_urls_without_a_port() -> None:
    loopback = Loopback("roost")
    loopback.bind("sentiment-predictor", 80, 42000)
    url = "http://sentiment-predictor.roost.svc.cluster.local/v2/models/sentiment/ready"
    assert loopback.rewrite(url) == "http://127.0.0.1:42000/v2/models/sentiment/ready"


def test_images_are_read_from_their_dockerfiles() -> None:
    serving = image_of("123456789012.dkr.ecr.us-east-1.amazonaws.com/roost-serving:0.1.0")
    assert serving.entrypoint == ["roost"] and serving.cmd[0] == "serve"
    assert serving.env["HOME"] == "/home/roost" and serving.workdir == "/home/roost"
    assert image_of("roost-training:dev").cmd == ["train"]
    assert image_of("docker.io/library/postgres:17.6-bookworm").dockerfile is None
