"""Local processes and waiting: free ports, background servers, deadlines.

Shared by the embedded MLflow server, local model servers, the nginx proxy and the
benchmark, so each of them starts, waits and stops the same way.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx

from roost.errors import Timeout, Unavailable

T = TypeVar("T")


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (bind to 0, read it back)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_until(
    predicate: Callable[[], T | None],
    timeout: float,
    interval: float = 0.1,
    describe: Callable[[], str] | None = None,
    what: str = "condition",
) -> T:
    """Call ``predicate`` until it returns something truthy; check first, sleep after.

    On timeout raise :class:`Timeout` with ``describe()``, the last observed state.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            state = describe() if describe else ""
            raise Timeout(
                f"timed out after {timeout:.0f}s waiting for {what}"
                + (f": {state}" if state else "")
            )
        time.sleep(interval)


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        return httpx.get(url, timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not reaped) still answers kill(0); treat it as dead.
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


@dataclass
class Background:
    """A process started in its own session, logging to a file."""

    pid: int
    log_file: Path
    popen: subprocess.Popen[bytes] | None = None

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        return pid_alive(self.pid)

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 15.0) -> None:
        stop_pid(self.pid, timeout)
        if self.popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=1)


def start_background(
    argv: Sequence[str],
    log_file: Path,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> Background:
    """Start ``argv`` detached (own session, so it outlives the caller); output to ``log_file``."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as log:
        popen = subprocess.Popen(
            list(argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            cwd=cwd,
            start_new_session=True,
        )
    return Background(pid=popen.pid, log_file=log_file, popen=popen)


def stop_pid(pid: int, timeout: float = 15.0) -> None:
    """SIGTERM the process group of ``pid``, then SIGKILL it after ``timeout``."""
    if not pid_alive(pid):
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(os.getpgid(pid), sig)
        with contextlib.suppress(Timeout):
            wait_until(lambda: not pid_alive(pid), timeout, 0.1, what=f"pid {pid} to exit")
            return


def wait_http(
    url: str, timeout: float, proc: Background | None = None, what: str | None = None
) -> None:
    """Wait for ``url`` to answer 200; fail early (with its log) if ``proc`` dies."""

    def ready() -> bool:
        if proc is not None and not proc.alive():
            raise ProcessExited(f"{what or url} exited during start-up:\n{proc.log_tail()}")
        return http_ok(url)

    wait_until(
        ready,
        timeout,
        0.2,
        describe=(lambda: proc.log_tail(5)) if proc else None,
        what=what or url,
    )


class ProcessExited(Unavailable):
    """A background server exited before it became ready."""


def cpu_limit() -> int:
    """CPUs this process may use: the cgroup quota (a pod's CPU limit) if set, else the count."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    count = count or 1
    try:  # cgroup v2: "max 100000" or "200000 100000"
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            return max(1, min(count, int(int(quota) / int(period) + 0.5)))
    except (OSError, ValueError):
        pass
    try:  # cgroup v1
        quota_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        if quota_us > 0:
            return max(1, min(count, int(quota_us / period_us + 0.5)))
    except (OSError, ValueError):
        pass
    return count


def git_commit(mark_dirty: bool = False) -> str | None:
    """The commit roost's code is at: ``ROOST_GIT_COMMIT`` (images set it), else git's HEAD.

    With ``mark_dirty``, ``-dirty`` is appended when tracked files differ from HEAD. None when
    neither is known (an installed package outside a checkout, no git).
    """
    from roost import config

    commit = config.environ("ROOST_GIT_COMMIT")
    if commit:
        return commit
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        head = git("rev-parse", "HEAD")
        dirty = mark_dirty and bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + "-dirty" if dirty else head) or None
