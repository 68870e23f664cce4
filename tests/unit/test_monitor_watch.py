"""The watch loop's policy (pure) and its state file: counting, cooldown, lease, CAS."""

from __future__ import annotations

from pathlib import Path

import pytest

from roost.config import MonitorSettings
from roost.errors import Conflict
from roost.monitor.report import BREACH, INSUFFICIENT, OK, Statistic, Window
from roost.monitor.watch import StateFile, WatchState, decide, finish

pytestmark = pytest.mark.unit

CFG = MonitorSettings(consecutive=2, action="retrain", cooldown_s=100.0, min_events=10)


def window(i: int, status: str, closed: bool = True) -> Window:
    value = 0.5 if status == BREACH else 0.01
    stats = {"js_distance": Statistic(None if status == INSUFFICIENT else value, 0.1, status)}
    return Window(f"t{i:02d}", f"t{i + 1:02d}", 0 if status == INSUFFICIENT else 100, 10,
                  stats, {}, {"labels": 0, "status": INSUFFICIENT}, closed)  # fmt: skip


def test_two_breaches_in_a_row_trigger_once() -> None:
    state = decide(WatchState("m"), [window(0, BREACH), window(1, BREACH)], "3", CFG, 0.0, "a1")
    assert state.pending is not None
    assert (state.pending.id, state.pending.action, state.pending.version) == ("a1", "retrain", "3")
    assert state.pending.breached == ["js_distance"] and state.pending.values == {
        "js_distance": 0.5
    }
    assert state.pending.windows == ["t00", "t01"]
    assert state.consecutive == 0 and state.last_window_end == "t02"
    # already pending: more breaches decide nothing new
    again = decide(state, [window(2, BREACH), window(3, BREACH)], "3", CFG, 1.0, "a2")
    assert again.pending == state.pending


def test_a_pass_resets_insufficient_does_not_and_open_windows_wait() -> None:
    state = decide(WatchState("m"), [window(0, BREACH), window(1, OK), window(2, BREACH)],
                   "3", CFG, 0.0, "a")  # fmt: skip
    assert state.pending is None and state.consecutive == 1
    state = decide(state, [window(3, INSUFFICIENT)], "3", CFG, 0.0, "a")
    assert state.pending is None and state.consecutive == 1  # no evidence either way
    state = decide(state, [window(4, BREACH, closed=False)], "3", CFG, 0.0, "a")
    assert state.pending is None and state.last_window_end == "t04"  # open: not judged yet
    state = decide(state, [window(2, BREACH), window(4, BREACH)], "3", CFG, 0.0, "a")
    assert state.pending is not None  # t02 was judged already; t04 is the second in a row


def test_cooldown_after_an_action() -> None:
    state = decide(WatchState("m"), [window(0, BREACH), window(1, BREACH)], "3", CFG, 0.0, "a")
    done = finish(state, now=10.0, cooldown_s=CFG.cooldown_s, outcome={"new_version": "4"})
    assert done.pending is None and done.cooldown_until == 110.0
    assert done.history[0]["id"] == "a" and done.history[0]["new_version"] == "4"
    quiet = decide(done, [window(2, BREACH), window(3, BREACH)], "3", CFG, 50.0, "b")
    assert quiet.pending is None  # in cooldown
    later = decide(quiet, [window(4, BREACH), window(5, BREACH)], "3", CFG, 200.0, "c")
    assert later.pending is not None and later.pending.id == "c"


def test_state_file_lease_and_compare_and_swap(tmp_path: Path) -> None:
    states = StateFile(tmp_path, "m")
    mine = states.acquire("w1", lease_s=30, now=0.0)
    assert mine is not None and mine.owner == "w1"
    assert states.acquire("w2", lease_s=30, now=10.0) is None  # held and alive
    taken = states.acquire("w2", lease_s=30, now=31.0)  # w1 went silent: w2 takes over
    assert taken is not None and taken.owner == "w2"
    with pytest.raises(Conflict, match="changed since it was read"):
        states.save(mine)  # w1's copy is stale
    saved = states.save(taken)
    assert StateFile(tmp_path, "m").load() == saved
    assert WatchState.loads(saved.dumps()) == saved


def test_k8s_retraining_names_its_job_after_the_action_and_needs_an_s3_store(
    tmp_path: Path,
) -> None:
    from typer.testing import CliRunner

    from roost.cli.app import app
    from roost.monitor.k8s_retrain import job_name

    assert job_name("3F2A-9c41_d0") == "roost-retrain-3f2a9c41d0" == job_name("3f2a9c41d0")
    result = CliRunner().invoke(app, [
        "--state-dir", str(tmp_path), "monitor", "watch", "--action", "retrain", "--on", "k8s",
        "--store", str(tmp_path / "store"), "--once",
    ])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and "s3://" in result.stderr
    bad = CliRunner().invoke(app, ["monitor", "watch", "--on", "cloud", "--once"])
    assert bad.exit_code == 2 and "local or k8s" in bad.stderr


def test_monitor_up_keeps_the_journal_local_for_an_s3_store(tmp_path: Path) -> None:
    from roost.config import load_settings
    from roost.monitor import local

    s3 = load_settings(None, {"state_dir": tmp_path, "monitor": {"store": "s3://b/events"}})
    assert local.store_uri(s3) == "s3://b/events"
    assert local.store_dir(s3) == (tmp_path / "monitor").resolve()
    argv = local.serve_argv(s3, "127.0.0.1", 1, local.store_dir(s3), local.store_uri(s3))
    assert argv[argv.index("--store") + 1] == "s3://b/events"
    assert argv[argv.index("--journal-dir") + 1] == str((tmp_path / "monitor").resolve())
    plain = load_settings(None, {"state_dir": tmp_path, "monitor": {"store": str(tmp_path / "x")}})
    assert local.store_uri(plain) == str(local.store_dir(plain)) == str(tmp_path / "x")
    argv = local.serve_argv(plain, "127.0.0.1", 1, local.store_dir(plain), local.store_uri(plain))
    assert "--journal-dir" not in argv
