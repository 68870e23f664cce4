"""The fast-path layer rows of `roost bench --layers` without running servers: each switch is
a real serving setting that turns its layer off, and bench.md shows the layer rows and gains.

One layer row runs on a real server in tests/integration/test_bench.py (the others differ
only in their switch, checked here).
"""

from __future__ import annotations

from typing import Any

import pytest

from roost.bench import layers, report
from roost.config import ServingSettings, Settings

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("layer", layers.LAYERS, ids=lambda layer: layer.name)
def test_each_layer_switch_is_a_serving_setting_that_changes_it(
    layer: layers.Layer, monkeypatch: pytest.MonkeyPatch
) -> None:
    default = ServingSettings()
    for key, value in layer.env.items():
        monkeypatch.setenv(key, value)
    serving = Settings().serving
    for key in layer.env:
        section, field = key.removeprefix("ROOST_").lower().split("__")
        assert section == "serving", key
        assert getattr(serving, field) != getattr(default, field), key
    assert layer.row == f"roost-no-{layer.name}"
    assert layer.switch == " ".join(f"{k}={v}" for k, v in layer.env.items())


def test_every_layer_is_measured_over_rest_v2() -> None:
    assert [layer.name for layer in layers.LAYERS] == [
        "fast-path", "protocol-callbacks", "micro-batching", "uvloop",
    ]  # fmt: skip
    assert all("rest-v2" in layer.protocols for layer in layers.LAYERS)
    assert sum(len(layer.protocols) for layer in layers.LAYERS) == 5  # bench.json's rows


def _server(name: str, protocol: str, rps: float) -> dict[str, Any]:
    step = {"rate": rps, "achieved_rps": rps, "p50_ms": 1.0, "p99_ms": 5.0, "p999_ms": 6.0,
            "errors": 0, "wrong": 0, "requests": 100, "passed": True}  # fmt: skip
    return {
        "name": name, "protocol": protocol, "texts_per_request": 1,
        "max_rps_p99_50ms": rps, "max_seq_per_s_p99_50ms": rps, "cold_start_s": 1.5,
        "cold_starts_s": [1.5], "peak_rss_mb": 300.0, "cpu_s_per_1k": 0.5, "at_max": step,
        "correctness": {}, "config": {}, "ladder": [step],
    }  # fmt: skip


def test_bench_md_lists_every_layer_row_and_its_gain() -> None:
    servers = [_server("roost", "rest-v2", 2000.0), _server("roost", "grpc-v2", 1000.0)]
    for i, layer in enumerate(layers.LAYERS):
        servers += [_server(layer.row, p, 500.0 + 100 * i) for p in layer.protocols]
    result: dict[str, Any] = {
        "mode": "full", "model_name": "sentiment", "model_version": "3", "commit": "abc",
        "slo_p99_ms": 50.0, "servers": servers,
        "machine": {"cpus": 2, "cpu_model": "x", "load_avg_before": [0.1, 0, 0],
                    "load_avg_after": [0.2, 0, 0]},
        "raw_forward": {"batch_size": 64, "max_seq_per_s": 9000.0},
    }  # fmt: skip
    result["layers"] = layers.gains(result)
    assert len(result["layers"]) == 5
    table = report.markdown(result)
    assert "Fast-path layers" in table
    for layer in layers.LAYERS:
        for protocol in layer.protocols:
            assert f"| {layer.row} | {protocol} | 1 |" in table
            assert f"- {layer.row} {protocol}: " in table  # its ladder
    assert "| uvloop | `ROOST_SERVING__EVENT_LOOP=asyncio` | rest-v2 | 2,000 | 800 | 2.5x |" in (
        table
    )
    assert "| fast-path | `ROOST_SERVING__FAST_PATH=false` | grpc-v2 | 1,000 | 500 | 2.0x |" in (
        table
    )
