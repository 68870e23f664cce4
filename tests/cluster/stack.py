"""The chart's kind stack started from its rendered manifests, piece by piece.

Each function takes the rendered object, prepares its container with :mod:`runner` and starts
the program the image holds. Third-party images get a stand-in from packages, said here:

- ``docker.io/library/postgres`` (StatefulSet ``<release>-postgresql``): Debian's PostgreSQL
  server. What the image's entrypoint does with the rendered env (``POSTGRES_USER``,
  ``POSTGRES_DB``, ``POSTGRES_PASSWORD_FILE``, ``PGDATA``) is done with ``initdb``, ``postgres``
  and ``createdb``, as a non-root user; the rendered ``pg_isready`` probe decides readiness.
- ``quay.io/minio/minio`` (Deployment ``<release>-minio``): moto's S3 server; it ignores the
  rendered keys (any key is accepted) and has no ``/minio/health`` endpoints, so its own
  readiness is used.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from roost import proc
from tests.cluster.runner import ContainerFailed, Manifest, Rendered, Runner, Running

RELEASE = "roost"
NAMESPACE = "roost"


def component(rendered: Rendered, kind: str, name: str) -> Manifest:
    return rendered.get(kind, f"{RELEASE}-{name}")


def pg_bindir() -> Path:
    """Debian's PostgreSQL server programs (package postgresql, /usr/lib/postgresql/N/bin)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).resolve().parent
    raise ContainerFailed("PostgreSQL is not installed: make apt-deps (Debian package postgresql)")


def _demote() -> dict[str, Any]:
    """Popen arguments that run PostgreSQL as the `postgres` user when we are root."""
    if os.geteuid() != 0:
        return {}
    return {"user": "postgres", "group": "postgres", "extra_groups": []}


def _chown_tree(path: Path) -> None:
    if os.geteuid() != 0:
        return
    import pwd

    entry = pwd.getpwnam("postgres")
    for root, dirs, files in os.walk(path):
        for name in [*dirs, *files]:
            os.chown(os.path.join(root, name), entry.pw_uid, entry.pw_gid)
    os.chown(path, entry.pw_uid, entry.pw_gid)


def start_postgresql(runner: Runner, timeout: float = 120) -> Running:
    """The PostgreSQL StatefulSet: initdb + postgres + createdb with its rendered env."""
    sts = component(runner.rendered, "StatefulSet", "postgresql")
    local = runner.loopback.bind(sts.name, 5432)
    # Its own directory outside pytest's (mode 0700) tree: the server runs as `postgres`.
    base = Path(tempfile.mkdtemp(prefix="roost-cluster-pg-"))
    base.chmod(0o755)
    runner.cleanup.append(base)
    container = runner.container(sts, ports={5432: local}, pod=f"{sts.name}-0", base=base)
    env = container.env
    for key in ("POSTGRES_USER", "POSTGRES_DB", "POSTGRES_PASSWORD_FILE", "PGDATA"):
        if not env.get(key):
            raise ContainerFailed(f"{container.where()}: no {key} in its env")
    bindir = pg_bindir()
    pgdata = Path(env["PGDATA"])
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    _chown_tree(container.workdir)
    container.env["PATH"] = f"{bindir}:{env['PATH']}"
    runner.run_once(
        container,
        [
            str(bindir / "initdb"), "-D", str(pgdata), "-U", env["POSTGRES_USER"],
            f"--pwfile={env['POSTGRES_PASSWORD_FILE']}", "--auth-host=scram-sha-256",
            "--auth-local=trust", "--encoding=UTF8",
        ],
        timeout,
        **_demote(),
    )  # fmt: skip
    socket_dir = container.mounts["/var/run/postgresql"]
    running = runner.start(
        container,
        [
            str(bindir / "postgres"), "-D", str(pgdata), "-p", str(local),
            "-k", str(socket_dir), "-c", "listen_addresses=127.0.0.1",
        ],
        **_demote(),
    )  # fmt: skip
    # The probe runs `pg_isready -h 127.0.0.1` in the container: the port moved with the map.
    running.probe_env = {"PGPORT": str(local)}
    running.wait_ready(timeout)
    password = Path(env["POSTGRES_PASSWORD_FILE"]).read_text()
    runner.run_once(
        container,
        [str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(local),
         "-U", env["POSTGRES_USER"], env["POSTGRES_DB"]],
        timeout,
        env={"PGPASSWORD": password},
    )  # fmt: skip
    return running


def start_s3(runner: Runner, timeout: float = 60) -> Running:
    """The MinIO Deployment, served by moto's S3 server on its mapped port."""
    deployment = component(runner.rendered, "Deployment", "minio")
    local = runner.loopback.bind(deployment.name, 9000)
    container = runner.container(deployment, ports={9000: local})
    moto = str(Path(sys.executable).with_name("moto_server"))
    running = runner.start(container, [moto, "-H", "127.0.0.1", "-p", str(local)])
    proc.wait_http(f"http://127.0.0.1:{local}/moto-api/", timeout, running.process, "moto (S3)")
    return running


def run_bucket_job(runner: Runner, timeout: float = 120) -> Running:
    """The bucket hook Job, its own command (`roost aws bootstrap ...`)."""
    job = component(runner.rendered, "Job", "bucket")
    container = runner.container(job, labels=job_labels(job.name))
    running = runner.start(container)
    running.wait_exit(timeout)
    return running


def start_mlflow(runner: Runner, timeout: float = 180) -> Running:
    """The MLflow Deployment with its rendered args (``roost mlflow serve ...``)."""
    deployment = component(runner.rendered, "Deployment", "mlflow")
    service = component(runner.rendered, "Service", "mlflow")
    port = int(service.doc["spec"]["ports"][0]["port"])
    local = runner.loopback.bind(service.name, port)
    container_port = int(
        deployment.doc["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"]
    )
    container = runner.container(deployment, ports={container_port: local})
    running = runner.start(container)
    running.wait_ready(timeout)
    return running


def job_labels(name: str) -> dict[str, str]:
    """The labels the Job controller puts on its pods."""
    return {"batch.kubernetes.io/job-name": name, "job-name": name}


@dataclass
class Stack:
    """The running kind stack: PostgreSQL, S3, the bucket Job's result, MLflow."""

    runner: Runner
    postgresql: Running
    s3: Running
    bucket_job: Running
    mlflow: Running

    @property
    def mlflow_uri(self) -> str:
        return f"http://127.0.0.1:{self.mlflow.port('http')}"

    @property
    def s3_url(self) -> str:
        return f"http://127.0.0.1:{self.s3.container.ports[9000]}"

    def s3_client(self) -> Any:
        import boto3

        keys = self.runner.rendered.data("Secret", f"{RELEASE}-minio")
        return boto3.client(
            "s3",
            endpoint_url=self.s3_url,
            region_name="us-east-1",
            aws_access_key_id=keys["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=keys["AWS_SECRET_ACCESS_KEY"],
        )
