"""Dask: connect to a cluster or start one, and hold a model once per worker process.

- :func:`connect`: with no address (and no ``DASK_SCHEDULER_ADDRESS``) start a
  ``LocalCluster`` sized to the machine, one single-threaded worker process per core (per
  GPU when CUDA is present, each advertising ``GPU=1``); with an address, use that cluster.
- :class:`ModelPlugin`: a ``WorkerPlugin`` carrying a model's safetensors bytes; every
  worker (including ones that join or restart later) builds the model once in ``setup``
  and keeps it in a per-process cache keyed by model id. Tasks only carry the id.
"""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import logging
import multiprocessing
import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from dask.base import tokenize
from distributed import Client, LocalCluster, Worker, as_completed
from distributed.diagnostics.plugin import WorkerPlugin
from safetensors.torch import load as load_safetensors

from latentbatch.checkpoint import WEIGHTS, ModelInfo
from latentbatch.config import ModelConfig
from latentbatch.errors import LatentbatchError
from latentbatch.model import Autoencoder

SCHEDULER_ENV = "DASK_SCHEDULER_ADDRESS"
_MODELS: dict[str, tuple[Autoencoder, torch.device]] = {}
R = TypeVar("R")


class ClusterError(LatentbatchError):
    """The Dask cluster cannot be reached or cannot run the work."""


def default_workers() -> int:
    """Workers of the embedded cluster: one per GPU, else one per core."""
    if torch.cuda.is_available():
        return torch.cuda.device_count()
    return max(1, os.cpu_count() or 1)


@contextmanager
def connect(
    scheduler: str | None = None, workers: int | None = None, timeout: str = "20s"
) -> Iterator[Client]:
    """A client of the cluster at ``scheduler`` (or $DASK_SCHEDULER_ADDRESS), else of a new
    local cluster with ``workers`` processes, closed on exit."""
    address = scheduler or os.environ.get(SCHEDULER_ENV)
    if address:
        try:
            client = Client(address, timeout=timeout)
        except (OSError, TimeoutError) as exc:
            raise ClusterError(f"cannot reach the Dask scheduler at {address}: {exc}") from exc
        with client:
            yield client
        return
    n = workers or default_workers()
    gpu = torch.cuda.is_available()
    kwargs: dict[str, Any] = {
        "n_workers": n,
        "threads_per_worker": 1,
        "processes": True,
        "dashboard_address": ":0",
        "host": "127.0.0.1",
    }
    if gpu:
        kwargs["resources"] = {"GPU": 1}
    cluster_type: type[LocalCluster] = LocalCluster
    if gpu and torch.cuda.device_count() > 1:
        try:
            from dask_cuda import LocalCUDACluster  # one worker per GPU, pinned

            cluster_type = LocalCUDACluster
            kwargs.pop("n_workers")
        except ImportError:
            pass
    with cluster_type(**kwargs) as cluster, Client(cluster) as client:
        # the embedded cluster's start/stop chatter is noise next to our progress output
        logging.getLogger("distributed").setLevel(logging.WARNING)
        yield client


@contextmanager
def using(
    client: Client | None, scheduler: str | None = None, workers: int | None = None
) -> Iterator[Client]:
    """``client`` when one is given (left open), else :func:`connect`'s."""
    if client is not None:
        yield client
        return
    with connect(scheduler, workers) as connected:
        yield connected


def gpu_resources(client: Client) -> dict[str, float] | None:
    """``{"GPU": 1}`` when any worker advertises a GPU, else None."""
    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    if any(w.get("resources", {}).get("GPU", 0) >= 1 for w in workers):
        return {"GPU": 1}
    return None


def worker_device(worker: Worker | None) -> torch.device:
    """``cuda`` on a worker that advertises ``GPU`` and sees a device, else ``cpu``."""
    has_gpu = worker is not None and worker.state.total_resources.get("GPU", 0) >= 1
    return torch.device("cuda") if has_gpu and torch.cuda.is_available() else torch.device("cpu")


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MALLOC_THRESHOLD = 64 * 2**20


def tune_malloc() -> bool:
    """Undo the Dask nanny's ``MALLOC_TRIM_THRESHOLD_=65536`` for tensor work (glibc only).

    With it, every large tensor of a decode batch is mmap'ed and trimmed afresh, which
    doubles the CPU time of a decode task; 64 MiB thresholds keep the arenas reused.
    Returns whether the thresholds were set.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    trim = libc.mallopt(_M_TRIM_THRESHOLD, MALLOC_THRESHOLD)
    mmap = libc.mallopt(_M_MMAP_THRESHOLD, MALLOC_THRESHOLD)
    return bool(trim and mmap)


def build_model(config: dict[str, Any], weights: bytes, model_id: str) -> Autoencoder:
    """An eval-mode autoencoder from safetensors bytes, checked against ``model_id``."""
    digest = hashlib.sha256(weights).hexdigest()
    if digest != model_id:
        raise ClusterError(f"model bytes have id {digest[:12]}, expected {model_id[:12]}")
    model = Autoencoder(ModelConfig.from_dict(config))
    model.load_state_dict(load_safetensors(weights))
    return model.to(memory_format=torch.channels_last).eval()


class ModelPlugin(WorkerPlugin):
    """Loads one model into every worker process, once."""

    def __init__(self, info: ModelInfo) -> None:
        self.model_id = info.model_id
        self.config = info.config.to_dict()
        self.weights = (info.path / WEIGHTS).read_bytes()
        self.name = f"latentbatch-model-{info.model_id[:16]}"

    def setup(self, worker: Worker) -> None:
        tune_malloc()
        device = worker_device(worker)
        if device.type == "cpu" and multiprocessing.parent_process() is not None:
            torch.set_num_threads(1)  # a single-threaded worker process: no oversubscription
        install_model(self.config, self.weights, self.model_id, device)

    def teardown(self, worker: Worker) -> None:
        _MODELS.pop(self.model_id, None)


def install_model(
    config: dict[str, Any], weights: bytes, model_id: str, device: torch.device
) -> None:
    """Build a model into this process's cache (what the plugin does on each worker)."""
    if model_id not in _MODELS:
        _MODELS[model_id] = (build_model(config, weights, model_id).to(device), device)


def cached_model(model_id: str) -> tuple[Autoencoder, torch.device]:
    """The model this worker process loaded for ``model_id``."""
    try:
        return _MODELS[model_id]
    except KeyError:
        raise ClusterError(
            f"model {model_id[:12]} is not loaded in this process; register ModelPlugin first"
        ) from None


def register_model(client: Client, info: ModelInfo) -> None:
    """Install the model on every current and future worker of ``client``'s cluster."""
    client.register_plugin(ModelPlugin(info))


@dataclass(frozen=True)
class Progress:
    """Where a run of tasks stands."""

    done_items: int
    total_items: int
    done_tasks: int
    total_tasks: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.done_items / self.seconds if self.seconds > 0 else 0.0

    @property
    def eta(self) -> float | None:
        return (self.total_items - self.done_items) / self.rate if self.rate > 0 else None


def map_bounded(
    client: Client,
    fn: Callable[[Any], R],
    specs: Iterable[Any],
    *,
    items: Callable[[Any], int],
    max_in_flight: int,
    resources: dict[str, float] | None = None,
    on_result: Callable[[R, Progress], None] | None = None,
) -> list[R]:
    """Run ``fn`` over ``specs`` with at most ``max_in_flight`` tasks submitted at once.

    Results are handed to ``on_result`` as they complete (with the progress so far) and
    returned in completion order. The first task error cancels the rest and is raised.
    """
    pending = list(specs)
    total_items = sum(items(s) for s in pending)
    total_tasks = len(pending)
    queue = iter(pending)
    started = time.perf_counter()
    results: list[R] = []
    done_items = 0

    def submit(spec: Any) -> Any:
        key = f"{getattr(fn, '__name__', 'task')}-{tokenize(spec)}"
        future = client.submit(fn, spec, key=key, resources=resources, pure=False)
        future_items[future.key] = items(spec)
        return future

    future_items: dict[str, int] = {}
    window = as_completed([submit(s) for s in itertools.islice(queue, max(1, max_in_flight))])
    try:
        for future in window:
            result = future.result()
            results.append(result)
            done_items += future_items.pop(future.key)
            nxt = next(queue, None)
            if nxt is not None:
                window.add(submit(nxt))
            if on_result is not None:
                progress = Progress(
                    done_items,
                    total_items,
                    len(results),
                    total_tasks,
                    time.perf_counter() - started,
                )
                on_result(result, progress)
    except BaseException:
        for future in list(window.futures):
            future.cancel()
        raise
    return results
