"""The e2e suites' shared demo: two `roost demo` runs on one store, made once per session
(the fixture is tests/e2e/conftest.py's ``demo_store``).

tests/e2e/test_demo.py asserts both runs (the loop, then the rerun on the same store);
tests/e2e/test_lineage_ui.py reads the store they leave (`roost lineage`, the MLflow UI in
a browser). One pair of runs serves both (each used to run its own: two demos, ~2 min each).
The first run stops what it started; the second runs with --keep-running so that MLflow, the
demo's model server and the canary's proxy are still serving for the lineage and UI checks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from roost import proc, tracking
from roost.config import load_settings
from tests.conftest import MLFLOW_EXPORTS

DEMO_ARGS = ("demo", "--json", "--max-rows", "6000", "--epochs", "4")


def roost(state: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "roost", "--state-dir", str(state), *args],
        capture_output=True, text=True, timeout=timeout, check=False,
        env={
            # The fixture is session-scoped, so it can run before conftest's module-scoped
            # clean-up: without MLflow's exports from earlier modules' in-process calls, the
            # demo starts its own server instead of dialling a stopped one.
            **{k: v for k, v in os.environ.items() if k not in MLFLOW_EXPORTS},
            "KUBECONFIG": str(state / "no-kubeconfig"),  # no cluster: lineage says so
            "ROOST_TRACKING__STARTUP_TIMEOUT_S": "300",  # MLflow starts slowly on a busy machine
        },
    )  # fmt: skip


@dataclass
class DemoStore:
    state: Path
    first: dict[str, Any]
    # What answered right after the first run (before the second started anything):
    # {"server_json": bool, "mlflow": bool, "metrics": bool}
    after_first: dict[str, bool]
    second: dict[str, Any]
    stopped: bool = False

    @property
    def ui(self) -> str:
        return str(self.second["mlflow_ui"])

    def stop(self) -> None:
        """Stop what the --keep-running run left serving (idempotent)."""
        if self.stopped:
            return
        self.stopped = True
        stop_demo_servers(self.state)


def stop_demo_servers(state: Path) -> None:
    from roost.monitor import local as receiver
    from roost.rollout.backends.local import LocalBackend

    settings = load_settings(None, {"state_dir": state})
    try:
        LocalBackend(settings).shutdown()  # nginx and the canary's servers
        for record in (state / "servers").glob("*.json"):  # the demo's own server
            proc.stop_pid(int(json.loads(record.read_text())["pid"]))
        receiver.down(settings)  # the shadow phase's payload receiver
    finally:
        tracking.down(settings)


def run(state: Path, *extra: str) -> dict[str, Any]:
    result = roost(state, *DEMO_ARGS, *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)  # type: ignore[no-any-return]
