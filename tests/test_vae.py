"""diffusers autoencoders (AutoencoderKL, AutoencoderTiny) as latentbatch models: read,
loaded from safetensors only, decoding a store exactly as diffusers does."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from distributed import Client

from latentbatch.cli import main
from latentbatch.decode import ModelMismatchError, decode
from latentbatch.encode import encode
from latentbatch.errors import CheckpointError
from latentbatch.models.checkpoint import read_info, summary
from latentbatch.models.weights import load_model
from latentbatch.outputs.shards import read_output
from latentbatch.stores.store import Layout, create_store, open_store
from tests.helpers import diffusers_decode


def _store(url: Path, model_dir: Path, rows: int = 20, seed: int = 0) -> str:
    """A store of seeded latents, N(0, 1) as scaled latents are, of ``model_dir``."""
    info = read_info(model_dir)
    store = create_store(
        str(url), model_id=info.model_id, config=info.config, capacity=rows,
        layout=Layout(8, 4, "float32"),
    )  # fmt: skip
    rng = np.random.default_rng(seed)
    for a in range(0, rows, 8):
        b = min(a + 8, rows)
        latents = rng.standard_normal((b - a, *info.config.latent_shape), dtype=np.float32)
        store.write_rows(a, latents, [f"z{i:03d}" for i in range(a, b)], np.full(b - a, -1))
    store.write_meta(count=rows)
    return str(url)


def test_a_diffusers_directory_is_a_model(kl_vae: Path, tiny_vae: Path) -> None:
    info = read_info(kl_vae)
    assert info.weights == "diffusion_pytorch_model.safetensors"
    assert info.config.preset == "AutoencoderKL" and info.config.latent_shape == (4, 4, 4)
    assert (info.config.downsampling, info.config.scaling_factor) == (8, 0.18215)
    shown = summary(info)
    assert shown["class"] == "AutoencoderKL" and shown["latent_channels"] == 4
    vae_params = sum(p.numel() for p in load_model(kl_vae)[0].parameters())
    assert shown["parameters"] == vae_params
    tiny = summary(read_info(tiny_vae))
    assert (tiny["class"], tiny["downsampling"], tiny["scaling_factor"]) == (
        "AutoencoderTiny", 8, 1.0
    )  # fmt: skip


def test_variants_snapshots_and_refusals(kl_vae: Path, tmp_path: Path) -> None:
    fp16 = shutil.copytree(kl_vae, tmp_path / "fp16")
    (fp16 / "diffusion_pytorch_model.safetensors").rename(
        fp16 / "diffusion_pytorch_model.fp16.safetensors"
    )
    assert read_info(fp16).model_id == read_info(kl_vae).model_id
    snapshot = tmp_path / "snapshots" / "abc123"  # a Hugging Face cache snapshot: links
    snapshot.mkdir(parents=True)
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        (snapshot / name).symlink_to(kl_vae / name)
    assert read_info(snapshot).model_id == read_info(kl_vae).model_id
    pickled = shutil.copytree(kl_vae, tmp_path / "pickled")
    (pickled / "diffusion_pytorch_model.safetensors").rename(
        pickled / "diffusion_pytorch_model.bin"
    )
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model\.bin, a pickle"):
        read_info(pickled)
    other = shutil.copytree(kl_vae, tmp_path / "other")
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "_class_name": "AutoencoderKLWan"}))
    with pytest.raises(CheckpointError, match="AutoencoderKLWan; latentbatch decodes the Autoen"):
        read_info(other)


@pytest.mark.parametrize("which", ["kl_vae", "tiny_vae"])
def test_decode_equals_diffusers_and_is_the_same_everywhere(
    which: str, request: pytest.FixtureRequest, tmp_path: Path, client: Client,
    process_client: Client,
) -> None:  # fmt: skip
    model_dir: Path = request.getfixturevalue(which)
    url = _store(tmp_path / "z.zarr", model_dir)
    store = open_store(url)
    assert store.meta["latent"]["convention"]["scaled"] is True
    outputs = {}
    for name, kwargs in (
        ("threads", {"client": client}),
        ("processes", {"client": process_client}),
    ):
        decode(model_dir, url, str(tmp_path / name), fmt="png", **kwargs)  # type: ignore[arg-type]
        outputs[name] = read_output(str(tmp_path / name))
    cli = subprocess.run(
        [Path(sys.executable).with_name("latentbatch"), "decode", "--model", str(model_dir),
         "--store", url, "--out", str(tmp_path / "cli"), "--format", "png", "--workers", "1",
         "--no-progress"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    outputs["cli"] = read_output(str(tmp_path / "cli"))
    ids, images = outputs["threads"]
    assert ids == [f"z{i:03d}" for i in range(20)] and images.shape == (20, 32, 32, 3)
    for other_ids, other_images in outputs.values():
        assert other_ids == ids
        np.testing.assert_array_equal(other_images, images)
    expected = diffusers_decode(model_dir, store.read_latents(0, 20))
    assert np.abs(images.astype(int) - expected.astype(int)).max() <= 1


def test_a_store_of_one_vae_refuses_the_other(
    kl_vae: Path, tiny_vae: Path, tmp_path: Path, client: Client
) -> None:
    url = str(tmp_path / "kl.zarr")
    encode(kl_vae, "synthetic:4", url, client=client)
    with pytest.raises(ModelMismatchError, match="was encoded by model"):
        decode(tiny_vae, url, str(tmp_path / "out"), client=client)
    assert not (tmp_path / "out").exists()


def test_encode_stores_the_scaled_mean(kl_vae: Path, tmp_path: Path, client: Client) -> None:
    import diffusers

    url = str(tmp_path / "e.zarr")
    encode(kl_vae, "synthetic:6", url, layout=Layout(8, 4, "float32"), client=client)
    store = open_store(url)
    assert store.count == 6 and store.latent_shape == (4, 4, 4)
    vae = diffusers.AutoencoderKL.from_pretrained(str(kl_vae)).eval()
    from latentbatch.sources.images import Geometry, open_source

    images = open_source("synthetic:6", Geometry(32, 3)).read(0, 6)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        mean = vae.encode(pixels * 2 - 1).latent_dist.mean * 0.18215
    np.testing.assert_allclose(store.read_latents(0, 6), mean.numpy(), atol=1e-4)
    assert not np.isnan(store.read_quality(0, 6)).any()


def test_models_show_names_the_convention(kl_vae: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "show", str(kl_vae)]) == 0
    shown = capsys.readouterr().out
    assert "AutoencoderKL" in shown and "0.18215" in shown and "downsampling" in shown


@pytest.mark.parametrize("codec_name", ["png", "webp", "jpeg"])
def test_non_square_latents_decode_to_tar_shards_webdataset_reads(
    codec_name: str, tiny_vae: Path, tmp_path: Path, client: Client
) -> None:
    import io

    import webdataset as wds
    from PIL import Image

    from latentbatch.outputs.codecs import check_codec

    info = read_info(tiny_vae)
    url = str(tmp_path / "wide.zarr")
    store = create_store(url, model_id=info.model_id, config=info.config, capacity=3,
                         layout=Layout(4, 2), image=(512, 768))  # fmt: skip
    assert store.latent_shape == (4, 64, 96) and store.image_size == (512, 768)
    latents = np.random.default_rng(0).standard_normal((3, 4, 64, 96), dtype=np.float32)
    store.write_rows(0, latents, ["a", "b", "c"], np.full(3, -1))
    store.write_meta(count=3)
    out = tmp_path / codec_name
    decode(tiny_vae, url, str(out), codec=check_codec(codec_name), client=client)
    samples = list(wds.WebDataset(str(out / "shard-000000.tar"), shardshuffle=False))
    extension = check_codec(codec_name).extension
    assert [s["__key__"] for s in samples] == ["a", "b", "c"]
    for sample in samples:
        with Image.open(io.BytesIO(sample[extension])) as image:
            assert image.size == (768, 512)  # width, height


def test_encode_at_a_size_and_native_sizes(
    kl_vae: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from PIL import Image

    folder = tmp_path / "pictures"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        pixels = rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"p{i}.png")
    url = str(tmp_path / "native.zarr")
    argv = ["encode", "--model", str(kl_vae), "--data", f"folder:{folder}", "--store", url,
            "--size", "native", "--workers", "1", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    store = open_store(url)
    assert store.image_size == (48, 80) and store.latent_shape == (4, 6, 10)
    assert main(["inspect", url]) == 0
    assert "scaled: a decode applies z = x / 0.18215 + 0" in capsys.readouterr().out
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / "sq.png")
    assert main([*argv[:6], str(tmp_path / "mixed.zarr"), *argv[7:]]) == 1
    assert "holds images of 2 sizes (48x80 (p0.png), 40x40 (sq.png))" in capsys.readouterr().err
    sized = str(tmp_path / "sized.zarr")
    assert main([*argv[:6], sized, "--size", "64x32", *argv[9:]]) == 0
    assert open_store(sized).latent_shape == (4, 8, 4)
    assert main([*argv[:6], str(tmp_path / "odd.zarr"), "--size", "60", *argv[9:]]) == 1
    assert "60x60 images do not fit the AutoencoderKL" in capsys.readouterr().err


@pytest.mark.parametrize("which", ["kl_vae", "tiny_vae"])
def test_images_over_the_memory_budget_decode_in_tiles(
    which: str, request: pytest.FixtureRequest, tmp_path: Path, client: Client,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    from latentbatch.config import MEMORY_ENV

    model_dir: Path = request.getfixturevalue(which)
    info = read_info(model_dir)
    url = str(tmp_path / "big.zarr")
    store = create_store(url, model_id=info.model_id, config=info.config, capacity=2,
                         layout=Layout(2, 2), image=(128, 192))  # fmt: skip
    latents = np.random.default_rng(0).standard_normal((2, 4, 16, 24), dtype=np.float32)
    store.write_rows(0, latents, ["a", "b"], np.full(2, -1))
    store.write_meta(count=2)
    whole = decode(model_dir, url, str(tmp_path / "whole"), fmt="png", client=client)
    assert not whole.tiled
    monkeypatch.setenv(MEMORY_ENV, "1")  # 1 MiB: under one 128x192 image's estimate
    assert info.config.decode_bytes(128, 192) > 2**20
    parts = decode(model_dir, url, str(tmp_path / "tiles"), fmt="png", client=client)
    assert parts.tiled
    _, tiles = read_output(str(tmp_path / "tiles"))
    _, images = read_output(str(tmp_path / "whole"))
    assert tiles.shape == images.shape == (2, 128, 192, 3)
    if which == "kl_vae":  # group norms see one tile at a time: other pixels
        assert not np.array_equal(tiles, images)
    else:  # TAESD's receptive field fits in its tiles' overlap: the same pixels
        assert np.abs(tiles.astype(int) - images.astype(int)).max() <= 1
