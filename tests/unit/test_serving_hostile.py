"""Issue 17's pure parts: the repository-extension setting, the input rule, binary bodies."""

from __future__ import annotations

import json

import pytest
from kserve.errors import InvalidInput
from typer.testing import CliRunner

from roost.cli.app import app
from roost.config import load_settings
from roost.errors import ConfigError
from roost.serving import codec

pytestmark = pytest.mark.unit


def test_repository_extension_is_off_and_needs_a_token() -> None:
    assert load_settings(None, {}).serving.repository_extension is False
    with pytest.raises(ConfigError, match="repository_token"):
        load_settings(None, {"serving": {"repository_extension": True}})
    on = load_settings(
        None, {"serving": {"repository_extension": True, "repository_token": "t0ken"}}
    )
    assert on.serving.repository_extension and "t0ken" not in repr(on.serving)


def test_serve_flags_refuse_the_extension_without_a_token() -> None:
    result = CliRunner().invoke(app, ["serve", "--repository-extension", "--model-uri", "/x"])
    assert result.exit_code != 0
    assert "repository_token" in result.output


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"id": "\ud800"}, "id"),
        ({"inputs": [{"datatype": "\udfff"}]}, "inputs[0].datatype"),
        ({"instances": ["ok", {"text": "a\ud83d"}]}, "instances[1].text"),
        ({"inputs": [{"data": ["fine 😀"]}]}, None),
    ],
)
def test_lone_surrogate_field(payload: object, field: str | None) -> None:
    assert codec.lone_surrogate_field(payload) == field


def test_decode_rejects_lone_surrogates_and_too_many_texts() -> None:
    with pytest.raises(InvalidInput, match=r"instances\[0\]: not valid Unicode"):
        codec.decode_v1({"instances": ["\ud800"]})
    with pytest.raises(codec.TooManyTexts, match="at most 2 per request"):
        codec.decode_v1({"instances": ["a", "b", "c"]}, max_texts=2)
    assert codec.decode_v1({"instances": ["a", "b"]}, max_texts=2).texts == ["a", "b"]
    assert "\\ud800" in codec.show("\ud800")


def body(inputs: list[dict], data: bytes) -> tuple[bytes, str]:
    head = json.dumps({"inputs": inputs}).encode()
    return head + data, str(len(head))


def tensor(size: object, shape: list[int] | None = None, datatype: str = "BYTES") -> dict:
    return {
        "name": "text",
        "datatype": datatype,
        "shape": shape or [1],
        "parameters": {"binary_data_size": size},
    }


@pytest.mark.parametrize(
    ("inputs", "data", "length", "message"),
    [
        (
            [tensor(9, [3])],
            b"\x05\x00\x00\x00hello",
            None,
            "holds 1 element(s) but the shape says 3",
        ),
        ([tensor(-1)], b"", None, "non-negative integer"),
        ([tensor("9")], b"\x05\x00\x00\x00hello", None, "non-negative integer"),
        ([tensor(9)], b"\xff\x00\x00\x00hello", None, "runs past the end"),
        ([tensor(2)], b"\x05\x00", None, "length prefix cut short"),
        ([tensor(9, [-1])], b"\x05\x00\x00\x00hello", None, "non-negative integers"),
        ([tensor(7, [2], "FP32")], b"\x00" * 7, None, "needs 8"),
        ([tensor(6)], b"\x02\x00\x00\x00\xff\xfe", None, "not valid UTF-8"),
        ([tensor(9)], b"\x05\x00\x00\x00helloxx", None, "after the binary data"),
        ([tensor(9)], b"\x05\x00\x00\x00hello", "x", "Inference-Header-Content-Length"),
        ([tensor(9)], b"\x05\x00\x00\x00hello", "99999", "outside the body"),
    ],
)
def test_check_binary_request_refuses(
    inputs: list[dict], data: bytes, length: str | None, message: str
) -> None:
    raw, header_length = body(inputs, data)
    with pytest.raises(InvalidInput, match=message.replace("(", r"\(").replace(")", r"\)")):
        codec.check_binary_request(raw, length if length is not None else header_length)


def test_check_binary_request_accepts_a_well_formed_body() -> None:
    raw, length = body([tensor(14, [2])], b"\x02\x00\x00\x00hi\x04\x00\x00\x00meh!")
    codec.check_binary_request(raw, length)
    assert codec.split_bytes_tensor(b"\x02\x00\x00\x00hi\x00\x00\x00\x00", 2, "x") == [b"hi", b""]
