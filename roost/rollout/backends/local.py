"""The local backend: champion and challenger as two ``roost serve`` processes behind nginx.

nginx (Debian's ``nginx-light``) listens on loopback and splits requests per request with
``split_clients`` on ``$request_id``: REST (``/v1``, ``/v2``, anything) on one port, gRPC
(HTTP/2, ``grpc_pass``) on another. Each weight change rewrites ``nginx.conf``, checks it
with ``nginx -t`` and reloads the master with SIGHUP; the new config answers
``GET /__roost/proxy`` with its weight and generation, so "applied" means "nginx serves it".

Everything lives in ``state_dir/rollout/<model>/``: the config, pid file, error and access
logs, temp paths, ``servers.json`` (pids and ports, so a restarted controller re-attaches),
``state.json`` (the rollout) and ``applied.jsonl`` (every weight nginx was given, once each).
The servers and nginx run in their own sessions and outlive the controller.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import httpx

from roost import proc, tracking
from roost.config import Settings
from roost.errors import NotFound, Timeout
from roost.rollout.analysis import Snapshot, parse_exposition
from roost.rollout.backends.base import (
    Backend,
    CanaryFailed,
    MetricsUnavailable,
    NotReady,
    Readiness,
)
from roost.rollout.backends.nginx import (
    CHALLENGER,
    CHAMPION,
    STATUS_PATH,
    Proxy,
    ProxyError,
    ServerRecord,
    Topology,
    find_nginx,
    render_config,
)
from roost.rollout.state import Command, RolloutState
from roost.rollout.store import FileStore, atomic_write
from roost.rollout.variant import VARIANT_HEADER
from roost.serving import local

log = logging.getLogger(__name__)


class LocalBackend(Backend):
    """Two model servers behind nginx on loopback; state in ``state_dir/rollout/<model>``."""

    name = "local"

    def __init__(
        self, settings: Settings, tracking_uri: str | None = None, model: str | None = None
    ) -> None:
        self.settings = settings
        self.cfg = settings.rollout
        self.tracking_uri = tracking_uri
        self.model = model or settings.registry.model_name
        self.served_name = settings.serving.model_name
        self.dir = (settings.state_dir / "rollout" / self.model).resolve()
        self.store = FileStore(self.dir)
        self.topology_file = self.dir / "servers.json"
        self.applied_file = self.dir / "applied.jsonl"
        self.proxy = Proxy(self.cfg.nginx, self.dir)

    # -- state ------------------------------------------------------------------------------
    def load_state(self) -> RolloutState | None:
        return self.store.load()

    def create_state(self, state: RolloutState) -> RolloutState:
        return self.store.create(state)

    def save_state(self, state: RolloutState) -> RolloutState:
        return self.store.save(state)

    def read_command(self) -> Command | None:
        return self.store.read_command()

    def write_command(self, command: Command) -> None:
        self.store.write_command(command)

    # -- topology ---------------------------------------------------------------------------
    def topology(self) -> Topology | None:
        try:
            return Topology.from_dict(json.loads(self.topology_file.read_text()))
        except FileNotFoundError:
            return None

    def _save_topology(self, topology: Topology) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write(self.topology_file, json.dumps(topology.to_dict(), indent=2))

    def _new_topology(self) -> Topology:
        return Topology(
            self.cfg.proxy_port or proc.free_port(), self.cfg.proxy_grpc_port or proc.free_port()
        )

    def _start_server(self, role: str, version: str) -> tuple[ServerRecord, local.LocalServer]:
        threads = self.settings.serving.intra_op_threads or 1
        log_file = self.dir / "logs" / f"{role}-v{version}.log"
        if self.tracking_uri is None:
            self.tracking_uri = tracking.resolve_uri(self.settings)
        env = {"ROOST_SERVING__INTRA_OP_THREADS": str(threads)}
        log_url = self._log_url()
        if log_url:  # the shadow phase replays what the champion logs
            env["ROOST_SERVING__LOGGING__URL"] = log_url
        server = local.start(
            self.settings,
            f"models:/{self.model}/{version}",
            log_file,
            name=self.served_name,
            tracking_uri=self.tracking_uri,
            env=env,
        )
        record = ServerRecord(
            version, server.process.pid, server.http_port, server.grpc_port, str(log_file)
        )
        log.info("model server started role=%s version=%s pid=%d", role, version, record.pid)
        return record, server

    def _log_url(self) -> str | None:
        """Where the servers log their payloads: the configured logger, else (rollouts with a
        shadow phase) the receiver the shadow reads from."""
        if self.settings.serving.logging.url:
            return self.settings.serving.logging.url
        if self.cfg.mode == "canary":
            return None
        from roost.rollout.replay import receiver_url

        return receiver_url(self.settings)

    def preflight(self) -> None:
        find_nginx(self.cfg.nginx)

    def prepare(self, state: RolloutState) -> None:
        """Champion and challenger servers up and ready, nginx running (reusing what runs)."""
        find_nginx(self.cfg.nginx)
        topology = self.topology() or self._new_topology()
        starting: list[tuple[str, local.LocalServer]] = []
        for role, version in ((CHAMPION, state.champion), (CHALLENGER, state.version)):
            current: ServerRecord | None = getattr(topology, role)
            if current is not None and current.version == version and current.alive():
                continue
            if current is not None and current.alive():
                proc.stop_pid(current.pid)
            record, server = self._start_server(role, version)
            setattr(topology, role, record)
            starting.append((role, server))
        self._save_topology(topology)  # pids recorded before waiting: a crash leaks nothing
        for role, server in starting:
            try:
                server.wait_ready(self.cfg.server_start_timeout_s)
            except proc.ProcessExited as exc:
                if role == CHALLENGER:
                    raise CanaryFailed(
                        f"challenger v{state.version} did not start: {exc}"
                    ) from None
                raise
        live = self.live()
        if live is None or starting:
            weight = live["weight"] if live and live.get("challenger") == state.version else 0
            self._configure(topology, weight, state.version)

    def _configure(self, topology: Topology, weight: int, challenger: str | None) -> None:
        """Rewrite, check and (re)load the config; wait until nginx serves it."""
        topology.generation += 1
        text = render_config(self.dir, topology, weight, challenger, os.geteuid() == 0)
        self.proxy.write(text)
        self._save_topology(topology)
        self.proxy.reload()
        generation = topology.generation
        proc.wait_until(
            lambda: (self.live() or {}).get("generation") == generation,
            15, 0.02, describe=lambda: str(self.live()), what="nginx to load its new config",
        )  # fmt: skip

    def live(self) -> dict[str, Any] | None:
        """What the running nginx serves (``GET /__roost/proxy``), None if it is not up."""
        topology = self.topology()
        if topology is None or self.proxy.pid() is None:
            return None
        try:
            response = httpx.get(f"http://127.0.0.1:{topology.proxy_port}{STATUS_PATH}", timeout=2)
            live: dict[str, Any] = response.json()
        except (httpx.HTTPError, ValueError):
            return None
        return live

    def _restart_proxy(self) -> str:
        """nginx is down (killed, crashed): start it again on its last checked config.

        The config on disk is the last one that passed ``nginx -t`` and was applied, so
        nginx comes back with the weight it served; the readiness check of the next tick
        compares that weight with the rollout's before any analysis.
        """
        if self.proxy.pid() is not None or not self.proxy.conf.exists():
            return "nginx is not answering"
        try:
            orphans = self.proxy.stop_orphans()
            if orphans:
                log.warning("stopped nginx workers left by a dead master: %s", orphans)
            self.proxy.start()
        except (ProxyError, Timeout) as exc:
            return f"nginx is not running and does not start: {exc}"
        log.warning("nginx was not running; started it again on %s", self.proxy.conf)
        return "nginx was not running; started it again on its last config"

    def _restart_champion(self, topology: Topology, state: RolloutState) -> str:
        """The champion's server exited (killed, crashed): start its version again.

        nginx still sends it the champion's share of the traffic, answering 502 for all of
        it, so it is started at once (not at the next rollout) and nginx is pointed at its
        new ports with the weight it serves. The rollout holds meanwhile: the next tick's
        readiness check sees the new server before any analysis.
        """
        old = topology.champion
        assert old is not None
        log.warning("champion server v%s (pid %d) exited; starting it again", old.version, old.pid)
        record, server = self._start_server(CHAMPION, old.version)
        topology.champion = record
        self._save_topology(topology)  # the pid recorded before waiting: a crash leaks nothing
        try:
            server.wait_ready(self.cfg.server_start_timeout_s)
        except (proc.ProcessExited, Timeout) as exc:
            return f"champion server v{old.version} exited and did not start again: {exc}"
        live = self.live()
        weight = int(live["weight"]) if live and live.get("challenger") == state.version else 0
        try:
            self._configure(topology, weight, state.version)
        except (ProxyError, Timeout) as exc:
            return f"champion server v{old.version} started again; nginx not updated: {exc}"
        return (
            f"champion server v{old.version} (pid {old.pid}) exited; started it again "
            f"(pid {record.pid}, see {record.log_file})"
        )

    def current_weight(self, state: RolloutState) -> int | None:
        live = self.live()
        if live is None:
            return None
        return int(live["weight"]) if live.get("challenger") == state.version else 0

    def set_weight(self, state: RolloutState, weight: int) -> None:
        topology = self.topology()
        if topology is None or topology.champion is None:
            raise NotReady("the local proxy is not set up yet")
        if weight > 0 and (
            topology.challenger is None or topology.challenger.version != state.version
        ):
            raise NotReady(f"no server for challenger v{state.version} yet")
        self._configure(topology, weight, state.version)
        entry = {"rollout": state.id, "version": state.version, "weight": weight,
                 "generation": topology.generation, "at": time.time()}  # fmt: skip
        with open(self.applied_file, "a") as handle:
            handle.write(json.dumps(entry) + "\n")
        log.info("weight applied model=%s version=%s weight=%d", self.model, state.version, weight)

    def applied(self, rollout_id: str | None = None) -> list[dict[str, Any]]:
        """Every weight given to nginx (optionally of one rollout), in order."""
        try:
            lines = self.applied_file.read_text().splitlines()
        except FileNotFoundError:
            return []
        entries = [json.loads(line) for line in lines if line.strip()]
        return [e for e in entries if rollout_id is None or e.get("rollout") == rollout_id]

    def ready(self, state: RolloutState) -> Readiness:
        topology = self.topology()
        if topology is None:
            return Readiness(False, "no local servers yet")
        chall = topology.challenger
        if state.weight > 0 and (chall is None or chall.version != state.version):
            return Readiness(False, f"no server for challenger v{state.version}")
        if chall is not None and chall.version == state.version and not chall.alive():
            raise CanaryFailed(
                f"challenger server v{state.version} (pid {chall.pid}) exited; see {chall.log_file}"
            )
        if topology.champion is not None and not topology.champion.alive():
            return Readiness(False, self._restart_champion(topology, state))
        for role, record in ((CHAMPION, topology.champion), (CHALLENGER, chall)):
            if record is None:
                if role == CHAMPION:
                    return Readiness(False, "no champion server")
                continue
            if not record.alive():
                return Readiness(False, f"{role} server v{record.version} is not running")
            if not proc.http_ok(f"{record.http_url}/v2/models/{self.served_name}/ready"):
                return Readiness(False, f"{role} server v{record.version} is not ready")
        live = self.live()
        if live is None:
            return Readiness(False, self._restart_proxy())
        weight = int(live["weight"]) if live.get("challenger") == state.version else 0
        if weight != state.weight:
            return Readiness(False, f"nginx serves {weight}%, expected {state.weight}%")
        return Readiness(True)

    def scrape(self, state: RolloutState) -> Snapshot:
        topology = self.topology()
        if topology is None:
            raise MetricsUnavailable("no local servers to scrape")
        snapshot: Snapshot = {}
        for role in (CHAMPION, CHALLENGER):
            record: ServerRecord | None = getattr(topology, role)
            if record is None:
                continue
            try:
                response = httpx.get(f"{record.http_url}/metrics", timeout=5)
                response.raise_for_status()
            except httpx.HTTPError as exc:
                raise MetricsUnavailable(f"{role} v{record.version} /metrics: {exc}") from None
            snapshot.update(
                parse_exposition(response.text, f"{role}-{record.pid}", self.served_name)
            )
        return snapshot

    def promote(self, state: RolloutState) -> None:
        topology = self.topology()
        if topology is None:
            raise NotFound(f"no local servers for {self.model}")
        chall = topology.challenger
        if chall is None or chall.version != state.version:
            if topology.champion is not None and topology.champion.version == state.version:
                return  # done before a restart
            raise NotReady(f"no server for challenger v{state.version}")
        old = topology.champion
        topology.champion, topology.challenger = chall, None
        self._configure(topology, 0, None)
        if old is not None and old.pid != chall.pid:
            proc.stop_pid(old.pid)

    def retire(self, state: RolloutState) -> None:
        topology = self.topology()
        if topology is None:
            return
        chall = topology.challenger
        if chall is None or chall.version != state.version:
            return
        topology.challenger = None
        if topology.champion is not None and self.proxy.pid() is not None:
            self._configure(topology, 0, None)
        else:
            self._save_topology(topology)
        proc.stop_pid(chall.pid)

    def shadow_endpoint(self, state: RolloutState) -> str:
        topology = self.topology()
        chall = None if topology is None else topology.challenger
        if chall is None or chall.version != state.version:
            raise NotReady(f"no server for challenger v{state.version}")
        return chall.http_url

    def logged_model(self) -> str:
        return self.settings.serving.logging.inference_service or self.served_name

    # -- outside the interface ----------------------------------------------------------------
    def endpoint(self) -> str | None:
        topology = self.topology()
        return None if topology is None else f"http://127.0.0.1:{topology.proxy_port}"

    def grpc_endpoint(self) -> str | None:
        topology = self.topology()
        return None if topology is None else f"127.0.0.1:{topology.proxy_grpc_port}"

    def describe(self) -> dict[str, str]:
        topology = self.topology()
        if topology is None:
            return {"state_dir": str(self.dir)}
        out = {
            "proxy_rest": f"http://127.0.0.1:{topology.proxy_port}",
            "proxy_grpc": f"127.0.0.1:{topology.proxy_grpc_port}",
            "state_dir": str(self.dir),
        }
        for role in (CHAMPION, CHALLENGER):
            record: ServerRecord | None = getattr(topology, role)
            if record is not None:
                out[role] = f"v{record.version} {record.http_url} (pid {record.pid})"
                out[f"pin_{role}"] = f"{VARIANT_HEADER}: {role} (v{record.version})"
        return out

    def shutdown(self) -> None:
        """Stop nginx and every server this backend started for the model."""
        self.proxy.stop()
        topology = self.topology()
        if topology is not None:
            for record in (topology.champion, topology.challenger):
                if record is not None:
                    proc.stop_pid(record.pid)
        self.topology_file.unlink(missing_ok=True)
