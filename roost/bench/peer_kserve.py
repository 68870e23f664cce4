"""Plain KServe: roost's model class under ``kserve.ModelServer`` as KServe's docs start one.

KServe's custom-model pattern (``python model.py --model_name ... --http_port ...``): the
model server's own argument parser, ``model.load()``, ``ModelServer().start([model])``.
No roost server work: no fast path, no roost HTTP protocol or gRPC servicer, no guard
middleware. The model class (:class:`~roost.serving.predictor.SentimentModel`, with its
micro-batcher) is roost's, so the row measures what roost's serving layer adds to KServe.
"""

from __future__ import annotations

import argparse


def main() -> None:
    from kserve import ModelServer, model_server

    from roost.config import Settings
    from roost.serving.predictor import SentimentModel

    parser = argparse.ArgumentParser(parents=[model_server.parser])
    parser.add_argument("--model_dir", required=True, help="The classifier directory.")
    args, _ = parser.parse_known_args()
    settings = Settings()
    model = SentimentModel(args.model_name, args.model_dir, settings)
    model.load()
    ModelServer(http_port=args.http_port, grpc_port=args.grpc_port).start([model])


if __name__ == "__main__":
    main()
