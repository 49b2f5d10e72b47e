"""The local stack: Prefect server, worker and deployments, Dask scheduler and workers."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest
from distributed import Client
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment

from latentbatch import stack
from latentbatch.encode import encode
from latentbatch.store import Layout
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


async def _final_states(ids: list[Any], timeout: float = 180) -> list[str]:
    """Poll flow runs until each is in a final state."""
    final = ("Completed", "Cancelled", "Failed", "Crashed")
    async with get_client() as prefect:
        for _ in range(int(timeout)):
            states = [str((await prefect.read_flow_run(i)).state_name) for i in ids]
            if all(s in final for s in states):
                return states
            await asyncio.sleep(1)
    raise TimeoutError(f"flow runs still {states} after {timeout} s")


def test_overlapping_nightly_runs_leave_one_running(
    running_stack: stack.StackInfo, tmp_path: Path
) -> None:
    parameters = {"root": str(tmp_path / "none"), "out_root": str(tmp_path / "out")}
    runs = [
        run_deployment("nightly-bulk-decode/nightly-bulk-decode", parameters=parameters, timeout=0)
        for _ in range(2)
    ]
    states = asyncio.run(_final_states([r.id for r in runs]))
    assert sorted(states) == ["Cancelled", "Completed"]


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
