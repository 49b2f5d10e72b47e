from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

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
from latentbatch.models.checkpoint import ModelBytes, read_once


def _build_count(model_id: str) -> tuple[int, int, str]:
    decoder, _ = cached_model(model_id, "decoder")
    return os.getpid(), id(decoder), type(decoder).__name__


def test_model_plugin_loads_the_decoder_once_per_worker_process(
    process_client: Client, tiny_model: Path
) -> None:
    model = read_once(tiny_model)
    info = model.info
    register_model(process_client, model, "decoder")
    register_model(process_client, model, "decoder")  # registering again is harmless
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
    model = read_once(tiny_model)
    info = model.info
    for part, kind in (("encoder", Encoder), ("decoder", Decoder)):
        plugin = ModelPlugin(model, (part,))  # type: ignore[arg-type]
        plugin.setup(None)  # no worker: a CPU device
        module, device = cached_model(info.model_id, part)  # type: ignore[arg-type]
        assert isinstance(module, kind) and device == torch.device("cpu")
        assert not module.training
        plugin.teardown(None)
        with pytest.raises(WorkerStateError):
            cached_model(info.model_id, part)  # type: ignore[arg-type]


def test_plugin_checks_the_bytes_against_the_id(tiny_model: Path) -> None:
    model = read_once(tiny_model)
    info = dataclasses.replace(model.info, model_id="0" * 64)
    plugin = ModelPlugin(ModelBytes(info=info, weights=model.weights), ("decoder",))
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


def _model_plugins(dask_worker: Any) -> list[str]:
    return sorted(name for name in dask_worker.plugins if name.startswith("latentbatch-"))


@pytest.mark.parametrize("command", ["encode", "decode", "import"])
def test_a_command_reads_the_weights_once_and_sends_each_worker_one_copy(
    command: str, tmp_path: Path, tiny_model: Path, kl_vae: Path, process_client: Client,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """The client opens the weights file once per encode, decode and import (read and
    hashed together), and each worker receives them in one plugin, however many parts it
    builds (an encode's encoder and decoder)."""
    import builtins
    import io

    import numpy as np

    from latentbatch.decode import decode
    from latentbatch.encode import encode
    from latentbatch.stores.store import Layout
    from latentbatch.uses.import_latents import import_latents

    model = kl_vae if command == "import" else tiny_model
    weights = (model / read_once(model).info.weights).resolve()
    store = str(tmp_path / "s.zarr")
    if command == "decode":
        encode(tiny_model, "synthetic:40", store, layout=Layout(16, 8), client=process_client)
    else:
        np.save(tmp_path / "rows.npy", np.zeros((8, 4, 4, 4), np.float32))
    for name in _model_plugins_names(process_client):
        process_client.unregister_worker_plugin(name)
    opened: list[str] = []
    real = io.open

    def counting(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if isinstance(file, (str, Path)) and Path(file).resolve() == weights and "r" in mode:
            opened.append(mode)
        return real(file, mode, *args, **kwargs)

    monkeypatch.setattr(io, "open", counting)
    monkeypatch.setattr(builtins, "open", counting)
    if command == "encode":
        encode(model, "synthetic:40", store, layout=Layout(16, 8), client=process_client)
    elif command == "decode":
        decode(model, store, str(tmp_path / "out"), client=process_client)
    else:
        import_latents(model, str(tmp_path / "rows.npy"), store, client=process_client)
    monkeypatch.undo()
    assert len(opened) == 1, opened
    plugins = process_client.run(_model_plugins)
    assert len(plugins) == 2 and all(len(names) == 1 for names in plugins.values()), plugins


def _model_plugins_names(client: Client) -> set[str]:
    return {name for names in client.run(_model_plugins).values() for name in names}
