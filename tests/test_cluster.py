from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dask.config
import pytest
from distributed import Client, LocalCluster

from latentbatch.engine.cluster import (
    PROFILER_ENV,
    ClusterError,
    Progress,
    connect,
    gpu_resources,
    map_bounded,
    map_in_order,
    worker_env,
    worker_settings,
)
from latentbatch.errors import DataError
from latentbatch.progress import VERBOSE_ENV


def _interval(seconds: float) -> tuple[float, float]:
    start = time.monotonic()
    time.sleep(seconds)
    return start, time.monotonic()


def test_map_bounded_draws_lazy_specs_as_it_submits(client: Client) -> None:
    drawn = []

    def specs() -> Iterator[int]:
        for i in range(40):
            drawn.append(i)
            yield i

    ahead = []
    map_bounded(
        client,
        _double,
        specs(),
        items=lambda _: 1,
        max_in_flight=3,
        totals=(40, 40),
        on_result=lambda r, p: ahead.append(len(drawn) - p.done_tasks),
    )
    assert len(drawn) == 40
    assert max(ahead) <= 3  # never more specs drawn than tasks in flight
    assert map_bounded(client, _double, iter([1, 2]), items=lambda _: 1) in ([2, 4], [4, 2])


def _double(x: int) -> int:
    return 2 * x


def _fail(x: int) -> int:
    if x == 2:
        raise ValueError("bad input 2")
    return x


def test_map_bounded_keeps_the_window(client: Client) -> None:
    seen = []
    results: list[tuple[float, float]] = []

    def collect(result: tuple[float, float], progress: Progress) -> None:
        results.append(result)
        seen.append(progress)

    returned = map_bounded(
        client,
        _interval,
        [0.05 + i * 1e-6 for i in range(6)],
        items=lambda _: 10,
        max_in_flight=1,
        on_result=collect,
    )
    assert returned == []  # handed to on_result only: nothing accumulates
    spans = sorted(results)
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))  # never two at once
    assert [p.done_items for p in seen] == [10, 20, 30, 40, 50, 60]
    assert seen[-1].total_items == 60
    assert seen[-1].rate > 0
    assert seen[-1].eta == 0


def test_map_bounded_raises_the_first_task_error(client: Client) -> None:
    from latentbatch.errors import TaskError

    with pytest.raises(TaskError, match="_fail failed on 2: ValueError: bad input 2"):
        map_bounded(client, _fail, [1, 2, 3], items=lambda _: 1, max_in_flight=3)


def _slow_square(x: int) -> int:
    time.sleep(0.3 if x == 0 else 0.0)  # the first finishes last
    if x < 0:
        raise DataError(f"{x} is negative; give a count")
    return x * x


def test_map_in_order_returns_results_in_the_specs_order(client: Client) -> None:
    """An import's listing tasks: results in their specs' order, however they finish;
    the library's own error comes back as it is."""
    assert map_in_order(client, _slow_square, [0, 1, 2, 3]) == [0, 1, 4, 9]
    with pytest.raises(DataError, match="-1 is negative; give a count"):
        map_in_order(client, _slow_square, [0, -1, 2])


def test_cpu_cluster_asks_for_no_gpu(client: Client) -> None:
    assert gpu_resources(client) is None


def test_gpu_workers_are_detected() -> None:
    with (
        LocalCluster(
            n_workers=1, processes=False, dashboard_address=":0", resources={"GPU": 1}
        ) as cluster,
        Client(cluster) as c,
    ):
        assert gpu_resources(c) == {"GPU": 1}


def test_connect_uses_an_address_or_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    with LocalCluster(n_workers=1, processes=False, dashboard_address=":0") as cluster:
        with connect(cluster.scheduler_address) as c:
            assert c.scheduler.address == cluster.scheduler_address
        monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", cluster.scheduler_address)
        with connect() as c:
            assert c.scheduler.address == cluster.scheduler_address


def test_connect_names_an_unreachable_scheduler() -> None:
    with (
        pytest.raises(
            ClusterError, match=r"cannot reach the Dask scheduler at tcp://127\.0\.0\.1:9"
        ),
        connect("tcp://127.0.0.1:9", timeout="2s"),
    ):
        pass


def _profiler_enabled() -> bool:
    return bool(dask.config.get("distributed.worker.profile.enabled"))


def test_embedded_cluster_has_one_worker_per_core() -> None:
    with connect(workers=None) as c:
        workers = c.scheduler_info(n_workers=-1)["workers"].values()
        assert len(workers) == (os.cpu_count() or 1)
        assert {w["nthreads"] for w in workers} == {1}
        # Dask's statistical profiler costs a decode worker CPU: off in its workers
        assert set(c.run(_profiler_enabled).values()) == {False}
    assert _profiler_enabled()  # and this process's settings are as they were


def test_the_environment_can_turn_the_worker_profiler_back_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(PROFILER_ENV, "True")
    assert worker_settings() == {} and worker_env() == {}
    with connect(workers=1) as c:
        assert set(c.run(_profiler_enabled).values()) == {True}
    monkeypatch.delenv(PROFILER_ENV)
    assert worker_env() == {PROFILER_ENV: "False"}


def _distributed_level() -> int:
    return logging.getLogger("distributed").getEffectiveLevel()


def test_embedded_cluster_is_quiet_unless_verbose(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(VERBOSE_ENV, raising=False)
    with connect(workers=1) as c:
        assert set(c.run(_distributed_level).values()) == {logging.WARNING}
        assert _distributed_level() == logging.WARNING
    monkeypatch.setenv(VERBOSE_ENV, "1")
    with connect(workers=1) as c:
        assert set(c.run(_distributed_level).values()) == {logging.INFO}


def _refuse(x: int) -> int:
    raise DataError(f"image {x} is not readable; fix the source")


def _compute_failed(client: Client) -> int:
    logs = client.get_worker_logs()
    return sum("Compute Failed" in message for lines in logs.values() for _, message in lines)


def test_bad_input_comes_back_as_its_error_without_worker_tracebacks(
    process_client: Client,
) -> None:
    from latentbatch.errors import TaskError

    before = _compute_failed(process_client)
    with pytest.raises(DataError, match="image 1 is not readable; fix the source"):
        map_bounded(process_client, _refuse, [1], items=lambda _: 1)
    assert _compute_failed(process_client) == before
    # a bug too comes back as one sentence, its traceback with it (shown by --debug)
    with pytest.raises(TaskError, match="_fail failed on 2: ValueError: bad input 2") as bug:
        map_bounded(process_client, _fail, [2], items=lambda _: 1)
    assert "ValueError: bad input 2" in bug.value.worker_traceback
    assert _compute_failed(process_client) == before


def test_gpu_workers_are_pinned_one_device_each() -> None:
    """The embedded cluster's GPU workers without dask-cuda: each worker process sees only
    its own device (started here on CPU; what CUDA makes of it is test_gpu's)."""
    from latentbatch.engine.cluster import HOST_GPUS_ENV, HOST_WORKERS_ENV, gpu_cluster

    def pinned() -> tuple[str | None, ...]:
        names = ("CUDA_VISIBLE_DEVICES", HOST_GPUS_ENV, HOST_WORKERS_ENV)
        return tuple(os.environ.get(name) for name in names)

    with gpu_cluster(3, ["0", "1"]) as cluster, Client(cluster) as client:
        workers = client.scheduler_info(n_workers=-1)["workers"].values()
        assert all(w["resources"] == {"GPU": 1} and w["nthreads"] == 1 for w in workers)
        expected = [("0", "2", "3"), ("0", "2", "3"), ("1", "2", "3")]  # device, GPUs, workers
        assert sorted(client.run(pinned).values()) == expected


@pytest.mark.parametrize(
    ("inherited", "count", "devices"),
    [
        (None, 1, ["0"]),
        (None, 2, ["0", "1"]),
        (None, 4, ["0", "1", "2", "3"]),
        ("2,3", 8, ["2", "3"]),  # a host limited to GPUs 2 and 3: never 0 and 1
        ("GPU-5a1b,GPU-9c2d", 2, ["GPU-5a1b", "GPU-9c2d"]),  # UUIDs kept as given
        ("MIG-0f1e", 1, ["MIG-0f1e"]),
        ("", 4, []),  # the host gave us none
    ],
)
def test_gpu_workers_get_the_devices_the_host_gave_us(
    inherited: str | None, count: int, devices: list[str]
) -> None:
    """The mapping, without a GPU: one worker per visible device, each given exactly
    one; with dask-cuda, each worker's rotated list starts with its own device."""
    from latentbatch.engine.cluster import (
        HOST_GPUS_ENV,
        HOST_WORKERS_ENV,
        dask_cuda_devices,
        gpu_worker_env,
        gpu_worker_specs,
        visible_gpus,
    )

    assert visible_gpus(inherited, count) == devices
    if not devices:
        return
    workers = len(devices)
    specs = gpu_worker_specs(workers, devices)
    envs = [spec["options"]["env"] for spec in specs.values()]
    assert [env["CUDA_VISIBLE_DEVICES"] for env in envs] == devices  # one each, in order
    assert {(env[HOST_GPUS_ENV], env[HOST_WORKERS_ENV]) for env in envs} == {
        (str(workers), str(workers))
    }
    rotated = dask_cuda_devices(devices, workers)
    assert [r.split(",")[0] for r in rotated] == devices  # each decodes on its own
    assert all(sorted(r.split(",")) == sorted(devices) for r in rotated)
    shared = [gpu_worker_env(i, devices, 2 * workers)["CUDA_VISIBLE_DEVICES"]
              for i in range(2 * workers)]  # fmt: skip
    assert shared == devices + devices  # twice as many workers: round-robin


def _fails_first_time(flag: str) -> str:
    path = Path(flag)
    if not path.exists():
        path.write_text("failed once")
        raise OSError("a transient failure")
    return "done"


def test_a_second_run_of_the_same_tasks_is_not_answered_by_the_first_ones_error(
    client: Client, tmp_path: Path
) -> None:
    """A retry submits the same specs again: it must run them, not get back the erred
    result the scheduler may still hold from the first attempt."""
    flag = str(tmp_path / "flag")
    with pytest.raises(OSError, match="a transient failure") as first:
        map_bounded(client, _fails_first_time, [flag], items=lambda _: 1)
    assert first.value  # the erred future stays referenced from the traceback
    assert map_bounded(client, _fails_first_time, [flag], items=lambda _: 1) == ["done"]


def test_the_embedded_clusters_workers_drop_what_closing_logs() -> None:
    """A worker's heartbeat that reaches a closing scheduler logs a traceback, and a task
    cancelled as the cluster closes a warning; the embedded cluster's workers drop those
    records (and only those)."""
    import logging

    from latentbatch.engine.cluster import CANCELLED_AT_CLOSE, CLOSING_HEARTBEAT, QuietClose

    loggers = {
        "distributed.worker": f"{CLOSING_HEARTBEAT}.",
        "distributed.worker.state_machine": f"Async instruction for task {CANCELLED_AT_CLOSE}",
    }
    before = {name: list(logging.getLogger(name).filters) for name in loggers}
    try:
        QuietClose().setup(None)
        for name, message in loggers.items():
            logger = logging.getLogger(name)
            noise = logger.makeRecord(name, logging.ERROR, __file__, 1, message, (), None)
            other = logger.makeRecord(name, logging.ERROR, __file__, 1, "other", (), None)
            assert not logger.filter(noise) and logger.filter(other)
    finally:
        for name, filters in before.items():
            logging.getLogger(name).filters[:] = filters


@dataclass(frozen=True)
class _Spec:
    store_url: str
    start: int
    stop: int


def _broken(spec: _Spec) -> None:
    raise KeyError(f"no such thing as {spec.stop}")


def test_a_tasks_unexpected_error_is_one_sentence_naming_its_input(client: Client) -> None:
    """An error that is not the library's own, raised in a task, comes back as one
    sentence naming the task and its rows, with the worker's traceback kept for --debug;
    I/O errors pass as they are (a flow retries them)."""
    from latentbatch.engine.cluster import map_bounded, run_task
    from latentbatch.errors import TaskError

    with pytest.raises(TaskError) as raised:
        map_bounded(client, _broken, [_Spec("s.zarr", 0, 16)], items=lambda s: 16)
    said = str(raised.value)
    assert said.startswith("_broken failed on rows [0, 16) of s.zarr: KeyError: ")
    assert "--debug" in said and "KeyError" in raised.value.worker_traceback
    with pytest.raises(FileNotFoundError):
        run_task(client, Path.read_bytes, Path("/nonexistent/latentbatch"))
