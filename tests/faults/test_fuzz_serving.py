"""Fuzzed inputs against a real `roost serve`: REST v1, REST v2 and gRPC v2.

Hypothesis generates random and mutated bodies, headers, datatypes, shapes, encodings and
sizes, for a bounded number of examples per protocol (FAULTS_FUZZ_EXAMPLES, default 250;
not ROOST_*: tests/conftest.py clears those).
Every answer to a bad input must be a 4xx (gRPC: a client-error code): never a 5xx, never
a dead server; after every batch of junk a well-formed request still gets the answer it got
before the fuzzing began. Each test prints how many requests it tried and every distinct
failure it found (not only the first: there is no shrinking, the run is bounded).
"""

from __future__ import annotations

import base64
import json
import os
import struct
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from roost.serving.local import LocalServer

pytestmark = pytest.mark.faults

EXAMPLES = int(os.environ.get("FAULTS_FUZZ_EXAMPLES", "250"))
CHECK_EVERY = 25  # a well-formed request after every this many junk ones
TEXTS = ["I absolutely love this airline", "terrible support, never again", "see you at 9"]
V1 = "/v1/models/sentiment:predict"
V2 = "/v2/models/sentiment/infer"
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    phases=[Phase.generate],  # bounded: no shrinking, every failure is collected instead
    suppress_health_check=list(HealthCheck),
)


@dataclass
class Tally:
    """What one fuzz run tried and found."""

    protocol: str
    tried: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    failures: dict[str, str] = field(default_factory=dict)  # kind -> one example

    def fail(self, kind: str, example: str) -> None:
        self.failures.setdefault(kind, example[:400])

    def report(self) -> str:
        lines = [
            f"fuzz {self.protocol}: {self.tried} requests, {len(self.failures)} distinct failures, "
            f"answers {dict(sorted(self.statuses.items()))}"
        ]
        lines += [f"  FAIL {kind}: {example}" for kind, example in sorted(self.failures.items())]
        return "\n".join(lines)


# -- REST -------------------------------------------------------------------------------------

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=40),
)  # fmt: skip
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=20,
)
texts = st.text(max_size=60) | st.sampled_from(["", "\x00", "\ud800", "é" * 300, "x" * 5000])
datatypes = st.sampled_from(
    ["BYTES", "bytes", "FP32", "INT64", "BOOL", "UINT8", "FP16", "", "STRING", "\ud800"]
) | st.text(max_size=8)
shapes = st.lists(st.integers(-3, 2**40) | st.sampled_from([0, 1, 3, -1]), max_size=4) | json_values


@st.composite
def v2_inputs(draw: st.DrawFn) -> dict[str, Any]:
    tensor: dict[str, Any] = {
        "name": draw(st.sampled_from(["text", "input", ""]) | st.text(max_size=8)),
        "datatype": draw(datatypes),
        "shape": draw(shapes),
        "data": draw(st.lists(texts, max_size=4) | json_values),
    }
    for key in list(tensor):
        if draw(st.integers(0, 9)) == 0:
            del tensor[key]
    if draw(st.booleans()):
        tensor["parameters"] = draw(
            st.dictionaries(
                st.sampled_from(["binary_data_size", "content_type", "binary_data"])
                | st.text(max_size=6),
                json_scalars,
                max_size=3,
            )
        )
    return tensor


@st.composite
def v2_bodies(draw: st.DrawFn) -> dict[str, Any]:
    body: dict[str, Any] = {"inputs": draw(st.lists(v2_inputs(), max_size=3) | json_values)}
    if draw(st.booleans()):
        body["id"] = draw(texts | json_scalars)
    if draw(st.booleans()):
        names = st.sampled_from(["label", "x"]) | texts
        body["outputs"] = draw(
            st.lists(st.fixed_dictionaries({"name": names}), max_size=2) | json_values
        )
    if draw(st.booleans()):
        body["parameters"] = draw(json_values)
    return body


@st.composite
def v1_bodies(draw: st.DrawFn) -> Any:
    instance = texts | json_values | st.fixed_dictionaries({"text": texts | json_scalars})
    return draw(
        st.fixed_dictionaries({"instances": st.lists(instance, max_size=4) | json_values})
        | json_values
    )


def encode_json(value: Any) -> bytes:
    # surrogatepass: lone surrogates travel as the raw bytes a hostile client would send
    return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")


@st.composite
def mutated(draw: st.DrawFn, raw: bytes) -> bytes:
    """A valid body with bytes flipped, cut, repeated or inserted."""
    data = bytearray(raw)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "dup"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[at] = draw(st.integers(0, 255))
        elif op == "cut":
            data = data[:at]
        elif op == "insert":
            data[at:at] = draw(st.binary(max_size=8))
        else:
            data += data[at:]
    return bytes(data)


def binary_extension(draw: st.DrawFn) -> tuple[bytes, dict[str, str]]:
    """The binary tensor extension: a JSON header, then length-prefixed bytes."""
    items = draw(st.lists(st.binary(max_size=12), min_size=0, max_size=3))
    payload = b"".join(struct.pack("<I", len(i)) + i for i in items)
    payload = draw(st.just(payload) | mutated(payload or b"\x00"))
    size = draw(st.just(len(payload)) | st.integers(-5, 2**33) | st.sampled_from(["9", "x", 1.5]))
    header = encode_json(
        {"inputs": [{"name": "text", "shape": draw(shapes), "datatype": draw(datatypes),
                     "parameters": {"binary_data_size": size}}]}
    )  # fmt: skip
    declared = draw(st.just(len(header)) | st.integers(-3, len(header) + 20))
    return header + payload, {
        "content-type": "application/octet-stream",
        "inference-header-content-length": str(declared),
    }


@st.composite
def rest_requests(draw: st.DrawFn) -> tuple[str, bytes, dict[str, str]]:
    path = draw(st.sampled_from([V1, V2]))
    valid_v1 = encode_json({"instances": TEXTS})
    valid_v2 = encode_json(
        {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [3], "data": TEXTS}]}
    )
    kind = draw(st.sampled_from(["structured", "mutated", "random", "binary-ext"]))
    headers = {"content-type": "application/json"}
    if kind == "structured":
        body = encode_json(draw(v1_bodies() if path == V1 else v2_bodies()))
    elif kind == "mutated":
        body = draw(mutated(valid_v1 if path == V1 else valid_v2))
    elif kind == "random":
        body = draw(st.binary(max_size=300))
    else:
        path = V2
        body, headers = binary_extension(draw)
    if draw(st.integers(0, 4)) == 0:
        headers["content-type"] = draw(
            st.sampled_from(
                ["text/plain", "application/json; charset=latin-1", "multipart/form-data",
                 "application/octet-stream", "", "application/json; charset=utf-16"]
            )
        )  # fmt: skip
    if draw(st.integers(0, 9)) == 0:
        headers["content-encoding"] = draw(st.sampled_from(["gzip", "deflate", "br", "x"]))
    if draw(st.integers(0, 9)) == 0:
        body = body.decode("utf-8", "replace").encode("utf-16")
    return path, body, headers


@pytest.fixture(scope="module")
def http(model_server: LocalServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=model_server.http_url, timeout=30) as client:
        yield client


def rest_answer(client: httpx.Client) -> list[str]:
    r = client.post(V2, json={"inputs": [{"name": "text", "datatype": "BYTES", "shape": [3],
                                          "data": TEXTS}]})  # fmt: skip
    assert r.status_code == 200, r.text
    return [str(x) for x in r.json()["outputs"][0]["data"]]


def checker(tally: Tally, server: LocalServer, good: Callable[[], list[str]]) -> Callable[[], None]:
    expected = good()

    def check() -> None:
        if not server.process.alive():
            tally.fail("server died", server.process.log_tail(5))
            pytest.fail(tally.report())
        try:
            answer = good()
        except Exception as exc:  # report it with the rest
            tally.fail("well-formed request failed after junk", repr(exc))
            return
        if answer != expected:
            tally.fail("well-formed request answered differently", f"{answer} != {expected}")

    return check


def test_fuzz_rest(model_server: LocalServer, http: httpx.Client) -> None:
    tally = Tally("rest v1+v2")
    check = checker(tally, model_server, lambda: rest_answer(http))

    @FUZZ
    @given(rest_requests())
    def one(request: tuple[str, bytes, dict[str, str]]) -> None:
        path, body, headers = request
        tally.tried += 1
        try:
            r = http.post(path, content=body, headers=headers)
        except httpx.HTTPError as exc:
            tally.statuses["no answer"] += 1
            tally.fail(f"no answer ({type(exc).__name__})", _show(path, body, headers))
        else:
            tally.statuses[str(r.status_code)] += 1
            if r.status_code >= 500:
                tally.fail(f"{r.status_code} {_error_of(r)[:80]}", _show(path, body, headers))
            elif r.status_code >= 400 and "error" not in _json_or_empty(r):
                tally.fail(f"{r.status_code} without a JSON error", _show(path, body, headers))
        if tally.tried % CHECK_EVERY == 0:
            check()

    one()
    check()
    print("\n" + tally.report())
    assert not tally.failures, tally.report()


def _json_or_empty(r: httpx.Response) -> dict[str, Any]:
    try:
        value = r.json()
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _error_of(r: httpx.Response) -> str:
    return str(_json_or_empty(r).get("error") or r.text)


def _show(path: str, body: bytes, headers: dict[str, str]) -> str:
    return f"POST {path} {headers} body={body[:200]!r}"


# -- gRPC -------------------------------------------------------------------------------------

GRPC_CLIENT_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.UNIMPLEMENTED,
}  # fmt: skip
INFER = "/inference.GRPCInferenceService/ModelInfer"


@st.composite
def grpc_requests(draw: st.DrawFn) -> bytes:
    """A serialized ModelInferRequest, or bytes that only look like one."""
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb

    kind = draw(st.sampled_from(["structured", "raw-contents", "mutated", "random"]))
    valid = _valid_grpc()
    if kind == "random":
        return draw(st.binary(max_size=200))
    if kind == "mutated":
        return draw(mutated(valid.SerializeToString()))
    shape = draw(st.lists(st.integers(-3, 2**40) | st.sampled_from([0, 1, 3]), max_size=3))
    tensor = pb.ModelInferRequest.InferInputTensor(
        name=draw(st.sampled_from(["text", ""]) | st.text(max_size=6)),
        datatype=draw(st.sampled_from(["BYTES", "bytes", "FP32", "INT32", "BOOL", ""])
                      | st.text(max_size=6)),
        shape=shape,
    )  # fmt: skip
    contents = draw(st.sampled_from(["bytes", "fp32", "int", "none"]))
    if contents == "bytes":
        tensor.contents.bytes_contents.extend(draw(st.lists(st.binary(max_size=30), max_size=4)))
    elif contents == "fp32":
        tensor.contents.fp32_contents.extend(draw(st.lists(st.floats(width=32), max_size=4)))
    elif contents == "int":
        tensor.contents.int_contents.extend(
            draw(st.lists(st.integers(-(2**31), 2**31 - 1), max_size=4))
        )
    request = pb.ModelInferRequest(
        model_name=draw(st.sampled_from(["sentiment", "nope", ""])),
        model_version=draw(st.sampled_from(["", "1", "99"])),
        id=draw(st.text(max_size=10)),
        inputs=[tensor] * draw(st.integers(0, 2)),
    )
    if kind == "raw-contents":
        del tensor.contents.bytes_contents[:]
        request = pb.ModelInferRequest(model_name="sentiment", inputs=[tensor])
        items = draw(st.lists(st.binary(max_size=12), max_size=3))
        raw = b"".join(struct.pack("<I", len(i)) + i for i in items)
        request.raw_input_contents.append(draw(st.just(raw) | mutated(raw or b"\x00")))
    return bytes(request.SerializeToString())


def _valid_grpc() -> Any:
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb

    tensor = pb.ModelInferRequest.InferInputTensor(name="text", datatype="BYTES", shape=[3])
    tensor.contents.bytes_contents.extend(t.encode() for t in TEXTS)
    return pb.ModelInferRequest(model_name="sentiment", inputs=[tensor])


def test_fuzz_grpc(model_server: LocalServer) -> None:
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb

    tally = Tally("grpc v2")
    with grpc.insecure_channel(model_server.grpc_target) as channel:
        raw_call = channel.unary_unary(
            INFER, request_serializer=lambda b: b, response_deserializer=lambda b: b
        )

        def good() -> list[str]:
            answer = pb.ModelInferResponse.FromString(
                raw_call(_valid_grpc().SerializeToString(), timeout=30)
            )
            label = next(o for o in answer.outputs if o.name == "label")
            return [b.decode() for b in label.contents.bytes_contents] or [
                base64.b64encode(answer.raw_output_contents[0]).decode()
            ]

        check = checker(tally, model_server, good)

        @FUZZ
        @given(grpc_requests())
        def one(request: bytes) -> None:
            tally.tried += 1
            try:
                raw_call(request, timeout=30)
                tally.statuses["OK"] += 1
            except grpc.RpcError as exc:
                code = exc.code()
                tally.statuses[code.name] += 1
                if code not in GRPC_CLIENT_ERRORS:
                    tally.fail(
                        f"{code.name} {(exc.details() or '')[:80]}", f"request={request[:200]!r}"
                    )
            if tally.tried % CHECK_EVERY == 0:
                check()

        one()
        check()
    print("\n" + tally.report())
    assert not tally.failures, tally.report()
