from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from distributed import Client, LocalCluster

os.environ.setdefault("MPLBACKEND", "Agg")
ROOT = Path(__file__).resolve().parents[1]


def needs(available: bool, what: str) -> pytest.MarkDecorator:
    """A mark that skips the tests of a module whose prerequisite is missing, except where
    ``CI`` is set: there ``python3 dev.py test`` has installed it, so its absence fails the
    module's collection instead of turning into a skip that looks green."""
    if not available and os.environ.get("CI"):
        pytest.fail(
            f"{what} is missing although CI is set; `python3 dev.py test` installs it as root",
            pytrace=False,
        )
    return pytest.mark.skipif(not available, reason=f"needs {what}")


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Models fetched from URLs go to a folder of this test session (in-process workers
    and the processes tests start inherit it), never to ~/.cache."""
    folder = tmp_path_factory.mktemp("model-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LATENTBATCH_MODEL_CACHE", str(folder))
        yield folder


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def seed_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The seed preset trained for 2 epochs on mnist5k (a few seconds)."""
    from latentbatch.config import TrainConfig, preset_config
    from latentbatch.train import train

    out = tmp_path_factory.mktemp("models") / "seed-mnist5k"
    return train(preset_config("seed"), TrainConfig("mnist5k", 2), out, progress=False).model_dir


@pytest.fixture(scope="session")
def other_seed_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another seed-preset model (different seed, so a different model id)."""
    from latentbatch.config import TrainConfig, preset_config
    from latentbatch.train import train

    out = tmp_path_factory.mktemp("models") / "seed-other"
    config = TrainConfig("mnist5k", 1, seed=5, limit=200)
    return train(preset_config("seed"), config, out, progress=False).model_dir


@pytest.fixture(scope="session")
def tiny_codec_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A very small codec-preset model (int8 latents) trained on synthetic shapes."""
    from tests.helpers import train_tiny_codec

    return train_tiny_codec(tmp_path_factory.mktemp("models") / "codec-tiny").model_dir


@pytest.fixture(scope="session")
def client() -> Iterator[Client]:
    """One in-process Dask cluster (threads) for the session."""
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as c,
    ):
        yield c


@pytest.fixture(scope="session")
def process_client() -> Iterator[Client]:
    """A Dask cluster of two worker processes on loopback for the session."""
    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=":0",
        ) as cluster,
        Client(cluster) as c,
    ):
        yield c


@pytest.fixture(scope="session")
def mnist_store(tmp_path_factory: pytest.TempPathFactory, seed_model: Path, client: Client) -> Path:
    """mnist5k encoded with ``seed_model`` in shards of 1,024 rows (read-only for tests)."""
    from latentbatch.encode import encode

    url = tmp_path_factory.mktemp("stores") / "mnist5k.zarr"
    encode(seed_model, "mnist5k", str(url), client=client)
    return url


@pytest.fixture(scope="session")
def running_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """``latentbatch stack up`` on 127.0.0.1 for the session; the test API points at it."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from latentbatch.engine import stack

    home = tmp_path_factory.mktemp("stack")
    info = stack.up(home, ROOT, workers=1, port=stack.free_port())
    try:
        with temporary_settings({PREFECT_API_URL: info.api_url}):
            yield info
    finally:
        stack.down(home)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny trained model directory shared by read-only tests."""
    from tests.helpers import train_tiny

    return train_tiny(tmp_path_factory.mktemp("models") / "tiny").model_dir


@pytest.fixture(scope="session")
def kl_vae(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small random-init diffusers AutoencoderKL (SD's layout) directory."""
    from tests.helpers import save_kl_vae

    return save_kl_vae(tmp_path_factory.mktemp("vae") / "kl")


@pytest.fixture(scope="session")
def tiny_vae(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small random-init diffusers AutoencoderTiny (TAESD's layout) directory."""
    from tests.helpers import save_tiny_vae

    return save_tiny_vae(tmp_path_factory.mktemp("vae") / "tiny")
