"""What the serving code relies on inside uvicorn, KServe and grpcio (issue 9: one way through
the serving code). roost subclasses uvicorn's httptools protocol and KServe's servers and
servicer; an upgrade that changes them must fail here, loudly, not degrade in production.

The versions are pinned in constraints.txt; after an upgrade, re-check the names below
against the new sources, then move the pins.
"""

from __future__ import annotations

import inspect
import re
from importlib.metadata import version
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
PINNED = ("uvicorn", "httptools", "kserve", "grpcio", "starlette", "fastapi")


def pins() -> dict[str, str]:
    text = (ROOT / "constraints.txt").read_text()
    return {m[1].lower(): m[2] for m in re.finditer(r"^([A-Za-z0-9_.-]+)==(\S+)$", text, re.M)}


@pytest.mark.parametrize("package", PINNED)
def test_the_serving_dependencies_are_the_pinned_versions(package: str) -> None:
    pinned = pins().get(package)
    assert pinned, f"{package} is not pinned in constraints.txt"
    assert version(package) == pinned, (
        f"{package} {version(package)} installed, {pinned} pinned: re-check "
        "tests/unit/test_serving_internals.py's names against it before moving the pin"
    )


def test_uvicorn_httptools_protocol_is_what_the_fast_path_subclasses() -> None:
    from uvicorn.protocols.http import httptools_impl as impl

    from roost.config import ServingSettings
    from roost.serving import fastpath

    assert fastpath.guarded_internals_present(impl)
    assert fastpath.http_protocol(None, ServingSettings()) is not None
    for name in fastpath.GUARDED_METHODS:
        assert callable(getattr(impl.HttpToolsProtocol, name)), name
    params = set(inspect.signature(impl.RequestResponseCycle.__init__).parameters)
    assert params >= {"scope", "transport", "flow", "default_headers", "keep_alive", "on_response"}
    source = inspect.getsource(impl.RequestResponseCycle.__init__)
    for name in fastpath.GUARDED_CYCLE:
        assert f"self.{name} =" in source or f"self.{name}:" in source, name
    protocol_source = inspect.getsource(impl.HttpToolsProtocol)
    for attribute in ("self.cycle", "self.connections", "self.transport", "self.loop", "self.app"):
        assert attribute in protocol_source, attribute
    assert 200 in impl.STATUS_LINE and 408 in impl.STATUS_LINE


def test_kserve_pieces_the_runner_builds_on() -> None:
    from kserve import model_server
    from kserve.protocol.dataplane import DataPlane
    from kserve.protocol.grpc.server import GRPCServer
    from kserve.protocol.grpc.servicer import InferenceServicer
    from kserve.protocol.rest.server import RESTServer

    assert "model_registry" in dir(DataPlane) and inspect.iscoroutinefunction(DataPlane.ready)
    assert callable(RESTServer.create_application) and "config" in inspect.getsource(RESTServer)
    grpc_init = inspect.getsource(GRPCServer.__init__)
    for attribute in ("self._port", "self._kwargs", "self._server", "self._data_plane"):
        assert attribute in grpc_init, attribute
    for method in ("ModelInfer", "ModelReady", "ModelMetadata", "ServerReady",
                   "RepositoryModelLoad", "RepositoryModelUnload"):  # fmt: skip
        assert inspect.iscoroutinefunction(getattr(InferenceServicer, method)), method
    assert hasattr(model_server.args, "grpc_max_receive_message_length")
    assert model_server.app is not None


def test_grpc_method_handlers_can_be_rewrapped() -> None:
    import grpc

    handler = grpc.unary_unary_rpc_method_handler(lambda r, c: r, request_deserializer=bytes)
    wrapped = handler._replace(request_deserializer=None)
    assert wrapped.request_deserializer is None and wrapped.unary_unary is handler.unary_unary


def test_one_protocol_enum() -> None:
    from roost import client
    from roost.serving import codec

    assert codec.Protocol is client.Protocol
    assert client.Protocol.REST_V2 is client.Protocol.V2
    assert [p.label for p in client.Protocol] == ["rest-v1", "rest-v2", "grpc-v2"]


def test_kserves_generated_grpc_code_registers_what_roost_wraps() -> None:
    """grpcserver.add_services collects KServe's handlers through the generated
    ``add_..._to_server`` (its two registration calls), wraps them once and adds
    ModelStreamInfer as a registered method of the same service."""
    import asyncio

    from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as generated

    from roost.config import ServingSettings
    from roost.serving import grpcserver

    collect = grpcserver._Collect()
    generated.add_GRPCInferenceServiceServicer_to_server(
        generated.GRPCInferenceServiceServicer(), collect
    )
    assert {"ModelInfer", "ModelReady", "ServerReady", "ModelMetadata"} <= set(collect.methods)

    class Servicer(generated.GRPCInferenceServiceServicer):  # type: ignore[misc]
        async def infer(self, request: object, context: object, stream: bool) -> object:
            return request

    async def start() -> int:  # the real server accepts both registrations
        server = grpcserver.aio.server()
        grpcserver.add_services(server, Servicer(), ServingSettings())
        port: int = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        await server.stop(None)
        return port

    assert asyncio.run(start()) > 0
    stream = grpcserver.stream_method(Servicer(), 4)
    assert inspect.isasyncgenfunction(stream.stream_stream)  # grpc.aio's test for a generator
