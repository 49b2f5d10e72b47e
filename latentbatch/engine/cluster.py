"""Dask from the client's side: connect to a cluster or start one, ask for resources, and
keep a bounded number of tasks in flight.

- :func:`connect`: with no address (and no ``DASK_SCHEDULER_ADDRESS``) start a
  ``LocalCluster`` sized to the machine, one single-threaded worker process per core; on
  a CUDA host one worker per GPU the host gave us (the inherited ``CUDA_VISIBLE_DEVICES``,
  indices or UUIDs, :func:`visible_gpus`), each advertising ``GPU=1`` and decoding on
  its own device (dask-cuda's ``LocalCUDACluster`` when installed, which hands each
  worker the list rotated to its device, :func:`dask_cuda_devices`; else one device's
  ``CUDA_VISIBLE_DEVICES`` per worker, :func:`gpu_worker_specs`); asked for more workers
  than GPUs, they share the GPUs round-robin; with an address, use that cluster.
- :func:`gpu_resources`: ask for ``GPU=1`` whenever any worker has it.
- :func:`map_bounded`: a window of tasks over many specs, with progress.

What each worker process holds (the model, its device) is :mod:`latentbatch.engine.workers`'.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
import traceback
import uuid
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import dask.config
from dask.base import tokenize
from distributed import Client, LocalCluster, Nanny, Scheduler, SpecCluster, as_completed
from distributed.diagnostics.plugin import WorkerPlugin

from latentbatch.errors import LatentbatchError, TaskError
from latentbatch.progress import Progress, verbose

SCHEDULER_ENV = "DASK_SCHEDULER_ADDRESS"
PROFILER_ENV = "DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED"
_LOG_LEVEL_ENV = "DASK_LOGGING__DISTRIBUTED"
HOST_GPUS_ENV = "LATENTBATCH_HOST_GPUS"  # GPUs of the worker's host, when pinned to one
HOST_WORKERS_ENV = "LATENTBATCH_HOST_GPU_WORKERS"  # GPU workers started on its host
R = TypeVar("R")
logger = logging.getLogger(__name__)


class ClusterError(LatentbatchError):
    """The Dask cluster cannot be reached or cannot run the work."""


def default_workers() -> int:
    """Workers of the embedded cluster: one per GPU, else one per core."""
    import torch  # the engine's: only a cluster that is started needs it

    if torch.cuda.is_available():
        return len(_inherited_gpus())
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
    with (
        _quiet_unless_verbose(),
        dask.config.set(worker_settings()),
        _local_cluster(workers) as cluster,
        Client(cluster) as client,
    ):
        if not verbose():
            client.register_plugin(QuietClose())
        yield client


CLOSING_HEARTBEAT = "Failed to communicate with scheduler during heartbeat"
CANCELLED_AT_CLOSE = "ended with CancelledError"
_CLOSING_NOISE = {
    "distributed.worker": CLOSING_HEARTBEAT,
    "distributed.worker.state_machine": CANCELLED_AT_CLOSE,
}


class _DropClosingNoise(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


class QuietClose(WorkerPlugin):
    """Each worker of the embedded cluster drops what distributed logs when the cluster
    closes under it after a refused input: a heartbeat that reaches the closing
    scheduler (a traceback) and the task cancelled mid-run ("... ended with
    CancelledError"). The user would see them under the one-sentence error; ``-v``
    keeps them."""

    name = "latentbatch-quiet-close"

    def setup(self, worker: Any) -> None:
        for name, text in _CLOSING_NOISE.items():
            logging.getLogger(name).addFilter(_DropClosingNoise(text))


def worker_settings() -> dict[str, Any]:
    """Dask settings of the worker processes latentbatch starts (the embedded cluster,
    ``latentbatch stack up``): Dask's statistical profiler off, unless
    ``$DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED`` says otherwise. It samples every
    thread's stack every 10 ms for the dashboard's Profile page; a CPU decode worker
    spent 3.6 % more CPU time with it (README, Benchmark)."""
    if PROFILER_ENV in os.environ:
        return {}
    return {"distributed.worker.profile.enabled": False}


def worker_env() -> dict[str, str]:
    """:func:`worker_settings` as the environment variables of a ``dask worker`` command
    (a nanny's workers take the nanny's settings instead, whatever their environment)."""
    return {
        "DASK_" + key.upper().replace(".", "__").replace("-", "_"): str(value)
        for key, value in worker_settings().items()
    }


def visible_gpus(inherited: str | None, device_count: int) -> list[str]:
    """The GPUs this host gave us, as ``CUDA_VISIBLE_DEVICES`` names them: the inherited
    list (indices such as ``2,3`` or UUIDs such as ``GPU-8f6a...``, kept as given) when
    it is set, else every device torch counts (``0 .. device_count - 1``)."""
    if inherited is not None:
        return [name.strip() for name in inherited.split(",") if name.strip()]
    return [str(i) for i in range(device_count)]


def gpu_worker_env(index: int, devices: list[str], workers: int) -> dict[str, str]:
    """The environment of GPU worker ``index`` of ``workers``: its one device, the
    ``index mod len(devices)``-th the host gave us (workers beyond the devices share
    them round-robin), and what it needs to size its encoding threads."""
    return {
        "CUDA_VISIBLE_DEVICES": devices[index % len(devices)],
        HOST_GPUS_ENV: str(len(devices)),
        HOST_WORKERS_ENV: str(workers),
    }


def dask_cuda_devices(devices: list[str], workers: int) -> list[str]:
    """What dask-cuda's ``LocalCUDACluster`` sets as each worker's ``CUDA_VISIBLE_DEVICES``
    when given ``devices``: the list rotated to start at the worker's own device, which
    is the one it decodes on (``cuda`` = the first visible)."""
    return [",".join(devices[i:] + devices[:i]) for i in range(workers)]


def _inherited_gpus() -> list[str]:
    import torch  # the engine's: only a cluster that is started needs it

    return visible_gpus(os.environ.get("CUDA_VISIBLE_DEVICES"), torch.cuda.device_count())


def _local_cluster(workers: int | None) -> SpecCluster:
    """The embedded cluster (see the module docstring)."""
    import torch

    n = workers or default_workers()
    if not torch.cuda.is_available():
        return LocalCluster(
            n_workers=n,
            threads_per_worker=1,
            processes=True,
            dashboard_address=":0",
            host="127.0.0.1",
            silence_logs=False if verbose() else logging.WARNING,
        )
    devices = _inherited_gpus()
    if n > len(devices):  # several workers share a GPU: dask-cuda cannot
        return gpu_cluster(n, devices)
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError:
        return gpu_cluster(n, devices)
    for i, visible in enumerate(dask_cuda_devices(devices[:n], n)):
        logger.info("dask-cuda worker %d decodes on GPU %s", i, visible.split(",")[0])
    cluster: SpecCluster = LocalCUDACluster(
        CUDA_VISIBLE_DEVICES=",".join(devices[:n]),
        threads_per_worker=1,
        resources={"GPU": 1},
        dashboard_address=":0",
        host="127.0.0.1",
    )
    return cluster


def gpu_worker_specs(count: int, devices: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Dask worker specs of ``count`` single-threaded nanny workers, worker ``i`` pinned
    to one of ``devices`` (default: the GPUs the host gave us, :func:`visible_gpus`)
    through :func:`gpu_worker_env` and advertising ``GPU=1``."""
    devices = devices or _inherited_gpus() or ["0"]
    return {
        f"gpu-{i}": {
            "cls": Nanny,
            "options": {
                "nthreads": 1,
                "resources": {"GPU": 1},
                "host": "127.0.0.1",
                "dashboard_address": ":0",
                "env": gpu_worker_env(i, devices, count),
            },
        }
        for i in range(count)
    }


def gpu_cluster(count: int, devices: list[str] | None = None) -> SpecCluster:
    """A local cluster of :func:`gpu_worker_specs` workers (no dask-cuda needed)."""
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard_address": ":0"}}
    return SpecCluster(workers=gpu_worker_specs(count, devices), scheduler=scheduler)


@contextmanager
def _quiet_unless_verbose() -> Iterator[None]:
    """The embedded cluster's start and stop chatter (about 90 INFO lines from the
    scheduler, nannies and workers) is noise beside progress bars: below WARNING it is
    dropped here and, through the nanny's spawn environment, in every worker process."""
    if verbose():
        yield
        return
    logger = logging.getLogger("distributed")
    level = logger.level
    logger.setLevel(logging.WARNING)
    spawn = {f"distributed.nanny.pre-spawn-environ.{_LOG_LEVEL_ENV}": "warning"}
    before = os.environ.get(_LOG_LEVEL_ENV)
    try:
        with dask.config.set(spawn):
            yield
    finally:
        logger.setLevel(level)
        # the nanny leaves its spawn environment in this process's os.environ
        if before is None:
            os.environ.pop(_LOG_LEVEL_ENV, None)
        else:
            os.environ[_LOG_LEVEL_ENV] = before


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


@dataclass(frozen=True)
class _Refused:
    """A task's :class:`LatentbatchError`, returned instead of raised: bad input is the
    caller's to report in a sentence, not a worker's to log as a failed computation
    with a traceback."""

    error: LatentbatchError


def _input_of(spec: Any) -> str:
    """What a task spec names as its input: its rows of its store (or output), as far
    as its fields say."""
    part = getattr(spec, "part", None)
    segments = getattr(part, "segments", None)
    files = sorted({piece.path for piece, _, _ in segments}) if segments else []
    url = getattr(spec, "store_url", None) or getattr(spec, "out_url", None)
    start, stop = getattr(spec, "start", None), getattr(spec, "stop", None)
    rows = f"rows [{start}, {stop}) of {url}" if start is not None and url else str(url or "")
    shown = f" ({', '.join(files[:3])}{' ...' if len(files) > 3 else ''})" if files else ""
    return (rows or repr(spec)[:120]) + shown


def _refusing(fn: Callable[[Any], R], spec: Any) -> R | _Refused:
    try:
        return fn(spec)
    except LatentbatchError as error:
        return _Refused(error)
    except (OSError, TimeoutError, ConnectionError):
        raise  # I/O trouble: as it is, so that a flow's retry can tell it is transient
    except Exception as error:  # not the library's own: one sentence, the traceback kept
        if type(error).__module__.startswith(("botocore", "aiobotocore")):
            raise
        name = getattr(fn, "__name__", "a task")
        logger.info("%s failed on %s", name, _input_of(spec), exc_info=True)  # worker logs
        return _Refused(
            TaskError(
                f"{name} failed on {_input_of(spec)}: {type(error).__name__}: {error}; run "
                "again with --debug for the worker's traceback, and report it if the input "
                "looks right",
                traceback.format_exc(),
            )
        )


def run_task(
    client: Client, fn: Callable[[Any], R], spec: Any, *, resources: dict[str, float] | None = None
) -> R:
    """``fn(spec)`` on one worker; a :class:`LatentbatchError` there is raised here (and,
    as in :func:`map_bounded`, not logged by the worker as a failed computation)."""
    result = client.submit(_refusing, fn, spec, resources=resources, pure=False).result()
    if isinstance(result, _Refused):
        raise result.error
    return result  # type: ignore[no-any-return]


def map_in_order(client: Client, fn: Callable[[Any], R], specs: Sequence[Any]) -> list[R]:
    """``[fn(s) for s in specs]`` as tasks, all submitted at once (a few, each large:
    an import's listing tasks); the first task error (in the specs' order) cancels the
    rest and is raised here, a :class:`LatentbatchError` as it is."""
    run = uuid.uuid4().hex[:8]
    futures = [
        client.submit(_refusing, fn, s, key=f"{getattr(fn, '__name__', 'task')}-{i}-{run}",
                      pure=False)
        for i, s in enumerate(specs)
    ]  # fmt: skip
    try:
        results = [future.result() for future in futures]
    finally:
        for future in futures:
            future.cancel()
    for result in results:
        if isinstance(result, _Refused):
            raise result.error
    return results  # type: ignore[return-value]


def map_results(
    client: Client,
    fn: Callable[[Any], R],
    specs: Iterable[Any],
    *,
    items: Callable[[Any], int] = lambda _: 1,
    max_in_flight: int | None = None,
    resources: dict[str, float] | None = None,
) -> Generator[tuple[R, int], None, None]:
    """``(result, items(spec))`` of ``fn`` over ``specs`` as tasks complete, with at most
    ``max_in_flight`` submitted at once (default: two per worker) and the specs drawn
    only as tasks are submitted. The first task error cancels the rest and is raised
    here; a :class:`LatentbatchError` travels back as a value, so workers do not log it."""
    if max_in_flight is None:
        max_in_flight = 2 * max(1, len(client.scheduler_info(n_workers=-1)["workers"]))
    queue = iter(specs)
    run = uuid.uuid4().hex[:8]  # keys of another run never match: an erred task of an
    # earlier attempt, still known to the scheduler, would otherwise answer a retry
    future_items: dict[str, int] = {}

    def submit(spec: Any) -> Any:
        key = f"{getattr(fn, '__name__', 'task')}-{tokenize(spec)}-{run}"
        future = client.submit(_refusing, fn, spec, key=key, resources=resources, pure=False)
        future_items[str(future.key)] = items(spec)
        return future

    window = as_completed([submit(s) for s in itertools.islice(queue, max(1, max_in_flight))])
    try:
        for future in window:
            result = future.result()
            if isinstance(result, _Refused):
                raise result.error
            count = future_items.pop(str(future.key))
            nxt = next(queue, None)
            if nxt is not None:
                window.add(submit(nxt))
            yield result, count
    except BaseException:
        for future in list(window.futures):
            future.cancel()
        raise


def map_bounded(
    client: Client,
    fn: Callable[[Any], R],
    specs: Iterable[Any],
    *,
    items: Callable[[Any], int],
    max_in_flight: int | None = None,
    resources: dict[str, float] | None = None,
    on_result: Callable[[R, Progress], None] | None = None,
    totals: tuple[int, int] | None = None,
) -> list[R]:
    """Run ``fn`` over ``specs`` with at most ``max_in_flight`` tasks submitted at once
    (default: two per worker, so each worker has its next task queued).

    Results are handed to ``on_result`` as they complete (with the progress so far), or
    without ``on_result`` returned in completion order. The first task error cancels the
    rest and is raised here; a :class:`LatentbatchError` travels back as a value, so
    workers do not log it. With ``totals`` (tasks, items) the specs are drawn from
    ``specs`` only as tasks are submitted, so a lazy iterable of any length costs the
    client the tasks in flight; without, they are listed first to count them.
    """
    if totals is None:
        pending = list(specs)
        totals = (len(pending), sum(items(s) for s in pending))
        specs = pending
    total_tasks, total_items = totals
    started = time.perf_counter()
    results: list[R] = []
    done_items = done_tasks = 0
    found = map_results(
        client, fn, specs, items=items, max_in_flight=max_in_flight, resources=resources
    )
    with closing(found):  # a raising on_result cancels the tasks in flight too
        for result, count in found:
            done_tasks += 1
            done_items += count
            if on_result is None:
                results.append(result)
                continue
            progress = Progress(
                done_items=done_items,
                total_items=total_items,
                done_tasks=done_tasks,
                total_tasks=total_tasks,
                seconds=time.perf_counter() - started,
            )
            on_result(result, progress)
    return results
