"""After the two demo runs (tests/e2e/conftest.py's demo_store): `roost lineage` on the
result, and the MLflow UI in a real browser.

The browser is Debian's ``chromium`` (``make apt-deps``), headless, driven by playwright's
Python package with ``executable_path`` (playwright never downloads a browser here). It
opens the embedded MLflow UI the demo left running, the model version page and the
training run page, and checks what an MLflow user reads there: the description roost
writes, the aliases, the gate and rollout tags, and the confusion-matrix artifact.
Screenshots go to the test's directory, or to ``ROOST_SCREENSHOT_DIR`` when set (that is
how docs/img/ was made).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.demo_store import DemoStore, roost

# Two demo runs (train, gate, canary) and a browser: generous on a busy machine.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1500)]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]  # fmt: skip
UI_TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def demo_store(demo_store: DemoStore) -> Iterator[DemoStore]:
    """The session's two demo runs (tests/e2e/conftest.py; test_demo.py asserts them): the
    second left MLflow and its servers running; they stop when this module is done."""
    try:
        yield demo_store
    finally:
        demo_store.stop()


def test_lineage_after_the_demo(demo_store: DemoStore) -> None:
    result = roost(demo_store.state, "lineage", "sentiment@champion", "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    doc = json.loads(result.stdout)
    assert doc["version"]["version"] == "2" and "champion" in doc["version"]["aliases"]
    assert doc["gate"]["decision"] == "passed" and doc["gate"]["champion_version"] == "1"
    (rollout,) = doc["rollouts"]
    assert rollout["outcome"] == "promoted" and rollout["champion"] == "1"
    # the demo's second run shadows v2 first (weight 0), then the canary steps
    assert [s["weight"] for s in rollout["steps"]] == [0, 10, 25, 50, 100]
    assert [s["step"] for s in rollout["steps"]] == ["shadow", 1, 2, 3, 4]
    assert all(s["verdict"] == "pass" for s in rollout["steps"])
    assert doc["images"]["note"] == "no cluster configured"
    local = doc["serving"]["local"]
    assert local and all(s["pid"] and s["url"].startswith("http://127.0.0.1:") for s in local)
    assert any(s["via"] == "direct" and s["percent"] == 100 for s in local)  # the demo's server

    first = roost(demo_store.state, "lineage", "sentiment/1", "--json")
    assert first.returncode == 0, first.stderr[-2000:]
    assert json.loads(first.stdout)["version"]["superseded_by"] == "2"

    tree = roost(demo_store.state, "lineage", "sentiment@champion")
    assert tree.returncode == 0 and tree.stdout == ""
    for text in ("sentiment v2", "training run", "dataset inputs", "gate", "promoted",
                 "no cluster configured", "tuning study", "shadow at"):  # fmt: skip
        assert text in tree.stderr, text


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} is missing: run `make apt-deps` (Debian's chromium)")
    from playwright.sync_api import sync_playwright

    profile = tmp_path / "chromium-profile"  # a fresh profile every time
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1400, "height": 1000},
        )
        try:
            yield context
        finally:
            context.close()


def _shots(tmp_path: Path) -> Path:
    out = Path(os.environ.get("ROOST_SCREENSHOT_DIR") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    return out


def test_mlflow_ui_shows_description_aliases_tags_and_confusion_matrix(
    demo_store: DemoStore, browser: Any, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    expect.set_options(timeout=UI_TIMEOUT_MS)  # the UI loads slowly on a busy machine
    shots = _shots(tmp_path)
    page = browser.new_page()
    page.set_default_timeout(UI_TIMEOUT_MS)

    page.goto(f"{demo_store.ui}/#/models/sentiment/versions/2")
    # The description roost wrote, rendered as Markdown.
    expect(page.get_by_text("Gate: passed").first).to_be_visible()
    expect(page.get_by_text("Rollout: promoted").first).to_be_visible()
    # The alias, and the gate and rollout tags in the version's tag table.
    expect(page.get_by_role("status", name="champion")).to_be_visible()  # "@ champion"
    for tag in ("roost.gate.decision", "roost.gate.candidate_score", "roost.rollout"):
        expect(page.get_by_text(tag, exact=True).first).to_be_visible()
    assistant = page.get_by_role("button", name="Close")  # MLflow 3's assistant panel: cosmetic
    if assistant.count():
        assistant.first.click()
    page.screenshot(path=str(shots / "mlflow-model-version.png"))

    # The description's link line leads to the training run.
    run_id = demo_store.second["run_id"]
    page.locator(f"a[href*='/runs/{run_id}']").first.click()
    page.wait_for_url(f"**/runs/{run_id}**")
    expect(page.get_by_text("test_macro_f1").first).to_be_visible()
    expect(page.get_by_text("roost.git_dirty").first).to_be_visible()
    page.screenshot(path=str(shots / "mlflow-training-run.png"))

    page.get_by_role("tab", name="Artifacts").or_(
        page.get_by_text("Artifacts", exact=True)
    ).first.click()
    page.get_by_text("confusion_matrix.png", exact=True).first.click()
    image = page.locator("img[src^='blob:']").first
    expect(image).to_be_visible()
    assert image.evaluate("img => img.naturalWidth") > 100  # the PNG decoded, not a broken icon
    page.screenshot(path=str(shots / "mlflow-confusion-matrix.png"))
