"""``roost bench profile``: where a roost server's GIL time goes under a fixed load.

Starts the model server (as the benchmark does), sends open-loop load at one rate, and
samples the server with ``py-spy record --gil`` (only threads holding the GIL are
recorded), so the samples add up to the Python time that bounds one process: what is left
of one core for more requests. Frames are put in categories by the first rule that
matches a stack, and each category is reported in microseconds of GIL time per request.

py-spy comes with ``roost[bench]`` (it needs ptrace rights over the server process).
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from roost import registry
from roost.bench import h2grpc, loadgen, measure, stream, workload
from roost.config import Settings
from roost.errors import MissingTool, RoostError
from roost.serving import local

# (category, substrings of a frame): the first category with a frame in the stack wins.
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("model: tokenise (BatchEncoder)", ("BatchEncoder.",)),
    ("model: torch forward", ("Kernel.predict_proba", "NGramBag", "torch/")),
    ("batching and per-batch metrics", ("MicroBatcher.", "_batch_metrics", "observe_many")),
    ("gRPC (grpc.aio, KServe servicer)", ("grpc", "FastServicer")),
    ("answer: JSON encode, socket write", ("_fast_finish", "FastPath.encode")),
    ("request: JSON decode, validate, enqueue", ("_fast_start", "FastPath.decode", "codec.py")),
    ("HTTP: uvicorn/httptools callbacks", ("uvicorn/", "roost/serving/fastpath.py")),
    ("event loop and transport (uvloop, C)", ("Runner.run", "asyncio/")),
)


@dataclass(frozen=True)
class Profile:
    protocol: str
    rate: float
    seconds: float
    requests: int
    answered: int
    p99_ms: float
    gil_busy: float  # fraction of the wall time some server thread held the GIL
    server_cpu_us_per_request: float
    categories: dict[str, float]  # category -> GIL microseconds per request

    def to_dict(self) -> dict[str, Any]:
        return {
            "protocol": self.protocol,
            "rate": self.rate,
            "seconds": self.seconds,
            "requests": self.requests,
            "answered": self.answered,
            "p99_ms": round(self.p99_ms, 2),
            "gil_busy": round(self.gil_busy, 3),
            "server_cpu_us_per_request": round(self.server_cpu_us_per_request, 1),
            "gil_us_per_request": {k: round(v, 1) for k, v in self.categories.items()},
        }

    def text(self) -> str:
        total = sum(self.categories.values())
        lines = [
            f"{self.protocol} at {self.rate:g} req/s for {self.seconds:g}s: "
            f"{self.answered}/{self.requests} answered, p99 {self.p99_ms:.1f} ms",
            f"server CPU {self.server_cpu_us_per_request:.1f} us/request (all threads); "
            f"GIL held {self.gil_busy:.0%} of the time, {total:.1f} us/request:",
        ]
        for name, us in sorted(self.categories.items(), key=lambda kv: -kv[1]):
            lines.append(f"  {us:7.1f} us  {us / total:6.1%}  {name}")
        return "\n".join(lines) + "\n"


def categorize(collapsed: str) -> Counter[str]:
    """Samples per category from py-spy's ``raw`` (collapsed stacks) output."""
    counts: Counter[str] = Counter()
    for line in collapsed.splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        for name, needles in CATEGORIES:
            if any(needle in stack for needle in needles):
                counts[name] += int(n)
                break
        else:
            counts["other"] += int(n)
    return counts


def run(
    settings: Settings,
    model_uri: str,
    out: Path,
    protocol: str,
    rate: float,
    seconds: float,
    sample_hz: int = 250,
) -> Profile:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        raise MissingTool("py-spy not found: pip install py-spy")
    h2grpc.use(settings.bench.grpc_client)
    model = registry.fetch_model(settings, model_uri)
    texts = workload.sample_texts(settings.data, settings.bench.texts, settings.bench.seed)
    out.mkdir(parents=True, exist_ok=True)
    work = (settings.state_dir / "bench" / "profile").resolve()  # samples and logs
    work.mkdir(parents=True, exist_ok=True)
    server = local.start(settings, str(model.path), work / f"server-{protocol}.log")
    try:
        server.wait_ready(120)
        name = server.name
        if protocol == "grpc-v2":
            sender: loadgen.Sender = h2grpc.unary(
                server.grpc_target, workload.grpc_requests(texts, name), lambda r, i: None
            )
        elif protocol == stream.STREAM_PROTOCOL:
            sender = h2grpc.streaming(
                server.grpc_target, workload.grpc_requests(texts, name), lambda r, i: None
            )
        else:
            sender = loadgen.HttpSender(
                "127.0.0.1", server.http_port, f"/v2/models/{name}/infer",
                workload.v2_bodies(texts), lambda s, b, i: None,
            )  # fmt: skip
        raw = work / f"py-spy-{protocol}.txt"

        async def load() -> tuple[loadgen.StepRecord, float]:
            await sender.open()
            spy: subprocess.Popen[bytes] | None = None
            try:
                await loadgen.run_step(sender, loadgen.StepPlan(min(rate, 2000), 2.0))
                spy = subprocess.Popen(
                    [py_spy, "record", "--gil", "--nonblocking", "-r", str(sample_hz),
                     "-d", str(int(seconds)), "-f", "raw", "-o", str(raw),
                     "-p", str(server.process.pid)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                )  # fmt: skip
                await asyncio.sleep(0.5)  # py-spy attaches
                cpu = measure.tree_cpu_s(server.process.pid)
                record = await loadgen.run_step(sender, loadgen.StepPlan(rate, seconds))
                cpu = measure.tree_cpu_s(server.process.pid) - cpu
                _, err = spy.communicate(timeout=seconds + 30)
                if spy.returncode != 0:
                    raise RoostError(f"py-spy failed: {err.decode(errors='replace')[-300:]}")
                return record, cpu
            finally:
                if spy is not None and spy.poll() is None:  # failed or timed out: no orphan
                    spy.kill()
                    spy.wait()
                await sender.close()

        loop = loadgen.new_event_loop()
        try:
            with measure.priority(settings.bench.client_nice):
                record, cpu = loop.run_until_complete(load())
        finally:
            loop.close()
    finally:
        server.stop()
    counts = categorize(raw.read_text())
    total = sum(counts.values())
    requests = record.plan.count
    _, p99, _ = loadgen.percentiles_ms(record.latencies_s)
    per_request = {k: v / sample_hz / requests * 1e6 for k, v in counts.items()}
    profile = Profile(
        protocol, rate, seconds, requests, len(record.latencies_s), p99,
        total / (sample_hz * seconds), cpu / requests * 1e6, per_request,
    )  # fmt: skip
    (out / f"profile-{protocol}.txt").write_text(profile.text())
    return profile
