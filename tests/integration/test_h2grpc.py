"""The bench's HTTP/2 gRPC client (``roost.bench.h2grpc``) against a real `roost serve`.

Every answer it gets must be what ``grpc.aio``'s client gets from the same server for the
same request: unary calls, one request over HTTP/2's initial 64 KiB window (the server's
WINDOW_UPDATEs carry it), an error status, and ``ModelStreamInfer`` on one stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb

from roost.bench import h2grpc, loadgen, stream
from roost.serving import codec
from roost.serving.local import LocalServer

pytestmark = pytest.mark.integration

TEXTS = [
    "I absolutely love this airline, best flight ever!",
    "My phone broke after two days, terrible support.",
    "The meeting moved to Thursday.",
    "worst. service. ever.",
]


def no_check(response: Any, index: int) -> str | None:
    return None  # answers() puts its own


def labels_of(response: Any) -> list[str]:
    outputs = {o.name: o for o in response.outputs}
    return [b.decode() for b in outputs[codec.LABEL_OUTPUT].contents.bytes_contents]


def answers(sender: Any, count: int) -> tuple[dict[int, list[str]], loadgen.StepRecord]:
    """Send ``count`` requests at 50/s through ``sender``; the labels of each answer."""
    got: dict[int, list[str]] = {}

    def check(response: Any, index: int) -> str | None:
        got[index] = labels_of(response)
        return None

    sender.check = check

    async def step() -> loadgen.StepRecord:
        await sender.open()
        try:
            plan = loadgen.StepPlan(rate=50.0, duration_s=count / 50.0, timeout_s=60.0)
            return await loadgen.run_step(sender, plan)
        finally:
            await sender.close()

    loop = loadgen.new_event_loop()
    try:
        return got, loop.run_until_complete(step())
    finally:
        loop.close()


def requests(model: str, groups: Sequence[Sequence[str]]) -> list[Any]:
    return [
        pb.ModelInferRequest(
            model_name=model,
            inputs=[
                pb.ModelInferRequest.InferInputTensor(
                    name=codec.TEXT_INPUT,
                    datatype="BYTES",
                    shape=[len(texts)],
                    contents=pb.InferTensorContents(bytes_contents=[t.encode() for t in texts]),
                )
            ],
        )
        for texts in groups
    ]


def test_unary_and_stream_answers_are_grpc_aios(model_server: LocalServer) -> None:
    target, name = model_server.grpc_target, model_server.name
    # 1,000 texts in one request: about 50 KiB of texts plus framing, past no limit of
    # roost's but across several DATA frames; and 1,500: past the 64 KiB initial window.
    many = [TEXTS[i % 4] + f" #{i}" for i in range(1500)]
    groups = [[t] for t in TEXTS] + [many[:1000], many]
    reqs = requests(name, groups)
    count = 2 * len(reqs)

    h2, h2_record = answers(h2grpc.H2GrpcSender(target, reqs, no_check), count)
    aio, aio_record = answers(loadgen.GrpcSender(target, reqs, no_check), count)
    assert h2_record.error_count == 0, h2_record.first_error
    assert aio_record.error_count == 0, aio_record.first_error
    assert h2 == aio and len(h2) == count
    assert [len(h2[i]) for i in range(len(reqs))] == [1, 1, 1, 1, 1000, 1500]

    streamed, record = answers(h2grpc.H2GrpcStreamSender(target, reqs, no_check), count)
    assert record.error_count == 0, record.first_error
    assert streamed == aio
    aio_streamed, _ = answers(stream.GrpcStreamSender(target, reqs, no_check), count)
    assert aio_streamed == streamed


def test_an_error_reads_as_grpc_aios(model_server: LocalServer) -> None:
    target = model_server.grpc_target
    reqs = requests("nope", [TEXTS[:1]])
    _, h2 = answers(h2grpc.H2GrpcSender(target, reqs, no_check), 2)
    _, aio = answers(loadgen.GrpcSender(target, reqs, no_check), 2)
    assert h2.errors == aio.errors == {"grpc-NOT_FOUND": 2}
    assert h2.first_error == aio.first_error and "nope" in (h2.first_error or "")
    # In a stream, an error is an answer (Triton's error_message), and the stream goes on.
    _, streamed = answers(h2grpc.H2GrpcStreamSender(target, reqs, no_check), 2)
    assert streamed.errors == {"stream-error": 2}, streamed.first_error
    assert "nope" in (streamed.first_error or "")
