"""bench.json, a markdown table and a latency-vs-throughput plot from one run's results."""

from __future__ import annotations

import json
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from roost import proc
from roost.bench import layers

CEILING = "grpc.aio, no model"  # the row of roost.bench.ceiling (its NAME)

JSON_NAME = "bench.json"
TABLE_NAME = "bench.md"
PLOT_NAME = "bench.png"
LIBRARIES = (
    "torch", "kserve", "uvicorn", "uvloop", "fastapi", "grpcio", "orjson", "numpy",
    "torchserve", "torch-model-archiver",
)  # fmt: skip
# Peers run in environments of their own: bench.json's peer_requirements has their pins.


def write(result: dict[str, Any], out: Path, command: str) -> dict[str, Path]:
    """Write the three reports under ``out``; returns their paths by kind."""
    out.mkdir(parents=True, exist_ok=True)
    result = {**result, "command": command}
    paths = {"json": out / JSON_NAME, "table": out / TABLE_NAME, "plot": out / PLOT_NAME}
    paths["json"].write_text(json.dumps(result, indent=2) + "\n")
    paths["table"].write_text(markdown(result))
    plot(result, paths["plot"])
    return paths


def _label(server: dict[str, Any]) -> str:
    shape = server["texts_per_request"]
    suffix = f" x{shape}" if shape != 1 else ""
    return f"{server['name']} {server['protocol']}{suffix}"


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


GRPC_CLIENTS = {
    "h2": "HTTP/2 frames on an asyncio protocol (`roost.bench.h2grpc`)",
    "grpcio": "`grpc.aio` (bench.grpc_client: grpcio)",
}


def markdown(result: dict[str, Any]) -> str:
    """The summary table, the targets, and each ladder (rate: p50/p99/p99.9, errors)."""
    slo = result["slo_p99_ms"]
    raw = result["raw_forward"]
    machine = result["machine"]
    lines = [
        f"`{result.get('command', 'roost bench')}` — {result['mode']} run, model "
        f"{result['model_name']} v{result['model_version']}, commit `{result['commit'][:12]}`, "
        f"{machine['cpus']} CPUs ({machine['cpu_model'] or 'unknown'}), load average "
        f"{machine['load_avg_before'][0]} before / {machine['load_avg_after'][0]} after; gRPC "
        f"load generator: {GRPC_CLIENTS.get(result.get('grpc_client', 'grpcio'), '?')}.",
        "",
        f"| server | protocol | texts/req | max req/s (p99 ≤ {slo:g} ms) | texts/s | "
        "p50 / p99 / p99.9 ms at max | errors (all steps) | server CPU s / 1k req | "
        "client CPU s / 1k req | peak RSS MB | cold start s |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for s in result["servers"]:
        if s.get("unavailable"):
            lines.append(
                f"| {s['name']} | {s['protocol']} | {s['texts_per_request']} | "
                f"not measured: {s['unavailable'][:160].replace('|', '/')} "
                "| - | - | - | - | - | - | - |"
            )
            continue
        at = s["at_max"] or {}
        errors = sum(step["errors"] for step in s["ladder"])
        lines.append(
            f"| {s['name']} | {s['protocol']} | {s['texts_per_request']} | "
            f"{_fmt(s['max_rps_p99_50ms'], 0)} | {_fmt(s['max_seq_per_s_p99_50ms'], 0)} | "
            f"{_fmt(at.get('p50_ms'), 2)} / {_fmt(at.get('p99_ms'), 2)} / "
            f"{_fmt(at.get('p999_ms'), 2)} | {errors} | {_fmt(s['cpu_s_per_1k'], 3)} | "
            f"{_fmt(s.get('client_cpu_s_per_1k'), 3)} | "
            f"{_fmt(s['peak_rss_mb'], 0)} | {_fmt(s['cold_start_s'], 2)} |"
        )
    lines.append(
        f"| raw forward (in-process) | - | {raw['batch_size']} | - | "
        f"{_fmt(raw['max_seq_per_s'], 0)} | - | - | - | - | - | - |"
    )
    lines += ["", "Targets (this run):", ""]
    names = {
        "roost_vs_torchserve": "roost REST v2 / TorchServe REST, max req/s",
        "roost_vs_raw": "roost REST v2 (1 text/req) / raw forward, texts/s",
        "cold_start": "roost cold start (process start → ready, model directory), s",
        "payload_logging_kept": "roost REST v2 with payload logging (receiver elsewhere) / "
        "without, max req/s",
    }
    for key, target in result.get("targets", {}).items():
        extra = ""
        if key == "roost_vs_raw":
            extra = (
                f"; with {target['best_texts_per_request']} texts/req: "
                f"{target['value_best_request_shape']}"
            )
        verdict = _verdict(target)
        name = target.get("label") or names.get(key, key)
        lines.append(
            f"- {name}: **{target['value']}** (target {target['target']}, {verdict}{extra})"
        )
    for protocol, row in result.get("grpc_ceiling", {}).items():
        lines.append(
            f"- roost {protocol} / the same protocol with no model (`{CEILING}`, what "
            f"grpc.aio and the client allow here): {row['roost_share']}; no model / roost "
            f"REST v2: {row.get('no_model_vs_roost_rest', '-')}"
        )
    shared = cpu_bound(result)
    if shared:
        lines.append(f"- {shared}")
    colocated = logging_colocated(result)
    if colocated:
        lines.append(f"- {colocated}")
    if result.get("cold_start_models_uri_s") is not None:
        lines.append(
            f"- roost cold start from `models:/` with an empty cache: "
            f"{result['cold_start_models_uri_s']} s"
        )
    floor = result.get("cold_start_floor")
    if floor and floor.get("seconds"):
        ratios = ", ".join(
            f"{_label(s)} {s['cold_start_s'] / floor['seconds']:.2f}x"
            for s in result["servers"]
            if s["cold_start_s"] > 0
            and s["protocol"] in ("rest-v2", "rest")
            and s["texts_per_request"] == 1
        )
        lines.append(
            f"- cold start floor (`{floor['command']}`, same run): {floor['seconds']} s; "
            f"cold start / floor: {ratios}"
        )
    lines += layers.markdown(result)
    lines += ["", "Ladders (offered req/s: p50 / p99 / p99.9 ms, errors):", ""]
    for s in result["servers"]:
        steps = ", ".join(
            f"{step['rate']:g}: {_fmt(step['p50_ms'], 1)}/{_fmt(step['p99_ms'], 1)}/"
            f"{_fmt(step['p999_ms'], 1)}" + (f" e{step['errors']}" if step["errors"] else "")
            for step in s["ladder"]
        )
        lines.append(f"- {_label(s)}: {steps}")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    """p50 (dashed) and p99 (solid) latency against achieved throughput, log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5.4), dpi=100)
    slo = result["slo_p99_ms"]
    # one colour per row (a dozen rows and more: the default cycle of 10 repeats itself)
    colours = plt.get_cmap("tab20")
    for i, server in enumerate(result["servers"]):
        steps = sorted(  # by what was achieved: a ladder that steps down would zigzag
            (s for s in server["ladder"] if s["p99_ms"] is not None),
            key=lambda s: s["achieved_rps"],
        )
        if not steps:
            continue
        x = [s["achieved_rps"] * server["texts_per_request"] for s in steps]
        (line,) = ax.plot(
            x, [s["p99_ms"] for s in steps], marker="o", ms=3, label=_label(server),
            color=colours((2 * i) % 20 if i < 10 else (2 * i + 1) % 20),
        )  # fmt: skip
        ax.plot(x, [s["p50_ms"] for s in steps], ls="--", lw=0.8, color=line.get_color())
    ax.axhline(slo, color="grey", lw=0.8, ls=":")
    ax.text(0.99, slo * 1.08, f"p99 objective {slo:g} ms", fontsize=8, ha="right",
            transform=ax.get_yaxis_transform())  # fmt: skip
    raw = result["raw_forward"]["max_seq_per_s"]
    ax.axvline(raw, color="black", lw=0.8, ls="-.", label="raw forward (texts/s)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("throughput (texts/s; = req/s at 1 text per request)")
    ax.set_ylabel("latency, ms (solid p99, dashed p50)")
    ax.set_title(
        f"{result['model_name']} v{result['model_version']} on {result['machine']['cpus']} CPUs "
        f"({result['mode']} run)",
        fontsize=10,
    )
    ax.grid(True, which="both", lw=0.3, alpha=0.5)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# -- what bench.json says besides the servers: the machine, the libraries, the targets --
def machine(load_before: tuple[float, float, float], client_nice: int) -> dict[str, Any]:
    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_limit": proc.cpu_limit(),
        "cpu_model": cpu_model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_avg_before": [round(x, 2) for x in load_before],
        "load_avg_after": [round(x, 2) for x in os.getloadavg()],
        "client_nice": client_nice,
    }


def libraries() -> dict[str, str]:
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def targets(result: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets, computed from this run's numbers (same machine, same run)."""
    servers: list[dict[str, Any]] = result["servers"]

    def find(name: str, protocol: str, per_request: int = 1) -> dict[str, Any] | None:
        for s in servers:
            if (s["name"], s["protocol"], s["texts_per_request"]) == (name, protocol, per_request):
                return s
        return None

    roost_rest = find("roost", "rest-v2")
    torchserve_rest = find("torchserve", "rest")
    logged = find("roost+payload-logging", "rest-v2")
    raw = float(result["raw_forward"]["max_seq_per_s"])
    out: dict[str, Any] = {}

    def ratio(
        key: str, num: dict[str, Any] | None, den: dict[str, Any] | None, goal: float
    ) -> None:
        # Every target is in the report: one that this run could not measure says why.
        if num is None or den is None:
            missing = "a server did not run"
            out[key] = {"value": None, "target": goal, "met": None, "reason": missing}
        elif den["max_rps_p99_50ms"] <= 0:
            reason = f"{den['name']} {den['protocol']} passed no ladder step at p99 <= SLO"
            out[key] = {"value": None, "target": goal, "met": None, "reason": reason}
        else:
            value = num["max_rps_p99_50ms"] / den["max_rps_p99_50ms"]
            out[key] = {"value": round(value, 3), "target": goal, "met": value >= goal}

    ratio("roost_vs_torchserve", roost_rest, torchserve_rest, 2.0)
    ratio("payload_logging_kept", logged, roost_rest, 0.9)
    roost_best = max(
        (s for s in servers if s["name"] == "roost"),
        key=lambda s: s["max_seq_per_s_p99_50ms"],
        default=None,
    )
    if roost_rest and raw > 0:
        single = roost_rest["max_seq_per_s_p99_50ms"] / raw
        best = roost_best["max_seq_per_s_p99_50ms"] / raw if roost_best else single
        out["roost_vs_raw"] = {
            "value": round(single, 3),
            "value_best_request_shape": round(best, 3),
            "best_texts_per_request": roost_best["texts_per_request"] if roost_best else 1,
            "target": 0.7,
            "met": single >= 0.7,
        }
    if roost_rest:
        cold = roost_rest["cold_start_s"]
        out["cold_start"] = {"value": cold, "target": 2.0, "met": cold <= 2.0}
    return out


def logging_colocated(result: dict[str, Any]) -> str | None:
    """One line on the whole logging pipeline on this machine: the predictor and
    ``roost monitor serve`` sharing its CPUs (no target: in a cluster the receiver is a pod of
    its own, which is what ``payload_logging_kept`` measures)."""
    plain = logged = None
    for s in result["servers"]:
        if (s["protocol"], s["texts_per_request"]) != ("rest-v2", 1):
            continue
        if s["name"] == "roost":
            plain = s
        elif s["name"] == "roost+payload-logging+receiver":
            logged = s
    if plain is None or logged is None or not plain["max_rps_p99_50ms"]:
        return None
    ratio = logged["max_rps_p99_50ms"] / plain["max_rps_p99_50ms"]
    cpu = logged.get("config", {}).get("receiver_cpu_us_per_event")
    per_event = f"; the receiver's CPU per stored event: {cpu} µs" if cpu else ""
    return (
        f"roost REST v2 with payload logging to `roost monitor serve` on the same CPUs / "
        f"without, max req/s: {ratio:.3f} (no target: the whole pipeline on one machine"
        f"{per_event})"
    )


def cpu_bound(result: dict[str, Any]) -> str | None:
    """The bound that client and server CPU put on each roost row with one text a request.

    Both run on this machine's CPUs: at a row's max step each request cost the server's and
    the load generator's CPU together, so no rate above ``cpus / that`` is possible here,
    whatever the server does with its part.
    """
    cpus = result["machine"].get("cpu_limit") or result["machine"]["cpus"]
    parts = []
    for s in result["servers"]:
        server, client = s.get("cpu_s_per_1k"), s.get("client_cpu_s_per_1k")
        if not s["name"].startswith("roost") or "+" in s["name"] or "-no-" in s["name"]:
            continue  # roost's own rows (either gRPC client), not the logging or layer rows
        if s["texts_per_request"] != 1 or not server or not client:
            continue
        client_name = " (grpc.aio client)" if "grpc.aio" in s["name"] else ""
        parts.append(
            f"{s['protocol']}{client_name} {server:.3f} + {client:.3f} = {server + client:.3f} "
            f"(at most {cpus / (server + client) * 1000:,.0f} req/s)"
        )
    if not parts:
        return None
    return (
        f"CPU s per 1k requests at each roost row's max, server + load generator, on {cpus:g} "
        "CPUs shared by both: " + "; ".join(parts)
    )


def _verdict(target: dict[str, Any]) -> str:
    if target["met"] is None:
        return f"not measured: {target.get('reason', 'no data')}"
    return "met" if target["met"] else "not met"
