"""nginx as the local canary proxy: its config (pure), and the daemon behind a pid file.

The config splits requests per request with ``split_clients`` on ``$request_id``: REST (any
path) on one port, gRPC (HTTP/2, ``grpc_pass``) on another, and answers ``GET /__roost/proxy``
with the weight and generation it was written for, so the backend can tell what nginx serves.

A request can pin its side: the header ``x-roost-variant: champion|challenger`` (any case)
routes it there whatever the weight (0 and 100 included) while a challenger server runs,
for REST and gRPC alike. An empty or absent header leaves the request to the weighted split.
Any other value is refused by the proxy itself (HTTP 400, gRPC INVALID_ARGUMENT) rather than
ignored: a misspelt pin that silently fell through to the split would corrupt an A/B test
without anyone noticing. ``challenger`` with no challenger server (no rollout in flight) is
refused the same way (HTTP 409, gRPC FAILED_PRECONDITION): answering from the champion would
be a lie about which model answered. The value is never echoed back (nginx cannot
JSON-escape it).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from roost import proc
from roost.errors import MissingTool, RoostError, Unavailable
from roost.rollout.store import atomic_write
from roost.rollout.variant import VARIANT_HEADER, Variant

NGINX_PACKAGE = "nginx-light"
STATUS_PATH = "/__roost/proxy"
CHAMPION, CHALLENGER = Variant.CHAMPION.value, Variant.CHALLENGER.value
VARIANTS = (CHAMPION, CHALLENGER)
# gRPC status codes (grpc/status.h) for the refusals on the gRPC port.
GRPC_INVALID_ARGUMENT, GRPC_FAILED_PRECONDITION = 3, 9


class ProxyError(Unavailable):
    """nginx refused its configuration, did not come up, or its files cannot be written.

    Retriable (exit 4): the live config is replaced only once a new one passed ``nginx -t``,
    so nginx keeps serving the last applied weight and a rollout holds it.
    """


@dataclass
class ServerRecord:
    """One ``roost serve`` process the backend started."""

    version: str
    pid: int
    http_port: int
    grpc_port: int
    log_file: str

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def alive(self) -> bool:
        return proc.pid_alive(self.pid)


@dataclass
class Topology:
    """What runs for one model: the proxy's ports and the servers behind it."""

    proxy_port: int
    proxy_grpc_port: int
    generation: int = 0
    champion: ServerRecord | None = None
    challenger: ServerRecord | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Topology:
        def server(value: dict[str, Any] | None) -> ServerRecord | None:
            return ServerRecord(**value) if value else None

        return cls(
            int(data["proxy_port"]),
            int(data["proxy_grpc_port"]),
            int(data.get("generation", 0)),
            server(data.get(CHAMPION)),
            server(data.get(CHALLENGER)),
        )


def variant_errors(topology: Topology) -> dict[str, tuple[int, int, str]]:
    """Why a pin is refused: ``{pin: (HTTP status, gRPC status, message)}`` (pure).

    ``bad``: a value that is neither side; ``none``: ``challenger`` with no challenger server.
    """
    champion = topology.champion.version if topology.champion else "?"
    expected = " or ".join(VARIANTS)
    return {
        "bad": (
            400,
            GRPC_INVALID_ARGUMENT,
            f"{VARIANT_HEADER}: unknown value, expected {expected} (any case) "
            "or no header for the weighted split",
        ),
        "none": (
            409,
            GRPC_FAILED_PRECONDITION,
            f"{VARIANT_HEADER}: challenger: no challenger is being rolled out "
            f"(champion v{champion} serves alone)",
        ),
    }


def _variant_maps(has_challenger: bool) -> list[str]:
    """``$roost_pin`` from the header, then the upstream each port routes to."""
    challenger = "challenger" if has_challenger else "none"
    return [
        f"    map $http_{VARIANT_HEADER.replace('-', '_')} $roost_pin {{",
        "        default bad;",
        '        "" "";',
        # Any case; HTTP's optional whitespace (nginx trims spaces, not tabs) is allowed.
        rf"        ~*^\s*{CHAMPION}\s*$ champion;",
        rf"        ~*^\s*{CHALLENGER}\s*$ {challenger};",
        "    }",
        '    map $roost_pin $roost_route { "" $roost_side; champion roost_champion; '
        'challenger roost_challenger; default ""; }',
        '    map $roost_pin $roost_grpc_route { "" $roost_grpc_side; '
        'champion roost_champion_grpc; challenger roost_challenger_grpc; default ""; }',
    ]


def _refusals(topology: Topology, grpc: bool) -> list[str]:
    """``if`` blocks that answer a refused pin before anything is proxied."""
    lines = []
    for pin, (http_status, grpc_status, message) in variant_errors(topology).items():
        lines.append(f"            if ($roost_pin = {pin}) {{")
        if grpc:
            # A trailers-only gRPC answer: HTTP 200 carrying grpc-status/grpc-message.
            lines += [
                f"                add_header grpc-status {grpc_status} always;",
                f'                add_header grpc-message "{message}" always;',
                "                return 204;",
            ]
        else:
            body = json.dumps({"error": message})
            lines.append(f"                return {http_status} '{body}';")
        lines.append("            }")
    return lines


def render_config(
    prefix: Path, topology: Topology, weight: int, challenger: str | None, run_as_root: bool
) -> str:
    """nginx.conf for one weight (pure; unit-tested). 0 or no challenger: champion only.

    Whatever the weight, a recorded challenger server stays an upstream, so a request
    pinned with ``x-roost-variant: challenger`` reaches it (at weight 0 too).
    """
    champ = topology.champion
    if champ is None:
        raise ProxyError("no champion server to route to")
    pinned = topology.challenger
    chall = pinned if weight > 0 else None
    weight = weight if chall is not None else 0
    status = json.dumps(
        {
            "weight": weight,
            "challenger": chall.version if chall else None,
            "champion": champ.version,
            "generation": topology.generation,
            "variants": {CHAMPION: champ.version, CHALLENGER: pinned.version if pinned else None},
        }
    )
    upstreams = [("roost_champion", champ.http_port), ("roost_champion_grpc", champ.grpc_port)]
    if pinned is not None:
        upstreams += [
            ("roost_challenger", pinned.http_port),
            ("roost_challenger_grpc", pinned.grpc_port),
        ]

    def split(variable: str, suffix: str) -> str:
        if chall is None or weight <= 0:
            rules = f"* roost_champion{suffix};"
        elif weight >= 100:
            rules = f"* roost_challenger{suffix};"
        else:
            rules = f"{weight}% roost_challenger{suffix}; * roost_champion{suffix};"
        return f'    split_clients "${{request_id}}" ${variable} {{ {rules} }}'

    tmp = prefix / "tmp"
    lines = [
        f"# generated by roost rollout: weight={weight} generation={topology.generation}",
        *(["user root root;"] if run_as_root else []),
        "worker_processes 1;",
        f"pid {prefix / 'nginx.pid'};",
        f"error_log {prefix / 'error.log'} warn;",
        "events { worker_connections 1024; }",
        "http {",
        "    log_format roost '$msec $status $request_time $roost_route $roost_pin "
        '$upstream_addr "$request"\';',
        f"    access_log {prefix / 'access.log'} roost;",
        f"    client_body_temp_path {tmp / 'body'};",
        f"    proxy_temp_path {tmp / 'proxy'};",
        f"    fastcgi_temp_path {tmp / 'fastcgi'};",
        f"    uwsgi_temp_path {tmp / 'uwsgi'};",
        f"    scgi_temp_path {tmp / 'scgi'};",
        "    client_max_body_size 8m;",
        *(
            f"    upstream {name} {{ server 127.0.0.1:{port}; keepalive 16; }}"
            for name, port in upstreams
        ),
        split("roost_side", ""),
        split("roost_grpc_side", "_grpc"),
        *_variant_maps(pinned is not None),
        "    server {",
        f"        listen 127.0.0.1:{topology.proxy_port};",
        # No idle client keep-alive: a reload then never closes a connection a client is
        # about to reuse, so weight changes lose no requests (loopback connects are cheap).
        "        keepalive_timeout 0;",
        f"        location = {STATUS_PATH} {{",
        "            default_type application/json;",
        f"            return 200 '{status}';",
        "        }",
        "        location / {",
        "            default_type application/json;",
        *_refusals(topology, grpc=False),
        "            proxy_pass http://$roost_route;",
        "            proxy_http_version 1.1;",
        '            proxy_set_header Connection "";',
        "            proxy_set_header Host $host;",
        "            proxy_next_upstream off;",
        "            proxy_read_timeout 60s;",
        "            add_header x-roost-route $roost_route always;",
        "        }",
        "    }",
        "    server {",
        f"        listen 127.0.0.1:{topology.proxy_grpc_port} http2;",
        "        location / {",
        "            default_type application/grpc;",
        *_refusals(topology, grpc=True),
        "            grpc_pass grpc://$roost_grpc_route;",
        "        }",
        "    }",
        "}",
        "",
    ]
    return "\n".join(lines)


def find_nginx(path: str) -> str:
    if os.path.isfile(path) and os.access(path, os.X_OK):
        return path
    raise MissingTool(
        f"nginx not found at {path}: the local rollout backend needs it; install the Debian "
        f"package {NGINX_PACKAGE} (`sudo apt-get install {NGINX_PACKAGE}`, or `make apt-deps`)"
    )


class Proxy:
    """A daemonised nginx master under ``prefix``, controlled through its pid file."""

    def __init__(self, binary: str, prefix: Path) -> None:
        self.binary = binary
        self.prefix = prefix
        self.conf = prefix / "nginx.conf"
        self.pid_file = prefix / "nginx.pid"
        self.error_log = prefix / "error.log"

    def _argv(self, conf: Path, *extra: str) -> list[str]:
        return [
            self.binary,
            "-p",
            str(self.prefix),
            "-c",
            str(conf),
            "-e",
            str(self.error_log),
            *extra,
        ]

    def pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if proc.pid_alive(pid) else None

    def stop_orphans(self) -> list[int]:
        """SIGKILL the workers a killed master left behind (they keep its ports); their pids.

        A worker stays in its master's process group, whose id is the pid the pid file still
        names; only processes named ``nginx`` in that group are touched.
        """
        try:
            group = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return []
        if proc.pid_alive(group):
            return []  # the master lives: nothing is orphaned
        killed = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            comm = stat[stat.find("(") + 1 : stat.rfind(")")]
            fields = stat[stat.rfind(")") + 2 :].split()
            if comm == "nginx" and int(fields[2]) == group and fields[0] != "Z":
                try:
                    os.kill(int(entry.name), signal.SIGKILL)
                except ProcessLookupError:
                    continue
                killed.append(int(entry.name))
        for pid in killed:
            proc.wait_until(lambda pid=pid: not proc.pid_alive(pid), 10, 0.05, what="nginx to die")  # type: ignore[misc]
        return killed

    def _run(self, argv: list[str], what: str) -> None:
        try:
            result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ProxyError(f"nginx {what} failed: {exc}") from None
        if result.returncode != 0:
            detail = (result.stderr or result.stdout).strip().splitlines()
            raise ProxyError(f"nginx {what} failed: {detail[-1] if detail else result.returncode}")

    def write(self, text: str) -> None:
        """Check ``text`` with ``nginx -t`` first; the live config is replaced only if valid."""
        candidate = self.prefix / "nginx.conf.next"
        try:
            for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
                (self.prefix / "tmp" / sub).mkdir(parents=True, exist_ok=True)
            candidate.write_text(text)
        except OSError as exc:  # a full or read-only disk: the live config stays as it is
            raise ProxyError(f"cannot write the nginx config in {self.prefix}: {exc}") from None
        self._run(self._argv(candidate, "-t", "-q"), "config test")
        try:
            atomic_write(self.conf, text)
            candidate.unlink(missing_ok=True)
        except OSError as exc:
            raise ProxyError(f"cannot write the nginx config in {self.prefix}: {exc}") from None

    def start(self) -> None:
        self._run(self._argv(self.conf), "start")

    def reload(self) -> None:
        pid = self.pid()
        if pid is None:
            self.start()
            return
        try:
            os.kill(pid, signal.SIGHUP)
        except ProcessLookupError:  # died since pid() looked: start it on the config
            self.start()

    def stop(self) -> None:
        pid = self.pid()
        if pid is not None:
            os.kill(pid, signal.SIGQUIT)  # graceful: finish in-flight requests
            try:
                proc.wait_until(lambda: not proc.pid_alive(pid), 10, 0.05, what="nginx to quit")
            except RoostError:
                proc.stop_pid(pid, 5)
        self.pid_file.unlink(missing_ok=True)
