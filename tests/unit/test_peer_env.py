"""The peers' environments build from the standard library alone (make test builds them
beside .venv), with the stamp `roost bench` checks before reusing one."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from roost.bench import peer_env, peers

pytestmark = pytest.mark.unit

SCRIPT = Path(peer_env.__file__)
REPO = Path(__file__).resolve().parents[2]


def base_python() -> str:
    return getattr(sys, "_base_executable", sys.executable)


def test_the_script_runs_without_roosts_environment() -> None:
    """-I: no site-packages, no PYTHONPATH; what `make peers` runs before .venv exists."""
    done = subprocess.run(
        [base_python(), "-I", str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "mlserver" in done.stdout and "pytriton" in done.stdout


def test_an_unknown_peer_is_one_line_and_exit_2() -> None:
    done = subprocess.run(
        [base_python(), "-I", str(SCRIPT), "--dir", "x", "--torch", "2.13.0", "nope"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert "invalid choice: 'nope'" in done.stderr


def test_the_bench_and_the_script_agree_on_each_peers_environment(tmp_path: Path) -> None:
    """A venv the script built for the Makefile's TORCH_VERSION is the one `roost bench`
    (which asks the running torch, e.g. 2.13.0+cpu) reuses, with no rebuild."""
    from importlib import metadata

    running = metadata.version("torch")
    makefile = (REPO / "Makefile").read_text()
    (pinned,) = re.findall(r"^TORCH_VERSION \?= (\S+)$", makefile, re.M)
    assert running.split("+")[0] == pinned
    for name, peer in peers.PEERS.items():
        if peer.own_env:
            assert peer.requirements == peer_env.REQUIREMENTS[name]
            assert peer_env.stamp(name, pinned) == peer_env.stamp(name, running)
    venv = tmp_path / "mlserver"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("")  # stands in for a built venv
    (venv / ".roost-peer").write_text(peer_env.stamp("mlserver", pinned) + "\n")
    said: list[str] = []
    got = peers.environment(peers.PEERS["mlserver"], tmp_path, 1.0, said.append)
    assert got == (venv / "bin" / "python").resolve() and said == []
