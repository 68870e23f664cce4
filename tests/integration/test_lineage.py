"""`roost lineage` against a real MLflow server and the recorded Kubernetes API replay."""

from __future__ import annotations

import dataclasses
import json
import string
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from roost import descriptions, lineage
from roost.cli.app import app
from roost.config import Settings
from roost.registry import Registry
from roost.rollout import engine
from roost.rollout.analysis import Snapshot
from roost.rollout.record import Recorder
from tests.fixtures.k8s.replay import ReplayServer, Reply, Request, api_client, fixture, serve
from tests.unit.test_rollout_engine import PLAN, Sim, drive

pytestmark = pytest.mark.integration

ROLLED = "lineage-sentiment"  # a model of its own: the shared `sentiment` stays as it is
BARE = "lineage-bare"
JOB = "roost-train-20250601-120000-ab12"
NS = "/apis/serving.kserve.io/v1beta1/namespaces/roost/inferenceservices"
PODS = "/api/v1/namespaces/roost/pods"
POD_FILES = {
    "serving.kserve.io/inferenceservice=sentiment": "lineage-pods-predictor.json",
    f"batch.kubernetes.io/job-name={JOB}": "lineage-pods-job.json",
}


class ByLabel(ReplayServer):
    """The replay, with pod lists told apart by their label selector (one path, two lists)."""

    def _answer(self, request: Request) -> Reply:
        if request.method == "GET" and request.path == PODS:
            selector = request.query.get("labelSelector", [""])[0]
            if selector in POD_FILES:
                body = string.Template(fixture(POD_FILES[selector])).safe_substitute(self.vars)
                return Reply(200, body)
        return super()._answer(request)


def cli(*args: str, settings: Settings, state: Path, **env: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(
        app,
        ["--state-dir", str(state), *args],
        env={"MLFLOW_TRACKING_URI": str(settings.tracking.uri), "COLUMNS": "250", **env},
    )
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    return result.exit_code, result.stdout, result.stderr


class Traffic(Sim):
    """The engine tests' simulated traffic, keyed by this rollout's versions."""

    def __init__(self, champion: str, challenger: str) -> None:
        super().__init__()
        self.keys = (f"champ|{champion}", f"chall|{challenger}")

    def tick(self, weight: int, seconds: float) -> Snapshot:
        snapshot = super().tick(weight, seconds)
        return {self.keys[0]: snapshot["champ|1"], self.keys[1]: snapshot["chall|2"]}


@pytest.fixture(scope="module")
def rolled(settings: Settings, champion) -> Iterator[str]:  # type: ignore[no-untyped-def]
    """The champion's model registered as `lineage-sentiment` v1, gated, canaried, promoted."""
    reg = Registry(str(settings.tracking.uri), ROLLED)
    client: MlflowClient = reg.client
    client.set_tag(champion.outcome.run_id, "roost.k8s.job", JOB)
    version = reg.register(champion.outcome.model_uri)
    gate = client.get_model_version(settings.registry.model_name, champion.version).tags
    reg.set_tags(version, {k: v for k, v in gate.items() if k.startswith("roost.gate.")})
    reg.set_alias("champion", version)
    recorder = Recorder(settings, model=ROLLED)
    now = time.time()
    state = engine.start(PLAN, ROLLED, version, "0", "local", now, "lineage-r1")
    state = dataclasses.replace(state, run_id=recorder.ensure_run(state))
    recorder.sync(state)
    state = drive(state, Traffic(champion="0", challenger=version), until=now + 200)
    assert state.phase.value == "promoted", state.history[-1]
    recorder.sync(state)
    try:
        yield version
    finally:
        client.delete_tag(champion.outcome.run_id, "roost.k8s.job")


@pytest.fixture
def replay(rolled: str) -> Iterator[ReplayServer]:
    with serve(ByLabel()) as server:
        server.vars.update(version=rolled, previous="0", job=JOB)
        server.on("GET", NS, Reply.file("lineage-isvcs.json"))
        yield server


def test_every_field_of_a_canaried_version(  # type: ignore[no-untyped-def]
    settings: Settings, champion, rolled: str, replay: ReplayServer
) -> None:
    doc = lineage.build(settings, lineage.parse_ref(f"{ROLLED}@champion"), api_client(replay.url))

    version = doc["version"]
    assert version["version"] == rolled and version["aliases"] == ["champion"]
    assert version["run_id"] == champion.outcome.run_id and version["status"] == "READY"
    assert "**Gate: passed**" in version["description"]
    assert "**Rollout: promoted**" in version["description"]

    run = doc["training_run"]
    assert run["run_id"] == champion.outcome.run_id
    assert run["params"]["train.epochs"] == "4" and "model.vocab_size" in run["params"]
    assert 0.4 < run["metrics"]["test_macro_f1"] < 1 and 0.4 < run["metrics"]["test_accuracy"] < 1
    contexts = {d["context"]: d for d in run["datasets"]}
    assert set(contexts) == {"training", "validation", "test"}
    rows = {c: int(run["params"][f"data.rows_{k}"]) for c, k in
            (("training", "train"), ("validation", "val"), ("test", "test"))}  # fmt: skip
    for context, d in contexts.items():
        assert d["digest"] and d["rows"] == rows[context]
    assert len(run["git"]["commit"]) == 40 and isinstance(run["git"]["dirty"], bool)
    assert run["k8s_job"] == {"name": JOB, "namespace": None}

    gate = doc["gate"]
    assert gate["decision"] == "passed" and gate["metric"] == "macro_f1"
    assert gate["candidate_score"] == pytest.approx(champion.outcome.test.macro_f1, abs=1e-6)

    (rollout,) = doc["rollouts"]
    assert rollout["outcome"] == "promoted" and rollout["id"] == "lineage-r1"
    assert [s["weight"] for s in rollout["steps"]] == list(PLAN.steps)
    assert all(s["verdict"] == "pass" for s in rollout["steps"])
    assert rollout["finished_at"] and rollout["started_at"]

    images = {(c["workload"], c["container"]): c for c in doc["images"]["containers"]}
    serving = images[("InferenceService sentiment", "kserve-container")]
    assert serving["digest"] == "sha256:" + "ab12cd34ef56" * 5 + "ab12"
    assert images[("InferenceService sentiment", "queue-proxy")]["digest"] is None  # no status yet
    assert images[(f"Job {JOB}", "train")]["digest"].startswith("sha256:77e0c5a1")
    # The older revision serves another version: its digest is not this version's.
    assert not any((c["digest"] or "").startswith("sha256:1111aaaa") for c in images.values())

    (isvc,) = doc["serving"]["inference_services"]
    assert isvc["inference_service"] == "sentiment" and isvc["percent"] == 25
    assert {r["version"]: r["percent"] for r in isvc["revisions"]} == {rolled: 25, "0": 75}

    for feature in ("tuning", "batch", "monitoring"):
        assert doc[feature]["recorded"] is False
    assert "tuning study: none recorded" in doc["missing"]
    assert "no git commit recorded" not in doc["missing"]


def test_features_recorded_by_other_commands_are_found_by_tags(
    settings: Settings, rolled: str
) -> None:
    reg = Registry(str(settings.tracking.uri), ROLLED)
    reg.set_tags(rolled, {"roost.tune.study": "lr-search", "roost.tune.trial": "12"})
    client = reg.client
    experiment = client.get_experiment_by_name(settings.tracking.experiment).experiment_id
    tags = {"roost.kind": "monitor", "roost.model": ROLLED, "roost.version": rolled}
    run = client.create_run(experiment, tags=tags, run_name="monitor-report")
    client.log_metric(run.info.run_id, "drift_js", 0.02)
    client.set_terminated(run.info.run_id)
    doc = lineage.build(settings, lineage.Ref(ROLLED, rolled, None), cluster_api=None)
    assert doc["tuning"]["tags"] == {"study": "lr-search", "trial": "12"}
    assert doc["monitoring"]["latest"]["run_id"] == run.info.run_id
    assert doc["monitoring"]["latest"]["metrics"] == {"drift_js": 0.02}
    assert not doc["batch"]["recorded"]


def test_a_version_with_missing_facts_says_each_one(  # type: ignore[no-untyped-def]
    settings: Settings, champion, tmp_path: Path
) -> None:
    client = MlflowClient(str(settings.tracking.uri))
    experiment = client.get_experiment_by_name(settings.tracking.experiment).experiment_id
    bare_run = client.create_run(experiment, run_name="hand-made")  # no tags, inputs, metrics
    client.set_terminated(bare_run.info.run_id)
    client.create_registered_model(BARE)
    # Copied in by hand from a bucket: no run, no gate, no alias, nothing else recorded.
    version = client.create_model_version(BARE, "s3://roost-artifacts/by-hand/sentiment").version
    with_run = client.create_model_version(
        BARE, f"{bare_run.info.artifact_uri}/model", run_id=bare_run.info.run_id
    ).version

    code, out, err = cli(
        "lineage", f"models:/{BARE}/{version}", "--json",
        settings=settings, state=tmp_path, KUBECONFIG=str(tmp_path / "none"),
    )  # fmt: skip
    assert code == 0, err
    doc = json.loads(out)
    assert doc["training_run"] is None and doc["gate"] is None and doc["rollouts"] == []
    assert doc["images"] == {"configured": False, "note": "no cluster configured", "containers": []}
    for line in ("no training run recorded (the version was not registered from a run)",
                 "no gate decision recorded", "no rollout recorded",
                 "no alias points at this version",
                 "images and InferenceServices: no cluster configured",
                 "tuning study: none recorded", "batch runs: none recorded",
                 "monitoring report: none recorded"):  # fmt: skip
        assert line in doc["missing"], line

    code, out, err = cli(
        "lineage", f"{BARE}/{with_run}", settings=settings, state=tmp_path,
        KUBECONFIG=str(tmp_path / "none"),
    )  # fmt: skip
    assert code == 0 and out == ""  # the tree goes to stderr
    for line in ("no git commit recorded", "whether the git tree was dirty is not recorded",
                 "no dataset inputs recorded on the training run",
                 "no test metrics recorded on the training run", "no cluster configured",
                 "none recorded", f"{BARE} v{with_run}"):  # fmt: skip
        assert line in err, line


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("sentiment/999", "registered model 'sentiment' has no version 999"),
        ("sentiment@nosuchalias", "has no version with alias 'nosuchalias'"),
        ("no-such-model/1", "registered model 'no-such-model' has no version 1"),
    ],
)
def test_an_unknown_version_is_one_line_and_exit_3(  # type: ignore[no-untyped-def]
    settings: Settings, champion, tmp_path: Path, ref: str, message: str
) -> None:
    code, out, err = cli("lineage", ref, "--json", settings=settings, state=tmp_path)
    assert code == 3 and out == ""
    assert len(err.strip().splitlines()) == 1 and message in err


def test_descriptions_on_the_registry(settings: Settings, champion) -> None:  # type: ignore[no-untyped-def]
    client = MlflowClient(str(settings.tracking.uri))
    model = client.get_registered_model(settings.registry.model_name)
    assert model.description == descriptions.model_description(settings.registry)
    version = client.get_model_version(settings.registry.model_name, champion.version)
    assert "**Gate: passed**" in version.description
    assert f"/runs/{champion.outcome.run_id})" in version.description


def test_request_id_starts_from_the_logged_request(  # type: ignore[no-untyped-def]
    settings: Settings, rolled: str, tmp_path: Path
) -> None:
    import pandas as pd

    part = tmp_path / "payloads" / f"model={ROLLED}" / f"version={rolled}" / "hour=2026120118"
    part.mkdir(parents=True)
    events = pd.DataFrame({"id": ["req-7", "req-8"], "type": ["request", "response"]})
    events.to_parquet(part / "part-0.parquet", index=False)
    code, out, err = cli(
        "lineage", "--request-id", "req-7", "--json", settings=settings, state=tmp_path,
        ROOST_LINEAGE__PAYLOAD_STORE=str(tmp_path / "payloads"), KUBECONFIG=str(tmp_path / "none"),
    )  # fmt: skip
    assert code == 0, err
    doc = json.loads(out)
    assert doc["request"]["request_id"] == "req-7" and doc["request"]["version"] == rolled
    assert doc["version"]["model"] == ROLLED and doc["version"]["version"] == rolled

    code, out, err = cli(
        "lineage", "--request-id", "req-7", settings=settings, state=tmp_path,
        KUBECONFIG=str(tmp_path / "none"),
    )  # fmt: skip
    assert (
        code == 2 and out == "" and err.strip().startswith("error: payload logging not configured")
    )
