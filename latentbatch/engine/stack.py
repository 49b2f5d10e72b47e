"""A local stack on 127.0.0.1 for people who want the Prefect UI.

``up`` starts, in order: a Prefect server, a Dask scheduler and workers, the work pool,
the deployments of ``deploy/prefect.yaml``, and a Prefect worker whose flow runs use the
stack's Dask cluster. Every process runs in its own session; PIDs, addresses and logs
live under one folder (default ``.scratch/stack``)::

    HOME/pids.json      name → pid, process start time, command
    HOME/stack.env      PREFECT_API_URL, PREFECT_UI_URL, DASK_SCHEDULER_ADDRESS, ...
    HOME/logs/NAME.log  one log per process
    HOME/prefect/       the server's PREFECT_HOME (SQLite database)

``down`` stops exactly the processes in ``pids.json`` (checked by PID and start time),
``status`` tells what is running.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from latentbatch.errors import LatentbatchError

DEFAULT_HOME = Path(".scratch/stack")
WORK_POOL = "latentbatch-local"
BIN = Path(sys.executable).parent


class StackError(LatentbatchError):
    """The stack cannot be started, reached or stopped."""


@dataclass(frozen=True)
class StackInfo:
    home: Path
    api_url: str
    ui_url: str
    scheduler: str
    dashboard: str


def free_port(preferred: int | None = None) -> int:
    """``preferred`` when it is free on 127.0.0.1, else any free port."""
    for candidate in ([preferred] if preferred else []) + [0]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", candidate))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise StackError("no free port on 127.0.0.1")


def base_env(home: Path) -> dict[str, str]:
    """Environment of every stack process: offline Prefect with its state under HOME."""
    return {
        **os.environ,
        "PREFECT_HOME": str(home / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_UI_ENABLED": "true",
    }


def read_env(home: Path = DEFAULT_HOME) -> dict[str, str]:
    """The addresses a running stack wrote to ``stack.env`` (empty when none)."""
    path = home / "stack.env"
    if not path.is_file():
        return {}
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return dict(pairs)


def _healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def _wait(check: Callable[[], bool], what: str, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise StackError(f"{what} did not come up in {timeout:.0f} s; see {log}")


class _Launcher:
    def __init__(self, home: Path) -> None:
        self.home = home
        self.logs = home / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.pids: dict[str, dict[str, object]] = {}

    def start(
        self, name: str, args: list[str], env: dict[str, str], cwd: Path | None = None
    ) -> int:
        log = (self.logs / f"{name}.log").open("ab")
        process = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
        )
        created = psutil.Process(process.pid).create_time()
        self.pids[name] = {"pid": process.pid, "created": created, "args": args}
        self.save()
        return process.pid

    def save(self) -> None:
        (self.home / "pids.json").write_text(json.dumps(self.pids, indent=2))


def _run_logged(
    name: str, args: list[str], env: dict[str, str], logs: Path, cwd: Path | None = None
) -> None:
    log = logs / f"{name}.log"
    with log.open("ab") as handle:
        done = subprocess.run(args, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    if done.returncode:
        raise StackError(f"{' '.join(args[:3])} ... failed (exit {done.returncode}); see {log}")


def register_deployments(project: Path, client_env: dict[str, str], logs: Path) -> None:
    """Create the process work pool and register ``deploy/prefect.yaml`` against the API
    that ``client_env`` points at (logs in ``logs/work-pool.log`` and ``logs/deploy.log``)."""
    prefect = str(BIN / "prefect")
    logs.mkdir(parents=True, exist_ok=True)
    pool = [prefect, "work-pool", "create", WORK_POOL, "--type", "process", "--overwrite"]
    _run_logged("work-pool", pool, client_env, logs)
    deploy = [
        prefect,
        "--no-prompt",
        "deploy",
        "--all",
        "--prefect-file",
        str(project / "deploy" / "prefect.yaml"),
    ]
    _run_logged(
        "deploy", deploy, {**client_env, "LATENTBATCH_ROOT": str(project)}, logs, cwd=project
    )


def up(
    home: Path = DEFAULT_HOME, project: Path = Path(), workers: int | None = None, port: int = 4200
) -> StackInfo:
    """Start the stack (see the module docstring); return its addresses. ``workers``
    defaults to one per GPU on a CUDA host (each pinned to its device), else 2."""
    home, project = home.resolve(), project.resolve()
    if running(home):
        raise StackError(
            f"a stack is already running from {home}; run `latentbatch stack down` first"
        )
    prefect_file = project / "deploy" / "prefect.yaml"
    if not prefect_file.is_file():
        raise StackError(
            f"{prefect_file} is missing; run from the latentbatch repository or pass --project"
        )
    launcher = _Launcher(home)
    server_port, scheduler_port, dashboard_port = free_port(port), free_port(), free_port()
    api_url = f"http://127.0.0.1:{server_port}/api"
    ui_url = f"http://127.0.0.1:{server_port}"
    scheduler = f"tcp://127.0.0.1:{scheduler_port}"
    dashboard = f"http://127.0.0.1:{dashboard_port}/status"
    env = {**base_env(home), "PREFECT_UI_API_URL": api_url}
    try:
        launcher.start(
            "prefect-server",
            [
                str(BIN / "prefect"),
                "server",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                str(server_port),
            ],
            env,
        )
        launcher.start(
            "dask-scheduler",
            [
                str(BIN / "dask"),
                "scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                str(scheduler_port),
                "--dashboard-address",
                f"127.0.0.1:{dashboard_port}",
            ],
            env,
        )
        import torch  # the engine: only `stack up` needs it, not status or down

        from latentbatch.engine.cluster import gpu_worker_env, visible_gpus, worker_env

        inherited = os.environ.get("CUDA_VISIBLE_DEVICES")
        gpus = (
            visible_gpus(inherited, torch.cuda.device_count()) if torch.cuda.is_available() else []
        )
        workers = workers or len(gpus) or 2
        gpu = ["--resources", "GPU=1"] if gpus else []
        for i in range(workers):
            pinned = gpu_worker_env(i, gpus, workers) if gpus else {}
            launcher.start(
                f"dask-worker-{i}",
                [
                    str(BIN / "dask"),
                    "worker",
                    scheduler,
                    "--nworkers",
                    "1",
                    "--nthreads",
                    "1",
                    "--host",
                    "127.0.0.1",
                    "--dashboard-address",
                    "127.0.0.1:0",
                    "--name",
                    f"stack-{i}",
                    *gpu,
                ],
                {**env, **worker_env(), **pinned},
            )
        _wait(lambda: _healthy(api_url), "the Prefect server", launcher.logs / "prefect-server.log")
        client_env = {**env, "PREFECT_API_URL": api_url}
        register_deployments(project, client_env, launcher.logs)
        launcher.start(
            "prefect-worker",
            [str(BIN / "prefect"), "worker", "start", "--pool", WORK_POOL, "--type", "process"],
            {**client_env, "DASK_SCHEDULER_ADDRESS": scheduler},
            cwd=project,
        )
    except BaseException:
        down(home)
        raise
    (home / "stack.env").write_text(
        f"PREFECT_API_URL={api_url}\nPREFECT_UI_URL={ui_url}\n"
        f"DASK_SCHEDULER_ADDRESS={scheduler}\nDASK_DASHBOARD={dashboard}\n"
    )
    return StackInfo(home, api_url, ui_url, scheduler, dashboard)


def _processes(home: Path) -> dict[str, psutil.Process | None]:
    """Recorded processes that are still the ones we started (PID and start time)."""
    path = home / "pids.json"
    if not path.is_file():
        return {}
    found: dict[str, psutil.Process | None] = {}
    for name, entry in json.loads(path.read_text()).items():
        try:
            process = psutil.Process(int(entry["pid"]))
            same = abs(process.create_time() - float(entry["created"])) < 1e-3
            found[name] = process if same and process.status() != psutil.STATUS_ZOMBIE else None
        except psutil.NoSuchProcess:
            found[name] = None
    return found


def running(home: Path = DEFAULT_HOME) -> bool:
    return any(p is not None for p in _processes(home.resolve()).values())


def status(home: Path = DEFAULT_HOME) -> dict[str, Any]:
    """Which stack processes run, and whether the server answers."""
    home = home.resolve()
    env = read_env(home)
    processes = {name: (p.pid if p else None) for name, p in _processes(home).items()}
    api = env.get("PREFECT_API_URL")
    return {
        "home": str(home),
        "processes": processes,
        "server_healthy": api is not None and _healthy(api),
        **{k.lower(): v for k, v in env.items()},
    }


def down(home: Path = DEFAULT_HOME, timeout: float = 20) -> list[str]:
    """Stop every recorded process (its whole session), newest first; return their names."""
    home = home.resolve()
    processes = _processes(home)
    stopped = []
    for name, process in reversed(list(processes.items())):
        if process is None:
            continue
        group = [process, *process.children(recursive=True)]
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        _, alive = psutil.wait_procs(group, timeout=timeout)
        for leftover in alive:
            leftover.kill()
        psutil.wait_procs(alive, timeout=5)
        stopped.append(name)
    for name in ("pids.json", "stack.env"):
        (home / name).unlink(missing_ok=True)
    return stopped
