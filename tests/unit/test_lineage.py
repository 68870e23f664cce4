"""The pure parts of `roost lineage` and of the registry descriptions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from roost import descriptions
from roost.config import RegistrySettings, load_settings
from roost.errors import ConfigError, NotFound
from roost.lineage import cluster, parse_ref
from roost.lineage import mlflow_facts as facts
from roost.lineage.requests import PayloadLoggingNotConfigured, find_request

pytestmark = pytest.mark.unit

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "k8s"


@pytest.mark.parametrize(
    ("text", "model", "version", "alias"),
    [
        ("sentiment@champion", "sentiment", None, "champion"),
        ("sentiment/3", "sentiment", "3", None),
        ("models:/sentiment@challenger", "sentiment", None, "challenger"),
        ("models:/sentiment/12", "sentiment", "12", None),
    ],
)
def test_parse_ref(text: str, model: str, version: str | None, alias: str | None) -> None:
    ref = parse_ref(text)
    assert (ref.model, ref.version, ref.alias) == (model, version, alias)


@pytest.mark.parametrize(
    "text", ["sentiment", "sentiment/latest", "@champion", "models:/", "a/b/c"]
)
def test_parse_ref_refuses_what_it_cannot_read(text: str) -> None:
    with pytest.raises(ConfigError, match="NAME@ALIAS"):
        parse_ref(text)


GATE_TAGS = {
    "roost.gate.decision": "passed",
    "roost.gate.metric": "macro_f1",
    "roost.gate.candidate_score": "0.720000",
    "roost.gate.champion_score": "0.710000",
    "roost.gate.champion_version": "1",
    "roost.gate.min_improvement": "0",
    "roost.gate.reason": "macro_f1 0.7200 >= champion v1 0.7100 + 0 (delta +0.0100)",
    "roost.gate.test_rows": "900",
    "roost.gate.evaluated_at": "2026-12-01T18:00:00Z",
}


def test_gate_reads_both_scores_from_the_tags() -> None:
    missing: list[str] = []
    gate = facts.gate(GATE_TAGS, missing)
    assert gate is not None and missing == []
    assert gate["decision"] == "passed" and gate["metric"] == "macro_f1"
    assert gate["candidate_score"] == 0.72 and gate["champion_score"] == 0.71
    assert gate["champion_version"] == "1" and gate["test_rows"] == 900


def test_first_version_gate_has_no_champion_score() -> None:
    tags = {**GATE_TAGS, "roost.gate.champion_score": "none", "roost.gate.champion_version": "none"}
    gate = facts.gate(tags, [])
    assert gate is not None and gate["champion_score"] is None and gate["champion_version"] is None


def test_no_gate_tags_is_said_missing() -> None:
    missing: list[str] = []
    assert facts.gate({"roost.source_run": "abc"}, missing) is None
    assert missing == ["no gate decision recorded"]


def test_features_are_found_by_tag_prefix_and_say_none_recorded_otherwise() -> None:
    tags = {"roost.tune.study": "sentiment-lr", "roost.tune.trial": "7", "roost.other": "x"}
    out = facts.features([], tags, None)
    assert out["tune"]["recorded"] and out["tune"]["tags"] == {
        "study": "sentiment-lr",
        "trial": "7",
    }
    assert not out["batch"]["recorded"] and out["batch"]["runs"] == []
    assert not out["monitor"]["recorded"] and out["monitor"]["latest"] is None


def test_digest_from_the_kubelets_image_ids() -> None:
    assert cluster.digest("ghcr.io/roost/serving@sha256:abc") == "sha256:abc"
    assert cluster.digest("docker-pullable://ghcr.io/roost/serving@sha256:def") == "sha256:def"
    assert cluster.digest("sha256:0123") == "sha256:0123"
    assert cluster.digest("") is None and cluster.digest(None) is None


def _pods() -> list[dict]:  # type: ignore[type-arg]
    text = (FIXTURES / "lineage-pods-predictor.json").read_text()
    text = text.replace("${version}", "7").replace("${previous}", "6")
    return json.loads(text)["items"]  # type: ignore[no-any-return]


def _isvc() -> dict:  # type: ignore[type-arg]
    text = (FIXTURES / "lineage-isvcs.json").read_text().replace("${version}", "7")
    return json.loads(text)["items"][0]  # type: ignore[no-any-return]


def test_traffic_share_per_revision_with_the_version_each_serves() -> None:
    rows = cluster.serving_shares(_isvc(), _pods())
    by_revision = {r["revision"]: r for r in rows}
    assert by_revision["sentiment-predictor-00004"]["percent"] == 25
    assert by_revision["sentiment-predictor-00004"]["version"] == "7"
    assert by_revision["sentiment-predictor-00003"]["percent"] == 75
    assert by_revision["sentiment-predictor-00003"]["version"] == "6"
    assert all(r["version_from"] == "pod environment" for r in rows)


def test_a_revision_without_pods_takes_the_spec_version_only_if_latest() -> None:
    rows = cluster.serving_shares(_isvc(), [])
    by_revision = {r["revision"]: r for r in rows}
    assert by_revision["sentiment-predictor-00004"]["version"] == "7"  # latest: the spec's
    assert by_revision["sentiment-predictor-00003"]["version"] is None  # older: unknown
    assert by_revision["sentiment-predictor-00003"]["version_from"].startswith("unknown")


def test_containers_include_init_containers_and_unstarted_ones() -> None:
    pod = _pods()[1]
    found = {c["container"]: c for c in cluster.containers(pod)}
    assert found["storage-initializer"]["digest"].startswith("sha256:")
    assert found["kserve-container"]["digest"].startswith("sha256:")
    assert found["queue-proxy"]["image"]


def test_cluster_facts_without_a_cluster_say_so(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "none"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    out = cluster.cluster_facts(load_settings(None, {}), "sentiment", "1", None)
    assert out == {
        "configured": False,
        "note": "no cluster configured",
        "serving": [],
        "images": [],
    }


def test_request_lookup_without_a_store_says_payload_logging_not_configured(
    tmp_path: Path,
) -> None:
    # a state dir of its own: the checkout's .roost/ may hold a receiver's store (make demo)
    settings = load_settings(None, {"state_dir": str(tmp_path)})
    with pytest.raises(PayloadLoggingNotConfigured, match=r"^payload logging not configured"):
        find_request(settings, "req-1")


def test_request_lookup_reads_the_parquet_store(tmp_path: Path) -> None:
    import pandas as pd

    for version, ids in (("1", ["a", "b"]), ("2", ["c"])):
        part = tmp_path / "model=sentiment" / f"version={version}" / "hour=2026120118"
        part.mkdir(parents=True)
        frame = pd.DataFrame({"id": ids, "type": "request", "text": ["t"] * len(ids)})
        frame.to_parquet(part / "part-0.parquet", index=False)
    settings = load_settings(None, {"lineage": {"payload_store": str(tmp_path)}})
    found = find_request(settings, "c")
    assert (found.model, found.version, found.request_id) == ("sentiment", "2", "c")
    with pytest.raises(NotFound, match="'zz' is not in the payload store"):
        find_request(settings, "zz")


ROLLOUT_TAGS = {
    "roost.rollout": "promoted",
    "roost.rollout.champion": "1",
    "roost.rollout.backend": "local",
    "roost.rollout.finished_at": "2026-12-01T18:01:00Z",
    "roost.rollout.step.1": json.dumps({"weight": 10, "at": "x", "verdict": "pass"}),
    "roost.rollout.step.2": json.dumps({"weight": 100, "at": "y", "verdict": "pass"}),
    "roost.rollout.reason": "every window passed",
}


def test_version_description_states_gate_rollout_and_training_run() -> None:
    run = {
        "run_id": "r" * 32, "name": "train-1", "experiment_id": "3",
        "metrics": {"test_accuracy": 0.75, "test_macro_f1": 0.72},
        "commit": "c" * 40, "dirty": False,
    }  # fmt: skip
    text = descriptions.version_description({**GATE_TAGS, **ROLLOUT_TAGS}, run)
    assert "**Gate: passed**: macro_f1 0.7200 vs champion v1 0.7100" in text
    assert (
        "**Rollout: promoted** against v1 (local, 2026-12-01T18:01:00Z): 10% pass → 100% pass"
        in text
    )
    assert f"[train-1](#/experiments/3/runs/{'r' * 32})" in text
    assert "git `cccccccccccc` (clean)" in text and "macro-F1 0.7200" in text


def test_version_description_of_a_bare_version_says_what_is_missing() -> None:
    text = descriptions.version_description({}, None)
    assert "**Gate:** not evaluated." in text
    assert "**Rollout:** none yet." in text
    assert "**Training run:** not recorded." in text
    superseded = descriptions.version_description(
        {"roost.rollout": "superseded", "roost.rollout.superseded_by": "4"}, None
    )
    assert "**Rollout: superseded** by v4" in superseded


def test_model_description_names_each_alias_and_what_moves_it() -> None:
    text = descriptions.model_description(RegistrySettings())
    for alias in ("`@champion`", "`@challenger`", "`@candidate`"):
        assert alias in text
    assert "roost promote" in text and "superseded" in text and descriptions.MARKER in text


def test_tree_renders_every_section_and_the_missing_facts() -> None:
    from roost.cli.lineage import render

    doc = {
        "tracking_uri": "http://127.0.0.1:1",
        "request": None,
        "version": {
            "model": "sentiment", "version": "2", "aliases": ["champion"], "status": "READY",
            "created_at": "t", "source": "models:/m-1", "run_id": None, "description": None,
            "ui": "#/models/sentiment/versions/2", "superseded_by": None,
        },
        "training_run": None,
        "gate": facts.gate(GATE_TAGS, []),
        "rollouts": [],
        "images": {"configured": False, "note": "no cluster configured", "containers": []},
        "serving": {"inference_services": [], "local": [], "cluster_errors": []},
        "tuning": facts.features([], {}, None)["tune"],
        "batch": facts.features([], {}, None)["batch"],
        "monitoring": facts.features([], {}, None)["monitor"],
        "missing": ["no training run recorded", "no git commit recorded"],
    }  # fmt: skip
    console = Console(record=True, width=200)
    console.print(render(doc))
    text = console.export_text()
    for expected in ("sentiment v2", "@champion", "gate", "passed", "candidate 0.7200",
                     "champion v1 0.7100", "rollouts (0)", "no cluster configured",
                     "tuning study", "none recorded", "no git commit recorded"):  # fmt: skip
        assert expected in text, expected


def test_request_lookup_reads_the_receivers_own_store(tmp_path: Path) -> None:
    """The store `roost monitor serve` writes (events/ beside journal/ and feedback/) is found
    from the monitor's settings, and a request names the version its response carried."""
    import orjson

    from roost.monitor import events, journal

    attrs = {"inferenceservicename": "sentiment", "endpoint": "default"}
    request = {"id": "r-7", "inputs": [{"name": "text", "shape": [1], "datatype": "BYTES",
                                        "data": ["fine"]}]}  # fmt: skip
    records = [
        journal.Record(
            "r-7", events.REQUEST_TYPE, 1.0, attributes=attrs, data=orjson.dumps(request)
        ),
        journal.Record(
            "r-7",
            events.RESPONSE_TYPE,
            1.1,
            attributes={**attrs, events.VERSION_EXTENSION: "4"},
            data=orjson.dumps({"id": "r-7", "model_version": "4", "outputs": []}),
        ),
        journal.Record.feedback("r-7", "positive", 2.0),
    ]
    journal.write_parts(tmp_path, 1, records)
    (tmp_path / "journal").mkdir()
    (tmp_path / "journal" / "segment-2.jsonl").write_text("{}\n")
    settings = load_settings(None, {"monitor": {"store": str(tmp_path)}})
    found = find_request(settings, "r-7")
    assert (found.model, found.version) == ("sentiment", "4")


def test_server_records_prune_the_record_of_a_dead_process(tmp_path: Path) -> None:
    from roost.lineage.local import server_records
    from roost.serving.local import SERVERS_DIR

    directory = tmp_path / SERVERS_DIR
    directory.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (directory / f"{gone.pid}.json").write_text(json.dumps({"pid": gone.pid, "name": "gone"}))
    (directory / f"{os.getpid()}.json").write_text(json.dumps({"pid": os.getpid(), "name": "me"}))
    (directory / "broken.json").write_text("{not json")

    assert [r["name"] for r in server_records(tmp_path)] == ["me"]
    assert not (directory / f"{gone.pid}.json").exists()
    assert (directory / f"{os.getpid()}.json").exists()
    assert (directory / "broken.json").exists()  # unreadable: left for a person, never guessed at
