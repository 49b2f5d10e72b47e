"""Everything in infra/ validated offline: YAML lint, Kubernetes schemas, the DaskCluster
against the operator's CRD, the compose file against the Compose Specification."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from yamllint import linter
from yamllint.config import YamlLintConfig

from latentbatch.models.checkpoint import model_dir_for
from tests.conftest import ROOT, needs
from tests.servers import kube_discovery

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


def _job_of_the_work_pool() -> dict[str, Any]:
    template = json.loads((INFRA / "k8s" / "work-pool-template.json").read_text())
    job: dict[str, Any] = json.loads(
        re.sub(r'"\{\{ \w+ \}\}"', '"x"', json.dumps(template["job_configuration"]["job_manifest"]))
    )
    job["metadata"]["name"] = "decode-latents-run"
    job["spec"]["template"]["spec"]["containers"][0]["args"] = ["python", "-m", "prefect.engine"]
    return job


@needs(shutil.which("kubectl") is not None, "kubectl (apt-get install kubectl)")
def test_every_manifest_passes_kubectl_apply_dry_run(tmp_path: Path) -> None:
    """kubectl itself reads every manifest (and the work pool's Job) as it would apply
    them: kinds known, names and namespaces set, documents well-formed."""
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(_job_of_the_work_pool()))
    manifests = [p for p in K8S if p.name not in HELM_VALUES] + [tmp_path / "job.yaml"]
    with kube_discovery(tmp_path) as kubeconfig:
        for path in manifests:
            apply = ["apply", "--dry-run=client", "--validate=false", "-f", str(path)]
            done = subprocess.run(
                ["kubectl", "--kubeconfig", str(kubeconfig), *apply],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert done.returncode == 0, f"{path.name}: {done.stderr}"
            created = [line for line in done.stdout.splitlines() if "created (dry run)" in line]
            assert len(created) == len(_documents(path)), done.stdout


def test_dask_workers_reach_the_tls_scheduler_the_operator_names() -> None:
    """The operator hands workers DASK_SCHEDULER_ADDRESS=tcp://<name>-scheduler.<ns>...;
    the scheduler speaks TLS only, so the worker's argument must name the same service
    over tls://, and the worker carries client certificates for its own connections."""
    (cluster,) = _documents(INFRA / "k8s" / "daskcluster.yaml")
    name, namespace = cluster["metadata"]["name"], cluster["metadata"]["namespace"]
    service = cluster["spec"]["scheduler"]["service"]
    port = next(p["port"] for p in service["ports"] if p["name"] == "tcp-comm")
    scheduler = cluster["spec"]["scheduler"]["spec"]["containers"][0]
    assert scheduler["args"][-2:] == ["--protocol", "tls"]
    worker = cluster["spec"]["worker"]["spec"]["containers"][0]
    assert worker["args"][:3] == [
        "dask",
        "worker",
        f"tls://{name}-scheduler.{namespace}.svc.cluster.local:{port}",
    ]
    env = {e["name"]: e["value"] for e in worker["env"]}
    for role in ("WORKER", "CLIENT"):
        assert env[f"DASK_DISTRIBUTED__COMM__TLS__{role}__CERT"].startswith("/certs/")
    template = json.loads((INFRA / "k8s" / "work-pool-template.json").read_text())
    job_env = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    job_env = {e["name"]: e.get("value") for e in job_env["containers"][0]["env"]}
    assert job_env["DASK_SCHEDULER_ADDRESS"] == worker["args"][2]


def test_flow_jobs_mount_the_models_where_deployments_look() -> None:
    job = _job_of_the_work_pool()["spec"]["template"]["spec"]
    container = job["containers"][0]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in job["volumes"]
        if "persistentVolumeClaim" in v
    }
    storage = {d["kind"]: d for d in _documents(INFRA / "k8s" / "storage.yaml")}
    assert claims["models"] == storage["PersistentVolumeClaim"]["metadata"]["name"]
    assert "ReadWriteMany" in storage["PersistentVolumeClaim"]["spec"]["accessModes"]
    deployments = yaml.safe_load((ROOT / "deploy" / "prefect.yaml").read_text())["deployments"]
    trained = [
        str(model_dir_for(d["parameters"]["preset"], d["parameters"]["data"]))
        for d in deployments
        if d["entrypoint"] == "flows/train.py:train_autoencoder" and "out" not in d["parameters"]
    ]
    model_dirs = trained + [
        value
        for d in deployments
        for key, value in (d.get("parameters") or {}).items()
        if key in ("model_dir", "models_root")
    ]
    assert len(trained) == 2, "the train deployments name their model by the rule"
    for model_dir in model_dirs:
        resolved = Path(container["workingDir"]) / model_dir
        assert Path(mounts["models"]) in (resolved, *resolved.parents), model_dir
    assert storage["ConfigMap"]["data"]["LATENTBATCH_MODELS"] == mounts["models"]


def test_flow_jobs_can_write_the_volumes_they_mount() -> None:
    """A fresh PersistentVolume is root-owned; the flow Job runs as uid 10001 and the train
    deployments write into the models volume: the pod's fsGroup makes every writable
    volume group-writable by the Job's group (or an init step must chown it)."""
    spec = _job_of_the_work_pool()["spec"]["template"]["spec"]
    context = spec["securityContext"]
    writable = {m["name"] for m in spec["containers"][0]["volumeMounts"] if not m.get("readOnly")}
    claims = {v["name"] for v in spec["volumes"] if "persistentVolumeClaim" in v}
    assert writable & claims == {"models"}
    assert context["runAsUser"] == 10001 and context["runAsNonRoot"] is True
    chowns = any("chown" in " ".join(c.get("command", [])) for c in spec.get("initContainers", []))
    assert context.get("fsGroup") == context.get("runAsGroup") == 10001 or chowns
    for document in _documents(INFRA / "k8s" / "daskcluster.yaml"):
        for role in ("worker", "scheduler"):
            pod = document["spec"][role]["spec"]
            assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsUser"]


def test_deployments_decode_with_the_models_the_train_deployments_make() -> None:
    """One naming rule (checkpoint.model_dir_for): the model directory every encode,
    decode and query deployment names is one a train deployment writes."""
    deployments = yaml.safe_load((ROOT / "deploy" / "prefect.yaml").read_text())["deployments"]
    trained = {
        str(model_dir_for(d["parameters"]["preset"], d["parameters"]["data"]))
        for d in deployments
        if d["entrypoint"] == "flows/train.py:train_autoencoder"
    }
    used = {
        d["parameters"]["model_dir"]
        for d in deployments
        if (d.get("parameters") or {}).get("model_dir")
    }
    assert used
    assert used <= trained, used - trained


def test_compose_volumes_are_writable_by_the_services_user() -> None:
    """A fresh named volume copies the ownership of the image's folder it mounts on: each
    mount point of our image's services must be created in the Dockerfile for uid 10001."""
    dockerfile = (INFRA / "docker" / "Dockerfile").read_text().replace("\\\n", " ")
    created = {
        path
        for line in re.findall(r"^RUN install -d -o 10001 -g 10001 (.+)$", dockerfile, re.M)
        for path in line.split()
    }
    compose = yaml.safe_load((INFRA / "compose.yaml").read_text())
    targets = {
        mount.split(":")[1]
        for service in compose["services"].values()
        if service.get("image") == "latentbatch:latest"
        for mount in service.get("volumes", [])
        if mount.split(":")[0] in compose["volumes"]
    }
    assert targets
    assert targets <= created
