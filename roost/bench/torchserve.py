"""Export a registry version for TorchServe, and run TorchServe locally for the benchmark.

The export is KServe's ``kserve-torchserve`` storage layout, so the chart can point an
InferenceService (model format ``pytorch``) at it::

    DIR/config/config.properties    addresses, workers, batching (model_snapshot), no auth
    DIR/model-store/NAME.mar        roost's handler + classifier files + roost's model code

The archive is self-contained: it carries the three roost modules the handler imports, copied
under flat names, and none of them imports ``roost`` (checked when archiving).
"""

from __future__ import annotations

import ast
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from roost import proc
from roost.classifier import MANIFEST, VOCAB, WEIGHTS, find_classifier_dir
from roost.errors import MissingTool, RoostError

log = logging.getLogger(__name__)

PACKAGE = Path(__file__).resolve().parents[1]
HANDLER_NAME = "roost_handler.py"
# Roost modules the handler imports, under the flat names it imports them by.
SHIPPED_MODULES = {
    "roost_tokenizer.py": PACKAGE / "tokenizer.py",
    "roost_model.py": PACKAGE / "model.py",
    "roost_kernel.py": PACKAGE / "serving" / "kernel.py",
}
KSERVE_MODEL_STORE = "/mnt/models/model-store"


# TorchServe's built-in log4j2.xml logs every request at DEBUG to a file and to stdout, and
# writes an access log. roost's predictor logs no access lines and runs at WARNING, so the
# benchmark gives TorchServe the same: warnings and errors only (files under LOG_LOCATION).
QUIET_LOG4J2 = """<?xml version="1.0" encoding="UTF-8"?>
<Configuration>
  <Appenders>
    <File name="ts_log" fileName="${env:LOG_LOCATION:-logs}/ts_log.log">
      <PatternLayout pattern="%d{ISO8601} [%-5p] %t %c - %m%n"/>
    </File>
  </Appenders>
  <Loggers>
    <Logger name="ACCESS_LOG" level="off"/>
    <Logger name="MODEL_METRICS" level="off"/>
    <Logger name="TS_METRICS" level="off"/>
    <Logger name="io.netty" level="error"/>
    <Logger name="org.apache" level="off"/>
    <Root level="warn"><AppenderRef ref="ts_log"/></Root>
  </Loggers>
</Configuration>
"""


@dataclass(frozen=True)
class Tuning:
    """TorchServe's knobs, per its performance guide: workers, then batch size and delay.

    The guide starts CPU serving at ``workers = physical cores / 2`` with one torch thread
    per worker and raises workers from there; batching is ``batch_size`` requests or
    ``max_batch_delay_ms``, whichever comes first.
    """

    workers: int = 1
    batch_size: int = 64
    max_batch_delay_ms: int = 5
    threads_per_worker: int = 1
    netty_threads: int = 0  # 0: TorchServe's default (number of CPUs)
    job_queue_size: int = 1000
    response_timeout_s: int = 120


@dataclass(frozen=True)
class Addresses:
    inference: str = "http://0.0.0.0:8085"
    management: str = "http://0.0.0.0:8085"
    metrics: str = "http://0.0.0.0:8082"
    grpc_inference_port: int = 7070
    grpc_management_port: int = 7071


@dataclass(frozen=True)
class Export:
    root: Path  # the directory with config/ and model-store/
    mar: Path
    config: Path
    model_name: str
    model_version: str

    def to_dict(self) -> dict[str, str]:
        return {k: str(v) for k, v in asdict(self).items()}


def check_self_contained(path: Path) -> None:
    """Fail if a file meant for the archive imports roost (the archive has no roost)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            if name == "roost" or name.startswith("roost."):
                raise RoostError(f"{path} imports {name}: it cannot run inside the .mar")


def archive(classifier_dir: Path, store: Path, model_name: str, version: str) -> Path:
    """Build ``store/<model_name>.mar`` with torch-model-archiver; returns its path."""
    archiver = tool("torch-model-archiver")
    source = find_classifier_dir(classifier_dir)
    store.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="roost-mar-") as tmp:
        staging = Path(tmp)
        shutil.copyfile(Path(__file__).with_name("ts_handler.py"), staging / HANDLER_NAME)
        for name, module in SHIPPED_MODULES.items():
            shutil.copyfile(module, staging / name)
        for name in (HANDLER_NAME, *SHIPPED_MODULES):
            check_self_contained(staging / name)
        extra = [str(source / MANIFEST), str(source / VOCAB)]
        extra += [str(staging / name) for name in SHIPPED_MODULES]
        argv = [
            archiver,
            "--model-name", model_name,
            "--version", version,
            "--serialized-file", str(source / WEIGHTS),
            "--handler", str(staging / HANDLER_NAME),
            "--extra-files", ",".join(extra),
            "--export-path", str(store),
            "--force",
        ]  # fmt: skip
        result = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=300)
    if result.returncode != 0:
        raise RoostError(f"torch-model-archiver failed: {result.stderr.strip()[-500:]}")
    return store / f"{model_name}.mar"


def config_properties(
    model_name: str,
    version: str,
    tuning: Tuning,
    addresses: Addresses,
    model_store: str = KSERVE_MODEL_STORE,
) -> str:
    """config.properties: KServe's keys (model_snapshot names the model) + roost's tuning."""
    model = {
        "defaultVersion": True,
        "marName": f"{model_name}.mar",
        "minWorkers": tuning.workers,
        "maxWorkers": tuning.workers,
        "batchSize": tuning.batch_size,
        "maxBatchDelay": tuning.max_batch_delay_ms,
        "responseTimeout": tuning.response_timeout_s,
    }
    snapshot = {"name": "startup.cfg", "modelCount": 1, "models": {model_name: {version: model}}}
    lines = [
        "# Written by `roost bench export-torchserve` for TorchServe (KServe kserve-torchserve).",
        f"inference_address={addresses.inference}",
        f"management_address={addresses.management}",
        f"metrics_address={addresses.metrics}",
        f"grpc_inference_port={addresses.grpc_inference_port}",
        f"grpc_management_port={addresses.grpc_management_port}",
        "enable_envvars_config=true",
        "install_py_dep_per_model=false",
        "disable_token_authorization=true",
        "enable_metrics_api=true",
        "metrics_mode=prometheus",
        "async_logging=true",
        f"job_queue_size={tuning.job_queue_size}",
        f"default_response_timeout={tuning.response_timeout_s}",
        f"model_store={model_store}",
        "load_models=all",
        f"model_snapshot={json.dumps(snapshot, separators=(',', ':'))}",
    ]
    if tuning.netty_threads:
        lines.append(f"number_of_netty_threads={tuning.netty_threads}")
    return "\n".join(lines) + "\n"


def export(
    classifier_dir: Path,
    out: Path,
    model_name: str,
    version: str,
    tuning: Tuning | None = None,
    addresses: Addresses | None = None,
    model_store: str = KSERVE_MODEL_STORE,
) -> Export:
    """Write the kserve-torchserve layout for one model version under ``out``."""
    tuning = tuning or Tuning()
    mar = archive(classifier_dir, out / "model-store", model_name, version)
    config = out / "config" / "config.properties"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(
        config_properties(model_name, version, tuning, addresses or Addresses(), model_store)
    )
    return Export(out, mar, config, model_name, version)


@dataclass
class LocalTorchServe:
    """A TorchServe started on loopback ports for the benchmark; ``stop()`` ends all of it."""

    process: proc.Background
    model_name: str
    inference_port: int
    management_port: int
    metrics_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.inference_port}"

    @property
    def predict_path(self) -> str:
        return f"/predictions/{self.model_name}"

    def stop(self) -> None:
        self.process.stop(timeout=20)


def start_local(
    export_dir: Export,
    workdir: Path,
    tuning: Tuning,
) -> LocalTorchServe:
    """Start ``torchserve --foreground`` on free loopback ports with the exported archive.

    The config is the export's, with loopback addresses; logs, the pid file and Java's temp
    files stay under ``workdir`` (TorchServe keeps its pid file in the temp dir, so a
    private one also keeps it apart from any other TorchServe on the machine).
    """
    torchserve = tool("torchserve")
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        raise MissingTool("java not found: TorchServe's frontend needs Java 17 (or set JAVA_HOME)")
    ports = [proc.free_port() for _ in range(5)]
    addresses = Addresses(
        inference=f"http://127.0.0.1:{ports[0]}",
        management=f"http://127.0.0.1:{ports[1]}",
        metrics=f"http://127.0.0.1:{ports[2]}",
        grpc_inference_port=ports[3],
        grpc_management_port=ports[4],
    )
    model_store = export_dir.mar.parent
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "config.properties"
    config.write_text(
        config_properties(
            export_dir.model_name, export_dir.model_version, tuning, addresses, str(model_store)
        )
    )
    log_config = workdir / "log4j2.xml"
    log_config.write_text(QUIET_LOG4J2)
    # A fresh temp dir per start: TorchServe refuses to start while its pid file names a
    # live server, and a previous one may still be shutting down.
    tmp = Path(tempfile.mkdtemp(prefix="tmp-", dir=workdir))
    argv = [
        torchserve, "--start", "--foreground", "--ncs", "--disable-token-auth",
        "--model-store", str(model_store), "--ts-config", str(config),
        "--log-config", str(log_config),
    ]  # fmt: skip
    env = {
        "TMPDIR": str(tmp),
        "TEMP": str(tmp),
        "LOG_LOCATION": str(workdir / "logs"),
        "METRICS_LOCATION": str(workdir / "logs"),
        "TS_CONFIG_FILE": str(config),
        "ROOST_TS_THREADS": str(tuning.threads_per_worker),
        "PYTHONUNBUFFERED": "1",
    }
    process = proc.start_background(argv, workdir / "torchserve.log", env=env, cwd=workdir)
    return LocalTorchServe(process, export_dir.model_name, ports[0], ports[1], ports[2])


def tool(name: str) -> str:
    """A console script of this environment (next to its python), else one on PATH."""
    candidate = Path(sys.executable).with_name(name)
    if candidate.is_file():
        return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    raise MissingTool(f"{name} not found: pip install 'roost[bench]' (torchserve 0.12)")
