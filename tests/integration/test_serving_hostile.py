"""The model server under a hostile client (issue 17): one test (or more) per finding.

Two real `roost serve` processes: the shared one with default settings (`model_server`), and
`hardened`, started here with the repository extension on behind a token and with short
timeouts and small limits, so that each limit is reached in a test's time.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest

from roost import proc
from roost.config import Settings
from roost.serving.local import LocalServer
from tests.conftest import serve_champion

pytestmark = pytest.mark.integration

TOKEN = "s3cret-operator-token"
MAX_TEXTS = 6000
ONE = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["fine"]}]}


@dataclass
class Hardened:
    server: LocalServer
    log: Path


@pytest.fixture(scope="module")
def hardened(
    settings: Settings, champion, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Hardened]:  # type: ignore[no-untyped-def]
    log = tmp_path_factory.mktemp("hardened") / "model-server.log"
    env = {
        "ROOST_SERVING__REPOSITORY_EXTENSION": "true",
        "ROOST_SERVING__REPOSITORY_TOKEN": TOKEN,
        "ROOST_SERVING__HEADER_TIMEOUT_S": "2",
        "ROOST_SERVING__BODY_TIMEOUT_S": "2",
        "ROOST_SERVING__KEEP_ALIVE_TIMEOUT_S": "30",
        "ROOST_SERVING__MAX_CONNECTIONS": "64",
        "ROOST_SERVING__GRPC_MAX_INFLIGHT": "4",
        "ROOST_SERVING__MAX_TEXTS_PER_REQUEST": str(MAX_TEXTS),
    }
    for server in serve_champion(settings, log, env=env, verbose=1):
        yield Hardened(server, log)


# -- helpers ---------------------------------------------------------------------------------
def stub(target: str):  # type: ignore[no-untyped-def]
    from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc

    channel = grpc.insecure_channel(target)
    return channel, pb_grpc.GRPCInferenceServiceStub(channel)


def pb():  # type: ignore[no-untyped-def]
    from kserve.protocol.grpc import grpc_predict_v2_pb2

    return grpc_predict_v2_pb2


def infer_request(texts: list[bytes] | None = None, **kw):  # type: ignore[no-untyped-def]
    m = pb()
    texts = texts if texts is not None else [b"hello there"]
    datatype = kw.pop("datatype", "BYTES")
    raw = kw.pop("raw", None)
    tensor = m.ModelInferRequest.InferInputTensor(
        name="text", datatype=datatype, shape=kw.pop("shape", [len(texts)])
    )
    if raw is None:
        tensor.contents.bytes_contents.extend(texts)
    request = m.ModelInferRequest(model_name=kw.pop("model", "sentiment"), inputs=[tensor], **kw)
    if raw is not None:
        request.raw_input_contents.extend(raw)
    return request


def grpc_error(call, *args, **kw) -> grpc.RpcError:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as info:
        call(*args, timeout=60, **kw)
    return info.value


def closed_by_server(sock: socket.socket) -> bool:
    """True once the server has closed ``sock`` (EOF or reset); never blocks."""
    sock.setblocking(False)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True


def bearer(token: str = TOKEN) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


# -- 1. the repository extension and readiness -------------------------------------------------
def test_repository_extension_is_off_by_default(model_server: LocalServer) -> None:
    with httpx.Client(base_url=model_server.http_url, timeout=30) as http:
        for action in ("unload", "load"):
            r = http.post(f"/v2/repository/models/sentiment/{action}")
            assert r.status_code == 404, r.text
            assert "repository extension is off" in r.json()["error"]
        assert http.get("/v2/health/ready").status_code == 200
        assert http.post("/v2/models/sentiment/infer", json=ONE).status_code == 200
    channel, api = stub(model_server.grpc_target)
    with channel:
        m = pb()
        err = grpc_error(
            api.RepositoryModelUnload, m.RepositoryModelUnloadRequest(model_name="sentiment")
        )
        assert err.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "repository extension is off" in (err.details() or "")
        assert api.ServerReady(m.ServerReadyRequest(), timeout=30).ready


def test_repository_needs_the_token_and_readiness_follows_the_model(hardened: Hardened) -> None:
    server = hardened.server
    m = pb()
    channel, api = stub(server.grpc_target)
    with httpx.Client(base_url=server.http_url, timeout=120) as http, channel:
        for headers in ({}, bearer("wrong"), {"authorization": TOKEN}):
            r = http.post("/v2/repository/models/sentiment/unload", headers=headers)
            assert r.status_code == 401, r.text
            assert "bearer token" in r.json()["error"]
        err = grpc_error(
            api.RepositoryModelUnload, m.RepositoryModelUnloadRequest(model_name="sentiment")
        )
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        assert http.get("/v2/health/ready").status_code == 200

        r = http.post("/v2/repository/models/nope/unload", headers=bearer())
        assert r.status_code == 404 and "nope" in r.json()["error"]
        err = grpc_error(
            api.RepositoryModelLoad,
            m.RepositoryModelLoadRequest(model_name="nope"),
            metadata=tuple(bearer().items()),
        )
        assert err.code() == grpc.StatusCode.NOT_FOUND and "nope" in (err.details() or "")

        r = http.post("/v2/repository/models/sentiment/unload", headers=bearer())
        assert r.status_code == 200 and r.json() == {"name": "sentiment", "unload": True}
        try:
            # Not ready anywhere a probe or a client looks, and inference says so.
            assert http.get("/v2/health/ready").status_code == 503
            assert http.get("/v2/models/sentiment/ready").status_code == 503
            assert http.get("/v2/health/live").status_code == 200
            r = http.post("/v2/models/sentiment/infer", json=ONE)
            assert r.status_code == 503 and "sentiment" in r.json()["error"]
            assert not api.ServerReady(m.ServerReadyRequest(), timeout=30).ready
            assert not api.ModelReady(m.ModelReadyRequest(name="sentiment"), timeout=30).ready
            err = grpc_error(api.ModelInfer, infer_request())
            assert err.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            loaded = api.RepositoryModelLoad(
                m.RepositoryModelLoadRequest(model_name="sentiment"),
                metadata=tuple(bearer().items()),
                timeout=120,
            )
        assert loaded.isLoaded
        assert http.get("/v2/health/ready").status_code == 200
        assert http.post("/v2/models/sentiment/infer", json=ONE).status_code == 200


# -- 2. a client's error is one info line --------------------------------------------------------
def test_client_errors_log_one_info_line_without_traceback(hardened: Hardened) -> None:
    before = hardened.log.read_text(errors="replace").count("\n")
    with httpx.Client(base_url=hardened.server.http_url, timeout=30) as http:
        fp32 = {"name": "t", "datatype": "FP32", "shape": [1], "data": [1.0]}
        short = {"name": "t", "datatype": "BYTES", "shape": [2], "data": ["x"]}
        bad = [
            http.post("/v2/models/sentiment/infer", json={"inputs": [fp32]}),
            http.post("/v2/models/sentiment/infer", json={"inputs": [short], "parameters": {}}),
            http.post("/v1/models/sentiment:predict", json={"instances": [1]}),
            http.post("/v1/models/nope:predict", json={"instances": ["x"]}),
        ]
    assert [r.status_code for r in bad] == [400, 400, 400, 404]
    channel, api = stub(hardened.server.grpc_target)
    with channel:
        assert grpc_error(api.ModelInfer, infer_request(datatype="FP32")).code() == (
            grpc.StatusCode.INVALID_ARGUMENT
        )

    def logged() -> list[dict] | None:
        lines = hardened.log.read_text(errors="replace").splitlines()[before:]
        events = [json.loads(x) for x in lines if x.startswith("{")]
        errors = [e for e in events if "client error" in e.get("msg", "")]
        return events if len(errors) >= 5 else None

    events = proc.wait_until(logged, timeout=30, what="5 client-error log lines")
    errors = [e for e in events if "client error" in e["msg"]]
    assert {e["level"] for e in errors} == {"info"}
    assert any("inputs[0].datatype: expected BYTES, got FP32" in e["msg"] for e in errors)
    assert all("exc" not in e and "Traceback" not in e["msg"] for e in events), [
        e for e in events if "exc" in e
    ][:1]


# -- 3. and 8. one input rule: lone surrogates, datatype case ----------------------------------
V2 = "/v2/models/sentiment/infer"
V1 = "/v1/models/sentiment:predict"
TENSOR = b'{"name":"text","shape":[1],"datatype":"BYTES","data":["hi"]}'
SURROGATE_BODIES = [
    (V2, b'{"id":"\\ud800","inputs":[' + TENSOR + b"]}", "id"),
    (V2, b'{"inputs":[' + TENSOR.replace(b'"BYTES"', b'"\\ud800"') + b"]}", "inputs[0].datatype"),
    (V2, b'{"inputs":[' + TENSOR.replace(b'"text"', b'"\\udfff"') + b"]}", "inputs[0].name"),
    (V2, b'{"inputs":[' + TENSOR.replace(b'"hi"', b'"a\\ud83d"') + b"]}", "inputs[0].data[0]"),
    (V1, b'{"instances":["ok","\\ud800"]}', "instances[1]"),
    (V1, b'{"instances":[{"text":"\\udc00x"}]}', "instances[0].text"),
]


@pytest.mark.parametrize(("path", "body", "field"), SURROGATE_BODIES)
def test_lone_surrogates_are_400_naming_the_field(
    model_server: LocalServer, path: str, body: bytes, field: str
) -> None:
    with httpx.Client(base_url=model_server.http_url, timeout=30) as http:
        r = http.post(path, content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
        assert r.json()["error"].startswith(f"{field}: not valid Unicode"), r.json()
        # A valid pair is text like any other.
        ok = http.post(
            path,
            content=body.replace(b"\\ud800", b"\\ud83d\\ude00")
            .replace(b"\\udfff", b"text")
            .replace(b"a\\ud83d", b"a\\ud83d\\ude00")
            .replace(b"\\udc00", b"x"),
            headers={"content-type": "application/json"},
        )
        assert ok.status_code in (200, 400), ok.text  # 400 only for the datatype one
        if b'"datatype":"\\ud800"' not in body:
            assert ok.status_code == 200, ok.text


def test_one_rule_for_every_protocol(model_server: LocalServer) -> None:
    body = {"inputs": [{"name": "text", "datatype": "bytes", "shape": [1], "data": ["hi"]}]}
    with httpx.Client(base_url=model_server.http_url, timeout=30) as http:
        rest = http.post("/v2/models/sentiment/infer", json=body)
    channel, api = stub(model_server.grpc_target)
    with channel:
        answer = api.ModelInfer(infer_request([b"hi"], datatype="bytes"), timeout=30)
        assert rest.status_code == 200, rest.text
        rest_label = next(o for o in rest.json()["outputs"] if o["name"] == "label")["data"]
        assert [x.decode() for x in answer.outputs[0].contents.bytes_contents] == rest_label
        # A surrogate encoded as UTF-8 bytes (CESU) is not UTF-8: INVALID_ARGUMENT, like REST's 400.
        err = grpc_error(api.ModelInfer, infer_request([b"\xed\xa0\x80"]))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "inputs[0].data[0]" in (err.details() or "")


# -- 4. and 5. the binary tensor extension; keep-alive after an error ------------------------------
def binary(header: dict, data: bytes, length: str | None = None) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header).encode()
    return head + data, {
        "content-type": "application/octet-stream",
        "inference-header-content-length": length if length is not None else str(len(head)),
    }


def bytes_input(shape: list, size: object) -> dict:
    return binary_input("BYTES", shape, size)


def binary_input(datatype: str, shape: list, size: object) -> dict:
    parameters = {"binary_data_size": size}
    return {
        "inputs": [{"name": "text", "shape": shape, "datatype": datatype, "parameters": parameters}]
    }


HELLO = b"\x05\x00\x00\x00hello"
MALFORMED_BINARY = {
    "issue example (3 elements declared, 1 sent)": binary(bytes_input([3], 9), HELLO),
    "size larger than the body": binary(bytes_input([1], 99), HELLO),
    "size smaller than the data": binary(bytes_input([1], 4), HELLO),
    "negative size": binary(bytes_input([1], -1), HELLO),
    "non-integer size": binary(bytes_input([1], "9"), HELLO),
    "float size": binary(bytes_input([1], 9.5), HELLO),
    "length prefix too long": binary(bytes_input([1], 9), b"\xff\x00\x00\x00hello"),
    "length prefix cut short": binary(bytes_input([1], 2), b"\x05\x00"),
    "shape [-1]": binary(bytes_input([-1], 9), HELLO),
    "FP32 with 7 bytes": binary(binary_input("FP32", [2], 7), b"\x00" * 7),
    "non-UTF-8 payload": binary(bytes_input([1], 6), b"\x02\x00\x00\x00\xff\xfe"),
    "header length not a number": binary(bytes_input([1], 9), HELLO, length="x9"),
    "header length past the body": binary(bytes_input([1], 9), HELLO, length="100000"),
    "header length zero": binary(bytes_input([1], 9), HELLO, length="0"),
    "header not JSON": (
        b"{nope" + HELLO,
        {"content-type": "application/octet-stream", "inference-header-content-length": "5"},
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED_BINARY))
def test_malformed_binary_extension_is_400(model_server: LocalServer, case: str) -> None:
    body, headers = MALFORMED_BINARY[case]
    with httpx.Client(base_url=model_server.http_url, timeout=30) as http:
        r = http.post("/v2/models/sentiment/infer", content=body, headers=headers)
    assert r.status_code == 400, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert r.json()["error"]


def test_a_well_formed_binary_request_is_answered(model_server: LocalServer) -> None:
    body, headers = binary(bytes_input([2], 14), b"\x02\x00\x00\x00hi\x04\x00\x00\x00meh!")
    with httpx.Client(base_url=model_server.http_url, timeout=30) as http:
        r = http.post("/v2/models/sentiment/infer", content=body, headers=headers)
    assert r.status_code == 200, r.text
    label = next(o for o in r.json()["outputs"] if o["name"] == "label")
    assert label["shape"] == [2]


def test_keep_alive_survives_every_error(model_server: LocalServer) -> None:
    """After an error the same connection answers, or the error said `Connection: close`."""
    good = json.dumps(ONE).encode()
    cases = [(b, h) for b, h in MALFORMED_BINARY.values()] + [
        (body, {"content-type": "application/json"}) for _, body, _ in SURROGATE_BODIES
    ]
    conn = http.client.HTTPConnection("127.0.0.1", model_server.http_port, timeout=30)
    try:
        for body, headers in cases:
            conn.request("POST", "/v2/models/sentiment/infer", body=body, headers=headers)
            response = conn.getresponse()
            response.read()
            assert response.status < 500, (response.status, headers)
            if response.will_close:
                assert response.getheader("connection", "").lower() == "close"
                conn.close()
                continue
            conn.request("POST", "/v2/models/sentiment/infer", body=good,
                         headers={"content-type": "application/json"})  # fmt: skip
            again = conn.getresponse()
            assert again.status == 200, again.read()
            again.read()
    finally:
        conn.close()


# -- 6. gRPC: bad raw contents, undecodable messages, repository NOT_FOUND ----------------------
@pytest.mark.parametrize(
    "raw", [[b"\x05\x00"], [b"\xff\xff\xff\x7fab"], [b"\x01\x00\x00\x00a\x00"]]
)
def test_grpc_bad_raw_input_contents_is_invalid_argument(
    model_server: LocalServer, raw: list[bytes]
) -> None:
    channel, api = stub(model_server.grpc_target)
    with channel:
        err = grpc_error(api.ModelInfer, infer_request(raw=raw, shape=[1]))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
        assert "inputs[0]" in (err.details() or "")
        ok = api.ModelInfer(infer_request(raw=[b"\x02\x00\x00\x00hi"], shape=[1]), timeout=30)
        assert ok.model_name == "sentiment"


def test_grpc_undecodable_message_is_invalid_argument(model_server: LocalServer) -> None:
    with grpc.insecure_channel(model_server.grpc_target) as channel:
        raw_call = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        for garbage in (b"\xff\xff\xff\xff", b"\x0a\x05ab", b"\x12\xff\x01"):
            err = grpc_error(raw_call, garbage)
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (garbage, err)
            assert "ModelInfer" in (err.details() or "")


# -- 7. versioned paths, :explain, gRPC model_version ---------------------------------------
def test_versions(model_server: LocalServer, champion) -> None:  # type: ignore[no-untyped-def]
    served = champion.version
    with httpx.Client(base_url=model_server.http_url, timeout=30) as http:
        r = http.post(f"/v2/models/sentiment/versions/{served}/infer", json=ONE)
        assert r.status_code == 200, r.text
        assert r.json()["model_version"] == served
        assert http.get(f"/v2/models/sentiment/versions/{served}/ready").json()["ready"] is True
        assert http.get(f"/v2/models/sentiment/versions/{served}").status_code == 200
        for path in ("/infer", "/ready", ""):
            method = "POST" if path == "/infer" else "GET"
            r = http.request(
                method,
                f"/v2/models/sentiment/versions/99{path}",
                json=ONE if method == "POST" else None,
            )
            assert r.status_code == 404, r.text
            assert "version 99 not found" in r.json()["error"]
        r = http.post("/v1/models/sentiment:explain", json={"instances": ["x"]})
        assert r.status_code == 404 and "explain" in r.json()["error"]
    channel, api = stub(model_server.grpc_target)
    with channel:
        err = grpc_error(api.ModelInfer, infer_request(model_version="99"))
        assert err.code() == grpc.StatusCode.NOT_FOUND and "99" in (err.details() or "")
        assert (
            api.ModelInfer(infer_request(model_version=served), timeout=30).model_version == served
        )
        err = grpc_error(api.ModelReady, pb().ModelReadyRequest(name="sentiment", version="99"))
        assert err.code() == grpc.StatusCode.NOT_FOUND


# -- 9. bounded connections ------------------------------------------------------------------
def open_idle(port: int, count: int) -> list[socket.socket]:
    socks = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        socks.append(s)
    return socks


def test_idle_slow_and_short_connections_are_closed(hardened: Hardened) -> None:
    server = hardened.server
    flood = open_idle(server.http_port, 300)  # max_connections is 64
    slow = socket.create_connection(("127.0.0.1", server.http_port))
    slow.sendall(b"POST /v2/models/sentiment/infer HTTP/1.1\r\nhost: x\r\n")
    short = socket.create_connection(("127.0.0.1", server.http_port))
    short.sendall(
        b"POST /v2/models/sentiment/infer HTTP/1.1\r\nhost: x\r\n"
        b'content-type: application/json\r\ncontent-length: 100\r\n\r\n{"inputs"'
    )
    everyone = [*flood, slow, short]
    try:
        # New clients are served while the flood is open.
        with httpx.Client(base_url=server.http_url, timeout=30) as http:
            assert http.post("/v2/models/sentiment/infer", json=ONE).status_code == 200
            assert http.get("/v2/health/live").status_code == 200
        proc.wait_until(
            lambda: all(closed_by_server(s) for s in everyone),
            timeout=60,
            describe=lambda: f"{sum(not closed_by_server(s) for s in everyone)} still open",
            what="the server to close idle, slow and short connections",
        )
    finally:
        for s in everyone:
            s.close()


def test_idle_grpc_connections_are_closed(hardened: Hardened) -> None:
    server = hardened.server
    flood = open_idle(server.grpc_port, 200)
    try:
        channel, api = stub(server.grpc_target)
        with channel:
            assert api.ModelInfer(infer_request(), timeout=30).model_name == "sentiment"
        proc.wait_until(
            lambda: all(closed_by_server(s) for s in flood),
            timeout=60,
            describe=lambda: f"{sum(not closed_by_server(s) for s in flood)} still open",
            what="the gRPC server to close connections that never sent a preface",
        )
    finally:
        for s in flood:
            s.close()


# -- 10. big legal batches do not starve small requests ------------------------------------------
def test_big_requests_do_not_starve_small_ones(hardened: Hardened) -> None:
    url = hardened.server.http_url
    texts = [
        f"the flight {i} was late again and the staff were rude about it" for i in range(MAX_TEXTS)
    ]
    with httpx.Client(base_url=url, timeout=120) as http:
        over = http.post("/v1/models/sentiment:predict", json={"instances": [*texts, "x"]})
        assert over.status_code == 413, over.text
        assert "max_texts_per_request" in over.json()["error"]

        def timed(method: str, path: str, **kw: object) -> float:
            start = time.perf_counter()
            r = http.request(method, path, **kw)  # type: ignore[arg-type]
            assert r.status_code == 200, r.text
            return time.perf_counter() - start

        baseline = [timed("POST", "/v2/models/sentiment/infer", json=ONE) for _ in range(10)]
        big_body = {
            "inputs": [{"name": "text", "datatype": "BYTES", "shape": [MAX_TEXTS], "data": texts}]
        }
        big_times: list[float] = []
        stop = threading.Event()

        def big_client() -> None:
            with httpx.Client(base_url=url, timeout=300) as own:
                while not stop.is_set():
                    start = time.perf_counter()
                    r = own.post("/v2/models/sentiment/infer", json=big_body)
                    assert r.status_code == 200
                    big_times.append(time.perf_counter() - start)

        threads = [threading.Thread(target=big_client, daemon=True) for _ in range(3)]
        for t in threads:
            t.start()
        try:
            proc.wait_until(lambda: len(big_times) >= 1, timeout=120, what="a big request")
            small, live = [], []
            while len(big_times) < 6:
                small.append(timed("POST", "/v2/models/sentiment/infer", json=ONE))
                live.append(timed("GET", "/v2/health/live"))
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=300)
    big = statistics.median(big_times)
    small_p90 = statistics.quantiles(small, n=10)[-1] if len(small) >= 10 else max(small)
    report = (
        f"baseline median {statistics.median(baseline) * 1000:.1f} ms, "
        f"small p90 {small_p90 * 1000:.1f} ms, live max {max(live) * 1000:.1f} ms, "
        f"big median {big * 1000:.0f} ms"
    )
    print(report)
    # Starved, a small request waits for whole big ones (~ the big latency); shared, for a slice.
    assert small_p90 < big / 3, report
    assert max(live) < big / 2, report


# -- 11. gRPC under overload -------------------------------------------------------------------
def test_grpc_overload_is_resource_exhausted_with_a_retry_hint(hardened: Hardened) -> None:
    from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc

    request = infer_request([f"text number {i} is here".encode() for i in range(64)])

    async def flood() -> list[tuple[grpc.StatusCode, dict[str, str]]]:
        async with grpc.aio.insecure_channel(hardened.server.grpc_target) as channel:
            api = pb_grpc.GRPCInferenceServiceStub(channel)

            async def one() -> tuple[grpc.StatusCode, dict[str, str]]:
                call = api.ModelInfer(request, timeout=120)
                try:
                    await call
                except grpc.aio.AioRpcError as exc:
                    return exc.code(), dict(exc.trailing_metadata() or ())
                return grpc.StatusCode.OK, {}

            return list(await asyncio.gather(*(one() for _ in range(200))))

    outcomes = asyncio.run(flood())
    codes = [code for code, _ in outcomes]
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, set(codes)
    assert grpc.StatusCode.OK in codes and grpc.StatusCode.RESOURCE_EXHAUSTED in codes
    shed = [meta for code, meta in outcomes if code is grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert all(meta.get("grpc-retry-pushback-ms") == "100" for meta in shed), shed[:1]
