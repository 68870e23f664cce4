"""The serving fast path: the batch encoder equals the tokenizer, plain requests decode (and
anything else is left to KServe's path), and the answers are byte-for-byte KServe's."""

from __future__ import annotations

import numpy as np
import orjson
import pandas as pd
import pytest
import torch
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.infer_type import InferInput, InferRequest
from kserve.protocol.rest.v2_datamodels import InferenceResponse

from roost import data
from roost.serving import codec, kernel
from roost.tokenizer import TOKEN_RE, Tokenizer

pytestmark = pytest.mark.unit

EDGE_TEXTS = [
    "",
    "   ",
    "I LOVE it!!! @united you're the best #happy",
    "@ lonely at sign, and @@double and e-mail a@b.com",
    "see http://example.com/x?y=1 and https://t.co/abc, www.example.org/page",
    "ΣΑΣ ΟΔΟΣ İstanbul ß straße",
    "don't can't won't rock'n'roll 'quoted'",
    "emoji 😀😀 and\ttabs\nnewlines",
    "word " * 400,  # longer than max_tokens
    "x" * 20000,  # longer than max_chars
]


def corpus_sample(n: int = 400) -> list[str]:
    frame = pd.read_csv(data.default_corpus_path(), nrows=n, encoding_errors="replace")
    return frame["text"].astype(str).tolist()


@pytest.fixture(scope="module")
def tokenizers() -> list[Tokenizer]:
    texts = corpus_sample() + EDGE_TEXTS
    fitted = [Tokenizer.fit(texts, ngram=n, min_count=1, max_tokens=64) for n in (1, 2, 3)]
    # A vocabulary that uses id 0 takes the encoder's explicit comparison path.
    zero = Tokenizer({**fitted[1].vocab, "the": 0}, ngram=2, max_tokens=64)
    return [*fitted, zero]


def test_batch_encoder_equals_the_tokenizer(tokenizers: list[Tokenizer]) -> None:
    texts = corpus_sample() + EDGE_TEXTS
    for tok in tokenizers:
        encoder = kernel.encoder_for(tok, TOKEN_RE)
        for batch in (texts, texts[:1], EDGE_TEXTS, [texts[5]] * 3):
            ref_ids, ref_offsets = tok.encode(batch)
            ids, offsets = encoder.encode(batch)
            assert torch.equal(ids, ref_ids) and torch.equal(offsets, ref_offsets)


def test_kernel_matches_the_classifier(tokenizers: list[Tokenizer]) -> None:
    from roost.classifier import TextClassifier
    from roost.model import build_model

    tok = tokenizers[1]
    torch.manual_seed(0)
    module = build_model("ngram", vocab_size=tok.size, num_classes=3, embed_dim=8)
    classifier = TextClassifier(tok, module, ["neg", "neu", "pos"], "ngram", {"embed_dim": 8})
    fast = kernel.Kernel(classifier.module, kernel.encoder_for(tok, TOKEN_RE), 3)
    texts = corpus_sample(50)
    assert np.array_equal(fast.predict_proba(texts), classifier.predict_proba(texts))
    assert fast.predict_proba([]).shape == (0, 3)


def v2_body(**overrides: object) -> dict[str, object]:
    tensor: dict[str, object] = {"name": "text", "datatype": "BYTES", "shape": [2]}
    tensor["data"] = ["a", "b"]
    tensor.update(overrides)
    return {"id": "r1", "inputs": [tensor]}


def test_plain_v2_accepts_the_common_request() -> None:
    assert codec.plain_v2(v2_body()) == (["a", "b"], "r1")
    assert codec.plain_v2({"inputs": v2_body()["inputs"]}) == (["a", "b"], "")
    assert codec.plain_v2(v2_body(shape=[2, 1], data=[["a"], ["b"]])) == (["a", "b"], "r1")


@pytest.mark.parametrize(
    "body",
    [
        v2_body(datatype="FP32"),
        v2_body(shape=[3]),
        v2_body(shape=[2, 2]),
        v2_body(shape=[0], data=[]),
        v2_body(data=["a", 1]),
        v2_body(data=[["a"], ["b"]]),  # nested data with shape [n]: KServe's path decides
        v2_body(parameters={"binary_data": True}),
        {**v2_body(), "outputs": [{"name": "label"}]},
        {**v2_body(), "parameters": {"x": 1}},
        {"id": 7, "inputs": v2_body()["inputs"]},
        {"inputs": []},
        {"inputs": "text"},
        [],
        "text",
    ],
)
def test_plain_v2_leaves_anything_else_to_kserve(body: object) -> None:
    assert codec.plain_v2(body) is None


def test_plain_v1() -> None:
    assert codec.plain_v1({"instances": ["a", {"text": "b"}]}) == ["a", "b"]
    for body in ({"instances": []}, {"instances": [1]}, {"instances": [{"t": "x"}]},
                 {"instances": ["a"], "parameters": {}}, {"texts": ["a"]}, ["a"]):  # fmt: skip
        assert codec.plain_v1(body) is None


def grpc_request(**kwargs: object) -> pb.ModelInferRequest:
    tensor = pb.ModelInferRequest.InferInputTensor(
        name="text",
        datatype=str(kwargs.pop("datatype", "BYTES")),
        shape=list(kwargs.pop("shape", [2])),  # type: ignore[call-overload]
        contents=pb.InferTensorContents(
            bytes_contents=list(kwargs.pop("values", [b"a", b"b"]))  # type: ignore[call-overload]
        ),
    )
    return pb.ModelInferRequest(model_name="sentiment", inputs=[tensor], **kwargs)  # type: ignore[arg-type]


def test_plain_grpc() -> None:
    assert codec.plain_grpc(grpc_request(), "sentiment") == ["a", "b"]
    assert codec.plain_grpc(grpc_request(shape=[2, 1]), "sentiment") == ["a", "b"]
    assert codec.plain_grpc(grpc_request(), "other") is None
    assert codec.plain_grpc(grpc_request(shape=[3]), "sentiment") is None
    assert codec.plain_grpc(grpc_request(values=[b"\xff"], shape=[1]), "sentiment") is None
    assert codec.plain_grpc(grpc_request(datatype="FP32"), "sentiment") is None
    with_outputs = grpc_request()
    with_outputs.outputs.add(name="label")
    assert codec.plain_grpc(with_outputs, "sentiment") is None
    raw = grpc_request()
    raw.raw_input_contents.append(b"\x01\x00\x00\x00a")
    assert codec.plain_grpc(raw, "sentiment") is None


def answer() -> tuple[list[str], list[str], np.ndarray]:
    labels = ["negative", "neutral", "positive"]
    proba = np.array([[0.1, 0.2, 0.7], [0.6, 0.3, 0.1]], dtype=np.float32)
    return labels, [labels[i] for i in proba.argmax(axis=1)], proba


def test_v2_json_is_kserves_answer() -> None:
    labels, names, proba = answer()
    request = InferRequest("sentiment", [InferInput("text", [2], "BYTES", ["a", "b"])], "r1")
    decoded = codec.Decoded(["a", "b"], codec.Protocol.REST_V2, request)
    rest, _ = codec.encode_v2(decoded, "sentiment", "3", labels, names, proba).to_rest()
    # What KServe's REST endpoint sends: its pydantic response model, dumped as JSON.
    wire = InferenceResponse.model_validate(rest).model_dump_json()
    fast = codec.v2_json("sentiment", "3", "r1", labels, names, proba)
    assert orjson.loads(fast) == orjson.loads(wire)
    assert list(orjson.loads(fast)) == list(orjson.loads(wire))


def test_v1_json_and_grpc_answer() -> None:
    labels, names, proba = answer()
    v1 = orjson.loads(codec.v1_json(labels, names, proba))
    assert [p["label"] for p in v1["predictions"]] == ["positive", "negative"]
    first = v1["predictions"][0]
    assert first["confidence"] == pytest.approx(0.7)
    assert first["probabilities"] == pytest.approx(
        {"negative": 0.1, "neutral": 0.2, "positive": 0.7}
    )
    response = codec.grpc_response("sentiment", "3", "r1", labels, names, proba)
    request = InferRequest(
        "sentiment", [InferInput("text", [2], "BYTES", [b"a", b"b"])], "r1", from_grpc=True
    )
    decoded = codec.Decoded(["a", "b"], codec.Protocol.GRPC_V2, request)
    reference = codec.encode_v2(decoded, "sentiment", "3", labels, names, proba).to_grpc()
    assert response == reference
