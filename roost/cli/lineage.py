"""``roost lineage``: one version's story, from its data to where it answers now."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.tree import Tree

from roost.cli.context import state
from roost.cli.output import JsonFlag, console, emit_json

EPILOG = (
    "Examples: roost lineage sentiment@champion · roost lineage sentiment/3 --json · "
    "roost lineage models:/sentiment@challenger · roost lineage --request-id 6f1c..."
)


def lineage(
    ctx: typer.Context,
    ref: Annotated[
        str | None,
        typer.Argument(help="NAME@ALIAS, NAME/VERSION or a models:/ URI.", show_default=False),
    ] = None,
    request_id: Annotated[
        str | None,
        typer.Option(
            "--request-id",
            help="Start from a logged request (needs the monitor's payload store).",
            show_default=False,
        ),
    ] = None,
    json_output: JsonFlag = False,
) -> None:
    """Show where a model version came from and where it runs: data, run, gate, rollouts."""
    from roost import lineage as core
    from roost.errors import ConfigError

    settings = state(ctx).settings()
    request: dict[str, Any] | None = None
    if request_id is not None:
        if ref is not None:
            raise ConfigError("give a model version or --request-id, not both")
        from roost.lineage.requests import find_request

        found = find_request(settings, request_id)
        request = {
            "request_id": found.request_id,
            "model": found.model,
            "version": found.version,
            "store": found.store,
        }
        parsed = core.Ref(found.model, found.version, None)
    elif ref is None:
        raise ConfigError("name a model version (NAME@ALIAS, NAME/VERSION) or --request-id")
    else:
        parsed = core.parse_ref(ref)
    document = core.build(settings, parsed, request=request)
    if json_output:
        emit_json(document)
        return
    console.print(render(document))


def _kv(tree: Tree, label: str, value: Any) -> Tree:
    return tree.add(f"[bold]{escape(label)}[/] {escape(str(value))}")


def _score(value: float | None) -> str:
    return "none" if value is None else f"{value:.4f}"


def _number(value: Any) -> str:
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else f"{value:.4f}"
    return str(value)


def render(doc: dict[str, Any]) -> Tree:
    """The lineage document as a rich tree (pure)."""
    v = doc["version"]
    aliases = ", ".join(f"@{a}" for a in v["aliases"]) or "no alias"
    root = Tree(f"[bold]{escape(v['model'])} v{v['version']}[/]  {escape(aliases)}")
    if doc.get("request"):
        r = doc["request"]
        root.add(
            f"[bold]request[/] {escape(r['request_id'])} answered by "
            f"{escape(r['model'])} v{escape(r['version'])} (payload store {escape(r['store'])})"
        )
    node = root.add("[bold]registered version[/]")
    _kv(node, "created", v["created_at"])
    _kv(node, "status", v["status"])
    _kv(node, "source", v["source"])
    if v.get("superseded_by"):
        _kv(node, "superseded by", f"v{v['superseded_by']}")
    _kv(node, "MLflow UI", f"{doc['tracking_uri']}/{v['ui']}")

    run = doc["training_run"]
    node = root.add("[bold]training run[/]")
    if run is None:
        node.add("[yellow]not recorded[/]")
    else:
        _kv(node, "run", f"{run['run_id']} ({run['name']}, {run['status']}, {run['started_at']})")
        git = run["git"]
        commit = git["commit"] or "no git commit recorded"
        dirty = {True: "dirty tree", False: "clean tree", None: "tree state not recorded"}
        _kv(node, "git", f"{commit} ({dirty[git['dirty']]})")
        if run.get("k8s_job"):
            _kv(node, "Kubernetes Job", run["k8s_job"]["name"])
        metrics = node.add("[bold]headline metrics[/]")
        for key, value in run["metrics"].items():
            _kv(metrics, key, _number(value))
        if not run["metrics"]:
            metrics.add("[yellow]none recorded[/]")
        data = node.add("[bold]dataset inputs[/]")
        for d in run["datasets"]:
            _kv(
                data,
                d["context"] or d["name"],
                f"{d['name']} digest {d['digest']} rows {d['rows']} ({d['source']})",
            )
        if not run["datasets"]:
            data.add("[yellow]none recorded[/]")
        params = node.add(f"[bold]params[/] ({len(run['params'])})")
        for key, value in run["params"].items():
            _kv(params, key, value)

    gate = doc["gate"]
    node = root.add("[bold]gate[/]")
    if gate is None:
        node.add("[yellow]no gate decision recorded[/]")
    else:
        colour = "green" if gate["decision"] == "passed" else "yellow"
        node.add(
            f"[bold {colour}]{escape(str(gate['decision']))}[/] {escape(gate['reason'] or '')}"
        )
        against = (
            f"champion v{gate['champion_version']} {_score(gate['champion_score'])}"
            if gate["champion_version"]
            else "no champion"
        )
        _kv(
            node,
            str(gate["metric"]),
            f"candidate {_score(gate['candidate_score'])} vs {against} "
            f"(min improvement {gate['min_improvement']:g}, {gate['test_rows']} test rows, "
            f"{gate['evaluated_at']})",
        )
        if gate.get("evaluation_run"):
            _kv(
                node,
                "MLflow evaluation",
                f"run {gate['evaluation_run']}: {gate.get('validation') or 'no verdict recorded'}",
            )

    node = root.add(f"[bold]rollouts[/] ({len(doc['rollouts'])})")
    if not doc["rollouts"]:
        node.add("[yellow]none recorded[/]")
    for r in doc["rollouts"]:
        sub = node.add(
            f"[bold]{escape(str(r['outcome']))}[/] {escape(str(r['id']))} against "
            f"v{escape(str(r['champion']))} ({escape(str(r['backend']))}) "
            f"{r['started_at']} -> {r['finished_at'] or 'running'}"
        )
        for s in r["steps"]:
            requests = json.dumps(s.get("requests")) if s.get("requests") else "-"
            where = "shadow" if s.get("step") == "shadow" else f"{s['weight']}%"
            sub.add(
                f"{where} at {s['at']}: {s.get('verdict') or 'no verdict'} "
                f"(requests {escape(requests)})"
            )
        if r.get("reason"):
            _kv(sub, "reason", r["reason"])

    images = doc["images"]
    node = root.add("[bold]images[/]")
    if not images["configured"]:
        node.add(f"[yellow]{escape(images['note'])}[/]")
    elif not images["containers"]:
        node.add("[yellow]no pod reports an image for this version[/]")
    for c in images["containers"]:
        _kv(
            node,
            f"{c['workload']} {c['pod']}/{c['container']}",
            f"{c['image']} {c['digest'] or '(no digest reported)'}",
        )

    serving = doc["serving"]
    node = root.add("[bold]served now[/]")
    for s in serving["inference_services"]:
        name = f"InferenceService {s['namespace']}/{s['inference_service']}"
        _kv(node, name, f"{s['percent']}% of traffic ({s['url']})")
    for s in serving["local"]:
        share = "?" if s["percent"] is None else f"{s['percent']}%"
        _kv(node, f"local server pid {s['pid']}", f"{s['url']} {share} via {s['via']}")
    for error in serving["cluster_errors"]:
        node.add(f"[yellow]{escape(error)}[/]")
    if not serving["inference_services"] and not serving["local"]:
        where = "" if images["configured"] else f" ({images['note']})"
        node.add(f"[yellow]not served anywhere roost can see{escape(where)}[/]")

    for key, label in (
        ("tuning", "tuning study"),
        ("batch", "batch runs"),
        ("monitoring", "monitoring report"),
    ):
        section = doc[key]
        node = root.add(f"[bold]{label}[/]")
        if not section["recorded"]:
            node.add("none recorded")
            continue
        for tag, value in section["tags"].items():
            _kv(node, tag, value)
        runs = (
            [section["latest"]]
            if key == "monitoring" and section.get("latest")
            else section["runs"]
        )
        for r in runs:
            _kv(node, f"run {r['run_id']}", f"{r['name']} {r['status']} {r['started_at']}")

    if doc["missing"]:
        node = root.add("[bold]not recorded[/]")
        for line in doc["missing"]:
            node.add(escape(line))
    return root
