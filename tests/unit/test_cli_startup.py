"""An operator's command answers at once: it imports no heavy library it does not use.

Behaviour, not timing: each case runs the command in a fresh interpreter and reads
``sys.modules`` afterwards (``roost --version`` took ~5 s while torch and mlflow came in
through ``cli/output.py``). Commands that train, serve or talk to MLflow import them when run.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from roost.config import load_settings
from roost.proc import free_port
from roost.rollout import engine
from roost.rollout.backends.local import LocalBackend
from roost.rollout.state import Plan

pytestmark = pytest.mark.unit

HEAVY = ("torch", "mlflow", "pandas", "pyarrow", "kserve", "kubernetes", "boto3", "sklearn")

# Runs `roost ARGS` in this interpreter, then prints which HEAVY packages it imported.
PROBE = """
import json, sys
from roost.cli.app import main
code = main(json.loads(sys.argv[1]))
heavy = sorted({name.split(".")[0] for name in sys.modules} & set(json.loads(sys.argv[2])))
print("\\n" + json.dumps({"exit": code, "heavy": heavy}))
"""


def roost(*args: str, state_dir: Path) -> tuple[int, list[str], str]:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(state_dir), "ROOST_STATE_DIR": str(state_dir)}
    done = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(list(args)), json.dumps(HEAVY)],
        capture_output=True, text=True, timeout=120, env=env, cwd=state_dir,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["exit"], result["heavy"], done.stderr


@pytest.mark.parametrize(
    "args",
    [
        ("--version",),
        ("--help",),
        ("rollout", "--help"),
        ("rollout", "pause", "--help"),
        ("train", "--help"),
        ("serve", "--help"),
        ("bench", "--help"),
    ],
)
def test_version_and_help_import_no_heavy_library(args: tuple[str, ...], tmp_path: Path) -> None:
    code, heavy, err = roost(*args, state_dir=tmp_path)
    assert code == 0, err
    assert heavy == []


def test_mlflow_status_imports_no_heavy_library(tmp_path: Path) -> None:
    code, heavy, err = roost("mlflow", "status", state_dir=tmp_path)
    assert code == 4, err  # nothing runs there: not reachable
    assert heavy == []


def test_predict_imports_no_heavy_library(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    code, heavy, err = roost("predict", "a text", "--url", url, state_dir=tmp_path)
    assert code == 4 and "error:" in err  # no server there
    assert heavy == []


def test_rollout_status_and_overrides_import_no_heavy_library(tmp_path: Path) -> None:
    settings = load_settings(None, {"state_dir": tmp_path})
    state = engine.start(Plan(steps=(10, 100)), "sentiment", "2", "1", "local", 1.0, "r9")
    LocalBackend(settings, "http://127.0.0.1:1").create_state(engine.commit(state, 2.0))

    code, heavy, err = roost("rollout", "status", "sentiment", "--json", state_dir=tmp_path)
    assert code == 0, err
    assert heavy == []
    code, heavy, err = roost("rollout", "abort", "other", state_dir=tmp_path)
    assert code == 3 and "no rollout of other" in err
    assert heavy == []


def test_command_modules_do_not_import_the_app() -> None:
    """The root app imports the command modules; they read its state from cli/context.py."""
    cli = Path(__file__).resolve().parents[2] / "roost" / "cli"
    offenders = []
    for module in sorted(cli.glob("*.py")):
        if module.name == "app.py":
            continue
        for node in ast.walk(ast.parse(module.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            names = {alias.name for alias in node.names}
            if node.module == "roost.cli.app" or (node.module == "roost.cli" and "app" in names):
                offenders.append(module.name)
    assert offenders == []


@pytest.mark.parametrize(
    "args",
    [
        ("predict", "--protocol", "grpc", "--timeout", "2"),  # kserve's --protocol: v1/v2/grpc-v2
        ("bench", "profile", "--protocol", "rest-v2", "--out", "x"),
    ],
)
def test_options_kserve_also_has_are_roosts_alone(args: tuple[str, ...], tmp_path: Path) -> None:
    """KServe parses sys.argv when imported; roost's own options must never reach it."""
    port = free_port()
    argv = [*args, "--grpc-target", f"127.0.0.1:{port}", "hi"] if args[0] == "predict" else args
    done = subprocess.run(
        [str(Path(sys.executable).with_name("roost")), *argv],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={"PATH": str(Path(sys.executable).parent), "ROOST_STATE_DIR": str(tmp_path)},
    )  # fmt: skip
    assert "invalid choice" not in done.stderr, done.stderr
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines and ("error" in lines[-1].lower()), done.stderr
