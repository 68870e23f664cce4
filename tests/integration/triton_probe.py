"""Call a roost server with Triton's clients, unchanged, and print what they got as JSON.

Run in its own interpreter: tritonclient.grpc and kserve register the same protobuf
package (`inference`), so they cannot share one process.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp


def main(http_target: str, grpc_target: str, texts: list[str]) -> None:
    data = np.array([t.encode() for t in texts], dtype=object)
    out: dict[str, object] = {}

    hc = thttp.InferenceServerClient(http_target)
    out["http_ready"] = hc.is_model_ready("sentiment")
    out["http_metadata"] = hc.get_model_metadata("sentiment")
    tin = thttp.InferInput("text", [len(texts)], "BYTES")
    tin.set_data_from_numpy(data, binary_data=True)  # the binary tensor extension
    res = hc.infer(
        "sentiment",
        [tin],
        outputs=[thttp.InferRequestedOutput("label"), thttp.InferRequestedOutput("probabilities")],
    )
    out["http_labels"] = [x.decode() for x in res.as_numpy("label")]
    out["http_probabilities_shape"] = list(res.as_numpy("probabilities").shape)

    gc = tgrpc.InferenceServerClient(grpc_target)
    out["grpc_ready"] = gc.is_model_ready("sentiment")
    gin = tgrpc.InferInput("text", [len(texts)], "BYTES")
    gin.set_data_from_numpy(data)
    gres = gc.infer("sentiment", [gin])
    out["grpc_labels"] = [x.decode() for x in gres.as_numpy("label")]
    probs = gres.as_numpy("probabilities")
    out["grpc_probabilities_shape"] = list(probs.shape)
    out["grpc_row_sums"] = probs.sum(axis=1).tolist()
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]))
