"""Where a version is served on this machine: the local model servers and the canary proxy.

Two records under ``state_dir`` name the processes: ``servers/<pid>.json`` (written by
:func:`roost.serving.local.start` for every background model server) and the local rollout
backend's ``rollout/<model>/servers.json`` (champion and challenger behind nginx). Neither
is believed on its own: a server counts only if its process is alive and its ``/metrics``
says which version it loaded (``roost_model_info``); the proxy's split is read from nginx
itself (``/__roost/proxy``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import httpx

from roost import proc
from roost.config import Settings
from roost.rollout.backends.nginx import STATUS_PATH
from roost.serving.local import SERVERS_DIR

log = logging.getLogger(__name__)

TIMEOUT_S = 2.0


def server_records(state_dir: Path) -> list[dict[str, Any]]:
    """Background model servers recorded under ``state_dir/servers``.

    A record whose process is gone (a server killed without its stop path, e.g. SIGKILL or a
    reboot) is deleted here, so stale files do not pile up; a live pid's record is kept even if
    its server does not answer (``loaded_version`` decides that).
    """
    out = []
    for path in sorted((state_dir / SERVERS_DIR).glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        pid = record.get("pid") if isinstance(record, dict) else None
        if isinstance(pid, int) and not proc.pid_alive(pid):
            path.unlink(missing_ok=True)
            continue
        out.append(record)
    return out


def loaded_version(http_url: str) -> dict[str, str] | None:
    """The model a live server says it loaded: labels of its ``roost_model_info`` gauge."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        response = httpx.get(f"{http_url}/metrics", timeout=TIMEOUT_S)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    for family in text_string_to_metric_families(response.text):
        if family.name == "roost_model_info":
            for sample in family.samples:
                if sample.value == 1:
                    return dict(sample.labels)
    return None


def proxy_split(port: int) -> dict[str, Any] | None:
    """The weight nginx applies now, from nginx (``GET /__roost/proxy``)."""
    try:
        response = httpx.get(f"http://127.0.0.1:{port}{STATUS_PATH}", timeout=TIMEOUT_S)
        document: dict[str, Any] = response.json()
    except (httpx.HTTPError, ValueError):
        return None
    return document if response.status_code == 200 else None


def local_serving(settings: Settings, model: str, version: str) -> list[dict[str, Any]]:
    """Live local servers of ``model`` that loaded ``version``, with their traffic share."""
    state_dir = settings.state_dir.resolve()
    rows: list[dict[str, Any]] = []
    seen: set[int] = set()
    topology_path = state_dir / "rollout" / model / "servers.json"
    try:
        topology = json.loads(topology_path.read_text())
    except (OSError, ValueError):
        topology = None
    if topology:
        split = proxy_split(int(topology["proxy_port"]))
        for role in ("champion", "challenger"):
            record = topology.get(role)
            if not record:
                continue
            seen.add(int(record["pid"]))
            row = _check(record["pid"], f"http://127.0.0.1:{record['http_port']}", version)
            if row is None:
                continue
            weight = int(split["weight"]) if split else None
            percent = None
            if weight is not None:
                percent = weight if role == "challenger" else 100 - weight
            rows.append(
                {
                    **row,
                    "via": f"canary proxy http://127.0.0.1:{topology['proxy_port']} ({role})",
                    "percent": percent,
                }
            )
    for record in server_records(state_dir):
        if int(record.get("pid", 0)) in seen:
            continue
        row = _check(int(record["pid"]), str(record["http_url"]), version, record.get("name"))
        if row is not None:
            rows.append({**row, "via": "direct", "percent": 100})
    return rows


def _check(pid: int, http_url: str, version: str, name: str | None = None) -> dict[str, Any] | None:
    if not proc.pid_alive(int(pid)):
        return None
    info = loaded_version(http_url)
    if info is None or info.get("version") != version:
        return None
    return {
        "pid": int(pid),
        "url": http_url,
        "model_name": info.get("model") or name,
        "alias": info.get("alias") or None,
        "uri": info.get("uri"),
    }
