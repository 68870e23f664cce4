"""Inference payload events: KServe's InferenceLogger wire format (CloudEvents 1.0 over HTTP).

KServe's logger agent (``pkg/logger/worker.go`` at kserve/kserve@aaac4e29) POSTs one event per
request and one per response in CloudEvents *binary* mode: the event's attributes are
``ce-*`` headers, the body is the raw JSON of the request or response, and a request and
its response share ``ce-id``. roost's predictor sends the same events (and, where the
receiver is roost's, may batch them in the CloudEvents *batched* mode:
``application/cloudevents-batch+json``, a JSON list of structured events), so one receiver
takes events from both.

This module only knows the format: names, building headers, and reading an event back out
of an HTTP request (pure functions; the receiver and the logger do the I/O).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

import orjson

SPEC_VERSION = "1.0"
REQUEST_TYPE = "org.kubeflow.serving.inference.request"
RESPONSE_TYPE = "org.kubeflow.serving.inference.response"
EVENT_TYPES = frozenset({REQUEST_TYPE, RESPONSE_TYPE})
# KServe's extension attributes (lower-case alphanumerics, as CloudEvents requires).
KSERVE_EXTENSIONS = ("inferenceservicename", "namespace", "component", "endpoint")
# roost's own extension: the model version that answered (KServe's agent cannot know it).
VERSION_EXTENSION = "modelversion"
BINARY_CONTENT = "application/json"
STRUCTURED_CONTENT = "application/cloudevents+json"
BATCH_CONTENT = "application/cloudevents-batch+json"
# The response header (and gRPC metadata key) that carries the event id to the client.
EVENT_ID_HEADER = "x-roost-event-id"
REQUIRED = ("id", "type", "source", "specversion")


class EventError(ValueError):
    """An event the receiver cannot accept; ``status`` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Event:
    """One CloudEvent, its data kept as the raw JSON bytes it arrived with."""

    id: str
    type: str
    source: str
    time: str
    data: bytes
    attributes: dict[str, str] = field(default_factory=dict)  # extensions, by name

    @property
    def model(self) -> str:
        return self.attributes.get("inferenceservicename") or "unknown"

    @property
    def version(self) -> str:
        return self.attributes.get(VERSION_EXTENSION) or ""


def now_rfc3339() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def binary_headers(event: Event) -> dict[str, str]:
    """The HTTP headers of ``event`` in binary mode (its body is ``event.data``)."""
    headers = {
        "content-type": BINARY_CONTENT,
        "ce-specversion": SPEC_VERSION,
        "ce-id": event.id,
        "ce-type": event.type,
        "ce-source": event.source,
        "ce-time": event.time,
    }
    for name, value in event.attributes.items():
        headers[f"ce-{name}"] = value
    return headers


def structured(event: Event) -> dict[str, Any]:
    """``event`` as a structured-mode JSON object, its data embedded without re-encoding."""
    doc: dict[str, Any] = {
        "specversion": SPEC_VERSION,
        "id": event.id,
        "type": event.type,
        "source": event.source,
        "time": event.time,
        "datacontenttype": BINARY_CONTENT,
        **event.attributes,
        "data": orjson.Fragment(event.data),
    }
    return doc


def batch_body(events: list[Event]) -> bytes:
    """A batched-mode body: a JSON list of structured events."""
    return orjson.dumps([structured(e) for e in events])


# -- reading events back (the receiver) -------------------------------------------------------
def _check(attrs: dict[str, Any]) -> None:
    for name in REQUIRED:
        value = attrs.get(name)
        if not isinstance(value, str) or not value:
            raise EventError(f"ce-{name}: required attribute missing")
    if attrs["specversion"] != SPEC_VERSION:
        raise EventError(f"ce-specversion: expected {SPEC_VERSION}, got {attrs['specversion']!r}")
    if attrs["type"] not in EVENT_TYPES:
        raise EventError(
            f"ce-type: unknown event type {attrs['type']!r} (expected {sorted(EVENT_TYPES)})"
        )


def _json_data(data: bytes, where: str) -> bytes:
    try:
        orjson.loads(data)
    except orjson.JSONDecodeError:
        raise EventError(f"{where}: not a JSON document") from None
    return data


def _extensions(attrs: dict[str, Any]) -> dict[str, str]:
    skip = {"specversion", "id", "type", "source", "time", "datacontenttype", "data"}
    return {k: str(v) for k, v in attrs.items() if k not in skip and v is not None}


def from_binary(headers: dict[str, str], body: bytes) -> Event:
    """An event from a binary-mode request (``headers`` with lower-case names)."""
    attrs = {k[3:]: v for k, v in headers.items() if k.startswith("ce-")}
    _check(attrs)
    ctype = headers.get("content-type", BINARY_CONTENT).split(";")[0].strip().lower()
    if ctype not in ("application/json", "text/json") and not ctype.endswith("+json"):
        raise EventError(f"content-type: expected application/json data, got {ctype!r}", 415)
    return Event(
        id=attrs["id"],
        type=attrs["type"],
        source=attrs["source"],
        time=attrs.get("time") or now_rfc3339(),
        data=_json_data(body, "body"),
        attributes=_extensions(attrs),
    )


def from_structured(doc: Any, where: str = "body") -> Event:
    """An event from one structured-mode JSON object."""
    if not isinstance(doc, dict):
        raise EventError(f"{where}: expected a CloudEvent JSON object")
    _check(doc)
    if "data" in doc:
        data = orjson.dumps(doc["data"])
    elif "data_base64" in doc:
        import base64

        try:
            raw = base64.b64decode(doc["data_base64"], validate=True)
        except ValueError:
            raise EventError(f"{where}.data_base64: not base64") from None
        data = _json_data(raw, f"{where}.data_base64")
    else:
        raise EventError(f"{where}.data: required (the inference request or response)")
    return Event(
        id=doc["id"],
        type=doc["type"],
        source=doc["source"],
        time=str(doc.get("time") or now_rfc3339()),
        data=data,
        attributes=_extensions(doc),
    )


def from_http(headers: dict[str, str], body: bytes) -> list[Event]:
    """The events of one HTTP request: binary, structured or batched content mode."""
    ctype = headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype in (STRUCTURED_CONTENT, BATCH_CONTENT):
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise EventError("body: not a JSON document") from None
        if ctype == STRUCTURED_CONTENT:
            return [from_structured(doc)]
        if not isinstance(doc, list):
            raise EventError("body: a batch is a JSON list of CloudEvents")
        return [from_structured(d, f"body[{i}]") for i, d in enumerate(doc)]
    if not any(k.startswith("ce-") for k in headers):
        raise EventError("ce-id: required attribute missing (no CloudEvents headers)")
    return [from_binary(headers, body)]
