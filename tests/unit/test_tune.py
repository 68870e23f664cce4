"""roost tune's pure parts: the search space, the worker policy, pruning on synthetic curves,
the heartbeat storage, and the CLI's one-line errors for a bad space file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pytest
from typer.testing import CliRunner

from roost.cli.app import app
from roost.config import load_settings
from roost.errors import ConfigError
from roost.train import EpochStats
from roost.tune import policy, space
from roost.tune import study as st
from roost.tune.storage import HeartbeatJournalStorage, redact

pytestmark = pytest.mark.unit


# -- space -----------------------------------------------------------------------------------


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


def test_default_space_covers_the_model_knobs() -> None:
    names = set(load_settings(None, {}).tune.space)
    assert {
        "train.lr", "train.weight_decay", "train.batch_size", "train.epochs",
        "model.embed_dim", "model.ngram", "model.max_vocab", "model.dropout",
    } <= names  # fmt: skip
    lr = load_settings(None, {}).tune.space["train.lr"]
    assert isinstance(lr, space.FloatParam) and lr.log


def test_space_file_parses(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "train.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}\n"
        "model.embed_dim: {type: categorical, choices: [16, 32]}\n"
        "model.ngram: {type: int, low: 1, high: 2}\n",
    )
    parsed = space.load_space(path)
    assert parsed["model.embed_dim"] == space.CategoricalParam(choices=[16, 32])
    assert parsed["model.ngram"] == space.IntParam(low=1, high=2)
    # also accepted under a top-level `space:` key
    nested = write(tmp_path, "space:\n  model.ngram: {type: int, low: 1, high: 3}\n")
    assert list(space.load_space(nested)) == ["model.ngram"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "train.lr: {type: float, low: 0.1, high: 0.01}",
            "train.lr: Value error, low (0.1) is above high",
        ),
        (
            "train.lr: {type: float, low: 0, high: 0.1, log: true}",
            "train.lr: Value error, a log scale needs low > 0",
        ),
        (
            "train.learning_rate: {type: float, low: 0.1, high: 1}",
            "train.learning_rate: not a tunable setting",
        ),
        ("data.max_rows: {type: int, low: 1, high: 5}", "data.max_rows: not a tunable setting"),
        ("train.seed: {type: int, low: 1, high: 5}", "train.seed: fixed for every trial"),
        ("model.ngram: {type: int, low: 1, high: 5}", "model.ngram: 5 is not a valid value"),
        ("model.dropout: {type: float, low: 0.1, hi: 0.5}", "model.dropout.high: Field required"),
        ("model.dropout: {type: normal, low: 0.1, high: 0.5}", "model.dropout: Input tag 'normal'"),
        (
            "model.embed_dim: {type: categorical, choices: []}",
            "model.embed_dim.choices: List should have at least 1",
        ),
        ("[1, 2]", "expected a mapping"),
        ("train.lr: {type: float, low: [", "not valid YAML"),
    ],
)
def test_bad_space_is_one_error_naming_the_field(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        space.load_space(write(tmp_path, text))
    message = str(err.value)
    assert expected in message, message
    assert len(message.splitlines()) == 1


def test_grid_needs_finite_values() -> None:
    ok = {
        "model.ngram": space.IntParam(low=1, high=3),
        "model.dropout": space.FloatParam(low=0.1, high=0.3, step=0.1),
    }
    assert space.grid(ok) == {"model.ngram": [1, 2, 3], "model.dropout": [0.1, 0.2, 0.3]}
    assert space.grid_size(ok) == 9
    with pytest.raises(ConfigError, match=r"train\.lr: a float range needs a step"):
        space.grid({"train.lr": space.FloatParam(low=1e-3, high=1e-2)})


def test_cli_rejects_a_bad_space_file_with_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, "model.embed_dim: {type: int, low: 64, high: 8}\n")
    result = CliRunner().invoke(app, ["tune", "--space", str(path), "--trials", "2"])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:")
    assert "model.embed_dim" in lines[0] and "above high" in lines[0]
    assert result.stdout == ""


def test_cli_rejects_an_unknown_sampler() -> None:
    result = CliRunner().invoke(app, ["tune", "--sampler", "cmaes"])
    assert result.exit_code == 2


# -- objective wiring ------------------------------------------------------------------------


def test_suggested_values_become_trial_settings(tmp_path: Path) -> None:
    settings = load_settings(
        None, {"state_dir": tmp_path, "train": {"checkpoint_dir": str(tmp_path)}}
    )
    drawn = {
        "train.lr": 0.01, "train.weight_decay": 1e-5, "train.batch_size": 128,
        "train.epochs": 5, "model.embed_dim": 32, "model.ngram": 1,
        "model.max_vocab": 50_000, "model.dropout": 0.2,
    }  # fmt: skip
    values = space.suggest(optuna.trial.FixedTrial(drawn), settings.tune.space)
    assert values == drawn
    trial = st.trial_settings(settings, values)
    assert (trial.train.lr, trial.train.batch_size, trial.train.epochs) == (0.01, 128, 5)
    assert (trial.model.embed_dim, trial.model.ngram, trial.model.dropout) == (32, 1, 0.2)
    assert trial.train.checkpoint_dir is None  # trials never resume each other's checkpoints
    assert settings.train.lr == 3e-3  # the base settings are untouched


def test_objective_value_per_metric() -> None:
    stats = EpochStats(1, 0.9, 0.5, 0.8, 0.6, 1.0, True, val_macro_f1=0.55)
    assert st.epoch_value(stats, "val_macro_f1") == 0.55
    assert st.epoch_value(stats, "val_accuracy") == 0.6
    assert st.direction("val_loss") == "minimize" and st.direction("val_macro_f1") == "maximize"


def test_sampler_pruner_and_target_follow_settings(tmp_path: Path) -> None:
    grid_space = {"model.ngram": {"type": "int", "low": 1, "high": 2}}
    s = load_settings(
        None,
        {"tune": {"sampler": "grid", "pruner": "hyperband", "trials": 10, "space": grid_space}},
    )
    assert isinstance(st.make_sampler(s.tune), optuna.samplers.GridSampler)
    assert isinstance(st.make_pruner(s), optuna.pruners.HyperbandPruner)
    assert st.target_trials(s.tune) == 2  # a grid of two points
    s = load_settings(None, {"tune": {"pruner": "none", "sampler": "random"}})
    assert isinstance(st.make_pruner(s), optuna.pruners.NopPruner)
    assert isinstance(st.make_sampler(s.tune), optuna.samplers.RandomSampler)
    assert st.max_epochs(load_settings(None, {})) == 12  # the space's epochs high


def test_a_space_file_replaces_the_space(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROOST_TUNE__SPACE", '{"model.ngram": {"type": "int", "low": 1, "high": 3}}')
    monkeypatch.setenv("ROOST_TUNE__TRIALS", "7")
    path = write(tmp_path, "train.lr: {type: float, low: 0.001, high: 0.01}\n")
    s = load_settings(None, {"tune": {"space_file": path}})
    assert list(s.tune.space) == ["train.lr"] and s.tune.trials == 7
    assert list(load_settings(None, {}).tune.space) == ["model.ngram"]  # env alone: its space


# -- pruning on synthetic curves -------------------------------------------------------------


def study_with_curves(pruner: optuna.pruners.BasePruner, curves: list[list[float]]) -> optuna.Study:
    study = optuna.create_study(direction="maximize", pruner=pruner)
    for curve in curves:
        study.add_trial(
            optuna.trial.create_trial(
                value=max(curve),
                intermediate_values=dict(enumerate(curve, start=1)),
                params={},
                distributions={},
            )
        )
    return study


def prunes_at(study: optuna.Study, curve: list[float]) -> int | None:
    trial = study.ask()
    for epoch, value in enumerate(curve, start=1):
        trial.report(value, epoch)
        if trial.should_prune():
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            return epoch
    study.tell(trial, curve[-1])
    return None


GOOD = [[0.50, 0.60, 0.66, 0.70], [0.52, 0.61, 0.67, 0.69], [0.48, 0.58, 0.65, 0.71]]


def median(startup: int, warmup: int) -> optuna.pruners.BasePruner:
    settings = load_settings(
        None, {"tune": {"pruner": "median", "startup_trials": startup, "warmup_epochs": warmup}}
    )
    return st.make_pruner(settings)


def test_median_pruner_stops_a_hopeless_curve_after_warmup() -> None:
    study = study_with_curves(median(startup=3, warmup=1), GOOD)
    assert prunes_at(study, [0.30, 0.31, 0.32, 0.33]) == 2  # epoch 1 is warm-up
    assert prunes_at(study, [0.55, 0.65, 0.70, 0.74]) is None
    study = study_with_curves(median(startup=3, warmup=0), GOOD)
    assert prunes_at(study, [0.30, 0.31, 0.32, 0.33]) == 1


def test_median_pruner_waits_for_startup_trials() -> None:
    study = study_with_curves(median(startup=5, warmup=0), GOOD)
    assert prunes_at(study, [0.10, 0.10, 0.10, 0.10]) is None


def test_no_pruner_never_prunes() -> None:
    study = study_with_curves(optuna.pruners.NopPruner(), GOOD)
    assert prunes_at(study, [0.0, 0.0, 0.0, 0.0]) is None


def test_hyperband_prunes_bad_curves_at_its_rungs() -> None:
    settings = load_settings(
        None,
        {
            "tune": {
                "pruner": "hyperband",
                "space": {"train.epochs": {"type": "int", "low": 2, "high": 4}},
            }
        },
    )
    pruner = st.make_pruner(settings)  # resources 1..4 epochs, reduction factor 3
    study = optuna.create_study(
        direction="maximize", pruner=pruner, sampler=optuna.samplers.RandomSampler(0)
    )
    good = [prunes_at(study, [0.5 + 0.01 * i] * 4) for i in range(9)]
    bad = [prunes_at(study, [0.01] * 4) for _ in range(6)]
    assert sum(p is not None for p in bad) >= 3, bad
    assert sum(p is not None for p in good) < len(good), good


# -- worker policy ---------------------------------------------------------------------------


def views(
    *states: str, retries: dict[int, tuple[int, ...]] | None = None
) -> list[policy.TrialView]:
    retries = retries or {}
    return [policy.TrialView(i, s, retries.get(i, ())) for i, s in enumerate(states)]


def test_a_failed_trial_that_was_retried_is_not_finished() -> None:
    t = policy.tally(views("COMPLETE", "FAIL", "PRUNED", "WAITING", retries={3: (1,)}))
    assert (t.complete, t.pruned, t.failed, t.retried, t.waiting) == (1, 1, 0, 1, 1)
    assert t.finished == 2
    # a retry of a retry names the whole chain: both failures are superseded
    t = policy.tally(views("FAIL", "FAIL", "COMPLETE", retries={1: (0,), 2: (0, 1)}))
    assert (t.failed, t.retried, t.finished) == (0, 2, 1)


@pytest.mark.parametrize(
    ("states", "target", "out_of_time", "action"),
    [
        ((), 3, False, "run"),
        (("COMPLETE", "RUNNING"), 3, False, "run"),
        (("COMPLETE", "RUNNING", "RUNNING"), 3, False, "wait"),  # a dead worker's retry may come
        (("COMPLETE", "RUNNING", "RUNNING", "WAITING"), 3, False, "run"),
        (("COMPLETE", "PRUNED", "FAIL"), 3, False, "done"),
        (("COMPLETE", "RUNNING"), 3, True, "done"),
    ],
)
def test_next_action(states: tuple[str, ...], target: int, out_of_time: bool, action: str) -> None:
    assert policy.next_action(policy.tally(views(*states)), target, out_of_time) == action


# -- heartbeat storage -----------------------------------------------------------------------


def test_a_silent_trial_is_failed_retried_and_reported(tmp_path: Path) -> None:
    seen: list[int] = []
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)

    def on_stale(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        seen.append(trial.number)
        retry(study, trial)

    storage = HeartbeatJournalStorage(
        tmp_path / "j.journal", heartbeat_s=1, grace_s=0, on_stale=on_stale
    )
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    assert trial.number == 0
    optuna.storages.fail_stale_trials(study)  # grace 0: silent at once
    trials = study.get_trials(deepcopy=False)
    assert [t.state.name for t in trials] == ["FAIL", "WAITING"]
    assert seen == [trial.number]
    assert trials[1].system_attrs[policy.RETRY_HISTORY_ATTR] == [0]
    assert trials[1].params == trials[0].params
    t = policy.tally(st.trial_views(study))
    assert (t.retried, t.failed, t.waiting, t.finished) == (1, 0, 1, 0)
    # a second storage object on the same file (another process) sees the same study
    other = HeartbeatJournalStorage(tmp_path / "j.journal", heartbeat_s=1, grace_s=60)
    assert len(optuna.load_study(study_name="s", storage=other).trials) == 2


def test_a_beating_trial_is_not_stale(tmp_path: Path) -> None:
    storage = HeartbeatJournalStorage(tmp_path / "j.journal", heartbeat_s=1, grace_s=30)
    study = optuna.create_study(study_name="s", storage=storage)
    trial = study.ask()
    storage.record_heartbeat(trial._trial_id)
    optuna.storages.fail_stale_trials(study)
    assert study.get_trials(deepcopy=False)[0].state.name == "RUNNING"
    study.tell(trial, 1.0)
    storage.record_heartbeat(trial._trial_id)  # after the end: ignored, not an error


def test_storage_url_never_shows_the_password() -> None:
    assert redact("postgresql+psycopg2://optuna:s3cret@db:5432/optuna") == (
        "postgresql+psycopg2://optuna:***@db:5432/optuna"
    )
    assert redact("postgresql://optuna@db/optuna") == "postgresql://optuna@db/optuna"
    assert redact("/tmp/x.journal") == "/tmp/x.journal"


# -- progress display ------------------------------------------------------------------------


def progress(*rows: tuple[int, str, float | None, int | None]) -> Any:
    from roost.tune.local import Progress, TrialRow

    trial_rows = [TrialRow(n, state, {"train.lr": 0.01}, v, e, None) for n, state, v, e in rows]
    views_ = [policy.TrialView(r.number, r.state) for r in trial_rows]
    return Progress(trial_rows, policy.tally(views_), 3, 0, 0.61, 2)


def test_plain_progress_prints_one_line_per_trial_event(capsys: pytest.CaptureFixture[str]) -> None:
    from roost.cli.tune import ProgressDisplay

    display = ProgressDisplay(live=False, quiet=False)
    display.update(progress((0, "RUNNING", None, None)))
    display.update(progress((0, "RUNNING", 0.5, 1)))  # an epoch: no line without a terminal
    display.update(progress((0, "COMPLETE", 0.61, 2), (1, "PRUNED", 0.2, 1)))
    display.update(progress((0, "COMPLETE", 0.61, 2), (1, "PRUNED", 0.2, 1)))  # nothing new
    lines = " ".join(capsys.readouterr().err.split())
    assert lines.count("trial 0 started lr=0.01") == 1
    assert "trial 0 COMPLETE 0.6100 after 2 epoch(s) | best #0 0.6100 [2/3]" in lines
    assert lines.count("trial 1 PRUNED 0.2000 after 1 epoch(s)") == 1


def test_live_table_has_a_row_per_trial() -> None:
    from rich.console import Console

    from roost.cli.tune import table

    console = Console(width=160, record=True)
    console.print(table(progress((0, "COMPLETE", 0.61, 2), (1, "RUNNING", 0.4, 1))))
    text = console.export_text()
    assert "2/3 finished" not in text and "1/3 finished" in text
    assert "COMPLETE" in text and "RUNNING" in text
    assert text.count("0.6100") == 3  # trial 0's value, and the best so far on both rows


def test_a_stopped_workers_trials_fail_at_once_and_are_retried(tmp_path: Path) -> None:
    settings = load_settings(None, {"state_dir": tmp_path})
    storage = HeartbeatJournalStorage(tmp_path / "j.journal", heartbeat_s=1, grace_s=3600)
    study = optuna.create_study(study_name="s", storage=storage)
    mine, other = study.ask(), study.ask()
    mine.set_user_attr(st.WORKER_ATTR, "host:101")
    other.set_user_attr(st.WORKER_ATTR, "host:202")
    assert st.fail_trials_of(settings, study, {"host:101"}) == [mine.number]
    states = [t.state.name for t in study.get_trials(deepcopy=False)]
    assert states == ["FAIL", "RUNNING", "WAITING"]  # the other worker's trial runs on
