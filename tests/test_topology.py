"""The compose topology without containers, on 127.0.0.1: PostgreSQL behind a Prefect
server with basic authentication, a Prefect worker, a Dask scheduler and two workers
talking TLS (one advertising GPU=1)."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import os
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from distributed import Client
from distributed.comm import connect as dask_connect
from distributed.security import Security
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

from latentbatch.encode import encode
from latentbatch.engine.stack import WORK_POOL, base_env, register_deployments
from latentbatch.engine.workers import GPU_ON_CPU_ENV
from latentbatch.stores.store import Layout
from tests.conftest import ROOT, needs
from tests.servers import (
    dask_env_ready,
    free_port,
    postgres_binary,
    postgres_server,
    start,
    stop,
    wait_for,
)


def _have_postgres() -> bool:
    try:
        postgres_binary("initdb")
    except FileNotFoundError:
        return False
    return True


pytestmark = [
    pytest.mark.slow,
    needs(_have_postgres(), "PostgreSQL (apt-get install postgresql)"),
]
AUTH = "admin:correct-horse-battery"
BIN = Path(sys.executable).parent


def _certificate(
    name: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    ca: bool = False,
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, issuer_key = issuer if issuer else (subject, key)
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        import ipaddress

        alt = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_certificates(folder: Path) -> dict[str, Path]:
    """A CA and two certificates signed by it (node, client), as PEM files."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("latentbatch-test-ca", ca_key, None, ca=True)
    files = {"ca": folder / "ca.pem"}
    files["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for name in ("node", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate(f"dask-{name}", key, (ca.subject, ca_key))
        files[name] = folder / f"{name}.pem"
        files[f"{name}-key"] = folder / f"{name}-key.pem"
        files[name].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        files[f"{name}-key"].write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return files


def dask_tls_env(certs: dict[str, Path]) -> dict[str, str]:
    """Dask configuration (as environment) requiring TLS with these certificates."""
    return {
        "DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION": "true",
        "DASK_DISTRIBUTED__COMM__TLS__CA_FILE": str(certs["ca"]),
        "DASK_DISTRIBUTED__COMM__TLS__SCHEDULER__CERT": str(certs["node"]),
        "DASK_DISTRIBUTED__COMM__TLS__SCHEDULER__KEY": str(certs["node-key"]),
        "DASK_DISTRIBUTED__COMM__TLS__WORKER__CERT": str(certs["node"]),
        "DASK_DISTRIBUTED__COMM__TLS__WORKER__KEY": str(certs["node-key"]),
        "DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT": str(certs["client"]),
        "DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY": str(certs["client-key"]),
    }


@dataclass(frozen=True)
class Topology:
    api_url: str
    scheduler: str
    certs: dict[str, Path]
    folder: Path
    restart_server: Callable[[], None]

    def security(self) -> Security:
        return Security(
            tls_ca_file=str(self.certs["ca"]),
            tls_client_cert=str(self.certs["client"]),
            tls_client_key=str(self.certs["client-key"]),
            require_encryption=True,
        )


def _dask_processes(scheduler: str, port: int, folder: Path, tls: dict[str, str]) -> list[Any]:
    dask = str(BIN / "dask")
    scheduler_args = [
        dask,
        "scheduler",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--protocol",
        "tls",
    ]
    processes = [
        start([*scheduler_args, "--dashboard-address", ":0"], folder / "scheduler.log", tls)
    ]
    for name, extra in (("cpu", []), ("gpu", ["--resources", "GPU=1"])):
        args = [dask, "worker", scheduler, "--nthreads", "1", "--name", name, "--host", "127.0.0.1"]
        args += ["--dashboard-address", ":0", *extra]
        # this machine has no GPU: the routing is what is tested, so the GPU=1 worker may
        # decode on its CPU (it is refused otherwise)
        env = {**tls, GPU_ON_CPU_ENV: "1"} if extra else tls
        processes.append(start(args, folder / f"worker-{name}.log", env))
    return processes


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    folder = tmp_path_factory.mktemp("topology")
    certs = make_certificates(folder / "certs")
    tls = dask_tls_env(certs)
    processes: list[Any] = []
    with postgres_server(folder / "pg", "pg-secret") as database:
        try:
            port, dask_port = free_port(), free_port()
            api_url = f"http://127.0.0.1:{port}/api"
            scheduler = f"tls://127.0.0.1:{dask_port}"
            env = {**base_env(folder), "PREFECT_UI_API_URL": api_url}
            server_env = {
                **env,
                "PREFECT_API_DATABASE_CONNECTION_URL": database,
                "PREFECT_SERVER_API_AUTH_STRING": AUTH,
            }
            server_args = [
                str(BIN / "prefect"),
                "server",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ]
            processes.append(start(server_args, folder / "server.log", server_env))
            headers = {"Authorization": "Basic " + base64.b64encode(AUTH.encode()).decode()}

            def healthy() -> bool:
                return httpx.get(f"{api_url}/health", headers=headers, timeout=2).status_code == 200

            def restart_server() -> None:
                stop(processes[0])
                processes[0] = start(server_args, folder / "server.log", server_env)
                wait_for(healthy, "the restarted Prefect server", 120)

            processes += _dask_processes(scheduler, dask_port, folder, tls)
            wait_for(healthy, "the Prefect server", 120)
            client_env = {**env, **tls, "PREFECT_API_URL": api_url, "PREFECT_API_AUTH_STRING": AUTH}
            register_deployments(ROOT, {**os.environ, **client_env}, folder / "logs")
            worker_args = [
                str(BIN / "prefect"),
                "worker",
                "start",
                "--pool",
                WORK_POOL,
                "--type",
                "process",
            ]
            worker_env = {**client_env, "DASK_SCHEDULER_ADDRESS": scheduler}
            processes.append(start(worker_args, folder / "prefect-worker.log", worker_env))
            topo = Topology(api_url, scheduler, certs, folder, restart_server)
            wait_for(lambda: dask_env_ready(scheduler, topo.security(), 2), "dask cluster", 60)
            with temporary_settings({PREFECT_API_URL: api_url, PREFECT_API_AUTH_STRING: AUTH}):
                yield topo
        finally:
            for process in reversed(processes):
                stop(process)


def test_api_refuses_requests_without_the_auth_string(topology: Topology) -> None:
    assert httpx.post(f"{topology.api_url}/flows/filter", json={}, timeout=5).status_code == 401
    wrong = httpx.post(
        f"{topology.api_url}/flows/filter", json={}, auth=("admin", "wrong"), timeout=5
    )
    assert wrong.status_code == 401
    user, password = AUTH.split(":")
    assert (
        httpx.post(
            f"{topology.api_url}/flows/filter", json={}, auth=(user, password), timeout=5
        ).status_code
        == 200
    )


async def _connect(address: str, security: Security) -> int:
    async with Client(address, asynchronous=True, timeout="5s", security=security) as client:
        return len((await client.scheduler.identity())["workers"])


async def _identity(address: str, **connection_args: object) -> object:
    comm = await dask_connect(address, timeout="5s", **connection_args)
    try:
        await comm.write({"op": "identity"})
        return await comm.read()
    finally:
        await comm.close()


def test_dask_refuses_a_client_without_a_certificate(topology: Topology) -> None:
    trusts_ca_only = ssl.create_default_context(cafile=str(topology.certs["ca"]))
    with pytest.raises((OSError, TimeoutError)):  # TLS without a client certificate
        asyncio.run(_identity(topology.scheduler, ssl_context=trusts_ca_only))
    with pytest.raises((OSError, TimeoutError)):  # no TLS at all
        asyncio.run(_identity(topology.scheduler.replace("tls://", "tcp://")))
    assert asyncio.run(_connect(topology.scheduler, topology.security())) == 2


def test_decode_deployment_runs_on_the_gpu_worker_only(
    topology: Topology, tmp_path: Path, tiny_model: Path, client: Client
) -> None:
    store, out = tmp_path / "s.zarr", tmp_path / "out"
    encode(tiny_model, "synthetic:64", str(store), layout=Layout(16, 8), client=client)
    parameters = {"model_dir": str(tiny_model), "store": str(store), "out": str(out)}
    parameters["images_per_shard"] = 16  # four tasks and the canary, all on the GPU worker
    run = run_deployment("decode-latents/decode-latents", parameters=parameters, timeout=240)
    assert run.state is not None
    assert run.state.is_completed(), run.state.message
    assert (out / "manifest.json").is_file()
    with Client(topology.scheduler, security=topology.security(), timeout="10s") as dask_client:
        executed = dask_client.run(
            lambda dask_worker: (dask_worker.name, dask_worker.state.executed_count)
        )
    counts = dict(executed.values())
    assert counts["gpu"] == 5  # the store's canary first, then the four decode tasks
    assert counts["cpu"] == 0


def _api(topology: Topology, path: str, body: dict[str, Any] | None = None) -> Any:
    user, password = AUTH.split(":")
    url = f"{topology.api_url}{path}"
    if body is None:
        response = httpx.get(url, auth=(user, password), timeout=10)
    else:
        response = httpx.post(url, json=body, auth=(user, password), timeout=10)
    return response.raise_for_status().json()


def _final_state(topology: Topology, run_id: str, timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = _api(topology, f"/flow_runs/{run_id}")["state_type"]
        if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return str(state)
        time.sleep(1)
    raise TimeoutError(f"flow run {run_id} still not finished after {timeout} s")


def test_server_restart_during_a_nightly_run_loses_nothing(
    topology: Topology, tmp_path: Path, tiny_model: Path, client: Client
) -> None:
    root, out_root, models = tmp_path / "stores", tmp_path / "decoded", tmp_path / "models"
    shutil.copytree(tiny_model, models / "tiny")
    encode(
        tiny_model, "synthetic:3000", str(root / "big.zarr"), layout=Layout(16, 8), client=client
    )
    parameters = {"root": str(root), "out_root": str(out_root), "models_root": str(models)}
    parameters["images_per_shard"] = 16  # one output shard per store shard: 188 of them
    run = run_deployment(
        "nightly-bulk-decode/nightly-bulk-decode", parameters=parameters, timeout=0
    )
    run_id = str(run.id)
    records = out_root / "big" / ".records"
    wait_for(lambda: len(list(records.glob("*.json"))) >= 10, "the first decoded shards", 180)

    topology.restart_server()
    recorded = sorted(p.stem for p in records.glob("*.json"))
    stamps = {name: (out_root / "big" / f"{name}.tar").stat().st_mtime_ns for name in recorded}
    first = _final_state(topology, run_id)
    print(f"the run ended {first} after the restart; {len(recorded)} shards were recorded before")
    assert _api(topology, f"/flow_runs/{run_id}")["id"] == run_id

    def messages() -> list[str]:
        logs = _api(topology, "/logs/filter", {"logs": {"flow_run_id": {"any_": [run_id]}}})
        return [entry["message"] for entry in logs]

    # the flow process ships its last log lines a moment after its final state
    wait_for(lambda: any("Finished in state" in m for m in messages()), "the final log lines", 60)
    assert any("submitted to infrastructure" in m for m in messages())  # written before the restart
    assert any("Finished in state" in m for m in messages())  # written after it
    artifacts = _api(
        topology, "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run_id]}}}
    )
    assert "nightly-progress" in {a["key"] for a in artifacts}

    env = {**os.environ, "PREFECT_API_URL": topology.api_url, "PREFECT_API_AUTH_STRING": AUTH}
    env |= base_env(topology.folder)
    retry = subprocess.run(
        [str(BIN / "prefect"), "flow-run", "retry", run_id], env=env, capture_output=True, text=True
    )
    assert retry.returncode == 0, retry.stderr + retry.stdout
    assert _final_state(topology, run_id) == "COMPLETED", first
    manifest = json.loads((out_root / "big" / "manifest.json").read_text())
    assert manifest["count"] == 3000
    assert manifest["shard_table"]["shards"] == 188
    for name, stamp in stamps.items():
        assert (out_root / "big" / f"{name}.tar").stat().st_mtime_ns == stamp, f"{name} was redone"
