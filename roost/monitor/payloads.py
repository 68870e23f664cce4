"""What the monitor reads out of a logged request or response body (REST v1 or v2 JSON).

Requests: the texts (v1 ``instances``: strings or ``{"text": ...}``; v2: the first input's
``data``). Responses: predicted labels, confidences and the model version (v2 ``outputs``
named ``label`` / ``confidence``; v1 ``predictions`` as roost's predictor writes them).
A body of another shape yields no fields, and the event is still stored (raw) as it came.
"""

from __future__ import annotations

from typing import Any

from roost.monitor import events


def parse(kind: str, body: Any) -> dict[str, Any]:
    if kind == events.REQUEST_TYPE:
        texts = request_texts(body)
        return {} if texts is None else {"texts": texts}
    if kind == events.RESPONSE_TYPE:
        return response_fields(body)
    return {}


def _strings(values: Any) -> list[str] | None:
    if not isinstance(values, list):
        return None
    flat: list[Any] = []
    for v in values:
        flat.extend(v if isinstance(v, list) else [v])
    return flat if all(isinstance(v, str) for v in flat) else None


def request_texts(body: Any) -> list[str] | None:
    if not isinstance(body, dict):
        return None
    if "instances" in body:
        instances = body["instances"]
        if not isinstance(instances, list):
            return None
        texts: list[str] = []
        for item in instances:
            text = item.get("text") if isinstance(item, dict) else item
            if not isinstance(text, str):
                return None
            texts.append(text)
        return texts
    inputs = body.get("inputs")
    if isinstance(inputs, list) and inputs and isinstance(inputs[0], dict):
        return _strings(inputs[0].get("data"))
    return None


def response_fields(body: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if not isinstance(body, dict):
        return out
    if isinstance(body.get("model_version"), str) and body["model_version"]:
        out["version"] = body["model_version"]
    predictions = body.get("predictions")
    if isinstance(predictions, list):
        labels: list[str] = []
        confidences: list[float] = []
        for p in predictions:
            if not isinstance(p, dict) or not isinstance(p.get("label"), str):
                return out
            labels.append(p["label"])
            confidences.append(float(p.get("confidence", 0.0)))
        out.update(labels=labels, confidences=confidences)
        return out
    outputs = body.get("outputs")
    if isinstance(outputs, list):
        by_name = {o.get("name"): o.get("data") for o in outputs if isinstance(o, dict)}
        names = _strings(by_name.get("label"))
        scores = by_name.get("confidence")
        if names is not None:
            out["labels"] = names
        if isinstance(scores, list) and all(isinstance(c, int | float) for c in scores):
            out["confidences"] = [float(c) for c in scores]
    return out
