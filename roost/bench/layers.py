"""Each fast-path layer's gain, in the same run: roost again with one layer switched off.

Every layer of roost's serving path has a switch that already exists in its settings
(environment variables of ``roost serve``), so the rows here run exactly what a user would
run with that switch. For each layer, the row without it is compared with the plain
``roost`` row of the same protocol: gain = max req/s with the layer / without it.

- ``fast-path``: ``serving.fast_path=false``: REST through KServe's FastAPI app and
  pydantic, gRPC through KServe's servicer (both protocols measured);
- ``protocol-callbacks``: ``serving.fast_path_protocol=false``: plain REST requests are
  answered by the ASGI fast path (:class:`roost.serving.fastpath.FastASGI`) instead of
  uvicorn's httptools callbacks;
- ``micro-batching``: ``serving.max_batch_size=1``: one forward pass per text;
- ``uvloop``: ``serving.event_loop=asyncio``: the stdlib event loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from roost.bench import h2grpc, loadgen, stream, workload
from roost.bench.plan import ServerResult, Target

if TYPE_CHECKING:
    from roost import registry
    from roost.bench.servers import Servers


@dataclass(frozen=True)
class Layer:
    name: str
    env: dict[str, str]
    protocols: tuple[str, ...]

    @property
    def row(self) -> str:
        return f"roost-no-{self.name}"

    @property
    def switch(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.env.items())


LAYERS = (
    Layer("fast-path", {"ROOST_SERVING__FAST_PATH": "false"}, ("rest-v2", "grpc-v2")),
    Layer("protocol-callbacks", {"ROOST_SERVING__FAST_PATH_PROTOCOL": "false"}, ("rest-v2",)),
    Layer("micro-batching", {"ROOST_SERVING__MAX_BATCH_SIZE": "1"}, ("rest-v2",)),
    Layer("uvloop", {"ROOST_SERVING__EVENT_LOOP": "asyncio"}, ("rest-v2",)),
)


def rows(
    servers: Servers,
    model: registry.LocalModel,
    name: str,
    version: str,
    texts: list[str],
    expected: workload.Expected,
    which: tuple[Layer, ...] = LAYERS,
) -> list[ServerResult]:
    """One server per layer of ``which`` (that layer off), loaded like the plain roost rows."""
    logs = servers.work / "logs"
    base = {"ROOST_SERVING__MODEL_ALIAS": model.alias} if model.alias else {}
    results: list[ServerResult] = []
    for layer in which:
        server, seconds = servers._start_roost(
            str(model.path), name, logs / f"{layer.row}.log", {**base, **layer.env},
            ["--model-version", version],
        )  # fmt: skip
        try:
            for protocol in layer.protocols:
                result = ServerResult(
                    layer.row, protocol, 1, seconds, [seconds],
                    {"layer_off": layer.name, "switch": layer.switch},
                )  # fmt: skip
                servers.load(Target(result, server.process.pid, len(texts),
                                    _sender(protocol, server, name, texts, expected)))  # fmt: skip
                results.append(result)
        finally:
            server.stop()
    return results


def _sender(
    protocol: str, server: Any, name: str, texts: list[str], expected: workload.Expected
) -> Any:
    if protocol == "grpc-v2":
        return lambda: h2grpc.unary(
            server.grpc_target, workload.grpc_requests(texts, name), workload.check_grpc(expected)
        )
    if protocol == stream.STREAM_PROTOCOL:
        return lambda: h2grpc.streaming(
            server.grpc_target, workload.grpc_requests(texts, name), workload.check_grpc(expected)
        )
    return lambda: loadgen.HttpSender(
        "127.0.0.1", server.http_port, f"/v2/models/{name}/infer", workload.v2_bodies(texts),
        workload.check_v2(expected, 1, len(texts)),
    )  # fmt: skip


def gains(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Per layer and protocol: max req/s with it (the plain roost row), without it, gain."""
    by_row = {(s["name"], s["protocol"], s["texts_per_request"]): s for s in result["servers"]}
    out = []
    for layer in LAYERS:
        for protocol in layer.protocols:
            with_it = by_row.get(("roost", protocol, 1))
            without = by_row.get((layer.row, protocol, 1))
            if with_it is None or without is None:
                continue
            on, off = with_it["max_rps_p99_50ms"], without["max_rps_p99_50ms"]
            out.append({
                "layer": layer.name, "switch": layer.switch, "protocol": protocol,
                "with_rps": on, "without_rps": off,
                "gain": round(on / off, 2) if off > 0 else None,  # None: off passed no step
            })  # fmt: skip
    return out


def markdown(result: dict[str, Any]) -> list[str]:
    """bench.md's section: the layer gains of this run (empty when no layer row ran)."""
    rows_ = result.get("layers") or []
    if not rows_:
        return []
    lines = [
        "",
        "Fast-path layers (same run; gain = max req/s with the layer / with it switched off):",
        "",
        "| layer | switched off by | protocol | with (req/s) | without (req/s) | gain |",
        "|---|---|---|---:|---:|---:|",
    ]
    for g in rows_:
        gain = "-" if g["gain"] is None else f"{g['gain']}x"
        lines.append(
            f"| {g['layer']} | `{g['switch']}` | {g['protocol']} | {g['with_rps']:,.0f} | "
            f"{g['without_rps']:,.0f} | {gain} |"
        )
    return lines
