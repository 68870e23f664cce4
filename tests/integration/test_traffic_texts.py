"""The canary's synthetic traffic texts: a run's held-out test split, or the samples."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from roost import data
from roost.config import Settings
from roost.registry import Registry
from roost.rollout.traffic import SAMPLE_TEXTS, run_texts

pytestmark = pytest.mark.integration


def test_run_texts_are_the_test_split_of_the_run(settings: Settings, champion) -> None:  # type: ignore[no-untyped-def]
    reg = Registry(settings.tracking.uri, settings.registry.model_name)
    run_id = champion.outcome.run_id
    split = [str(text) for text in reg.test_split(run_id)[data.TEXT].tolist()]

    assert run_texts(reg, run_id) == split and len(split) > len(SAMPLE_TEXTS)
    assert run_texts(reg, run_id, 5) == split[:5]


def test_a_run_without_a_test_split_gets_the_sample_texts(settings: Settings) -> None:
    reg = Registry(settings.tracking.uri, settings.registry.model_name)
    bare = MlflowClient(settings.tracking.uri).create_run("0").info.run_id  # logged nothing

    assert run_texts(reg, bare) == list(SAMPLE_TEXTS)
