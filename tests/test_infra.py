"""Everything in infra/ validated offline: YAML lint, Kubernetes schemas, the DaskCluster
against the operator's CRD, the compose file against the Compose Specification."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from yamllint import linter
from yamllint.config import YamlLintConfig

from tests.conftest import ROOT

INFRA = ROOT / "infra"
SCHEMAS = INFRA / "schemas"
K8S = sorted((INFRA / "k8s").glob("*.yaml"))
HELM_VALUES = {"prefect-server-values.yaml", "prefect-worker-values.yaml"}


def _documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_yaml_lint() -> None:
    config = YamlLintConfig(file=str(INFRA / ".yamllint.yaml"))
    files = [
        p
        for p in [*INFRA.rglob("*.yaml"), ROOT / "deploy" / "prefect.yaml"]
        if SCHEMAS not in p.parents
    ]
    problems = [
        f"{p}:{e.line}: {e.message}" for p in files for e in linter.run(p.read_text(), config)
    ]
    assert problems == []


@pytest.mark.parametrize(
    "path", [p for p in K8S if p.name not in HELM_VALUES], ids=lambda p: p.name
)
def test_kubernetes_manifests_fit_their_schemas(path: Path) -> None:
    crd = yaml.safe_load((SCHEMAS / "daskcluster-crd.yaml").read_text())
    dask_schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for document in _documents(path):
        if document["kind"] == "DaskCluster":
            assert (
                document["apiVersion"]
                == f"{crd['spec']['group']}/{crd['spec']['versions'][0]['name']}"
            )
            jsonschema.validate(document, dask_schema)
        else:
            kubernetes_validate.validate(document, "1.30", strict=True)


def test_daskcluster_asks_for_gpus_and_tls() -> None:
    (cluster,) = _documents(INFRA / "k8s" / "daskcluster.yaml")
    worker = cluster["spec"]["worker"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "GPU=1" in worker["args"]
    env = {e["name"]: e["value"] for e in worker["env"]}
    assert env["DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION"] == "true"


def test_work_pool_job_template_holds_a_valid_job() -> None:
    template = json.loads((INFRA / "k8s" / "work-pool-template.json").read_text())
    job = json.loads(
        re.sub(r'"\{\{ \w+ \}\}"', '"x"', json.dumps(template["job_configuration"]["job_manifest"]))
    )
    container = job["spec"]["template"]["spec"]["containers"][0]
    container["args"] = ["python", "-m", "prefect.engine"]
    kubernetes_validate.validate(job, "1.30", strict=True)
    assert set(template["variables"]["properties"]) >= {"image", "command", "env", "name"}


def test_compose_file_fits_the_compose_specification() -> None:
    schema = json.loads((SCHEMAS / "compose-spec.json").read_text())
    compose = yaml.safe_load((INFRA / "compose.yaml").read_text())
    compose = {k: v for k, v in compose.items() if not k.startswith("x-")}
    jsonschema.Draft7Validator(schema).validate(compose)
    services = compose["services"]
    assert {
        "postgres",
        "prefect-server",
        "prefect-worker",
        "dask-scheduler",
        "dask-gpu-worker",
    } <= set(services)
    gpu = services["dask-gpu-worker"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert "GPU=1" in gpu["command"]
    assert all(
        "healthcheck" in services[s] for s in ("postgres", "prefect-server", "dask-scheduler")
    )
    assert {"stores", "outputs"} <= set(compose["volumes"])


def test_image_runs_as_a_non_root_user() -> None:
    dockerfile = (INFRA / "docker" / "Dockerfile").read_text()
    assert re.search(r"^FROM pytorch/pytorch:[\w.-]*cuda", dockerfile, re.MULTILINE)
    users = re.findall(r"^USER (\S+)", dockerfile, re.MULTILINE)
    assert users
    assert users[-1].split(":")[0] not in ("root", "0")
    assert (INFRA / "docker" / "Dockerfile.dockerignore").read_text().startswith("#")
