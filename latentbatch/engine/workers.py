"""Per-worker-process state: the model each Dask worker holds, and how it runs torch.

::

    client                                     every worker process (now or joining later)
    ──────                                     ───────────────────────────────────────────
    register_model(client, model, "decoder")
      └─ ModelPlugin(config, id, parts,  ───►  setup(): tune malloc, pick the device,
           the safetensors bytes the client      one torch thread on a CPU worker; the
           read once, or the model's URL)        bytes, or the URL's copy in this host's
                                                 model cache (checked against the id),
                                                 built into the parts asked for (through
                                                 weights.load_model_bytes) into the
                                                 cache keyed by (model id, part)
    tasks carry only the model id      ───►   cached_model(model_id, part) → (module, device)

The cache is per process, so a model is built once per worker however many tasks use it.
A worker that cannot build it at setup (no CUDA behind GPU=1, weights altered on the
object store, the store unreachable) tries again in each task that needs it, which then
fails with the reason, naming the worker.
"""

from __future__ import annotations

import ctypes
import json
import logging
import multiprocessing
import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from functools import cache

import torch
from distributed import Client, Worker, get_worker
from distributed.diagnostics.plugin import WorkerPlugin

from latentbatch.config import ModelConfig
from latentbatch.engine.cluster import HOST_GPUS_ENV, HOST_WORKERS_ENV
from latentbatch.errors import LatentbatchError
from latentbatch.ids import short_id
from latentbatch.models.checkpoint import ModelBytes, weights_bytes
from latentbatch.models.weights import Part, load_model_bytes
from latentbatch.storage.fs import StorageOptions
from latentbatch.stores.store import LatentStore, StoreError, open_store

_MODELS: dict[tuple[str, Part], tuple[torch.nn.Module, torch.device]] = {}
_PLUGINS: dict[tuple[str, Part], ModelPlugin] = {}
_INSTALLING = threading.Lock()
GPU_ON_CPU_ENV = "LATENTBATCH_GPU_ON_CPU"  # "1": a GPU=1 worker without CUDA uses its CPU
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MALLOC_THRESHOLD = 64 * 2**20
logger = logging.getLogger(__name__)


class WorkerStateError(LatentbatchError):
    """A task needs a model that this worker process has not loaded."""


class GpuUnavailableError(LatentbatchError):
    """A worker advertises a GPU that its torch cannot use."""


def worker_device(worker: Worker | None) -> torch.device:
    """``cuda`` on a worker that advertises ``GPU``, else ``cpu``.

    A worker that advertises ``GPU`` but whose torch sees no CUDA device is refused with
    a :class:`GpuUnavailableError` naming it: it never decodes on its CPU silently. Only
    ``LATENTBATCH_GPU_ON_CPU=1`` in its environment lets it (topologies tested without
    GPUs), with a warning in its log.
    """
    if worker is None or worker.state.total_resources.get("GPU", 0) < 1:
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if os.environ.get(GPU_ON_CPU_ENV) == "1":
        logger.warning("worker %s advertises GPU=1 without CUDA: decoding on CPU", worker.name)
        return torch.device("cpu")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
    raise GpuUnavailableError(
        f"Dask worker {worker.name} at {worker.address} advertises GPU=1 but its torch "
        f"{torch.__version__} sees no CUDA device (CUDA_VISIBLE_DEVICES={visible}); install "
        "a CUDA build of torch there, or start that worker without --resources GPU=1"
    )


def worker_threads() -> int | None:
    """Threads of the Dask worker running this code (its share of the host's cores), or
    None outside a worker."""
    try:
        return int(get_worker().state.nthreads)
    except ValueError:
        return None


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


def encoder_threads(device: torch.device, threads: int | None = None) -> int:
    """Image-encoding threads of a decode: its share of the host's cores.

    On CPU that is the Dask worker's ``threads`` (one per core it was given), or this
    process's cores outside a worker. A GPU worker uses the host cores it owns: its CPU
    affinity when it is pinned to some, else the host's cores over the host's GPUs
    (``LATENTBATCH_HOST_GPUS`` when the worker sees only its own) or over the GPU workers
    sharing them (``LATENTBATCH_HOST_GPU_WORKERS``), whichever are more, at least 2, so
    that encoding keeps pace with the GPU.
    """
    cores = len(os.sched_getaffinity(0))
    if device.type != "cuda":
        return max(1, threads or cores)
    if cores == os.cpu_count():
        gpus = int(os.environ.get(HOST_GPUS_ENV) or torch.cuda.device_count())
        cores //= max(1, gpus, int(os.environ.get(HOST_WORKERS_ENV) or 1))
    return max(2, cores)


@cache
def encoding_pool(threads: int) -> ThreadPoolExecutor:
    """This process's pool of ``threads`` image-encoding threads."""
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="latentbatch-encode")


@cache
def reader_pool() -> ThreadPoolExecutor:
    """This process's read-ahead thread: reads the next batch of latents while the
    current one decodes."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="latentbatch-read")


_STORES: OrderedDict[tuple[str, str, str], LatentStore] = OrderedDict()
STORE_CACHE = 8


def cached_store(url: str, options: StorageOptions | None, uuid: str, stop: int) -> LatentStore:
    """The store at ``url`` opened once per worker process (opening costs 5-20 ms, a
    tenth of decoding a shard), for reading rows below ``stop``. It is opened afresh when
    it has grown past the rows it was opened with, and refused when the store there is
    no longer the one with ``uuid`` (replaced since the decode began)."""
    key = (url, json.dumps(options or {}, sort_keys=True), uuid)
    store = _STORES.get(key)
    if store is None or store.capacity < stop:
        store = open_store(url, options)
        if store.uuid != uuid:
            raise StoreError(
                f"{url} is not the store this decode began with (uuid {store.uuid}, not "
                f"{uuid}); it was replaced: run the decode again"
            )
        _STORES[key] = store
    _STORES.move_to_end(key)
    while len(_STORES) > STORE_CACHE:
        _STORES.popitem(last=False)
    return store


def install_model(
    weights: bytes, config: ModelConfig, model_id: str, part: Part, device: torch.device
) -> None:
    """Build a model part into this process's cache (what the plugin does on each worker)."""
    if (model_id, part) not in _MODELS:
        module = load_model_bytes(weights, config, model_id, part).to(device)
        _MODELS[model_id, part] = (module, device)


def cached_model(model_id: str, part: Part) -> tuple[torch.nn.Module, torch.device]:
    """The model part this worker process loaded for ``model_id``, and its device; built
    now when the plugin could not build it at setup (raising the reason)."""
    if (model_id, part) not in _MODELS and (model_id, part) in _PLUGINS:
        try:
            worker: Worker | None = get_worker()
        except ValueError:  # not in a worker: a plugin set up by hand
            worker = None
        _PLUGINS[model_id, part].install(worker, part)
    try:
        return _MODELS[model_id, part]
    except KeyError:
        raise WorkerStateError(
            f"the {part} of model {short_id(model_id)} is not loaded in this process; "
            "register it with latentbatch.engine.workers.register_model first"
        ) from None


def loaded_models() -> list[tuple[str, str, str]]:
    """``(model id, part, device)`` of every model part this process holds."""
    return sorted((key[0], key[1], str(device)) for key, (_, device) in _MODELS.items())


class ModelPlugin(WorkerPlugin):
    """Loads parts of one model into every worker process, once: the weights travel to
    each worker once, however many parts it builds from them."""

    def __init__(self, model: ModelBytes, parts: tuple[Part, ...]) -> None:
        self.info = model.info
        self.parts = parts
        # a local model travels as the bytes the client read once (the workers may be
        # other hosts); a URL's weights are fetched by each host into its model cache
        # (checked against the id where they are built, naming the worker that refused)
        self.weights = model.weights
        self.name = f"latentbatch-{'-'.join(parts)}-{model.info.model_id[:16]}"

    def install(self, worker: Worker | None, part: Part) -> None:
        """Build ``part`` into this process's cache, raising why it cannot."""
        with _INSTALLING:
            if (self.info.model_id, part) in _MODELS:
                return
            device = worker_device(worker)
            try:
                weights = self.weights or weights_bytes(self.info)
                install_model(weights, self.info.config, self.info.model_id, part, device)
            except LatentbatchError as exc:
                who = "this process" if worker is None else f"Dask worker {worker.name}"
                raise type(exc)(f"{who} refused the model: {exc}") from None

    def setup(self, worker: Worker | None) -> None:
        tune_malloc()
        for part in self.parts:
            _PLUGINS[self.info.model_id, part] = self
        try:
            if worker_device(worker).type == "cpu" and multiprocessing.parent_process():
                torch.set_num_threads(1)  # a single-threaded worker process
            for part in self.parts:
                self.install(worker, part)
        except Exception as exc:  # every task that needs the model tries again and raises
            logger.warning("%s", exc)

    def teardown(self, worker: Worker | None) -> None:
        for part in self.parts:
            _MODELS.pop((self.info.model_id, part), None)
            _PLUGINS.pop((self.info.model_id, part), None)


def register_model(client: Client, model: ModelBytes, *parts: Part) -> None:
    """Install ``parts`` of the model on every current and future worker of the cluster
    (one plugin: its weights reach each worker once)."""
    client.register_plugin(ModelPlugin(model, parts))
