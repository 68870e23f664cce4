"""PyTriton: Triton's HTTP and gRPC front end with its dynamic batcher, calling the kernel.

Input ``text`` (BYTES, one per request row), outputs ``label`` (BYTES) and
``probabilities`` (FP32 [classes]) per row, so Open Inference Protocol clients send the
same request as to roost, with Triton's batch dimension (shape ``[1, 1]``).
Run: ``python pytriton_server.py NAME HTTP_PORT GRPC_PORT METRICS_PORT``.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import roost_peer
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

MAX_BATCH = int(os.environ.get("ROOST_PEER_MAX_BATCH", "64"))
QUEUE_DELAY_US = int(os.environ.get("ROOST_PEER_QUEUE_DELAY_US", "1000"))


def main() -> None:
    name, http_port, grpc_port, metrics_port = sys.argv[1:5]
    kernel, labels = roost_peer.load()
    label_bytes = np.array([label.encode() for label in labels], dtype=object)

    @batch  # type: ignore[untyped-decorator]
    def infer(text: np.ndarray) -> dict[str, np.ndarray]:
        texts = [t.decode("utf-8") for t in text.reshape(-1).tolist()]
        proba = kernel.predict_proba(texts).astype(np.float32)
        return {"label": label_bytes[np.argmax(proba, axis=1)].reshape(-1, 1),
                "probabilities": proba}  # fmt: skip

    config = TritonConfig(
        http_address="127.0.0.1", http_port=int(http_port),
        grpc_address="127.0.0.1", grpc_port=int(grpc_port), metrics_port=int(metrics_port),
        log_verbose=0,
    )  # fmt: skip
    with Triton(config=config) as triton:
        triton.bind(
            model_name=name,
            infer_func=infer,
            inputs=[Tensor(name="text", dtype=bytes, shape=(1,))],
            outputs=[
                Tensor(name="label", dtype=bytes, shape=(1,)),
                Tensor(name="probabilities", dtype=np.float32, shape=(len(labels),)),
            ],
            config=ModelConfig(
                max_batch_size=MAX_BATCH,
                batcher=DynamicBatcher(max_queue_delay_microseconds=QUEUE_DELAY_US),
            ),
            strict=False,
        )
        triton.serve()


if __name__ == "__main__":
    main()
