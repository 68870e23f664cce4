"""Stream to a roost server with Triton's gRPC client, unchanged, and print what came back.

Run in its own interpreter (tritonclient and kserve register the same protobuf package).
Three streams:

- tritonclient's ``start_stream``/``async_stream_infer`` (BYTES in ``raw_input_contents``):
  one request per text, then bad requests (an FP32 input, an unknown model), then one more
  text on the same stream;
- the raw ``ModelStreamInfer`` method with ``bytes_contents`` requests (roost's fast path),
  an undecodable message between them;
- a unary ``infer`` per text, for the labels the streams must match.
"""

from __future__ import annotations

import json
import queue
import sys
from typing import Any

import grpc
import numpy as np
import tritonclient.grpc as tgrpc
from tritonclient.grpc import service_pb2 as pb

WAIT_S = 60.0


def text_input(text: str) -> tgrpc.InferInput:
    tensor = tgrpc.InferInput("text", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([text.encode()], dtype=object))
    return tensor


def labels_of(result: Any) -> list[str]:
    return [x.decode() for x in result.as_numpy("label")]


def triton_stream(client: tgrpc.InferenceServerClient, texts: list[str]) -> dict[str, Any]:
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    for i, text in enumerate(texts):
        client.async_stream_infer("sentiment", [text_input(text)], request_id=f"t{i}")
    bad = tgrpc.InferInput("text", [1], "FP32")
    bad.set_data_from_numpy(np.array([1.0], dtype=np.float32))
    client.async_stream_infer("sentiment", [bad], request_id="bad-datatype")
    client.async_stream_infer("nope", [text_input(texts[0])], request_id="bad-model")
    got: dict[str, Any] = {"labels": {}, "errors": []}
    for _ in range(len(texts) + 2):
        result, error = answers.get(timeout=WAIT_S)
        if error is not None:
            got["errors"].append(str(error))
        else:
            got["labels"][result.get_response().id] = labels_of(result)
    # The stream is still open after the errors: one more request on it.
    client.async_stream_infer("sentiment", [text_input(texts[0])], request_id="after")
    result, error = answers.get(timeout=WAIT_S)
    got["after"] = None if error is not None else labels_of(result)
    client.stop_stream()
    return got


def raw_stream(target: str, texts: list[str]) -> dict[str, Any]:
    """bytes_contents requests (the fast path) with an undecodable message in between."""
    messages = []
    for i, text in enumerate(texts):
        request = pb.ModelInferRequest(model_name="sentiment", id=f"r{i}")
        tensor = request.inputs.add(name="text", datatype="BYTES", shape=[1])
        tensor.contents.bytes_contents.append(text.encode())
        messages.append(request.SerializeToString())
    messages.insert(1, b"\xff\xff\xff")
    with grpc.insecure_channel(target) as channel:
        call = channel.stream_stream(
            "/inference.GRPCInferenceService/ModelStreamInfer",
            request_serializer=None,
            response_deserializer=pb.ModelStreamInferResponse.FromString,
        )
        got: dict[str, Any] = {"labels": {}, "errors": []}
        for response in call(iter(messages), timeout=WAIT_S):
            if response.error_message:
                got["errors"].append(response.error_message)
            else:
                out = {o.name: o for o in response.infer_response.outputs}
                got["labels"][response.infer_response.id] = [
                    x.decode() for x in out["label"].contents.bytes_contents
                ]
    return got


def main(target: str, texts: list[str]) -> None:
    client = tgrpc.InferenceServerClient(target)
    unary = [labels_of(client.infer("sentiment", [text_input(t)])) for t in texts]
    out = {"unary": unary, "triton": triton_stream(client, texts), "raw": raw_stream(target, texts)}
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]))
