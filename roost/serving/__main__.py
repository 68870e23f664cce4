"""``python -m roost.serving``: the model server's entry point for pods, ``roost serve``'s flags.

It serves exactly what ``roost serve`` serves (same settings: flags > env > YAML > defaults,
same server), faster from process start to ready, which is mostly importing torch and
kserve: it skips the CLI's imports (typer, rich, every command group) and runs the imports
and the model load with Python's cyclic garbage collector off (it would walk the growing
heap of module objects again and again: about 0.4 s of a 1.7 s import on 2 CPUs).
``serve`` freezes what start-up allocated and turns the collector back on.
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

# (flag, settings key, type, help): the options of `roost serve`.
OPTIONS: tuple[tuple[str, str, type, str], ...] = (
    ("--model-uri", "serving.model_uri", str, "models:/NAME@ALIAS, models:/NAME/N or a dir"),
    ("--model-name", "serving.model_name", str, "name on the endpoints"),
    ("--http-port", "serving.http_port", int, "REST port"),
    ("--grpc-port", "serving.grpc_port", int, "gRPC port"),
    ("--model-version", "serving.model_version", str, "version to report"),
    ("--max-body-bytes", "serving.max_body_bytes", int, "request body limit"),
    ("--max-batch-size", "serving.max_batch_size", int, "texts per forward pass"),
    ("--max-batch-wait-ms", "serving.max_batch_wait_ms", float, "batch fill wait"),
    ("--log-url", "serving.logging.url", str, "payload events to this URL (roost.monitor)"),
    ("--log-sample-rate", "serving.logging.sample_rate", float, "fraction of inferences logged"),
)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m roost.serving", description=__doc__, allow_abbrev=False
    )
    parser.add_argument("--config", "-c", type=Path, help="YAML config file (also ROOST_CONFIG)")
    parser.add_argument("--state-dir", type=Path, help="local state directory")
    parser.add_argument("--log-format", default="auto", choices=("auto", "rich", "json", "plain"))
    parser.add_argument("--verbose", "-v", action="count", default=0)
    for flag, _key, kind, text in OPTIONS:
        parser.add_argument(flag, type=kind, help=text)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    gc.disable()  # until serve() has loaded the model (it freezes and re-enables)
    args = parse(sys.argv[1:] if argv is None else argv)
    from roost import logs
    from roost.config import load_settings, nested
    from roost.errors import RoostError

    logs.configure(args.verbose, args.log_format)
    logs.quiet_libraries()
    flags = {key: getattr(args, flag[2:].replace("-", "_")) for flag, key, _t, _h in OPTIONS}
    overrides = nested(flags)
    if args.state_dir is not None:
        overrides["state_dir"] = args.state_dir
    try:
        settings = load_settings(args.config, overrides)
        from roost.serving.server import serve

        serve(settings)
    except RoostError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
