"""What gRPC itself allows on this machine: roost's gRPC rows with the model taken out.

``python -m roost.bench.ceiling --port P --answers FILE --model-name NAME`` serves
``ModelInfer`` and ``ModelStreamInfer`` on grpc.aio as roost's server does (uvloop, roost's
server options, the same hand-written answer), but answers each request from a table the
real model filled beforehand (text -> probabilities): an answer costs the request's
protobuf parse, a dict lookup and the answer's bytes, no batching and no forward pass.

The bench loads it with the same client, ladder and SLO as roost's gRPC rows, in the same
run, as the row ``grpc.aio, no model``. Its max req/s is the most any server built on
grpc.aio can reach here with that client; roost's gRPC rows read against it (bench.md),
and the closing note of the gRPC work quotes it as what bounds them.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np

from roost import proc
from roost.bench import h2grpc, measure, report, stream, workload
from roost.bench.plan import Progress, ServerResult, Target
from roost.serving.wire import SERVICE, infer_response, stream_response

NAME = report.CEILING  # the row's name, which bench.md's lines name too


# -- the server (its own process) ----------------------------------------------------------
class Answers:
    """text -> the model's probabilities, as the bench computed them."""

    def __init__(self, model_name: str, labels: list[str], texts: list[str], proba: np.ndarray):
        self.model_name = model_name
        self.labels = labels
        self.rows = {t: proba[i : i + 1].astype(np.float32) for i, t in enumerate(texts)}

    def answer(self, request: Any) -> bytes:
        (text,) = request.inputs[0].contents.bytes_contents
        proba = self.rows[text.decode()]
        names = [self.labels[int(proba[0].argmax())]]
        return infer_response(self.model_name, None, request.id, self.labels, names, proba)

    @classmethod
    def load(cls, path: Path, model_name: str) -> Answers:
        data = np.load(path, allow_pickle=False)
        return cls(model_name, list(data["labels"]), list(data["texts"]), data["proba"])

    @staticmethod
    def save(path: Path, labels: list[str], texts: list[str], proba: np.ndarray) -> None:
        np.savez(path, labels=np.array(labels), texts=np.array(texts), proba=proba)


async def serve(port: int, answers: Answers) -> None:
    import grpc
    from grpc import aio
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb

    from roost.config import ServingSettings
    from roost.serving.grpcserver import server_options

    async def infer(request: Any, context: Any) -> bytes:
        return answers.answer(request)

    async def infer_stream(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[bytes]:
        async for request in requests:
            yield stream_response(answers.answer(request))

    async def live(request: Any, context: Any) -> bytes:
        return bytes(pb.ServerLiveResponse(live=True).SerializeToString())

    decode = pb.ModelInferRequest.FromString
    methods = {
        "ModelInfer": grpc.unary_unary_rpc_method_handler(infer, request_deserializer=decode),
        "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(
            infer_stream, request_deserializer=decode
        ),
        "ServerLive": grpc.unary_unary_rpc_method_handler(
            live, request_deserializer=pb.ServerLiveRequest.FromString
        ),
    }
    limits = {"grpc_max_send_message_length": 16 << 20, "grpc_max_receive_message_length": 16 << 20}
    server = aio.server(options=server_options(ServingSettings(), limits))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, methods),))
    server.add_registered_method_handlers(SERVICE, methods)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--answers", type=Path, required=True)
    parser.add_argument("--model-name", required=True)
    args = parser.parse_args(argv)
    answers = Answers.load(args.answers, args.model_name)
    import uvloop  # roost's server runs on uvloop too (serving.event_loop's default)

    uvloop.run(serve(args.port, answers))


# -- the bench's side ----------------------------------------------------------------------
def live_probe(target: str) -> Callable[[], bool]:
    def probe() -> bool:
        import grpc
        from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb

        with grpc.insecure_channel(target) as channel:
            call = channel.unary_unary(
                f"/{SERVICE}/ServerLive",
                request_serializer=pb.ServerLiveRequest.SerializeToString,
                response_deserializer=pb.ServerLiveResponse.FromString,
            )
            try:
                return bool(call(pb.ServerLiveRequest(), timeout=2.0).live)
            except grpc.RpcError:
                return False

    return probe


def rows(
    work: Path,
    name: str,
    texts: list[str],
    expected: workload.Expected,
    load: Callable[[Target], None],
    progress: Progress,
    timeout_s: float = 120.0,
) -> list[ServerResult]:
    """The ``grpc-v2`` and ``grpc-v2-stream`` rows of :data:`NAME`."""
    answers = work / "ceiling-answers.npz"
    Answers.save(answers, expected.labels, texts, np.asarray(expected.rows, dtype=np.float32))
    port = proc.free_port()
    argv = [
        sys.executable, "-m", "roost.bench.ceiling",
        "--port", str(port), "--answers", str(answers), "--model-name", name,
    ]  # fmt: skip
    started_at = time.perf_counter()
    server = proc.start_background(argv, work / "logs" / "ceiling.log")
    try:
        target = f"127.0.0.1:{port}"
        cold = measure.wait_ready(
            live_probe(target), started_at, timeout_s, server.alive, lambda: server.log_tail(8)
        )
        progress(f"{NAME} ready: cold start {cold:.2f}s")
        config = {
            "model": "none: answers looked up by text",
            "started_as": "python -m roost.bench.ceiling --port P --answers F --model-name N",
        }

        def result(protocol: str) -> ServerResult:
            return ServerResult(NAME, protocol, 1, cold, [cold], dict(config))

        requests = workload.grpc_requests(texts, name)
        targets = [
            Target(
                result("grpc-v2"), server.pid, len(texts),
                lambda: h2grpc.unary(target, requests, workload.check_grpc(expected)),
            ),
            Target(
                result(stream.STREAM_PROTOCOL), server.pid, len(texts),
                lambda: h2grpc.streaming(target, requests, workload.check_grpc(expected)),
            ),
        ]  # fmt: skip
        for t in targets:
            load(t)
        return [t.server for t in targets]
    finally:
        server.stop(timeout=10)


def ratios(result: dict[str, Any]) -> dict[str, Any]:
    """Each gRPC row of roost against the same protocol with no model (1.0: gRPC bounds it)."""
    servers = result["servers"]
    out: dict[str, Any] = {}
    for protocol in ("grpc-v2", stream.STREAM_PROTOCOL):
        got = {
            s["name"]: s["max_rps_p99_50ms"]
            for s in servers
            if s["protocol"] == protocol and s["texts_per_request"] == 1
        }
        if got.get(NAME) and "roost" in got:
            out[protocol] = {"roost": got["roost"], "no_model": got[NAME],
                             "roost_share": round(got["roost"] / got[NAME], 3)}  # fmt: skip
    rest = [
        s["max_rps_p99_50ms"]
        for s in servers
        if (s["name"], s["protocol"], s["texts_per_request"]) == ("roost", "rest-v2", 1)
    ]
    if rest and rest[0] > 0:
        for row in out.values():
            row["no_model_vs_roost_rest"] = round(row["no_model"] / rest[0], 3)
    return out


if __name__ == "__main__":
    main()
