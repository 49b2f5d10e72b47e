"""The compose topology without containers, on 127.0.0.1: PostgreSQL behind a Prefect
server with basic authentication, a Prefect worker, a Dask scheduler and two workers
talking TLS (one advertising GPU=1)."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

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
from latentbatch.stack import WORK_POOL, base_env
from latentbatch.store import Layout
from tests.conftest import ROOT
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
    pytest.mark.skipif(
        not _have_postgres(), reason="needs PostgreSQL (apt-get install postgresql)"
    ),
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

    def security(self) -> Security:
        return Security(
            tls_ca_file=str(self.certs["ca"]),
            tls_client_cert=str(self.certs["client"]),
            tls_client_key=str(self.certs["client-key"]),
            require_encryption=True,
        )


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    folder = tmp_path_factory.mktemp("topology")
    certs = make_certificates(folder / "certs")
    tls = dask_tls_env(certs)
    processes = []
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
            processes.append(
                start(
                    [
                        str(BIN / "prefect"),
                        "server",
                        "start",
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(port),
                    ],
                    folder / "server.log",
                    server_env,
                )
            )
            dask = str(BIN / "dask")
            processes.append(
                start(
                    [
                        dask,
                        "scheduler",
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(dask_port),
                        "--protocol",
                        "tls",
                        "--dashboard-address",
                        ":0",
                    ],
                    folder / "scheduler.log",
                    tls,
                )
            )
            for name, extra in (("cpu", []), ("gpu", ["--resources", "GPU=1"])):
                args = [
                    dask,
                    "worker",
                    scheduler,
                    "--nthreads",
                    "1",
                    "--name",
                    name,
                    "--host",
                    "127.0.0.1",
                    "--dashboard-address",
                    ":0",
                    *extra,
                ]
                processes.append(start(args, folder / f"worker-{name}.log", tls))
            headers = {
                "Authorization": "Basic " + __import__("base64").b64encode(AUTH.encode()).decode()
            }
            wait_for(
                lambda: (
                    httpx.get(f"{api_url}/health", headers=headers, timeout=2).status_code == 200
                ),
                "prefect server",
                120,
            )
            client_env = {**env, **tls, "PREFECT_API_URL": api_url, "PREFECT_API_AUTH_STRING": AUTH}
            prefect = str(BIN / "prefect")
            subprocess.run(
                [prefect, "work-pool", "create", WORK_POOL, "--type", "process", "--overwrite"],
                env={**os.environ, **client_env},
                check=True,
                capture_output=True,
            )
            subprocess.run(
                [
                    prefect,
                    "--no-prompt",
                    "deploy",
                    "--all",
                    "--prefect-file",
                    str(ROOT / "deploy" / "prefect.yaml"),
                ],
                env={**os.environ, **client_env, "LATENTBATCH_ROOT": str(ROOT)},
                cwd=ROOT,
                check=True,
                capture_output=True,
            )
            processes.append(
                start(
                    [prefect, "worker", "start", "--pool", WORK_POOL, "--type", "process"],
                    folder / "prefect-worker.log",
                    {**client_env, "DASK_SCHEDULER_ADDRESS": scheduler},
                )
            )
            topo = Topology(api_url, scheduler, certs)
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
    run = run_deployment("decode-latents/decode-latents", parameters=parameters, timeout=240)
    assert run.state is not None
    assert run.state.is_completed(), run.state.message
    assert (out / "manifest.json").is_file()
    with Client(topology.scheduler, security=topology.security(), timeout="10s") as dask_client:
        executed = dask_client.run(
            lambda dask_worker: (dask_worker.name, dask_worker.state.executed_count)
        )
    counts = dict(executed.values())
    assert counts["gpu"] == 4
    assert counts["cpu"] == 0
