"""Triton's bidirectional ``ModelStreamInfer`` on a real `roost serve`, through tritonclient."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from roost.serving.local import LocalServer

pytestmark = pytest.mark.integration

TEXTS = [
    "I absolutely love this airline, best flight ever!",
    "My phone broke after two days, terrible support.",
    "The meeting moved to Thursday.",
    "worst. service. ever.",
]


def test_triton_stream_client_gets_the_unary_answers_and_errors_in_stream(
    model_server: LocalServer,
) -> None:
    probe = Path(__file__).with_name("triton_stream_probe.py")
    result = subprocess.run(
        [sys.executable, str(probe), model_server.grpc_target, json.dumps(TEXTS)],
        capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout)
    unary = out["unary"]
    assert len(unary) == len(TEXTS) and all(len(labels) == 1 for labels in unary)

    triton = out["triton"]
    assert triton["labels"] == {f"t{i}": unary[i] for i in range(len(TEXTS))}
    assert len(triton["errors"]) == 2, triton["errors"]
    assert any("INVALID_ARGUMENT" in e and "FP32" in e for e in triton["errors"]), triton
    assert any("NOT_FOUND" in e and "nope" in e for e in triton["errors"]), triton
    assert triton["after"] == unary[0]  # the stream outlived its errors

    raw = out["raw"]
    assert raw["labels"] == {f"r{i}": unary[i] for i in range(len(TEXTS))}
    assert len(raw["errors"]) == 1 and "not a valid ModelInferRequest" in raw["errors"][0]
