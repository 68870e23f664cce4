"""roost's TorchServe handler: runs inside TorchServe's Python worker, not in roost.

The model archive carries everything it imports besides torch and numpy: the classifier files
(``classifier.json``, ``vocab.json``, ``weights.pt``) and three roost modules copied under
flat names (``roost_tokenizer.py``, ``roost_model.py``, ``roost_kernel.py``), so the same
``.mar`` runs on a plain ``torchserve`` and in KServe's ``kserve-torchserve`` image. The batch
kernel is the one roost's predictor runs, so a benchmark compares the servers, not the code.

Each request in TorchServe's batch may be (JSON unless noted):

- ``{"text": "..."}`` or a ``text/plain`` body: one text -> one prediction object;
- ``{"instances": [...]}`` (KServe v1, strings or ``{"text": ...}``) -> ``{"predictions": [...]}``;
- a list of strings -> a list of prediction objects.

A prediction object is ``{"label", "confidence", "probabilities": {label: p}}``, as roost's
REST v1. The texts of every request in the batch are classified in one forward pass; a bad
request gets HTTP 400 on its own and does not fail the others.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

# Shipped next to this file in the .mar (see roost.bench.torchserve.archive).
import roost_kernel
import roost_model
import roost_tokenizer
import torch

THREADS_ENV = "ROOST_TS_THREADS"


class BadRequest(ValueError):
    """One request of the batch cannot be read."""


class RoostHandler:
    """TorchServe custom service: ``initialize(context)`` then ``handle(data, context)``."""

    def __init__(self) -> None:
        self.kernel: Any = None
        self.labels: list[str] = []
        self.initialized = False

    def initialize(self, context: Any) -> None:
        model_dir = Path(context.system_properties["model_dir"])
        # TorchServe's performance guide: several workers with one torch thread each.
        torch.set_num_threads(int(os.environ.get(THREADS_ENV, "1")))
        manifest = json.loads((model_dir / "classifier.json").read_text())
        tokenizer = roost_tokenizer.Tokenizer.from_dict(
            json.loads((model_dir / "vocab.json").read_text())
        )
        self.labels = list(manifest["labels"])
        module = roost_model.build_model(
            manifest["arch"],
            vocab_size=int(manifest["vocab_size"]),
            num_classes=len(self.labels),
            **manifest["hparams"],
        )
        state = torch.load(model_dir / "weights.pt", map_location="cpu", weights_only=True)
        module.load_state_dict(state)
        self.kernel = roost_kernel.Kernel(
            module,
            roost_kernel.encoder_for(tokenizer, roost_tokenizer.TOKEN_RE),
            len(self.labels),
        )
        self.kernel.predict_proba(["warm-up"])
        self.initialized = True

    def handle(self, data: list[Any], context: Any) -> list[Any]:
        parsed: list[tuple[str, list[str]] | BadRequest] = []
        for row in data:
            try:
                parsed.append(read_request(row))
            except BadRequest as exc:
                parsed.append(exc)
        texts = [t for item in parsed if not isinstance(item, BadRequest) for t in item[1]]
        proba = self.kernel.predict_proba(texts).tolist()
        out: list[Any] = []
        offset = 0
        for idx, item in enumerate(parsed):
            if isinstance(item, BadRequest):
                if context is not None:
                    context.set_response_status(400, str(item), idx)
                out.append({"error": str(item)})
                continue
            kind, request_texts = item
            rows = proba[offset : offset + len(request_texts)]
            offset += len(request_texts)
            predictions = [self._prediction(row) for row in rows]
            if kind == "one":
                out.append(predictions[0])
            elif kind == "instances":
                out.append({"predictions": predictions})
            else:
                out.append(predictions)
        return out

    def _prediction(self, row: list[float]) -> dict[str, Any]:
        best = max(range(len(row)), key=row.__getitem__)
        return {
            "label": self.labels[best],
            "confidence": row[best],
            "probabilities": dict(zip(self.labels, row, strict=True)),
        }


def read_request(row: Any) -> tuple[str, list[str]]:
    """(kind, texts) of one request of TorchServe's batch; kind: one, instances or list."""
    body = row
    if isinstance(row, dict) and ("data" in row or "body" in row):  # TorchServe's request
        body = row.get("data") or row.get("body")
    if isinstance(body, bytes | bytearray):
        try:
            text = bytes(body).decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest("request body: not valid UTF-8") from None
        try:
            body = json.loads(text)
        except ValueError:
            body = text
    if isinstance(body, str):
        return "one", [body]
    if isinstance(body, dict):
        if "instances" in body:
            instances = body["instances"]
            if not isinstance(instances, list) or not instances:
                raise BadRequest("instances: expected a non-empty list")
            return "instances", [_text(x, f"instances[{i}]") for i, x in enumerate(instances)]
        return "one", [_text(body, "request body")]
    if isinstance(body, list) and body:
        return "list", [_text(x, f"[{i}]") for i, x in enumerate(body)]
    raise BadRequest("request body: expected a text, {'text': ...} or {'instances': [...]}")


def _text(item: Any, where: str) -> str:
    if isinstance(item, dict):
        item = item.get("text")
    if not isinstance(item, str):
        raise BadRequest(f"{where}: expected a string or {{'text': string}}")
    return item


_service = RoostHandler()


def handle(data: list[Any] | None, context: Any) -> list[Any] | None:
    """TorchServe's module-level entry point (also called once with ``data=None`` to load)."""
    if not _service.initialized:
        _service.initialize(context)
    if data is None:
        return None
    return _service.handle(data, context)
