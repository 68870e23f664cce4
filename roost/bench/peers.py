"""The other servers a team would pick instead of roost, in the same run on the same model.

- ``kserve``: plain KServe ``ModelServer`` with roost's model class (:mod:`.peer_kserve`),
  in roost's own environment (it is roost's base), REST v2 and gRPC v2;
- ``mlserver``: Seldon's MLServer with a custom runtime, adaptive batching, REST v2 and gRPC;
- ``bentoml``: a BentoML service with adaptive batching, its REST API;
- ``pytriton``: NVIDIA PyTriton, Triton's C++ HTTP and gRPC front end with its dynamic
  batcher calling the same forward.

Every peer but KServe gets its own virtual environment (their pins clash with roost's:
MLServer and BentoML pin FastAPI/pydantic/protobuf ranges of their own), under
``bench.peers_venvs`` (default ``.venv-peers``; ``make peers`` builds them ahead), with the
torch roost runs installed from the same local wheel file (never another torch). Each peer
serves the model files the TorchServe archive ships (the registry version's classifier
files + three flat roost modules, :mod:`roost.bench.peer_apps`), so all run one kernel.

A peer that cannot be installed or started here still gets its row: no ladder, and
``unavailable`` says why. Each one is started as its docs say (``mlserver start DIR``,
``bentoml serve MODULE:Service``, PyTriton's ``Triton().bind(...).serve()``, KServe's
``python model.py --model_name ...``), its answers are checked against the reference model
before its ladder (the loader does that for every target).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from roost import proc
from roost.bench import h2grpc, loadgen, measure, peer_env, workload
from roost.bench import torchserve as ts
from roost.bench.plan import Profile, Progress, ServerResult, Target
from roost.classifier import MANIFEST, VOCAB, WEIGHTS, find_classifier_dir
from roost.config import BenchSettings
from roost.errors import Timeout

log = logging.getLogger(__name__)

APPS = Path(__file__).resolve().with_name("peer_apps")


@dataclass(frozen=True)
class Peer:
    name: str
    requirements: tuple[str, ...]  # pip pins of its own environment; () = roost's environment
    protocols: tuple[str, ...]
    config: dict[str, Any] = field(default_factory=dict)  # what we chose, and why
    # Configurations to try (each updates ``config``); the best per protocol is reported,
    # with every one's max req/s under ``sweep`` (as TorchServe's worker counts are).
    variants: tuple[dict[str, Any], ...] = ()

    @property
    def own_env(self) -> bool:
        return bool(self.requirements)


PEERS: dict[str, Peer] = {
    "kserve": Peer(
        "kserve", (), ("rest-v2", "grpc-v2"),
        {"server": "kserve.ModelServer (KServe's custom-model entry point)", "workers": 1,
         "logging": "KServe's log config at WARNING (as roost: no access/trace lines)",
         "model_class": "roost SentimentModel (its micro-batcher on)", "fast_path": False,
         "why": "KServe's defaults: one worker process (its docs: more workers only for "
                "CPU-bound pre/post-processing); the model batches as in roost"},
    ),
    "mlserver": Peer(
        "mlserver", peer_env.REQUIREMENTS["mlserver"], ("rest-v2", "grpc-v2"),
        {"max_batch_size": 64, "max_batch_time_s": 0.005, "parallel_workers": 1,
         "why": "MLServer's docs: adaptive batching (max_batch_size / max_batch_time) for "
                "throughput; parallel_workers 1 (inference in one worker process, the "
                "front end in the main one: 2 processes for 2 cores)"},
    ),
    "bentoml": Peer(
        "bentoml", peer_env.REQUIREMENTS["bentoml"], ("rest",),
        {"workers": 1, "max_batch_size": 64, "max_latency_ms": 60000, "batching": "adaptive",
         "why": "BentoML's docs: adaptive batching (batchable=True, max_batch_size) for "
                "throughput; max_latency_ms its default 60 s (at 50 ms its dispatcher sheds "
                "load with 503 'process is overloaded' well below the rate it can serve "
                "within a 50 ms p99, which the ladder judges instead); one worker (its "
                "guidance: workers = cores for CPU-bound work, and the batch kernel "
                "already uses the cores through torch threads). Also tried with batching "
                "off: once its dispatcher has learnt the load, it holds each call for a "
                "batch window, and its p99 stays above 50 ms even at a few req/s (with "
                "max_latency_ms from 100 to 60000); `sweep` has both variants' rates"},
        variants=({"batching": "adaptive"}, {"batching": "off"}),
    ),
    "pytriton": Peer(
        "pytriton", peer_env.REQUIREMENTS["pytriton"], ("rest-v2", "grpc-v2"),
        {"max_batch_size": 64, "max_queue_delay_us": 1000,
         "why": "Triton's model-configuration guide: the dynamic batcher, with a short "
                "max_queue_delay to raise the batch size at little latency cost"},
    ),
}  # fmt: skip


class PeerUnavailable(Exception):
    """The peer cannot be installed or started on this machine; the message says why."""


# -- environments ------------------------------------------------------------------------
def environment(peer: Peer, root: Path, timeout_s: float, progress: Progress) -> Path:
    """The python of ``peer``'s own virtual environment under ``root``, built if needed
    (:func:`roost.bench.peer_env.build`, with the running torch's version)."""
    if not peer.own_env:
        return Path(sys.executable)
    try:
        return peer_env.build(peer.name, root, metadata.version("torch"), timeout_s, progress)
    except peer_env.EnvError as exc:
        raise PeerUnavailable(str(exc)) from None


def stage(classifier_dir: Path, dest: Path) -> Path:
    """Model files + the peer apps in one directory (a peer's PYTHONPATH and model dir)."""
    source = find_classifier_dir(classifier_dir)
    dest.mkdir(parents=True, exist_ok=True)
    for name in (MANIFEST, VOCAB, WEIGHTS):
        shutil.copyfile(source / name, dest / name)
    for name, module in ts.SHIPPED_MODULES.items():
        shutil.copyfile(module, dest / name)
    for app in APPS.glob("*.py"):
        if app.name != "__init__.py":
            ts.check_self_contained(app)
            shutil.copyfile(app, dest / app.name)
    return dest


# -- the bench stage ---------------------------------------------------------------------
@dataclass
class Started:
    process: proc.Background
    ready: Callable[[], bool]
    http_port: int
    grpc_port: int


class Peers:
    """Install, start, check and load each peer; one :class:`ServerResult` per protocol."""

    def __init__(
        self,
        cfg: BenchSettings,
        work: Path,
        profile: Profile,
        progress: Progress,
        load: Callable[[Target], None],
    ) -> None:
        self.cfg = cfg
        self.work = work
        self.profile = profile
        self.progress = progress
        self.load = load

    def run(
        self, classifier_dir: Path, name: str, texts: list[str], expected: workload.Expected
    ) -> list[ServerResult]:
        staged = stage(classifier_dir, self.work / "peers" / "model")
        results: list[ServerResult] = []
        for key in self.cfg.peers:
            peer = PEERS[key]
            try:
                if peer.variants:
                    results += self._sweep(peer, staged, name, texts, expected)
                else:
                    results += self._one(peer, staged, name, texts, expected)
            except (PeerUnavailable, Timeout, OSError) as exc:
                reason = " ".join(str(exc).split()) or type(exc).__name__
                self.progress(f"{peer.name}: not measured: {reason}")
                results += [
                    ServerResult(peer.name, protocol, 1, 0.0, [], dict(peer.config),
                                 unavailable=reason)
                    for protocol in peer.protocols
                ]  # fmt: skip
        return results

    def _sweep(
        self,
        peer: Peer,
        staged: Path,
        name: str,
        texts: list[str],
        expected: workload.Expected,
    ) -> list[ServerResult]:
        """``_one`` for each of ``peer.variants``; per protocol the best, with the sweep."""
        runs = [
            self._one(replace(peer, config={**peer.config, **variant}), staged, name, texts,
                      expected)
            for variant in peer.variants
        ]  # fmt: skip
        best: list[ServerResult] = []
        for rows in zip(*runs, strict=True):
            winner = max(rows, key=lambda r: r.max_rps)
            winner.config["sweep"] = [
                {**variant, "max_rps_p99_50ms": round(r.max_rps, 1)}
                for variant, r in zip(peer.variants, rows, strict=True)
            ]
            best.append(winner)
        return best

    def _one(
        self,
        peer: Peer,
        staged: Path,
        name: str,
        texts: list[str],
        expected: workload.Expected,
    ) -> list[ServerResult]:
        root = self.cfg.peers_venvs
        python = environment(peer, root, self.cfg.peer_install_timeout_s, self.progress)
        logs = self.work / "logs"
        started_at = time.perf_counter()
        server = self._start(peer, python, staged, name, logs)
        try:
            try:
                cold = measure.wait_ready(
                    server.ready, started_at, self.cfg.peer_start_timeout_s,
                    server.process.alive, lambda: server.process.log_tail(8),
                )  # fmt: skip
            except Timeout as exc:
                raise PeerUnavailable(_start_failure(str(exc), server.process.log_file)) from None
            self.progress(f"{peer.name} ready: cold start {cold:.2f}s")
            config = {**peer.config, "started_as": self._argv_text(peer)}
            targets = [
                Target(
                    ServerResult(peer.name, protocol, 1, cold, [cold], dict(config)),
                    server.process.pid,
                    len(texts),
                    self._sender(peer, protocol, server, name, texts, expected),
                )
                for protocol in peer.protocols
            ]
            for target in targets:
                self.load(target)
            return [t.server for t in targets]
        finally:
            server.process.stop(timeout=20)

    @staticmethod
    def _argv_text(peer: Peer) -> str:
        return {
            "kserve": "python -m roost.bench.peer_kserve --model_name NAME --model_dir DIR "
            "--http_port P --grpc_port G",
            "mlserver": "mlserver start REPO (settings.json + NAME/model-settings.json)",
            "bentoml": "bentoml serve bentoml_service:Classifier --host 127.0.0.1 --port P",
            "pytriton": "python pytriton_server.py NAME HTTP GRPC METRICS",
        }[peer.name]

    def _start(self, peer: Peer, python: Path, staged: Path, name: str, logs: Path) -> Started:
        http, grpc, metrics = proc.free_port(), proc.free_port(), proc.free_port()
        env = {
            "PYTHONPATH": str(staged),
            "PYTHONUNBUFFERED": "1",
            "ROOST_PEER_MODEL_DIR": str(staged),
        }
        log_file = logs / f"peer-{peer.name}.log"
        v2_ready = measure.http_ready(f"http://127.0.0.1:{http}/v2/models/{name}/ready")
        bin_dir = python.parent
        if peer.name == "kserve":
            argv = [str(python), "-m", "roost.bench.peer_kserve", "--model_name", name,
                    "--model_dir", str(staged), "--http_port", str(http),
                    "--grpc_port", str(grpc), "--enable_latency_logging", "false",
                    "--log_config_file", str(self._kserve_log_config())]  # fmt: skip
            env = {"PYTHONUNBUFFERED": "1"}
            process = proc.start_background(argv, log_file, env=env)
            return Started(process, v2_ready, http, grpc)
        if peer.name == "mlserver":
            repo = self.work / "peers" / "mlserver-repo"
            shutil.rmtree(repo, ignore_errors=True)
            (repo / name).mkdir(parents=True)
            settings = {"host": "127.0.0.1", "http_port": http, "grpc_port": grpc,
                        "metrics_port": metrics, "parallel_workers": 1, "debug": False,
                        "logging_level": "WARNING"}  # fmt: skip
            (repo / "settings.json").write_text(json.dumps(settings, indent=2))
            model_settings = {
                "name": name,
                "implementation": "mlserver_runtime.RoostRuntime",
                "max_batch_size": peer.config["max_batch_size"],
                "max_batch_time": peer.config["max_batch_time_s"],
                "parameters": {"uri": str(staged)},
            }
            (repo / name / "model-settings.json").write_text(json.dumps(model_settings, indent=2))
            argv = [str(bin_dir / "mlserver"), "start", str(repo)]
            process = proc.start_background(argv, log_file, env=env, cwd=staged)
            return Started(process, v2_ready, http, grpc)
        if peer.name == "bentoml":
            env |= {"BENTOML_DO_NOT_TRACK": "true",
                    "BENTOML_HOME": str(self.work / "peers" / "bentoml-home"),
                    "ROOST_PEER_MAX_BATCH": str(peer.config["max_batch_size"]),
                    "ROOST_PEER_MAX_LATENCY_MS": str(peer.config["max_latency_ms"]),
                    "ROOST_PEER_WORKERS": str(peer.config["workers"]),
                    "ROOST_PEER_BATCHING": str(peer.config.get("batching", ""))}  # fmt: skip
            argv = [str(bin_dir / "bentoml"), "serve", "bentoml_service:Classifier",
                    "--host", "127.0.0.1", "--port", str(http)]  # fmt: skip
            process = proc.start_background(argv, log_file, env=env, cwd=staged)
            return Started(process, measure.http_ready(f"http://127.0.0.1:{http}/readyz"), http, 0)
        if peer.name == "pytriton":
            env |= {"ROOST_PEER_MAX_BATCH": str(peer.config["max_batch_size"]),
                    "ROOST_PEER_QUEUE_DELAY_US": str(peer.config["max_queue_delay_us"]),
                    # Triton's Python stub links "libpython3.X.so"; the one of the
                    # interpreter that runs the model (not the distribution's, which may be
                    # another patch release with another stdlib).
                    "LD_LIBRARY_PATH": _libpython_dir()}  # fmt: skip
            argv = [str(python), str(staged / "pytriton_server.py"), name, str(http), str(grpc),
                    str(metrics)]  # fmt: skip
            process = proc.start_background(argv, log_file, env=env, cwd=staged)
            return Started(process, v2_ready, http, grpc)
        raise PeerUnavailable(f"unknown peer {peer.name!r}")

    def _kserve_log_config(self) -> Path:
        """KServe's own logging config at WARNING: no access, trace or per-call gRPC lines.

        roost and the other servers log warnings only; KServe logs every request three times
        at INFO by default (uvicorn access, kserve.trace, its gRPC interceptor).
        """
        import copy

        from kserve.logging import KSERVE_LOG_CONFIG

        config = copy.deepcopy(KSERVE_LOG_CONFIG)
        for logger in config["loggers"].values():
            logger["level"] = "WARNING"
        path = self.work / "peers" / "kserve-logging.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(config, indent=2))
        return path

    def _sender(
        self,
        peer: Peer,
        protocol: str,
        server: Started,
        name: str,
        texts: list[str],
        expected: workload.Expected,
    ) -> Callable[[], loadgen.Sender]:
        conns = self.cfg.connections
        batch_dim = peer.name == "pytriton"  # Triton's batching adds a leading batch axis
        if protocol == "rest-v2":
            bodies = v2_bodies(texts, batch_dim)
            path = f"/v2/models/{name}/infer"
            check = workload.check_v2(expected, 1, len(texts))
            return lambda: loadgen.HttpSender(
                "127.0.0.1", server.http_port, path, bodies, check, conns
            )
        if protocol == "grpc-v2":
            requests = grpc_requests(texts, name, batch_dim)
            target = f"127.0.0.1:{server.grpc_port}"
            grpc_check = check_grpc_any(expected)
            return lambda: h2grpc.unary(target, requests, grpc_check)
        bento = bentoml_bodies(texts)
        bento_check = check_bentoml(expected)
        return lambda: loadgen.HttpSender(
            "127.0.0.1", server.http_port, "/classify", bento, bento_check, conns
        )


def _start_failure(error: str, log_file: Path) -> str:
    """Why a peer did not start: its log's last error line (a traceback's tail says little)."""
    first = error.split(":", 1)[0]  # "server exited during start-up" / "... not ready after"
    try:
        lines = log_file.read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    errors = [ln for ln in lines if re.search(r"\w*(Error|Exception)\b|error:", ln)]
    detail = " ".join((errors[-1] if errors else error).split())
    return f"did not start ({first}; log {log_file}): {detail[-300:]}"


def _libpython_dir() -> str:
    import os
    import sysconfig

    libdir = str(sysconfig.get_config_var("LIBDIR") or "")
    rest = os.environ.get("LD_LIBRARY_PATH", "")
    return ":".join(p for p in (libdir, rest) if p)


# -- requests and checks of the peers ----------------------------------------------------
def v2_bodies(texts: list[str], batch_dim: bool) -> list[bytes]:
    """REST v2 bodies of one text each; ``batch_dim``: shape ``[1, 1]`` (Triton batching)."""
    if not batch_dim:
        return workload.v2_bodies(texts)
    return [
        orjson.dumps(
            {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1, 1], "data": [t]}]}
        )
        for t in texts
    ]


def grpc_requests(texts: list[str], name: str, batch_dim: bool) -> list[Any]:
    requests = workload.grpc_requests(texts, name)
    if batch_dim:
        for request in requests:
            request.inputs[0].shape[:] = [1, 1]
    return requests


def check_grpc_any(expected: workload.Expected) -> Any:
    """roost's gRPC check, or the same on ``raw_output_contents`` (what Triton answers with).

    Raw BYTES are 4-byte little-endian lengths, each followed by its bytes; raw FP32 is
    little-endian float32.
    """
    typed = workload.check_grpc(expected)

    def check(response: Any, index: int) -> str | None:
        if not response.raw_output_contents:
            problem: str | None = typed(response, index)
            return problem
        raw = dict(zip((o.name for o in response.outputs), response.raw_output_contents,
                       strict=False))  # fmt: skip
        try:
            labels = raw["label"]
            (size,) = struct.unpack_from("<I", labels, 0)
            label = labels[4 : 4 + size].decode()
            probs = np.frombuffer(raw["probabilities"], dtype="<f4").tolist()
        except (KeyError, struct.error, ValueError) as exc:
            return f"unreadable answer ({exc!r})"
        return expected.check(index, label, probs)

    return check


def bentoml_bodies(texts: list[str]) -> list[bytes]:
    return [orjson.dumps({"texts": [t]}) for t in texts]


def check_bentoml(expected: workload.Expected) -> Any:
    def check(status: int, body: bytes, index: int) -> str | None:
        try:
            row = orjson.loads(body)[0]
            best = max(range(len(row)), key=row.__getitem__)
            label = expected.labels[best]
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            return f"unreadable answer ({exc!r}): {body[:120]!r}"
        return expected.check(index, label, row)

    return check


# -- the floor of a cold start, and the targets ------------------------------------------
def cold_start_floor(classifier_dir: Path, runs: int) -> dict[str, Any]:
    """A bare ``python -c "import torch"`` plus loading the model file, process start to exit."""
    weights = find_classifier_dir(classifier_dir) / WEIGHTS
    code = f"import torch; torch.load({str(weights)!r}, map_location='cpu', weights_only=True)"
    argv = [sys.executable, "-c", code]
    seconds: list[float] = []
    for _ in range(max(1, runs)):
        started = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True, timeout=300)
        seconds.append(round(time.perf_counter() - started, 3))
    return {
        "seconds": sorted(seconds)[len(seconds) // 2],
        "runs_s": seconds,
        "command": "python -c \"import torch; torch.load('weights.pt', weights_only=True)\"",
    }


def targets(result: dict[str, Any]) -> dict[str, Any]:
    """roost REST v2 against each peer's best protocol (>= 1), and cold start / floor (<= 1.5)."""
    servers: list[dict[str, Any]] = result["servers"]
    out: dict[str, Any] = {}
    roost = next(
        (s for s in servers if (s["name"], s["protocol"], s["texts_per_request"])
         == ("roost", "rest-v2", 1)), None,
    )  # fmt: skip
    for peer in PEERS:
        rows = [s for s in servers if s["name"] == peer and s["texts_per_request"] == 1]
        if not rows:
            continue
        key = f"roost_vs_{peer}"
        label = f"roost REST v2 / {peer}'s best protocol, max req/s"
        best = max(rows, key=lambda s: s["max_rps_p99_50ms"])
        reason = None
        if roost is None:
            reason = "roost rest-v2 did not run"
        elif best.get("unavailable"):
            reason = f"{peer}: {best['unavailable']}"
        elif best["max_rps_p99_50ms"] <= 0:
            reason = f"{peer} passed no ladder step at p99 <= SLO"
        if reason is not None or roost is None:
            out[key] = {"label": label, "value": None, "target": 1.0, "met": None,
                        "reason": reason}  # fmt: skip
            continue
        value = roost["max_rps_p99_50ms"] / best["max_rps_p99_50ms"]
        out[key] = {"label": label, "value": round(value, 3), "target": 1.0,
                    "met": value >= 1.0, "peer_protocol": best["protocol"]}  # fmt: skip
    floor = result.get("cold_start_floor")
    if roost is not None and floor and floor["seconds"] > 0:
        ratio = roost["cold_start_s"] / floor["seconds"]
        out["cold_start_vs_floor"] = {
            "label": "roost cold start / floor (bare torch import + model load), at most",
            "value": round(ratio, 3), "target": 1.5, "met": ratio <= 1.5,
            "floor_s": floor["seconds"], "cold_start_s": roost["cold_start_s"],
        }  # fmt: skip
    return out
