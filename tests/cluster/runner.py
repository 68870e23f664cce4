"""The manifest runner: start a rendered pod's containers as local processes.

No cluster runs here, so this does the part of the kubelet that decides *what a container
runs*: the command and args of the rendered pod spec (else the image's ENTRYPOINT/CMD, read
from the Dockerfile that builds it), the environment as Kubernetes builds it (``value`` with
``$(VAR)`` expansion, ``valueFrom`` secret/configMap/field references resolved against the
rendered objects, ``envFrom``, the Service link variables), and the volumes as directories.

What differs from a pod, each on purpose and explicit:

- **Images are not run**; the program inside is. ``roost`` and ``python`` (the entry points the
  roost Dockerfiles install) run from this virtualenv; images roost does not build
  (PostgreSQL, MinIO, KServe's runtimes) get a stand-in program from the test.
- **Service DNS names** of rendered Services (every form: ``name``, ``name.ns``, ``name.ns.svc``,
  ``name.ns.svc.<domain>``) followed by a Service port are rewritten to ``127.0.0.1:<free port>``
  in env values and args, through one :class:`Loopback` map the test can print.
- **Container ports** become free loopback ports: an arg equal to the container port right
  after a ``--*port*`` flag is rewritten, and ``0.0.0.0`` binds become ``127.0.0.1``.
- **Mount paths** become temporary directories: an env value or arg equal to a mount path, or
  under it, is rewritten; Secret and ConfigMap volumes are written out as files.

The runner raises :class:`ContainerFailed` naming the manifest (template path, kind/name,
container) and quoting the program's own output when a container exits where it should
serve, exits non-zero where it should finish, or references an object that is not there.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from roost import proc

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent

# Image repository -> the Dockerfile that builds it (Makefile `images`: roost-<dir>).
DOCKERFILES = {
    "roost-training": ROOT / "training" / "Dockerfile",
    "roost-serving": ROOT / "serving" / "Dockerfile",
    "roost-mlflow": ROOT / "mlflow" / "Dockerfile",
}

# Programs the roost images put on PATH (/opt/venv/bin) -> this virtualenv's.
PROGRAMS = {"roost": VENV_BIN / "roost", "python": Path(sys.executable)}


class ContainerFailed(AssertionError):
    """A rendered container could not start, or did not do what its manifest says."""


# -- rendered objects ------------------------------------------------------------------------


@dataclass(frozen=True)
class Manifest:
    """One rendered object and the template it came from."""

    path: str
    doc: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.doc["kind"])

    @property
    def name(self) -> str:
        return str(self.doc["metadata"]["name"])

    def where(self, container: str | None = None) -> str:
        suffix = f" container {container!r}" if container else ""
        return f"{self.path} ({self.kind}/{self.name}{suffix})"


class Rendered:
    """A chart render, indexed by kind and name, plus objects the cluster already holds."""

    def __init__(
        self,
        rendered: dict[str, str],
        namespace: str,
        cluster_domain: str = "cluster.local",
        existing: list[dict[str, Any]] | None = None,
    ) -> None:
        self.namespace = namespace
        self.cluster_domain = cluster_domain
        self.manifests: list[Manifest] = []
        for path, text in sorted(rendered.items()):
            if not path.endswith((".yaml", ".yml")):
                continue
            for doc in yaml.safe_load_all(text):
                if doc:
                    self.manifests.append(Manifest(path, doc))
        # Objects created outside the chart (kubectl create secret ...), e.g. on EKS.
        self.existing = [Manifest("<existing in the cluster>", d) for d in existing or []]

    def find(self, kind: str, name: str | None = None) -> list[Manifest]:
        return [
            m
            for m in self.manifests + self.existing
            if m.kind == kind and (name is None or m.name == name)
        ]

    def get(self, kind: str, name: str) -> Manifest:
        found = self.find(kind, name)
        if not found:
            names = ", ".join(m.name for m in self.find(kind)) or "none"
            raise ContainerFailed(f"the render has no {kind}/{name} (it has: {names})")
        return found[0]

    def embedded(self, configmap: str, key: str) -> Manifest:
        """A manifest kept as text in a ConfigMap (the chart's templates for the CLI)."""
        cm = self.get("ConfigMap", configmap)
        return Manifest(f"{cm.path}#{key}", yaml.safe_load(cm.doc["data"][key]))

    def data(self, kind: str, name: str) -> dict[str, str]:
        """A Secret's (decoded) or a ConfigMap's data."""
        found = self.find(kind, name)
        if not found:
            raise KeyError(f"{kind}/{name}")
        doc = found[0].doc
        if kind == "Secret":
            out = {k: base64.b64decode(v).decode() for k, v in (doc.get("data") or {}).items()}
            out.update(doc.get("stringData") or {})
            return out
        return {k: str(v) for k, v in (doc.get("data") or {}).items()}

    def services(self) -> list[Manifest]:
        return self.find("Service")


# -- Service names -> loopback ----------------------------------------------------------------


@dataclass
class Loopback:
    """The explicit map of in-cluster ``host:port`` to ``127.0.0.1:<free port>``."""

    namespace: str
    cluster_domain: str = "cluster.local"
    ports: dict[tuple[str, int], int] = field(default_factory=dict)

    def bind(self, service: str, port: int, local: int | None = None) -> int:
        """Route Service ``service`` port ``port`` to a loopback port (a free one by default)."""
        key = (service, port)
        if key not in self.ports:
            self.ports[key] = local if local is not None else proc.free_port()
        return self.ports[key]

    def local(self, service: str, port: int) -> int:
        return self.ports[(service, port)]

    def forms(self, service: str) -> list[str]:
        ns, domain = self.namespace, self.cluster_domain
        return [f"{service}.{ns}.svc.{domain}", f"{service}.{ns}.svc", f"{service}.{ns}", service]

    def rewrite(self, text: str) -> str:
        """Every ``<service form>:<port>`` (and ``//<form>`` for port 80) -> 127.0.0.1:<local>."""
        for (service, port), local in sorted(self.ports.items(), key=lambda kv: -len(kv[0][0])):
            for form in self.forms(service):
                text = re.sub(
                    rf"(?<![\w.-]){re.escape(form)}:{port}(?![0-9])", f"127.0.0.1:{local}", text
                )
                if port == 80:
                    text = re.sub(rf"//{re.escape(form)}(?=[/?#]|$)", f"//127.0.0.1:{local}", text)
        return text

    def table(self) -> list[str]:
        return [
            f"{self.forms(s)[0]}:{p} -> 127.0.0.1:{local}"
            for (s, p), local in sorted(self.ports.items())
        ]


# -- image entry points -----------------------------------------------------------------------


@dataclass(frozen=True)
class Image:
    """What a roost image runs, read from its Dockerfile's final stage."""

    reference: str
    dockerfile: Path | None
    entrypoint: list[str]
    cmd: list[str]
    env: dict[str, str]
    workdir: str | None


def image_of(reference: str) -> Image:
    repository = reference.rsplit("/", 1)[-1].split(":", 1)[0].split("@", 1)[0]
    dockerfile = DOCKERFILES.get(repository)
    if dockerfile is None:
        return Image(reference, None, [], [], {}, None)
    stage = dockerfile.read_text().split("\nFROM ")[-1]
    text = re.sub(r"\\\n\s*", " ", stage)
    entrypoint: list[str] = []
    cmd: list[str] = []
    env: dict[str, str] = {}
    workdir = None
    for line in text.splitlines():
        word, _, rest = line.strip().partition(" ")
        if word == "ENTRYPOINT":
            entrypoint = json.loads(rest)
        elif word == "CMD":
            cmd = json.loads(rest)
        elif word == "WORKDIR":
            workdir = rest.strip()
        elif word == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                env[key] = value
    return Image(reference, dockerfile, entrypoint, cmd, env, workdir)


# -- one container ----------------------------------------------------------------------------


def pod_template(doc: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(pod metadata, pod spec) of a workload or a Pod."""
    if doc["kind"] == "Pod":
        return doc.get("metadata") or {}, doc["spec"]
    template = doc["spec"]["template"]
    return template.get("metadata") or {}, template["spec"]


_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(value: str, defined: dict[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: earlier variables only; ``$$`` escapes; unknown kept."""

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return defined.get(name, match.group(0))

    return _VAR.sub(one, value)


def service_links(rendered: Rendered, loopback: Loopback) -> dict[str, str]:
    """The ``<NAME>_SERVICE_HOST``/``_PORT`` variables the kubelet adds (enableServiceLinks)."""
    env: dict[str, str] = {}
    for svc in rendered.services():
        name = svc.name.upper().replace("-", "_")
        ports = svc.doc["spec"].get("ports") or []
        if not ports:
            continue
        mapped = [(p, loopback.ports.get((svc.name, int(p["port"])))) for p in ports]
        first_local = mapped[0][1] or int(ports[0]["port"])
        env[f"{name}_SERVICE_HOST"] = "127.0.0.1"
        env[f"{name}_SERVICE_PORT"] = str(first_local)
        env[f"{name}_PORT"] = f"tcp://127.0.0.1:{first_local}"
        for port, local in mapped:
            number, proto = local or int(port["port"]), port.get("protocol", "TCP")
            prefix = f"{name}_PORT_{port['port']}_{proto}"
            env[prefix] = f"{proto.lower()}://127.0.0.1:{number}"
            env[f"{prefix}_PROTO"] = proto.lower()
            env[f"{prefix}_PORT"] = str(number)
            env[f"{prefix}_ADDR"] = "127.0.0.1"
            if port.get("name"):
                env[f"{name}_SERVICE_PORT_{port['name'].upper().replace('-', '_')}"] = str(number)
    return env


@dataclass
class Container:
    """A rendered container made ready to run here."""

    manifest: Manifest
    name: str
    image: Image
    argv: list[str]
    env: dict[str, str]
    mounts: dict[str, Path]
    ports: dict[int, int]
    spec: dict[str, Any]
    workdir: Path  # the pod's directory: volumes and the container's log
    cwd: Path  # the image's WORKDIR (its mapped volume) or the pod's directory

    def where(self) -> str:
        return self.manifest.where(self.name)

    def describe(self) -> str:
        return f"{self.where()} as image {self.image.reference}: {shlex.join(self.argv)}"


@dataclass
class Runner:
    """Prepares and starts the containers of one render."""

    rendered: Rendered
    loopback: Loopback
    base: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    started: list[Running] = field(default_factory=list)
    cleanup: list[Path] = field(default_factory=list)

    # -- preparing --------------------------------------------------------------------------

    def container(
        self,
        manifest: Manifest,
        name: str | None = None,
        *,
        ports: dict[int, int] | None = None,
        labels: dict[str, str] | None = None,
        mounts: dict[str, Path] | None = None,
        add_env: list[dict[str, Any]] | None = None,
        pod: str | None = None,
        base: Path | None = None,
    ) -> Container:
        """The container ``name`` (default: the first) of ``manifest``, resolved for this host.

        ``ports`` maps container ports to loopback ports (free ones for every declared port
        by default); ``labels`` are the labels a controller adds to the pod (Job: job-name);
        ``mounts`` gives a mount path a prepared directory (KServe's /mnt/models);
        ``add_env`` are variables a webhook adds (KServe's storage settings).
        """
        meta, spec = pod_template(manifest.doc)
        containers = spec.get("containers") or []
        chosen = next((c for c in containers if name is None or c["name"] == name), None)
        if chosen is None:
            raise ContainerFailed(f"{manifest.where()} has no container {name!r}")
        where = manifest.where(chosen["name"])
        pod_name = pod or f"{manifest.name}-{os.getpid() % 100000:05d}"
        workdir = (base or self.base) / pod_name
        workdir.mkdir(parents=True, exist_ok=True)
        image = image_of(chosen.get("image", ""))

        declared = {int(p["containerPort"]): p.get("name") for p in chosen.get("ports") or []}
        port_map = dict(ports or {})
        for number in declared:
            port_map.setdefault(number, proc.free_port())

        volumes = {v["name"]: v for v in spec.get("volumes") or []}
        mount_dirs: dict[str, Path] = {}
        for mount in chosen.get("volumeMounts") or []:
            path = mount["mountPath"]
            if mounts and path in mounts:
                mount_dirs[path] = mounts[path]
                continue
            volume = volumes.get(mount["name"])
            if volume is None and mount["name"] not in _claim_templates(manifest.doc):
                raise ContainerFailed(f"{where}: volumeMount {mount['name']!r} has no volume")
            directory = workdir / "volumes" / mount["name"]
            directory.mkdir(parents=True, exist_ok=True)
            if volume is not None:
                self._fill_volume(volume, directory, where)
            mount_dirs[path] = directory / mount["subPath"] if mount.get("subPath") else directory
        for path, directory in (mounts or {}).items():
            mount_dirs.setdefault(path, directory)

        pod_meta = {
            "name": pod_name,
            "namespace": self.rendered.namespace,
            "labels": {**(meta.get("labels") or {}), **(labels or {})},
            "annotations": meta.get("annotations") or {},
        }
        env = self._env(chosen, spec, pod_meta, where, add_env or [])

        command = chosen.get("command")
        args = chosen.get("args")
        if command is None:
            # An image roost does not build has no Dockerfile here: the test gives a stand-in.
            command = image.entrypoint
            if args is None:
                args = image.cmd
        argv = [str(a) for a in [*command, *(args or [])]]
        argv = [expand(a, env) for a in argv]  # $(VAR) in command/args, as the kubelet does

        def localise(value: str) -> str:
            value = self.loopback.rewrite(value)
            for path in sorted(mount_dirs, key=len, reverse=True):
                if value == path or value.startswith(path.rstrip("/") + "/"):
                    return str(mount_dirs[path]) + value[len(path.rstrip("/")) :]
            return value

        argv = [localise(a) for a in argv]
        for i, arg in enumerate(argv):
            previous = argv[i - 1] if i else ""
            if previous.startswith("--") and "port" in previous and arg.isdigit():
                # Declared or not (a pod listens on undeclared ports too): a free port here.
                port_map.setdefault(int(arg), proc.free_port())
                argv[i] = str(port_map[int(arg)])
            elif previous in ("--host", "--address") and arg == "0.0.0.0":
                argv[i] = "127.0.0.1"
        env = {k: localise(v) for k, v in env.items()}
        # What the test adds (host paths such as a kubeconfig) keeps its paths: only names.
        for item in add_env or []:
            if "value" in item:
                env[item["name"]] = self.loopback.rewrite(expand(str(item["value"]), env))
        program = PROGRAMS.get(argv[0]) if argv else None
        if program is not None:
            argv[0] = str(program)

        _check_probe_ports(chosen, port_map, where)
        cwd = workdir
        if image.workdir and image.workdir in mount_dirs:
            cwd = mount_dirs[image.workdir]
        return Container(manifest, chosen["name"], image, argv, env, mount_dirs, port_map,
                         chosen, workdir, cwd)  # fmt: skip

    def _fill_volume(self, volume: dict[str, Any], directory: Path, where: str) -> None:
        def write(kind: str, name: str, items: list[dict[str, Any]] | None) -> None:
            try:
                data = self.rendered.data(kind, name)
            except KeyError:
                raise ContainerFailed(
                    f"{where}: volume {volume['name']!r}: no {kind} {name!r}"
                ) from None
            chosen = items or [{"key": k, "path": k} for k in data]
            for item in chosen:
                if item["key"] not in data:
                    raise ContainerFailed(f"{where}: {kind} {name!r} has no key {item['key']!r}")
                target = directory / item["path"]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(data[item["key"]])

        if "secret" in volume:
            write("Secret", volume["secret"]["secretName"], volume["secret"].get("items"))
        elif "configMap" in volume:
            write("ConfigMap", volume["configMap"]["name"], volume["configMap"].get("items"))
        elif "projected" in volume:
            for source in volume["projected"].get("sources") or []:
                if "serviceAccountToken" in source:
                    (directory / source["serviceAccountToken"]["path"]).write_text("local-token")
                for item in (source.get("downwardAPI") or {}).get("items") or []:
                    (directory / item["path"]).write_text(self.rendered.namespace)

    def _env(
        self,
        container: dict[str, Any],
        spec: dict[str, Any],
        pod: dict[str, Any],
        where: str,
        add_env: list[dict[str, Any]],
    ) -> dict[str, str]:
        env: dict[str, str] = {
            "PATH": f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin",
            "HOSTNAME": pod["name"],
        }
        env.update(image_of(container.get("image", "")).env)
        env["PATH"] = env["PATH"].replace("/opt/venv/bin", str(VENV_BIN))
        if spec.get("enableServiceLinks", True):
            env.update(service_links(self.rendered, self.loopback))
        env["KUBERNETES_SERVICE_HOST"] = ""  # no API server in the pod's reach
        for source in container.get("envFrom") or []:
            prefix = source.get("prefix", "")
            for kind, key in (("Secret", "secretRef"), ("ConfigMap", "configMapRef")):
                if key in source:
                    ref = source[key]
                    try:
                        data = self.rendered.data(kind, ref["name"])
                    except KeyError:
                        if ref.get("optional"):
                            continue
                        raise ContainerFailed(
                            f"{where}: envFrom {kind} {ref['name']!r} not found"
                        ) from None
                    env.update({prefix + k: v for k, v in data.items()})
        for item in [*(container.get("env") or []), *add_env]:
            name = item["name"]
            if "valueFrom" in item:
                value = self._value_from(item["valueFrom"], pod, spec, where, name)
                if value is None:
                    continue
                env[name] = value
            else:
                env[name] = expand(str(item.get("value", "")), env)
        env.update(self.extra_env)
        return env

    def _value_from(
        self,
        source: dict[str, Any],
        pod: dict[str, Any],
        spec: dict[str, Any],
        where: str,
        name: str,
    ) -> str | None:
        for kind, key in (("Secret", "secretKeyRef"), ("ConfigMap", "configMapKeyRef")):
            if key in source:
                ref = source[key]
                try:
                    data = self.rendered.data(kind, ref["name"])
                except KeyError:
                    if ref.get("optional"):
                        return None
                    raise ContainerFailed(
                        f"{where}: env {name}: {kind} {ref['name']!r} not found "
                        "(CreateContainerConfigError)"
                    ) from None
                if ref["key"] not in data:
                    if ref.get("optional"):
                        return None
                    raise ContainerFailed(
                        f"{where}: env {name}: {kind} {ref['name']!r} has no key {ref['key']!r}"
                    )
                return data[ref["key"]]
        if "fieldRef" in source:
            path = source["fieldRef"]["fieldPath"]
            match = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
            if match:
                value = pod[match.group(1)].get(match.group(2))
                if value is None:
                    raise ContainerFailed(f"{where}: env {name}: the pod has no {path}")
                return str(value)
            fields = {
                "metadata.name": pod["name"],
                "metadata.namespace": pod["namespace"],
                "spec.serviceAccountName": spec.get("serviceAccountName", "default"),
                "spec.nodeName": "local",
                "status.podIP": "127.0.0.1",
                "status.hostIP": "127.0.0.1",
            }
            if path not in fields:
                raise ContainerFailed(f"{where}: env {name}: unsupported fieldPath {path}")
            return fields[path]
        if "resourceFieldRef" in source:
            return None
        raise ContainerFailed(f"{where}: env {name}: unknown valueFrom {sorted(source)}")

    # -- running ----------------------------------------------------------------------------

    def start(
        self,
        container: Container,
        argv: list[str] | None = None,
        env: dict[str, str] | None = None,
        **popen: Any,
    ) -> Running:
        """Start the container's program (or ``argv``, a stand-in) in its own session."""
        log = container.workdir / f"{container.name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        command = argv or container.argv
        if not command:
            raise ContainerFailed(
                f"{container.where()}: image {container.image.reference} is not built by roost "
                "and the test gave no stand-in program"
            )
        with open(log, "ab") as out:
            out.write(f"$ {shlex.join(command)}\n".encode())
            out.flush()
            try:
                process = subprocess.Popen(
                    command,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env={**container.env, **(env or {})},
                    cwd=container.cwd,
                    start_new_session=True,
                    **popen,
                )
            except OSError as exc:
                raise ContainerFailed(
                    f"{container.where()}: cannot start {command[0]}: {exc}"
                ) from None
        running = Running(container, proc.Background(process.pid, log, process), list(command))
        self.started.append(running)
        return running

    def run_once(
        self,
        container: Container,
        argv: list[str] | None = None,
        timeout: float = 120,
        env: dict[str, str] | None = None,
        **popen: Any,
    ) -> Running:
        """Run the container (or a stand-in step) to completion; non-zero exit fails."""
        running = self.start(container, argv, env, **popen)
        running.wait_exit(timeout)
        return running

    def stop_all(self) -> None:
        for running in reversed(self.started):
            running.stop()
        for path in self.cleanup:
            shutil.rmtree(path, ignore_errors=True)


def _check_probe_ports(container: dict[str, Any], ports: dict[int, int], where: str) -> None:
    """Every probe must aim at a port the container declares or its program is told to use."""
    names = {p.get("name"): int(p["containerPort"]) for p in container.get("ports") or []}
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container.get(kind) or {}
        target = (probe.get("httpGet") or probe.get("tcpSocket") or {}).get("port")
        if target is None:
            continue
        number = names.get(target) if isinstance(target, str) and not target.isdigit() else None
        if number is None and not (isinstance(target, int) or str(target).isdigit()):
            raise ContainerFailed(
                f"{where}: {kind} port {target!r}: the container has no such port"
            )
        if int(number if number is not None else target) not in ports:
            listens = (
                ", ".join(f"{n}={p}" if n else str(p) for n, p in names.items()) or "none declared"
            )
            raise ContainerFailed(
                f"{where}: {kind} checks port {target}, where nothing listens "
                f"(container ports: {listens}; port args: {sorted(ports)})"
            )


def _claim_templates(doc: dict[str, Any]) -> set[str]:
    templates = (doc.get("spec") or {}).get("volumeClaimTemplates") or []
    return {t["metadata"]["name"] for t in templates}


@dataclass
class Running:
    """A started container: its probes and its exit, judged against the manifest."""

    container: Container
    process: proc.Background
    argv: list[str] = field(default_factory=list)
    probe_env: dict[str, str] = field(default_factory=dict)

    def log(self, lines: int = 40) -> str:
        return self.process.log_tail(lines)

    def failure(self, what: str) -> ContainerFailed:
        return ContainerFailed(
            f"{self.container.where()} {what}\n"
            f"command: {shlex.join(self.argv or self.container.argv)}\n"
            f"--- its output (last lines) ---\n{self.log()}"
        )

    def wait_exit(self, timeout: float) -> int:
        """Wait for a Job's container to finish; non-zero exit fails with its output."""
        popen = self.process.popen
        assert popen is not None
        try:
            code = popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise self.failure(f"did not finish within {timeout:.0f}s") from None
        if code != 0:
            raise self.failure(f"exited with code {code}")
        return code

    def wait_ready(self, timeout: float, probe: str = "readinessProbe") -> None:
        """Wait until the manifest's probe passes; the program exiting first fails."""
        spec = self.container.spec.get(probe) or self.container.spec.get("startupProbe")
        if spec is None:
            raise ContainerFailed(f"{self.container.where()} has no {probe}")

        def check() -> bool:
            if not self.process.alive():
                code = self.process.popen.poll() if self.process.popen else None
                raise self.failure(f"exited (code {code}) before its {probe} passed")
            return self.probe(spec)

        try:
            proc.wait_until(check, timeout, 0.25, what=f"{self.container.where()} {probe}")
        except proc.Timeout:
            raise self.failure(f"{probe} did not pass within {timeout:.0f}s") from None

    def port(self, ref: int | str) -> int:
        """The loopback port of a container port, by number or name."""
        if isinstance(ref, str) and not ref.isdigit():
            for p in self.container.spec.get("ports") or []:
                if p.get("name") == ref:
                    return self.container.ports[int(p["containerPort"])]
            raise ContainerFailed(f"{self.container.where()}: no port named {ref!r}")
        return self.container.ports[int(ref)]

    def probe(self, spec: dict[str, Any]) -> bool:
        if "httpGet" in spec:
            get = spec["httpGet"]
            url = f"http://127.0.0.1:{self.port(get['port'])}{get.get('path', '/')}"
            try:
                return (
                    200 <= httpx.get(url, timeout=spec.get("timeoutSeconds", 1)).status_code < 400
                )
            except httpx.HTTPError:
                return False
        if "tcpSocket" in spec:
            with contextlib.suppress(OSError):
                import socket

                with socket.create_connection(
                    ("127.0.0.1", self.port(spec["tcpSocket"]["port"])), timeout=1
                ):
                    return True
            return False
        if "exec" in spec:
            env = {**self.container.env, **self.probe_env}
            result = subprocess.run(
                spec["exec"]["command"], env=env, capture_output=True, timeout=30, check=False
            )
            return result.returncode == 0
        raise ContainerFailed(f"{self.container.where()}: unsupported probe {sorted(spec)}")

    def alive(self) -> bool:
        return self.process.alive()

    def kill(self) -> None:
        """SIGKILL the whole process group, as a node losing the pod would."""
        import signal

        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        if self.process.popen is not None:
            self.process.popen.wait(timeout=30)

    def stop(self) -> None:
        self.process.stop(timeout=5)


def wait_for(predicate: Any, timeout: float, what: str) -> Any:
    return proc.wait_until(predicate, timeout, 0.25, what=what)
