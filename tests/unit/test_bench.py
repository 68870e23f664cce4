"""Benchmark pieces without servers: the ladder, the answer checks, the TorchServe export's
config and handler, and the reports."""

from __future__ import annotations

import importlib
import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import orjson
import pytest
import torch

from roost.bench import ladder, loadgen, report, torchserve, workload
from roost.classifier import TextClassifier
from roost.model import build_model
from roost.tokenizer import Tokenizer

pytestmark = pytest.mark.unit


# -- ladder ---------------------------------------------------------------------------------
def climb(lad: ladder.Ladder, capacity: float, flaky: set[float] | None = None) -> list[float]:
    """Drive a ladder against a server that passes every rate up to ``capacity``."""
    tried: list[float] = []
    flaky = set(flaky or ())
    while (rate := lad.next_rate()) is not None:
        tried.append(rate)
        passed = rate <= capacity and rate not in flaky
        flaky.discard(rate)  # a flaky rate fails once only
        lad.record(rate, passed)
    return tried


def test_ladder_climbs_retries_and_bisects() -> None:
    lad = ladder.Ladder(100, 2.0, 1e6, max_steps=20, refine=2)
    tried = climb(lad, capacity=1000)
    assert tried[:5] == [100, 200, 400, 800, 1600]
    assert tried[5] == 1600  # a failure is run once more before it counts
    assert tried[6] == pytest.approx((800 * 1600) ** 0.5, abs=1)  # then bisection
    assert lad.best is not None and 800 <= lad.best <= 1000
    assert lad.worst is not None and lad.worst > 1000


def test_ladder_survives_a_stray_failure() -> None:
    lad = ladder.Ladder(100, 2.0, 1e6, max_steps=20, refine=0)
    tried = climb(lad, capacity=1000, flaky={400})
    assert tried[:4] == [100, 200, 400, 400] and lad.best == 800


def test_ladder_bounds() -> None:
    assert climb(ladder.Ladder(100, 2.0, 300, 20, 2), capacity=1e9) == [100, 200, 300]
    assert len(climb(ladder.Ladder(100, 2.0, 1e9, 3, 2), capacity=1e9)) == 3
    # Nothing passes above the floor: it steps down to min_rate and stops.
    lad = ladder.Ladder(100, 2.0, 1e9, 10, 2, retry_failures=False, min_rate=10)
    assert climb(lad, 5) == [100, 50, 25, 12] and lad.best is None


def test_ladder_steps_down_when_the_first_rate_fails() -> None:
    lad = ladder.Ladder(1000, 2.0, 1e9, 20, 1, retry_failures=False)
    tried = climb(lad, capacity=100)
    assert tried[:5] == [1000, 500, 250, 125, 62]  # halved until a rate passes
    assert tried[5] == 88  # then a bisection between the passing and the failing rate
    assert lad.best == 88


def test_ladder_start_follows_the_raw_forward() -> None:
    assert ladder.start_rate(500, 73459, 1) == 500  # a fast machine: the configured start
    assert ladder.start_rate(500, 19888, 32) == 62  # the slow machine's x32 ladder
    assert ladder.start_rate(500, 0, 1) == 500  # not measured: the configured start


def test_summarize_and_pass_rule() -> None:
    record = loadgen.StepRecord(loadgen.StepPlan(rate=100, duration_s=1.0))
    record.latencies_s = [0.001] * 99 + [0.2]
    step = ladder.summarize(record, slo_p99_ms=50, cpu_s=0.5, client_cpu_s=0.2)
    assert step.requests == 100 and step.errors == 0
    assert step.client_cpu_s_per_1k == pytest.approx(2.0)
    assert step.p50_ms == pytest.approx(1.0) and step.p999_ms > 150
    assert step.cpu_s_per_1k == pytest.approx(5.0)
    assert step.passed  # the p99 (interpolated) stays under 50 ms
    record.fail("timeout", "late")
    assert not ladder.summarize(record, 50, None).passed  # any error fails a step
    assert not ladder.passes(float("nan"), 0, 0, 50)
    assert ladder.max_passing([]) is None


# -- answers --------------------------------------------------------------------------------
def expected() -> workload.Expected:
    proba = np.array([[0.1, 0.2, 0.7], [0.49995, 0.5, 0.00005]], dtype=np.float32)
    return workload.Expected(["negative", "neutral", "positive"], proba)


def test_expected_check() -> None:
    exp = expected()
    assert exp.check(0, "positive", [0.1, 0.2, 0.7]) is None
    assert exp.check(2, "positive", None) is None  # indexes wrap around the sample
    assert "label" in str(exp.check(0, "negative", None))
    assert "probabilities" in str(exp.check(0, "positive", [0.2, 0.1, 0.7]))
    # A near tie: either of the tied labels is right.
    assert exp.check(1, "negative", None) is None and exp.check(1, "neutral", None) is None


def test_v2_bodies_and_check() -> None:
    texts = ["a", "b", "c", "d", "e"]
    bodies = workload.v2_bodies(texts, per_request=2)
    assert len(bodies) == 2
    assert orjson.loads(bodies[1])["inputs"][0]["data"] == ["c", "d"]
    exp = workload.Expected(["n", "p"], np.array([[0.9, 0.1], [0.2, 0.8]] * 2, dtype=np.float32))
    check = workload.check_v2(exp, per_request=2, groups=2)
    good = {"outputs": [{"name": "label", "data": ["n", "p"]},
                        {"name": "probabilities", "data": [0.9, 0.1, 0.2, 0.8]}]}  # fmt: skip
    assert check(200, orjson.dumps(good), 1) is None
    assert check(200, b"not json", 0) is not None
    bad = {"outputs": [{"name": "label", "data": ["p", "p"]}, good["outputs"][1]]}
    assert "label" in str(check(200, orjson.dumps(bad), 0))


# -- TorchServe export ----------------------------------------------------------------------
def test_config_properties_is_kserves_layout() -> None:
    text = torchserve.config_properties(
        "sentiment", "3", torchserve.Tuning(workers=2, batch_size=32, max_batch_delay_ms=4),
        torchserve.Addresses(),
    )  # fmt: skip
    props = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    assert props["inference_address"] == "http://0.0.0.0:8085"
    assert props["model_store"] == "/mnt/models/model-store"
    assert props["disable_token_authorization"] == "true"
    model = json.loads(props["model_snapshot"])["models"]["sentiment"]["3"]
    assert model["marName"] == "sentiment.mar"
    assert (model["minWorkers"], model["maxWorkers"]) == (2, 2)
    assert (model["batchSize"], model["maxBatchDelay"]) == (32, 4)


def test_archive_modules_do_not_import_roost(tmp_path: Path) -> None:
    for module in (*torchserve.SHIPPED_MODULES.values(), Path(torchserve.__file__).with_name(
        "ts_handler.py"
    )):  # fmt: skip
        torchserve.check_self_contained(module)
    leaky = tmp_path / "leaky.py"
    leaky.write_text("from roost.classifier import TextClassifier\n")
    with pytest.raises(Exception, match=r"roost\.classifier"):
        torchserve.check_self_contained(leaky)


@pytest.fixture
def handler_module(tmp_path: Path) -> Iterator[ModuleType]:
    """The handler as TorchServe loads it: a directory with the archive's files, no roost."""
    tok = Tokenizer.fit(["good day", "bad day", "okay then"], min_count=1)
    torch.manual_seed(0)
    module = build_model("ngram", vocab_size=tok.size, num_classes=3, embed_dim=8)
    classifier = TextClassifier(tok, module, ["negative", "neutral", "positive"], "ngram",
                                {"embed_dim": 8})  # fmt: skip
    classifier.save(tmp_path)
    for name, source in torchserve.SHIPPED_MODULES.items():
        shutil.copyfile(source, tmp_path / name)
    shutil.copyfile(Path(torchserve.__file__).with_name("ts_handler.py"), tmp_path / "hdl.py")
    sys.path.insert(0, str(tmp_path))
    try:
        yield importlib.import_module("hdl")
    finally:
        sys.path.remove(str(tmp_path))
        for name in ("hdl", "roost_kernel", "roost_model", "roost_tokenizer"):
            sys.modules.pop(name, None)


class FakeContext:
    def __init__(self, model_dir: Path) -> None:
        self.system_properties = {"model_dir": str(model_dir)}
        self.status: dict[int, int] = {}

    def set_response_status(self, code: int = 200, phrase: str = "", idx: int = 0) -> None:
        self.status[idx] = code


def test_handler_batches_requests_and_isolates_bad_ones(handler_module: ModuleType) -> None:
    context = FakeContext(Path(handler_module.__file__).parent)
    assert handler_module.handle(None, context) is None  # TorchServe's load call
    rows: list[Any] = [
        {"body": {"text": "good day"}},
        {"body": b'{"instances": ["bad day", {"text": "okay then"}]}'},
        {"data": "plain text body"},
        {"body": {"nope": 1}},
        {"body": ["a", "b"]},
        "okay then",  # TorchServe's kserve envelope passes instances themselves
    ]
    out = handler_module.handle(rows, context)
    assert len(out) == len(rows)
    assert set(out[0]) == {"label", "confidence", "probabilities"}
    assert len(out[1]["predictions"]) == 2
    assert isinstance(out[4], list) and len(out[4]) == 2
    assert context.status == {3: 400} and "error" in out[3]
    assert out[5]["label"] == out[1]["predictions"][1]["label"]


# -- reports --------------------------------------------------------------------------------
def fake_result() -> dict[str, Any]:
    step = {"rate": 100.0, "achieved_rps": 100.0, "p50_ms": 1.0, "p99_ms": 2.0,
            "p999_ms": 3.0, "errors": 0, "wrong": 0, "requests": 100, "cpu_s_per_1k": 0.1,
            "client_cpu_s_per_1k": 0.15, "client_lag_ms": 0.0, "passed": True,
            "first_error": None}  # fmt: skip
    server = {"name": "roost", "protocol": "rest-v2", "texts_per_request": 1,
              "max_rps_p99_50ms": 100.0, "max_seq_per_s_p99_50ms": 100.0, "cold_start_s": 1.2,
              "cold_starts_s": [1.2], "peak_rss_mb": 300.0, "cpu_s_per_1k": 0.1,
              "client_cpu_s_per_1k": 0.15, "at_max": step, "correctness": {}, "config": {},
              "ladder": [step]}  # fmt: skip
    return {
        "machine": {"cpus": 2, "cpu_model": "x", "load_avg_before": [0.1, 0, 0],
                    "load_avg_after": [0.2, 0, 0]},
        "commit": "abc", "model_name": "sentiment", "model_version": "3", "mode": "quick",
        "slo_p99_ms": 50.0, "raw_forward": {"max_seq_per_s": 1000.0, "batch_size": 64},
        "servers": [server, {**server, "name": "torchserve", "protocol": "rest"}],
        "targets": {"cold_start": {"value": 1.2, "target": 2.0, "met": True}},
        "cold_start_models_uri_s": None,
    }  # fmt: skip


def test_reports(tmp_path: Path) -> None:
    paths = report.write(fake_result(), tmp_path, "roost bench --quick")
    doc = json.loads(paths["json"].read_text())
    assert doc["command"] == "roost bench --quick"
    table = paths["table"].read_text()
    assert "| roost | rest-v2 | 1 | 100 |" in table and "torchserve" in table
    assert "| 0.100 | 0.150 | 300 |" in table  # server, then client CPU s / 1k requests
    # 2 CPUs / (0.1 + 0.15 ms a request): the bound roost's one-text row is under
    assert "rest-v2 0.100 + 0.150 = 0.250 (at most 8,000 req/s)" in table
    assert "torchserve" not in report.cpu_bound(doc)  # roost's rows only
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_profile_categories() -> None:
    from roost.bench.profile import categorize

    collapsed = "\n".join(
        [
            "Thread.run (threading.py:1);_worker (x);"
            "BatchEncoder.ids (roost/serving/kernel.py:60) 7",
            "Runner.run (asyncio/runners.py:118);_fast_finish (roost/serving/fastpath.py:240) 3",
            "Runner.run (asyncio/runners.py:118);on_headers_complete (uvicorn/x.py:1) 2",
            "Runner.run (asyncio/runners.py:118) 1",
            "weird 1",
        ]
    )
    counts = categorize(collapsed)
    assert counts["model: tokenise (BatchEncoder)"] == 7
    assert counts["answer: JSON encode, socket write"] == 3
    assert counts["HTTP: uvicorn/httptools callbacks"] == 2
    assert counts["event loop and transport (uvloop, C)"] == 1
    assert counts["other"] == 1


def test_raw_forward_leaves_out_batches_larger_than_the_sample() -> None:
    from roost.bench.measure import raw_forward

    rates = raw_forward(lambda texts: np.zeros((len(texts), 3)), ["a"] * 10, (1, 8, 64), 0.01)
    assert set(rates) == {1, 8}
    assert all(rate > 0 for rate in rates.values())


def test_targets_name_what_a_run_could_not_measure() -> None:
    """A TorchServe that passed no ladder step leaves its ratio unmeasured, with the reason."""
    from roost.bench.report import targets

    def server(name: str, protocol: str, rps: float) -> dict[str, object]:
        return {
            "name": name,
            "protocol": protocol,
            "texts_per_request": 1,
            "max_rps_p99_50ms": rps,
            "max_seq_per_s_p99_50ms": rps,
            "cold_start_s": 1.5,
        }

    result = {
        "servers": [
            server("roost", "rest-v2", 4000.0),
            server("torchserve", "rest", 0.0),
            server("roost+payload-logging", "rest-v2", 3800.0),
        ],
        "raw_forward": {"max_seq_per_s": 10000.0},
    }
    out = targets(result)
    assert out["roost_vs_torchserve"]["met"] is None
    assert "torchserve rest passed no ladder step" in out["roost_vs_torchserve"]["reason"]
    assert out["payload_logging_kept"] == {"value": 0.95, "target": 0.9, "met": True}
    assert out["cold_start"]["met"] is True


def test_the_colocated_receiver_row_is_reported_beside_the_targets() -> None:
    """The receiver on the same CPUs gets a line of its own (ratio and CPU per event)."""
    from roost.bench.report import logging_colocated

    def server(name: str, rps: float, **config: object) -> dict[str, object]:
        return {"name": name, "protocol": "rest-v2", "texts_per_request": 1,
                "max_rps_p99_50ms": rps, "config": config}  # fmt: skip

    plain = server("roost", 4000.0)
    here = server("roost+payload-logging+receiver", 3000.0, receiver_cpu_us_per_event=58.2)
    line = logging_colocated({"servers": [plain, server("roost+payload-logging", 3900.0), here]})
    assert line is not None
    assert "same CPUs / without, max req/s: 0.750" in line and "58.2 µs" in line
    assert logging_colocated({"servers": [plain]}) is None
    assert logging_colocated({"servers": [server("roost", 0.0), here]}) is None


# -- peers ----------------------------------------------------------------------------------
def test_peer_targets_take_each_peers_best_protocol_and_the_cold_start_floor() -> None:
    from roost.bench import peers

    def server(name: str, protocol: str, rps: float, **extra: object) -> dict[str, object]:
        return {"name": name, "protocol": protocol, "texts_per_request": 1,
                "max_rps_p99_50ms": rps, "max_seq_per_s_p99_50ms": rps, "cold_start_s": 1.5,
                **extra}  # fmt: skip

    result = {
        "servers": [
            server("roost", "rest-v2", 4000.0),
            server("mlserver", "rest-v2", 1000.0),
            server("mlserver", "grpc-v2", 2000.0),
            server("pytriton", "rest-v2", 0.0),
            server("bentoml", "rest", 0.0, unavailable="pip install failed: no wheel"),
        ],
        "cold_start_floor": {"seconds": 1.2},
    }
    out = peers.targets(result)
    assert out["roost_vs_mlserver"]["value"] == 2.0 and out["roost_vs_mlserver"]["met"] is True
    assert out["roost_vs_mlserver"]["peer_protocol"] == "grpc-v2"
    assert out["roost_vs_pytriton"]["met"] is None
    assert "passed no ladder step" in out["roost_vs_pytriton"]["reason"]
    assert out["roost_vs_bentoml"]["reason"] == "bentoml: pip install failed: no wheel"
    assert "roost_vs_kserve" not in out  # not in this run: no target
    assert out["cold_start_vs_floor"]["value"] == 1.25 and out["cold_start_vs_floor"]["met"]


def test_report_shows_an_unavailable_peer_with_its_reason(tmp_path: Path) -> None:
    result = fake_result()
    result["servers"].append(
        {**result["servers"][0], "name": "pytriton", "ladder": [], "at_max": None,
         "max_rps_p99_50ms": 0.0, "cold_start_s": 0.0, "unavailable": "did not start: x"}
    )  # fmt: skip
    result["cold_start_floor"] = {"seconds": 0.6, "command": "python -c 'import torch'"}
    paths = report.write(result, tmp_path, "roost bench --quick")
    table = paths["table"].read_text()
    assert "| pytriton | rest-v2 | 1 | not measured: did not start: x |" in table
    assert "cold start / floor: roost rest-v2 2.00x" in table


def test_peer_apps_do_not_import_roost() -> None:
    from roost.bench import peers

    for app in peers.APPS.glob("*.py"):
        torchserve.check_self_contained(app)  # raises if one does
    assert {"mlserver_runtime.py", "bentoml_service.py", "pytriton_server.py",
            "roost_peer.py"} <= {p.name for p in peers.APPS.glob("*.py")}  # fmt: skip


def test_grpc_check_reads_tritons_raw_output_contents() -> None:
    import struct

    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb

    from roost.bench import peers

    expected = workload.Expected(["neg", "pos"], np.array([[0.2, 0.8]], dtype=np.float32))
    check = peers.check_grpc_any(expected)

    def answer(label: bytes, probs: list[float]) -> Any:
        response = pb.ModelInferResponse(
            outputs=[pb.ModelInferResponse.InferOutputTensor(name="label", datatype="BYTES"),
                     pb.ModelInferResponse.InferOutputTensor(name="probabilities",
                                                             datatype="FP32")],
        )  # fmt: skip
        response.raw_output_contents.extend(
            [struct.pack("<I", len(label)) + label, np.array(probs, "<f4").tobytes()]
        )
        return response

    assert check(answer(b"pos", [0.2, 0.8]), 0) is None
    assert "label 'neg'" in (check(answer(b"neg", [0.8, 0.2]), 0) or "")


def test_a_peer_with_variants_reports_its_best_per_protocol_with_the_sweep(
    tmp_path: Path,
) -> None:
    """BentoML runs with adaptive batching and without; each protocol keeps the better."""
    from dataclasses import replace

    from roost.bench import peers
    from roost.bench.ladder import StepSummary
    from roost.bench.plan import Profile, ServerResult
    from roost.config import Settings

    def step(rate: float) -> StepSummary:
        return StepSummary(rate, rate, 5.0, 20.0, 30.0, 0, 0, 100, passed=True)

    rates = {"adaptive": 0.0, "off": 250.0}
    seen: list[dict[str, Any]] = []

    class Measured(peers.Peers):
        def _one(self, peer, staged, name, texts, expected):  # type: ignore[no-untyped-def]
            seen.append(dict(peer.config))
            rate = rates[peer.config["batching"]]
            result = ServerResult(peer.name, "rest", 1, 1.0, [1.0], dict(peer.config))
            result.ladder = [step(rate)] if rate else []
            return [result]

    cfg = Settings().bench
    bentoml = peers.PEERS["bentoml"]
    assert [v["batching"] for v in bentoml.variants] == ["adaptive", "off"]
    runner = Measured(cfg, tmp_path, Profile.of(cfg, quick=True), print, lambda t: None)
    (row,) = runner._sweep(replace(bentoml), tmp_path, "sentiment", [], None)  # type: ignore[arg-type]
    assert [c["batching"] for c in seen] == ["adaptive", "off"]
    assert row.config["batching"] == "off" and row.max_rps == 250.0
    assert row.config["sweep"] == [
        {"batching": "adaptive", "max_rps_p99_50ms": 0.0},
        {"batching": "off", "max_rps_p99_50ms": 250.0},
    ]


def test_a_torchserve_start_that_lost_a_port_is_recognised() -> None:
    from roost.bench.servers import _port_taken

    java = "java.io.IOException: Failed to bind to address 0.0.0.0/0.0.0.0:7070\n"
    assert _port_taken(java + "Caused by: java.net.BindException: Address already in use")
    assert _port_taken("at io.grpc.internal.ServerImpl.start(ServerImpl.java:185)")
    assert not _port_taken("ModuleNotFoundError: No module named 'roost_kernel'")
