"""The KServe predictor: codec, micro-batching, metrics, model and server."""
