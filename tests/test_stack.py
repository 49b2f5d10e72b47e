"""The local stack: Prefect server, worker and deployments, Dask scheduler and workers."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import dask.config
import psutil
import pytest
from distributed import Client
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment

from latentbatch.encode import encode
from latentbatch.engine import stack
from latentbatch.stores.store import Layout
from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def _prefect(info: stack.StackInfo, *args: str) -> str:
    env = {**stack.base_env(info.home), "PREFECT_API_URL": info.api_url}
    done = subprocess.run(
        [str(Path(sys.executable).with_name("prefect")), *args],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_deployments_and_the_nightly_schedule(running_stack: stack.StackInfo) -> None:
    listed = _prefect(running_stack, "deployment", "ls")
    for name in ("train-autoencoder", "encode-images", "decode-latents", "nightly-bulk-decode"):
        assert name in listed
    nightly = _prefect(
        running_stack, "deployment", "inspect", "nightly-bulk-decode/nightly-bulk-decode"
    )
    assert "'cron': '0 2 * * *'" in nightly
    assert "'timezone': 'UTC'" in nightly
    assert "'collision_strategy': 'CANCEL_NEW'" in nightly


def test_stack_workers_run_without_the_profiler(running_stack: stack.StackInfo) -> None:
    with Client(running_stack.scheduler, timeout="20s") as c:
        enabled = c.run(dask.config.get, "distributed.worker.profile.enabled")
        assert set(enabled.values()) == {False}


def test_decode_deployment_runs_on_the_stack(
    running_stack: stack.StackInfo, tmp_path: Path, tiny_model: Path, client: Client
) -> None:
    store, out = tmp_path / "s.zarr", tmp_path / "out"
    encode(tiny_model, "synthetic:50", str(store), layout=Layout(16, 8), client=client)
    parameters = {
        "model_dir": str(tiny_model),
        "store": str(store),
        "out": str(out),
        "output_format": "png",
    }
    run = run_deployment("decode-latents/decode-latents", parameters=parameters, timeout=240)
    assert run.state is not None
    assert run.state.is_completed(), run.state.message
    assert (out / "manifest.json").is_file()
    assert len(list(out.glob("shard-*/*.png"))) == 50


FINAL = ("Completed", "Cancelled", "Failed", "Crashed")


async def _state(run_id: Any) -> str:
    async with get_client() as prefect:
        return str((await prefect.read_flow_run(run_id)).state_name)


async def _final_states(ids: list[Any], timeout: float = 180) -> list[str]:
    """Poll flow runs until each is in a final state."""
    final = FINAL
    async with get_client() as prefect:
        for _ in range(int(timeout)):
            states = [str((await prefect.read_flow_run(i)).state_name) for i in ids]
            if all(s in final for s in states):
                return states
            await asyncio.sleep(1)
    raise TimeoutError(f"flow runs still {states} after {timeout} s")


async def _wait_for_state(run_id: Any, wanted: str, timeout: float = 120) -> None:
    async with get_client() as prefect:
        for _ in range(int(timeout * 4)):
            state = str((await prefect.read_flow_run(run_id)).state_name)
            if state == wanted:
                return
            await asyncio.sleep(0.25)
    raise TimeoutError(f"flow run {run_id} is {state}, not {wanted}, after {timeout} s")


def _open_gate(gate: Path, run_id: Any, timeout: float = 60) -> None:
    """Write to the FIFO that the run is blocked reading. A reader must be there for the
    write to land (ENXIO while none is, EPIPE if it left): try until one took it, or the
    run has ended without it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            fd = os.open(gate, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # ENXIO: nobody reads it (yet)
            if asyncio.run(_state(run_id)) in FINAL:
                return
            time.sleep(0.2)
            continue
        try:
            os.write(fd, b"{}")
            return
        except BrokenPipeError:
            time.sleep(0.2)
        finally:
            os.close(fd)
    raise TimeoutError(f"nobody read {gate} in {timeout} s")


def test_overlapping_nightly_runs_leave_one_running(
    running_stack: stack.StackInfo, tmp_path: Path
) -> None:
    # The first run's scan opens root/gate.zarr/zarr.json, a FIFO: it blocks there, still
    # Running, until the test writes to the FIFO, so the second run surely overlaps it.
    gate = tmp_path / "root" / "gate.zarr" / "zarr.json"
    gate.parent.mkdir(parents=True)
    os.mkfifo(gate)
    parameters = {"root": str(tmp_path / "root"), "out_root": str(tmp_path / "out")}
    name = "nightly-bulk-decode/nightly-bulk-decode"
    first = run_deployment(name, parameters=parameters, timeout=0)
    asyncio.run(_wait_for_state(first.id, "Running"))
    second = run_deployment(name, parameters=parameters, timeout=0)
    try:
        asyncio.run(_wait_for_state(second.id, "Cancelled"))
    finally:
        _open_gate(gate, first.id)
    assert asyncio.run(_final_states([first.id, second.id])) == ["Completed", "Cancelled"]


def test_down_leaves_no_process_and_no_port(tmp_path: Path) -> None:
    info = stack.up(tmp_path / "home", ROOT, workers=1, port=stack.free_port())
    recorded = stack.status(info.home)["processes"]
    pids = [pid for pid in recorded.values() if pid]  # type: ignore[union-attr]
    assert len(pids) == 4
    ports = {
        int(u.rsplit(":", 1)[1].split("/")[0])
        for u in (info.ui_url, info.scheduler, info.dashboard)
    }
    stopped = stack.down(info.home)
    assert len(stopped) == 4
    assert not any(
        psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        for pid in pids
    )
    listening = {
        c.laddr.port for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN
    }
    assert not ports & listening
    assert not stack.running(info.home)
    assert stack.down(info.home) == []
    assert sorted(p.name for p in (info.home / "logs").iterdir())[0] == "dask-scheduler.log"
