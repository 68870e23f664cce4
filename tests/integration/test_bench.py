"""`roost bench --quick`: real roost and TorchServe servers under real load on loopback.

Asserts the shape of bench.json and that every answer agreed with the reference model;
speed is what the benchmark reports, never what a test asserts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest

from roost.config import Settings

pytestmark = pytest.mark.integration

STEP_KEYS = {"rate", "achieved_rps", "p50_ms", "p99_ms", "p999_ms", "errors", "wrong",
             "requests", "cpu_s_per_1k", "client_cpu_s_per_1k", "client_lag_ms", "passed",
             "first_error"}  # fmt: skip
SERVER_KEYS = {"name", "protocol", "texts_per_request", "max_rps_p99_50ms",
               "max_seq_per_s_p99_50ms", "cold_start_s", "cold_starts_s", "peak_rss_mb",
               "cpu_s_per_1k", "client_cpu_s_per_1k", "at_max", "correctness", "config",
               "ladder"}  # fmt: skip


REPO = Path(__file__).resolve().parents[2]
# The peers make test's quick bench runs: plain KServe (roost's environment) and those whose
# venvs `make peers` builds (Makefile TEST_PEERS); BentoML's install is the slow one.
TEST_PEERS = ("kserve", "mlserver", "pytriton")


def roost(
    settings: Settings, *args: str, timeout: float, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": str(settings.tracking.uri), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "roost", "--state-dir", str(settings.state_dir), *args],
        capture_output=True, text=True, timeout=timeout, env=env, check=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def quick_bench(
    settings: Settings, champion: Any, tmp_path_factory: pytest.TempPathFactory
) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("bench")
    peers = {"ROOST_BENCH__PEERS": json.dumps(TEST_PEERS),
             "ROOST_BENCH__PEERS_VENVS": str(REPO / ".venv-peers")}  # fmt: skip
    result = roost(
        settings,
        "bench",
        "--quick",  # no --layers: one layer row is test_a_layer_row_is_roost_with_its_switch_off
        "--out",
        str(out),
        "--json",
        timeout=900,
        env=peers,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout), out


def test_bench_json_shape(quick_bench: tuple[dict[str, Any], Path], champion: Any) -> None:
    doc, out = quick_bench
    assert json.loads((out / "bench.json").read_text())["servers"] == doc["servers"]
    assert (out / "bench.md").read_text().startswith("`roost bench --quick")
    assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG"
    assert doc["machine"]["cpus"] >= 1 and doc["commit"]
    assert doc["model_version"] == champion.version
    assert {"torch", "kserve", "torchserve"} <= set(doc["libraries"])
    raw = doc["raw_forward"]
    assert raw["max_seq_per_s"] > 0 and raw["batch_size"] >= 1
    pairs = {(s["name"], s["protocol"]) for s in doc["servers"]}
    assert {("roost", "rest-v2"), ("roost", "grpc-v2"), ("torchserve", "rest")} <= pairs
    assert ("roost+payload-logging", "rest-v2") in pairs  # logging on, same run: its cost
    assert ("roost+payload-logging+receiver", "rest-v2") in pairs  # and with the receiver here
    here = next(s for s in doc["servers"] if s["name"] == "roost+payload-logging+receiver")
    assert here["config"]["receiver_events_stored"] > 0  # the receiver stored the load's events
    assert here["config"]["receiver_cpu_us_per_event"] > 0
    peer_rows = {
        ("kserve", "rest-v2"),
        ("kserve", "grpc-v2"),
        ("mlserver", "rest-v2"),
        ("mlserver", "grpc-v2"),
        ("pytriton", "rest-v2"),
        ("pytriton", "grpc-v2"),
    }
    assert peer_rows <= pairs
    for server in doc["servers"]:  # the peers make test runs install and run here
        assert "unavailable" not in server, (server["name"], server["unavailable"])
    floor = doc["cold_start_floor"]
    assert floor["seconds"] > 0 and len(floor["runs_s"]) >= 1
    for server in doc["servers"]:
        assert set(server) >= SERVER_KEYS
        assert server["cold_start_s"] > 0 and server["peak_rss_mb"] > 0
        assert server["ladder"], server["name"]
        for step in server["ladder"]:
            assert set(step) >= STEP_KEYS
            assert step["requests"] >= 1
    keys = {
        "roost_vs_torchserve",
        "roost_vs_raw",
        "cold_start",
        "payload_logging_kept",
        "roost_vs_kserve",
        "roost_vs_mlserver",
        "roost_vs_pytriton",
        "cold_start_vs_floor",
    }
    assert keys <= set(doc["targets"])
    for key, target in doc["targets"].items():
        # A number and its verdict, or (on a machine too busy for a ladder step) the reason.
        if target["met"] is None:
            assert target["value"] is None and target["reason"], (key, target)
        else:
            assert isinstance(target["value"], int | float), (key, target)


def test_grpc_stream_row(quick_bench: tuple[dict[str, Any], Path]) -> None:
    """The ModelStreamInfer row and the gRPC targets (shape only: the speeds are what the
    report says). --quick runs no layer rows unless asked (--layers)."""
    from roost.bench import layers

    doc, out = quick_bench
    pairs = {(s["name"], s["protocol"]) for s in doc["servers"]}
    assert ("roost", "grpc-v2-stream") in pairs
    assert not {layer.row for layer in layers.LAYERS} & {name for name, _ in pairs}
    assert doc["layers"] == []
    assert {"grpc_unary_vs_rest", "grpc_stream_vs_rest"} <= set(doc["targets"])
    table = (out / "bench.md").read_text()
    assert "roost gRPC v2 ModelStreamInfer / REST v2" in table
    assert "Fast-path layers" not in table


def test_grpc_rows_without_the_model(quick_bench: tuple[dict[str, Any], Path]) -> None:
    """The no-model gRPC rows (what grpc.aio allows here) ran, every answer checked against
    the reference model like roost's, and each roost gRPC row is put against its own."""
    from roost.bench import ceiling

    doc, out = quick_bench
    rows = {s["protocol"]: s for s in doc["servers"] if s["name"] == ceiling.NAME}
    assert set(rows) == {"grpc-v2", "grpc-v2-stream"}
    for row in rows.values():
        assert row["correctness"]["wrong"] == 0 and row["correctness"]["errors"] == 0
        assert row["correctness"]["answered"] == row["correctness"]["checked"] > 0
        assert row["ladder"]
    roost = {s["protocol"]: s for s in doc["servers"] if s["name"] == "roost"}
    for protocol, row in rows.items():  # a ratio wherever both rows passed a ladder step
        if row["max_rps_p99_50ms"] > 0 and roost[protocol]["max_rps_p99_50ms"] > 0:
            ratio = doc["grpc_ceiling"][protocol]
            assert ratio["no_model"] == row["max_rps_p99_50ms"]
            assert ratio["roost_share"] == round(ratio["roost"] / ratio["no_model"], 3)
    assert f"the same protocol with no model (`{ceiling.NAME}`" in (out / "bench.md").read_text()


def test_a_layer_row_is_roost_with_its_switch_off(
    settings: Settings, champion: Any, tmp_path: Path
) -> None:
    """One layer row through the code `roost bench --layers` runs, on a real server: uvloop
    off (the stdlib asyncio loop, which no other test serves on; fast-path off is served in
    test_bench_fastpath.py). The other rows differ only in their switch, which
    tests/unit/test_bench_layers.py checks is a real setting."""

    from roost import registry
    from roost.bench import layers, workload
    from roost.bench.plan import Profile
    from roost.bench.run import Bench
    from roost.classifier import TextClassifier

    profile = Profile.of(settings.bench, quick=True)
    bench = Bench(settings, tmp_path, profile, lambda message: None, layers=True)
    model = registry.fetch_model(settings, champion.model_uri)
    classifier = TextClassifier.load(model.path)
    texts = workload.sample_texts(settings.data, 200, settings.bench.seed)
    expected = workload.Expected(list(classifier.labels), classifier.predict_proba(texts))
    (layer,) = [layer for layer in layers.LAYERS if layer.name == "uvloop"]
    name = model.name or settings.registry.model_name
    rows = layers.rows(
        bench.servers, model, name, model.version or "local", texts, expected, (layer,)
    )
    assert [(r.name, r.protocol) for r in rows] == [(layer.row, p) for p in layer.protocols]
    for row in rows:
        doc = row.to_dict()
        assert set(doc) >= SERVER_KEYS and "unavailable" not in doc
        assert doc["config"] == {"layer_off": layer.name, "switch": layer.switch}
        assert layer.switch == "ROOST_SERVING__EVENT_LOOP=asyncio"
        assert doc["cold_start_s"] > 0 and doc["peak_rss_mb"] > 0 and doc["ladder"]
        check = doc["correctness"]
        assert check["checked"] >= 50
        assert (check["answered"], check["wrong"], check["errors"]) == (check["checked"], 0, 0), (
            row.protocol, check["first_error"],
        )  # fmt: skip
        assert sum(step["wrong"] for step in doc["ladder"]) == 0
    assert (bench.work / "logs" / f"{layer.row}.log").exists()


def test_every_answer_matches_the_reference_model(
    quick_bench: tuple[dict[str, Any], Path],
) -> None:
    doc, _ = quick_bench
    for server in doc["servers"]:
        check = server["correctness"]
        assert check["checked"] >= 50
        assert (check["answered"], check["wrong"], check["errors"]) == (check["checked"], 0, 0), (
            server["name"], server["protocol"], check["first_error"],
        )  # fmt: skip
        # Under load too: answers may be late or missing past saturation, never wrong.
        assert sum(step["wrong"] for step in server["ladder"]) == 0, server["ladder"]


def test_export_torchserve_layout(settings: Settings, champion: Any, tmp_path: Path) -> None:
    result = roost(
        settings, "bench", "export-torchserve", "--version", champion.version,
        "--out", str(tmp_path), "--json", timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["model_version"] == champion.version
    props = (tmp_path / "config" / "config.properties").read_text()
    assert "model_store=/mnt/models/model-store" in props
    assert '"marName":"sentiment.mar"' in props
    with zipfile.ZipFile(tmp_path / "model-store" / "sentiment.mar") as mar:
        names = set(mar.namelist())
    shipped = {"roost_handler.py", "roost_kernel.py", "roost_model.py", "roost_tokenizer.py"}
    model_files = {"classifier.json", "vocab.json", "weights.pt", "MAR-INF/MANIFEST.json"}
    assert shipped | model_files <= names
