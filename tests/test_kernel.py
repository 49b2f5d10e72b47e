"""The device kernel: batches through the encoder and decoder, and the NaN/Inf check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from latentbatch.engine.kernel import (
    NonFiniteLatentsError,
    Upcasts,
    chosen_precision,
    decode_batches,
    decode_latents,
    encode_images,
    encode_precision,
    finite_rows,
    refuse_nonfinite,
)
from latentbatch.models.weights import load_model
from latentbatch.sources.images import Geometry, open_source
from latentbatch.stores.store import open_store


def test_cpu_decode_bits_do_not_depend_on_threads_or_batch(
    mnist_store: Path, seed_model: Path
) -> None:
    decoder, _ = load_model(seed_model, "decoder")
    latents = open_store(str(mnist_store)).read_latents(0, 700)
    threads = torch.get_num_threads()
    cpu = torch.device("cpu")
    try:
        torch.set_num_threads(1)
        one_thread = decode_latents(decoder, latents, cpu, batch_size=256)
        small_batches = decode_latents(decoder, latents, cpu, batch_size=33)
        torch.set_num_threads(2)
        two_threads = decode_latents(decoder, latents, cpu, batch_size=256)
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_array_equal(one_thread, small_batches)
    np.testing.assert_array_equal(one_thread, two_threads)


@pytest.mark.parametrize(
    ("asked", "device", "force_upcast", "bf16", "chosen"),
    [
        ("auto", "cpu", True, False, "fp32"),  # CPU runs fp32 unless asked
        ("auto", "cpu", False, True, "fp32"),
        ("auto", "cuda", True, False, "fp32"),  # an SD VAE on a V100 or T4: no bf16
        ("auto", "cuda", True, True, "bf16"),  # an SD VAE on an A100 or H100
        ("auto", "cuda", False, True, "fp16"),  # TAESD, the fp16-fix VAEs
        ("auto", "cuda", False, False, "fp16"),
        ("auto", "cuda", None, True, "bf16"),  # latentbatch's presets declare nothing
        ("auto", "cuda", None, False, "fp32"),
        ("fp16", "cuda", True, True, "fp16"),  # asked: as asked
        ("bf16", "cpu", None, False, "bf16"),
    ],
)
def test_auto_precision_honours_force_upcast_on_simulated_devices(
    asked: str, device: str, force_upcast: bool | None, bf16: bool, chosen: str
) -> None:
    found = chosen_precision(asked, device, force_upcast=force_upcast, bf16=bf16)  # type: ignore[arg-type]
    assert found == chosen


@pytest.mark.parametrize("family", ["kl", "tiny"])
def test_bf16_and_fp16_decodes_stay_near_fp32_on_cpu(
    family: str, kl_vae: Path, tiny_vae: Path
) -> None:
    """Reduced precision on CPU (bf16 by autocast, fp16 by a cast copy): fp16 within 2
    levels of fp32 everywhere; bf16, whose mantissa is 8 bits, off by under one level on
    average and at most 8 for these random-init weights (measured: the KL's 0.6 on
    average and 6 at most, TAESD's 0.1 and 1). Trained weights are judged by the 2-level
    bound in ``tests/test_families.py``."""
    decoder, _ = load_model(kl_vae if family == "kl" else tiny_vae, "decoder")
    latents = np.random.default_rng(4).standard_normal((6, 4, 4, 4)).astype(np.float32)
    cpu = torch.device("cpu")
    fp32 = decode_latents(decoder, latents, cpu).astype(np.int16)
    for precision in ("bf16", "fp16"):
        upcasts = Upcasts()
        reduced = decode_latents(decoder, latents, cpu, 4, precision=precision, upcasts=upcasts)  # type: ignore[arg-type]
        assert (upcasts.batches, upcasts.fp32_again) == (2, 0)
        off = np.abs(reduced.astype(np.int16) - fp32)
        assert off.any(), precision  # it did run in reduced precision
        if precision == "fp16":
            assert off.max() <= 2
        else:
            assert off.mean() < 1 and off.max() <= 8


def test_a_batch_that_overflows_float16_is_decoded_again_in_fp32(tmp_path: Path) -> None:
    """A decoder whose activations overflow float16 gives NaN there, which would round to
    black images: each such batch is decoded again in fp32, counted, and its images are
    the fp32 decode's."""
    from tests.helpers import save_overflowing_kl_vae

    decoder, _ = load_model(save_overflowing_kl_vae(tmp_path / "overflows"), "decoder")
    latents = np.random.default_rng(5).standard_normal((8, 4, 4, 4)).astype(np.float32)
    cpu = torch.device("cpu")
    fp32 = decode_latents(decoder, latents, cpu)
    assert fp32.std() > 0  # finite and not one colour in fp32
    upcasts = Upcasts()
    again = decode_latents(decoder, latents, cpu, 4, precision="fp16", upcasts=upcasts)
    assert (upcasts.batches, upcasts.fp32_again) == (2, 2)
    np.testing.assert_array_equal(again, fp32)


@pytest.mark.parametrize(
    ("asked", "device", "force_upcast", "chosen"),
    [
        ("auto", "cpu", False, "fp32"),
        ("auto", "cuda", True, "fp32"),  # SD's and SDXL's original VAEs: overflow in fp16
        ("auto", "cuda", False, "fp16"),
        ("auto", "cuda", None, "fp16"),  # latentbatch's presets, as before
        ("bf16", "cuda", True, "bf16"),
    ],
)
def test_encode_precision_keeps_fp32_where_the_family_needs_it(
    asked: str, device: str, force_upcast: bool | None, chosen: str
) -> None:
    assert encode_precision(asked, device, force_upcast=force_upcast) == chosen  # type: ignore[arg-type]


def test_a_bf16_encode_on_cpu_stays_near_fp32(kl_vae: Path) -> None:
    encoder, _ = load_model(kl_vae, "encoder")
    images = np.random.default_rng(2).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    cpu = torch.device("cpu")
    fp32 = encode_images(encoder, images, cpu)
    bf16 = encode_images(encoder, images, cpu, precision="bf16")
    assert not np.array_equal(fp32, bf16)  # it ran in bf16
    assert np.abs(fp32 - bf16).max() < 0.05 * np.abs(fp32).max()


def test_finite_check_on_float16_bits_matches_numpy() -> None:
    rows = np.random.default_rng(3).standard_normal((40, 17)).astype(np.float16)
    rows[3, 1], rows[7, 0], rows[9, 16] = np.nan, np.inf, -np.inf
    rows[11, 2], rows[12, 3] = np.float16(65504), np.float16(6e-8)  # largest, subnormal
    np.testing.assert_array_equal(finite_rows(rows), np.isfinite(rows).all(axis=1))
    np.testing.assert_array_equal(np.flatnonzero(~finite_rows(rows)), [3, 7, 9])
    as32 = rows.astype(np.float32)
    np.testing.assert_array_equal(finite_rows(as32), finite_rows(rows))


def test_encode_then_decode_in_batches_is_the_model_in_one_call(tiny_model: Path) -> None:
    model, info = load_model(tiny_model)
    images = open_source("synthetic:300", Geometry(info.config.image_size, 1)).read(0, 300)
    cpu = torch.device("cpu")
    latents = encode_images(model.encoder, images, cpu)  # 256 + 44
    assert latents.shape == (300, *info.config.latent_shape) and latents.dtype == np.float32
    with torch.inference_mode():
        whole = model.encoder(torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)).numpy()
    np.testing.assert_allclose(latents, whole, rtol=0, atol=1e-5)
    handed: list[np.ndarray] = []
    batches = (latents[i : i + 100] for i in range(0, 300, 100))
    decoded = decode_batches(model.decoder, batches, cpu, handed.append)
    assert [len(h) for h in handed] == [100, 100, 100]
    np.testing.assert_array_equal(np.concatenate(handed), decoded)
    np.testing.assert_array_equal(decoded, decode_latents(model.decoder, latents, cpu))
    assert decoded.shape == (300, *images.shape[1:]) and decoded.dtype == np.uint8


def test_nonfinite_latents_are_refused_naming_rows_and_ids() -> None:
    latents = np.zeros((8, 2, 3, 3), np.float16)
    refuse_nonfinite(latents, list(range(10, 18)), [f"id{i}" for i in range(8)], "here")
    latents[2, 1, 0, 0], latents[6, 0, 2, 2] = np.nan, -np.inf
    rows, ids = list(range(10, 18)), [f"id{i}" for i in range(8)]
    with pytest.raises(
        NonFiniteLatentsError, match=r"2 latents in here .* rows 12 \(id2\), 16 \(id6\)"
    ):
        refuse_nonfinite(latents, rows, ids, "here")


def test_batches_follow_the_image_size_within_the_memory_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from latentbatch.config import MEMORY_ENV, ModelConfig, tiled
    from latentbatch.engine.kernel import batch_for

    sd = ModelConfig("AutoencoderKL", 3, 512, (128, 256, 512, 512), 4, diffusers={})
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setenv(MEMORY_ENV, "4096")
    assert batch_for(cpu) == 256 and batch_for(cuda) == 4096  # no size: the device's batch
    assert batch_for(cpu, sd.decode_bytes(256, 256)) == 8
    assert batch_for(cuda, sd.decode_bytes(512, 512)) == 2
    assert batch_for(cuda, sd.decode_bytes(1024, 1024)) == 1 and tiled(sd.decode_bytes(1024, 1024))
    assert not tiled(sd.decode_bytes(512, 512))
    monkeypatch.setenv(MEMORY_ENV, "16384")
    assert batch_for(cuda, sd.decode_bytes(512, 512)) == 8
    assert not tiled(sd.decode_bytes(1024, 1024))
