from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch
from distributed import Client

from latentbatch.engine.cluster import HOST_GPUS_ENV, HOST_WORKERS_ENV
from latentbatch.engine.workers import (
    ModelPlugin,
    WorkerStateError,
    cached_model,
    encoder_threads,
    loaded_models,
    register_model,
    tune_malloc,
    worker_device,
    worker_threads,
)
from latentbatch.errors import CheckpointError
from latentbatch.models.autoencoder import Decoder, Encoder
from latentbatch.models.checkpoint import read_info


def _build_count(model_id: str) -> tuple[int, int, str]:
    decoder, _ = cached_model(model_id, "decoder")
    return os.getpid(), id(decoder), type(decoder).__name__


def test_model_plugin_loads_the_decoder_once_per_worker_process(
    process_client: Client, tiny_model: Path
) -> None:
    info = read_info(tiny_model)
    register_model(process_client, info, "decoder")
    register_model(process_client, info, "decoder")  # registering again is harmless
    seen = process_client.gather(
        [process_client.submit(_build_count, info.model_id, pure=False) for _ in range(8)]
    )
    by_pid: dict[int, set[int]] = {}
    for pid, model, kind in seen:
        by_pid.setdefault(pid, set()).add(model)
        assert kind == "Decoder"  # only the part asked for, not the whole autoencoder
    assert all(len(models) == 1 for models in by_pid.values())
    loaded = process_client.run(loaded_models)
    assert len(loaded) == 2
    assert all((info.model_id, "decoder", "cpu") in models for models in loaded.values())
    assert all((info.model_id, "encoder", "cpu") not in models for models in loaded.values())


def test_plugin_builds_each_part_alone(tiny_model: Path) -> None:
    info = read_info(tiny_model)
    for part, kind in (("encoder", Encoder), ("decoder", Decoder)):
        plugin = ModelPlugin(info, part)  # type: ignore[arg-type]
        plugin.setup(None)  # no worker: a CPU device
        module, device = cached_model(info.model_id, part)  # type: ignore[arg-type]
        assert isinstance(module, kind) and device == torch.device("cpu")
        assert not module.training
        plugin.teardown(None)
        with pytest.raises(WorkerStateError):
            cached_model(info.model_id, part)  # type: ignore[arg-type]


def test_plugin_checks_the_bytes_against_the_id(tiny_model: Path) -> None:
    info = dataclasses.replace(read_info(tiny_model), model_id="0" * 64)
    plugin = ModelPlugin(info, "decoder")
    plugin.setup(None)  # refused: logged here, raised by every task that needs it
    with pytest.raises(CheckpointError, match=r"this process refused.*expected 000000000000"):
        cached_model(info.model_id, "decoder")
    plugin.teardown(None)


def test_cached_model_without_plugin_says_so() -> None:
    with pytest.raises(WorkerStateError, match=r"register it with latentbatch\.engine\.workers"):
        cached_model("f" * 64, "decoder")


def test_no_worker_means_cpu() -> None:
    assert worker_device(None) == torch.device("cpu")


def test_tune_malloc_sets_glibc_thresholds() -> None:
    assert tune_malloc() is True


def test_encoder_threads_are_the_workers_share_of_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    cores = len(os.sched_getaffinity(0))
    assert encoder_threads(torch.device("cpu")) == cores  # outside a worker: the process's
    assert encoder_threads(torch.device("cpu"), 1) == 1  # a one-thread worker: one core
    assert encoder_threads(torch.device("cpu"), 3) == 3
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    assert encoder_threads(torch.device("cuda")) == max(2, cores)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert encoder_threads(torch.device("cuda")) == max(2, cores // 8)
    # a worker pinned to one GPU sees one device; its host's GPUs come from the launcher
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv(HOST_GPUS_ENV, "8")
    assert encoder_threads(torch.device("cuda")) == max(2, cores // 8)
    # sixteen workers sharing the host's GPUs share its cores too
    monkeypatch.setenv(HOST_WORKERS_ENV, "16")
    assert encoder_threads(torch.device("cuda")) == max(2, cores // 16)
    monkeypatch.setenv(HOST_WORKERS_ENV, "4")  # fewer workers than GPUs: a GPU's share
    assert encoder_threads(torch.device("cuda")) == max(2, cores // 8)


def test_encoding_threads_of_a_worker_are_its_threads(client: Client) -> None:
    assert client.submit(worker_threads, pure=False).result() == 1
    assert worker_threads() is None
