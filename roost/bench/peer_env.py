"""The bench peers' own virtual environments: what each installs, and how one is built.

Standard library only, so that it also runs as a script before roost's own environment
exists: ``make test`` builds the peers' venvs side by side with ``.venv``::

    python3 roost/bench/peer_env.py --dir .venv-peers --torch 2.13.0 mlserver pytriton

:func:`roost.bench.peers.environment` (``roost bench``, ``roost bench install-peers``) builds
the same environments with the same stamp, so either one reuses what the other built.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

TORCH_WHEELS = Path("/opt/wheels")

# pip pins of each peer's own environment (plain KServe runs in roost's and has none here).
REQUIREMENTS: dict[str, tuple[str, ...]] = {
    # uvloop 0.22+ raises in asyncio.get_event_loop() without a running loop, which
    # MLServer 1.7.1's inference workers call at start: they die and restart forever.
    "mlserver": ("mlserver==1.7.1", "uvloop==0.21.0"),
    "bentoml": ("bentoml==1.4.40",),
    "pytriton": ("nvidia-pytriton==0.7.0",),
}


class EnvError(Exception):
    """A peer's environment could not be built; the message says why."""


def torch_requirement(version: str) -> tuple[str, str]:
    """(what pip installs for torch ``version``, a constraint that keeps it that torch).

    The local wheel file of that version when there is one (no download), else the version
    from the index.
    """
    base = version.split("+", 1)[0]
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    wheels = sorted(TORCH_WHEELS.glob(f"torch-{base}*-{tag}-*.whl"))
    return (str(wheels[0]) if wheels else f"torch=={base}"), f"torch=={base}"


def stamp(name: str, torch_version: str) -> str:
    """What a current environment of peer ``name`` has in its ``.roost-peer`` file."""
    wanted = "\n".join([torch_requirement(torch_version)[0], *REQUIREMENTS[name]])
    return hashlib.sha256(wanted.encode()).hexdigest()[:16]


def build(
    name: str, root: Path, torch_version: str, timeout_s: float,
    say: Callable[[str], object] = print,
) -> Path:  # fmt: skip
    """The python of peer ``name``'s environment under ``root``, built unless it is current."""
    requirements = REQUIREMENTS[name]
    torch_req, torch_pin = torch_requirement(torch_version)
    digest = stamp(name, torch_version)
    venv = (root / name).resolve()
    python = venv / "bin" / "python"
    stamp_file = venv / ".roost-peer"
    if python.exists() and stamp_file.exists() and stamp_file.read_text().strip() == digest:
        return python
    say(f"{name}: installing {' '.join(requirements)} into {venv}")
    shutil.rmtree(venv, ignore_errors=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    base = getattr(sys, "_base_executable", sys.executable)
    _run([base, "-m", "venv", str(venv)], 120, f"{name}: venv")
    constraints = venv / "constraints.txt"
    constraints.write_text(torch_pin + "\n")
    _run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
         "-c", str(constraints), torch_req, *requirements],
        timeout_s, f"{name}: pip install",
    )  # fmt: skip
    stamp_file.write_text(digest + "\n")
    return python


def _run(argv: list[str], timeout_s: float, what: str) -> None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise EnvError(f"{what} took over {timeout_s:.0f}s") from None
    if done.returncode != 0:
        lines = [ln for ln in (done.stderr or done.stdout).splitlines() if ln.strip()]
        lines = [ln for ln in lines if "is ignored: it is neither" not in ln]
        raise EnvError(f"{what} failed: {' | '.join(lines[-3:])[-400:]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the bench peers' virtual environments.")
    parser.add_argument("names", nargs="+", choices=sorted(REQUIREMENTS))
    parser.add_argument("--dir", type=Path, required=True, help="where the venvs go")
    parser.add_argument("--torch", required=True, help="the torch version roost runs")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per pip install")
    args = parser.parse_args(argv)
    for name in args.names:
        try:
            print(f"{name}: {build(name, args.dir, args.torch, args.timeout)}")
        except EnvError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
