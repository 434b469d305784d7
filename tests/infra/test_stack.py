"""The team stack for real, on loopback: PostgreSQL, a Prefect server and an MLflow tracking server on it,
a process work pool with the pipeline deployed from infra/prefect.yaml, a worker, and a flow run of a pico
config triggered through the API. Everything started here is stopped here.

Skipped where PostgreSQL's server binaries are missing (Debian: `apt-get install postgresql`).
"""

from __future__ import annotations

import glob
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import MEMORISE, REPO, pico_raw
from tests.servers import server, stop
from unlearning.train.launch import free_port

pytestmark = pytest.mark.infra
BIN = Path(sys.executable).parent
PG_BIN = next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)), None)


def _as_postgres(argv: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run its tools as the `postgres` user."""
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    if PG_BIN is None or (os.geteuid() == 0 and not shutil.which("runuser")):
        pytest.skip("PostgreSQL's server is not installed (apt-get install postgresql)")
    base = tmp_path_factory.mktemp("stack")
    # pytest's temporary directories are private to their owner: the `postgres` user gets its own.
    pgbase = Path(tempfile.mkdtemp(prefix="unlearning-pg-"))
    pgbase.chmod(0o777)
    password = secrets.token_urlsafe(16)
    pgdata, pwfile = pgbase / "data", pgbase / "pw"
    pwfile.write_text(password)
    pwfile.chmod(0o644)
    pg_port, prefect_port, mlflow_port = free_port(), free_port(), free_port()
    subprocess.run(_as_postgres([f"{PG_BIN}/initdb", "-D", str(pgdata), "-U", "unlearning", "--auth=scram-sha-256",
                                 f"--pwfile={pwfile}"]), check=True, capture_output=True)
    subprocess.run(_as_postgres([f"{PG_BIN}/pg_ctl", "-D", str(pgdata), "-l", str(pgbase / "pg.log"), "-w", "-o",
                                 f"-c listen_addresses=127.0.0.1 -p {pg_port} -k {pgbase}", "start"]),
                   check=True, capture_output=True)
    try:
        pg_env = {**os.environ, "PGPASSWORD": password}
        for db in ("prefect", "mlflow"):
            subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(pg_port), "-U", "unlearning", "-d", "postgres",
                            "-c", f"CREATE DATABASE {db}"], check=True, capture_output=True, env=pg_env)
        dsn = f"unlearning:{password}@127.0.0.1:{pg_port}"
        prefect_env = {**os.environ, "PREFECT_HOME": str(base / "prefect-home"),
                       "PREFECT_API_DATABASE_CONNECTION_URL": f"postgresql+asyncpg://{dsn}/prefect",
                       "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false"}
        prefect_env.pop("PREFECT_API_URL", None)
        mlflow_env = {**os.environ, "MLFLOW_BACKEND_STORE_URI": f"postgresql+psycopg2://{dsn}/mlflow"}
        with (server([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
                      prefect_env, base / "prefect.log", f"http://127.0.0.1:{prefect_port}/api/health"),
              server([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
                       "--workers", "1", "--artifacts-destination", str(base / "mlartifacts")],
                      mlflow_env, base / "mlflow.log", f"http://127.0.0.1:{mlflow_port}/health")):
            yield {"base": str(base), "prefect": f"http://127.0.0.1:{prefect_port}/api",
                   "mlflow": f"http://127.0.0.1:{mlflow_port}", "password": password}
    finally:
        subprocess.run(_as_postgres([f"{PG_BIN}/pg_ctl", "-D", str(pgdata), "-m", "fast", "-w", "stop"]),
                       capture_output=True)
        shutil.rmtree(pgbase, ignore_errors=True)


def test_a_deployed_pipeline_runs_on_a_worker_and_reports_to_both_servers(stack, tmp_path):
    from mlflow.tracking import MlflowClient

    base = Path(stack["base"])
    env = {**os.environ, "PREFECT_API_URL": stack["prefect"], "MLFLOW_TRACKING_URI": stack["mlflow"],
           "PREFECT_HOME": str(base / "client-home"), "UNLEARNING_HOME": str(REPO),
           "PREFECT_LOGGING_LEVEL": "WARNING"}
    prefect = str(BIN / "prefect")

    def cli(*args: str, timeout: float = 300) -> str:
        done = subprocess.run([prefect, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, f"prefect {' '.join(args)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done.stdout

    cli("work-pool", "create", "local-process", "--type", "process")
    cli("--no-prompt", "deploy", "--name", "pipeline-process", "--prefect-file", "infra/prefect.yaml")
    config = tmp_path / "pico.yaml"
    config.write_text(yaml.safe_dump(pico_raw(
        tmp_path / "run", model={"finetune": MEMORISE}, methods=[{"name": "npo"}],
        train={"num_processes": 1, "batch_size": 4, "max_steps": 3, "lr": 1e-3},
        merge={"lambdas": [2.0], "finetune": {"lr": 3e-3, "max_steps": 3}},
        eval={"suite": "tofu", "max_new_tokens": 8})))
    with (tmp_path / "worker.log").open("w") as log:
        worker = subprocess.Popen([prefect, "worker", "start", "--pool", "local-process", "--type", "process"],
                                  cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        done = subprocess.run([prefect, "deployment", "run", "unlearning-pipeline/pipeline-process", "--param",
                               f"config={config}", "--watch", "--watch-timeout", "900"], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=960)
    finally:
        stop(worker)
    worker_log = (tmp_path / "worker.log").read_text()[-4000:]
    assert done.returncode == 0 and "Completed" in done.stdout, f"{done.stdout}\n{done.stderr}\n{worker_log}"
    request = urllib.request.Request(f"{stack['prefect']}/flow_runs/filter", data=json.dumps({}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=30) as r:
        flow_runs = json.loads(r.read())
    assert [(run["state_type"], bool(run["deployment_id"])) for run in flow_runs] == [("COMPLETED", True)]

    client = MlflowClient(stack["mlflow"])
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("pico").experiment_id])}
    (top,) = [r for r in runs.values() if "mlflow.parentRunId" not in r.data.tags]
    assert top.info.status == "FINISHED" and top.info.run_name.startswith("pico · ")
    assert top.data.tags["prefect_flow_run_id"] == flow_runs[0]["id"]
    for label in ("target", "npo", "merged_l2"):
        assert {"forget_quality", "model_utility"} <= set(runs[f"eval-{label}"].data.metrics)
    assert client.get_model_version_by_alias("pico", "oracle").tags["label"] == "oracle"
    assert stack["password"] not in (base / "mlflow.log").read_text()
