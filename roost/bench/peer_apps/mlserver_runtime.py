"""MLServer custom runtime around the batch kernel (MLServer's "custom inference runtime").

Input ``text`` (BYTES), outputs ``label`` (BYTES) and ``probabilities`` (FP32 [n, classes]):
the Open Inference Protocol tensors roost serves, so the same REST v2 and gRPC requests and
checks apply. MLServer's adaptive batching (``max_batch_size``/``max_batch_time`` in
model-settings.json) merges requests along the first axis before ``predict``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import roost_peer
from mlserver import MLModel
from mlserver.codecs import NumpyCodec, StringCodec
from mlserver.types import InferenceRequest, InferenceResponse


class RoostRuntime(MLModel):  # type: ignore[misc]
    async def load(self) -> bool:
        uri = self.settings.parameters.uri if self.settings.parameters else None
        self.kernel, self.labels = roost_peer.load(uri)
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        texts: list[Any] = StringCodec.decode_input(payload.inputs[0])
        proba = self.kernel.predict_proba([str(t) for t in texts])
        names = [self.labels[i] for i in np.argmax(proba, axis=1).tolist()]
        return InferenceResponse(
            model_name=self.name,
            outputs=[
                StringCodec.encode_output("label", names),
                NumpyCodec.encode_output("probabilities", proba.astype(np.float32)),
            ],
        )
