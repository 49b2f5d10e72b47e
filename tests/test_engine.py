"""The engine on real clusters: CLI-started scheduler and worker processes on loopback,
a worker killed mid-decode, a client killed mid-decode; each with every image codec."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from distributed import Client

from latentbatch.decode import decode
from latentbatch.encode import encode
from latentbatch.outputs.codecs import ImageCodec, check_codec
from latentbatch.progress import Progress
from latentbatch.storage.lease import TIMEOUT_ENV
from latentbatch.stores.store import Layout
from tests.helpers import mtimes, sha256s
from tests.servers import dask_cluster

pytestmark = pytest.mark.slow
# output shards of two 128-row store shards each: 20 shards, the last of 136 images
SHARD_ROWS, SHARDS = 256, 20


@pytest.fixture(scope="module")
def small_shards(
    tmp_path_factory: pytest.TempPathFactory, seed_model: Path, client: Client
) -> Path:
    """mnist5k in 40 shards of 128 rows, so decodes take long enough to interrupt."""
    url = tmp_path_factory.mktemp("stores") / "small.zarr"
    encode(seed_model, "mnist5k", str(url), layout=Layout(128, 64), client=client)
    return url


@pytest.fixture(scope="module", params=["png", "webp", "jpeg"])
def codec(request: pytest.FixtureRequest) -> ImageCodec:
    return check_codec(request.param)


@pytest.fixture(scope="module")
def reference(
    tmp_path_factory: pytest.TempPathFactory,
    seed_model: Path,
    small_shards: Path,
    client: Client,
    codec: ImageCodec,
) -> dict[str, str]:
    """sha256 of every output file of an in-process decode."""
    out = tmp_path_factory.mktemp("reference") / "out"
    _decode(seed_model, small_shards, out, codec, client=client)
    return {k: v for k, v in sha256s(out).items() if not k.startswith(".records")}


@pytest.fixture(scope="module")
def external(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[str, list[subprocess.Popen[bytes]]]]:
    with dask_cluster(tmp_path_factory.mktemp("cluster")) as cluster:
        yield cluster


def _decode(model: Path, store: Path, out: Path | str, codec: ImageCodec, **run: Any) -> Any:
    """The engine's decode of ``store`` with the module's shard size and ``codec``."""
    return decode(model, str(store), str(out), codec=codec, images_per_shard=SHARD_ROWS, **run)


def _outputs(out: Path) -> dict[str, str]:
    return {k: v for k, v in sha256s(out).items() if not k.startswith(".records")}


def test_cli_cluster_gives_byte_identical_shards_and_manifest(
    tmp_path: Path,
    seed_model: Path,
    small_shards: Path,
    reference: dict[str, str],
    external: tuple[str, list],
    codec: ImageCodec,
) -> None:
    address, _ = external
    out = str(tmp_path / "out")
    result = _decode(seed_model, small_shards, out, codec, scheduler=address)
    assert result.decoded == 5000
    outputs = _outputs(tmp_path / "out")
    assert "manifest.json" in outputs
    assert outputs == reference
    table = (tmp_path / "out" / "shards.jsonl").read_text().splitlines()
    last = 5000 - SHARD_ROWS * (SHARDS - 1)
    assert [json.loads(line)["count"] for line in table] == [SHARD_ROWS] * (SHARDS - 1) + [last]


def test_killed_worker_still_gives_byte_identical_output(
    tmp_path: Path,
    seed_model: Path,
    small_shards: Path,
    reference: dict[str, str],
    external: tuple[str, list],
    codec: ImageCodec,
) -> None:
    address, _ = external
    killed: list[int] = []
    with Client(address) as client:
        pids = client.run(os.getpid)

        def kill_one(progress: Progress) -> None:
            if progress.done_tasks == 4 and not killed:
                pid = next(iter(pids.values()))
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

        out = tmp_path / "out"
        result = _decode(seed_model, small_shards, out, codec, client=client, on_progress=kill_one)
        assert killed
        assert result.decoded == 5000
        assert _outputs(tmp_path / "out") == reference
        deadline = time.monotonic() + 60  # the nanny brings a fresh worker process back
        while (
            len(client.scheduler_info(n_workers=-1)["workers"]) < 2 and time.monotonic() < deadline
        ):
            time.sleep(0.5)
        assert killed[0] not in client.run(os.getpid).values()


def test_killed_client_then_rerun_decodes_only_missing_shards(
    tmp_path: Path,
    seed_model: Path,
    small_shards: Path,
    reference: dict[str, str],
    external: tuple[str, list],
    codec: ImageCodec,
) -> None:
    address, _ = external
    out = tmp_path / "out"
    cli = Path(sys.executable).with_name("latentbatch")
    args = [str(cli), "decode", "--model", str(seed_model), "--store", str(small_shards)]
    args += ["--out", str(out), "--scheduler", address, "--no-progress"]
    args += ["--image-codec", codec.name, "--images-per-shard", str(SHARD_ROWS)]
    env = {**os.environ, TIMEOUT_ENV: "2"}  # its lease is stale 2 s after the kill
    process = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records = out / ".records"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if records.exists() and len(list(records.glob("*.json"))) >= 4:
            break
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (out / "manifest.json").exists()
    time.sleep(2.5)  # tasks still running may finish their shard; the lease goes stale
    before = mtimes(out, "shard-*.tar")
    recorded = {int(p.stem.split("-")[1]) for p in records.glob("*.json")}
    assert 4 <= len(recorded) < SHARDS

    result = _decode(seed_model, small_shards, out, codec, scheduler=address)
    assert set(result.shards_skipped) == recorded
    assert set(result.shards_written) == set(range(SHARDS)) - recorded
    after = mtimes(out, "shard-*.tar")
    for index in recorded:
        name = f"shard-{index:06d}.tar"
        assert after[name] == before[name]
    assert _outputs(out) == reference
    assert json.loads((out / "manifest.json").read_text())["count"] == 5000
