"""Real servers on loopback for tests: started here, stopped by PID."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop(process: subprocess.Popen[bytes], timeout: float = 10) -> None:
    """Stop a process we started (and its process group) by PID."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout)


def start(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start a server in its own process group, logging to ``log``."""
    handle = log.open("wb")
    return subprocess.Popen(
        args,
        stdout=handle,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, **(env or {})},
    )


def wait_for(check, what: str, timeout: float = 60) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{what} did not come up in {timeout} s")


@contextmanager
def dask_cluster(
    folder: Path,
    workers: int = 2,
    worker_args: list[str] | None = None,
    worker_env: dict[str, str] | None = None,
) -> Iterator[tuple[str, list[subprocess.Popen[bytes]]]]:
    """``dask scheduler`` and ``dask worker`` processes on 127.0.0.1, from the CLI; every
    worker gets ``worker_args`` too (``--resources GPU=1``, ...) and ``worker_env``."""
    from distributed import Client

    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    dask = str(BIN / "dask")
    scheduler = start(
        [
            dask,
            "scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--dashboard-address",
            ":0",
        ],
        folder / "scheduler.log",
    )
    processes = [scheduler]
    try:
        for i in range(workers):
            args = [dask, "worker", address, "--nworkers", "1", "--nthreads", "1"]
            args += ["--host", "127.0.0.1", "--dashboard-address", ":0", "--name", f"w{i}"]
            args += worker_args or []
            processes.append(start(args, folder / f"worker-{i}.log", worker_env))

        def ready() -> bool:
            with Client(address, timeout="2s") as c:
                return len(c.scheduler_info(n_workers=-1)["workers"]) == workers

        wait_for(ready, f"dask cluster at {address}")
        yield address, processes
    finally:
        for process in reversed(processes):
            stop(process)


@contextmanager
def moto_server(folder: Path) -> Iterator[str]:
    """An S3 endpoint (moto) on 127.0.0.1; yields its URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], folder / "moto.log"
    )
    try:
        wait_for(lambda: urllib.request.urlopen(url, timeout=1).status == 200, "moto server")
        yield url
    finally:
        stop(process)


def postgres_binary(name: str) -> str:
    """A PostgreSQL server binary: on PATH, or in Debian's /usr/lib/postgresql/*/bin."""
    import shutil

    found = shutil.which(name) or next(
        iter(sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))), None
    )
    if found is None:
        raise FileNotFoundError(f"{name} not found: apt-get install postgresql")
    return str(found)


def _as_postgres(args: list[str]) -> list[str]:
    """Run a PostgreSQL binary as the postgres user when we are root (it refuses root)."""
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args


@contextmanager
def postgres_server(folder: Path, password: str) -> Iterator[str]:
    """A throw-away PostgreSQL on 127.0.0.1 whose superuser is ``prefect``; yields an
    asyncpg SQLAlchemy URL. Its data lives in a fresh folder the postgres user can reach
    (pytest's own temporary folders are private to root)."""
    import shutil
    import tempfile

    folder.mkdir(parents=True, exist_ok=True)
    home = Path(tempfile.mkdtemp(prefix="latentbatch-pg-"))
    data = home / "data"
    pwfile = home / "pw"
    pwfile.write_text(password)
    if os.geteuid() == 0:
        for path in (home, pwfile):
            shutil.chown(path, "postgres")
    initdb = postgres_binary("initdb")
    init = [
        initdb,
        "-D",
        str(data),
        "-U",
        "prefect",
        "--pwfile",
        str(pwfile),
        "-A",
        "scram-sha-256",
    ]
    subprocess.run(_as_postgres(init), check=True, capture_output=True)
    port = free_port()
    postgres = postgres_binary("postgres")
    args = [postgres, "-D", str(data), "-h", "127.0.0.1", "-p", str(port), "-k", str(home)]
    process = start(_as_postgres(args), folder / "postgres.log")
    try:

        def ready() -> bool:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True

        wait_for(ready, "postgres")
        time.sleep(1)
        yield f"postgresql+asyncpg://prefect:{password}@127.0.0.1:{port}/postgres"
    finally:
        stop(process)
        shutil.rmtree(home, ignore_errors=True)


def dask_env_ready(address: str, security: object, workers: int) -> bool:
    """Whether the scheduler at ``address`` answers and has ``workers`` workers."""
    from distributed import Client

    with Client(address, security=security, timeout="3s") as client:
        return len(client.scheduler_info(n_workers=-1)["workers"]) == workers


# kind → (group/version, plural, namespaced) of every kind in infra/k8s
KUBE_KINDS = {
    "Namespace": ("v1", "namespaces", False),
    "Secret": ("v1", "secrets", True),
    "ConfigMap": ("v1", "configmaps", True),
    "PersistentVolumeClaim": ("v1", "persistentvolumeclaims", True),
    "Job": ("batch/v1", "jobs", True),
    "DaskCluster": ("kubernetes.dask.org/v1", "daskclusters", True),
}


@contextmanager
def kube_discovery(folder: Path) -> Iterator[Path]:
    """An HTTP endpoint on 127.0.0.1 answering the Kubernetes API's discovery documents
    for :data:`KUBE_KINDS` and "not found" for every object; yields a kubeconfig for it.

    ``kubectl apply --dry-run=client`` needs discovery (kind → resource) and a look at
    the live object even though it changes nothing; no cluster can run here, so this
    answers those two questions and nothing else."""
    import json
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    versions: dict[str, list[dict[str, object]]] = {}
    for kind, (group_version, plural, namespaced) in KUBE_KINDS.items():
        versions.setdefault(group_version, []).append(
            {
                "name": plural,
                "singularName": kind.lower(),
                "namespaced": namespaced,
                "kind": kind,
                "verbs": ["create", "get", "list", "patch"],
            }
        )
    groups = sorted({gv.split("/")[0] for gv in versions if "/" in gv})
    documents: dict[str, object] = {
        "/api": {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []},
        "/apis": {
            "kind": "APIGroupList",
            "apiVersion": "v1",
            "groups": [
                {
                    "name": g,
                    "versions": [{"groupVersion": f"{g}/v1", "version": "v1"}],
                    "preferredVersion": {"groupVersion": f"{g}/v1", "version": "v1"},
                }
                for g in groups
            ],
        },
    }
    for group_version, resources in versions.items():
        path = "/api/v1" if group_version == "v1" else f"/apis/{group_version}"
        documents[path] = {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": group_version,
            "resources": resources,
        }

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?")[0]
            document = documents.get(path)
            status = 200 if document is not None else 404
            if document is None:
                document = {
                    "kind": "Status",
                    "apiVersion": "v1",
                    "status": "Failure",
                    "reason": "NotFound",
                    "code": 404,
                }
            body = json.dumps(document).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    config = folder / "kubeconfig"
    config.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {"name": "c", "cluster": {"server": f"http://127.0.0.1:{server.server_port}"}}
                ],
                "users": [{"name": "u", "user": {}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    try:
        yield config
    finally:
        server.shutdown()
        server.server_close()


class TcpProxy:
    """A TCP forwarder on 127.0.0.1 to ``target_port``, in this process: ``stop()`` closes
    its port and every connection through it (the endpoint seems gone), ``start()``
    reopens the same port (the endpoint is back)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._marker, self._left, self._seconds = b"", 0, 0.0
        self.outages = 0

    def go_away_after(self, marker: bytes, count: int, seconds: float) -> None:
        """Once ``count`` requests holding ``marker`` have gone through, stop for
        ``seconds`` and start again (the endpoint restarted)."""
        self._marker, self._left, self._seconds = marker, count, seconds

    def _outage(self) -> None:
        self.stop()
        self.outages += 1
        time.sleep(self._seconds)
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        with self._lock:
            sockets, self._sockets = self._sockets, []
            listener, self._listener = self._listener, None
        for sock in [*sockets, *([listener] if listener else [])]:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # stopped
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, upstream]
            for a, b, watch in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pipe, args=(a, b, watch), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, watch: bool) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
                if watch and self._left and self._marker in data:
                    with self._lock:
                        self._left -= 1
                        due = self._left == 0
                    if due:
                        threading.Thread(target=self._outage, daemon=True).start()
        except OSError:
            pass
        finally:
            with suppress(OSError):
                sink.shutdown(socket.SHUT_WR)
