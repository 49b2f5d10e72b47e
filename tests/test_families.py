"""Every image-autoencoder family decoded as its own diffusers pipeline decodes it: import
(with the family's convention) then decode equals the pipeline's decode lines on the same
latents, within one level; a wrong convention does not."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from distributed import Client

from latentbatch.cli import main
from latentbatch.decode import decode
from latentbatch.encode import encode
from latentbatch.engine.kernel import Precision
from latentbatch.outputs.shards import read_output
from latentbatch.stores.store import open_store
from latentbatch.uses.import_latents import import_latents
from tests.helpers import FAMILY_MODELS, save_family_vae, train_family_vae

REPA_SCALE = (0.9, 1.3, 0.7, 1.1)  # a cache's per-channel scale and bias
REPA_BIAS = (0.2, -0.4, 0.1, 0.5)


@pytest.fixture(scope="module")
def family_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {family: save_family_vae(root / family, family) for family in FAMILY_MODELS}


def _vae(path: Path) -> Any:
    import diffusers

    name = __import__("json").loads((path / "config.json").read_text())["_class_name"]
    return getattr(diffusers, name).from_pretrained(str(path), low_cpu_mem_usage=False).eval()


# The pipelines' static helpers, line for line (diffusers 0.42: FluxPipeline._pack_latents,
# Flux2Pipeline._unpatchify_latents); the pipeline classes need transformers to import.


def _flux_pack(latents: torch.Tensor, batch: int, channels: int, height: int, width: int) -> Any:
    latents = latents.view(batch, channels, height // 2, 2, width // 2, 2)
    latents = latents.permute(0, 2, 4, 1, 3, 5)
    return latents.reshape(batch, (height // 2) * (width // 2), channels * 4)


def _flux2_unpatchify(latents: torch.Tensor) -> torch.Tensor:
    batch_size, num_channels_latents, height, width = latents.shape
    latents = latents.reshape(batch_size, num_channels_latents // (2 * 2), 2, 2, height, width)
    latents = latents.permute(0, 1, 4, 2, 5, 3)
    return latents.reshape(batch_size, num_channels_latents // (2 * 2), height * 2, width * 2)


def _pipeline_decode(family: str, path: Path, x: np.ndarray) -> np.ndarray:
    """The family's diffusers pipeline's own decode lines on latents ``x`` as its
    transformer sees them, then its image processor's postprocess, as uint8 NHWC."""
    from diffusers.image_processor import VaeImageProcessor

    vae = _vae(path)
    config = vae.config
    latents = torch.from_numpy(x)
    with torch.no_grad():
        if family in ("sd", "dc-ae"):  # StableDiffusionPipeline, SanaPipeline
            image = vae.decode(latents / config.scaling_factor).sample
        elif family == "sdxl":  # StableDiffusionXLPipeline with latents_mean/std
            mean = torch.tensor(config.latents_mean).view(1, 4, 1, 1)
            std = torch.tensor(config.latents_std).view(1, 4, 1, 1)
            image = vae.decode(latents * std / config.scaling_factor + mean).sample
        elif family in ("sd3", "flux1"):  # StableDiffusion3Pipeline, FluxPipeline (unpacked)
            image = vae.decode(latents / config.scaling_factor + config.shift_factor).sample
        elif family == "flux2":  # Flux2Pipeline
            bn_mean = vae.bn.running_mean.view(1, -1, 1, 1)
            bn_std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + config.batch_norm_eps)
            unpatched = _flux2_unpatchify(latents * bn_std + bn_mean)
            image = vae.decode(unpatched).sample
        elif family == "qwen":  # QwenImagePipeline: 5-D, one frame
            mean = torch.tensor(config.latents_mean).view(1, config.z_dim, 1, 1, 1)
            std = 1.0 / torch.tensor(config.latents_std).view(1, config.z_dim, 1, 1, 1)
            image = vae.decode(latents[:, :, None] / std + mean).sample[:, :, 0]
        else:  # a REPA/LightningDiT cache's per-channel scale and bias
            scale = torch.tensor(REPA_SCALE).view(1, 4, 1, 1)
            bias = torch.tensor(REPA_BIAS).view(1, 4, 1, 1)
            image = vae.decode(latents / scale + bias).sample
    pixels = VaeImageProcessor().postprocess(image, output_type="np")
    return np.asarray((pixels * 255).round(), np.uint8)


def _stored_shape(family: str) -> tuple[int, int, int]:
    """Latents of 32x32 images as the family's transformer sees them."""
    return {"flux2": (16, 2, 2), "dc-ae": (4, 8, 8), "qwen": (4, 8, 8)}.get(family, (4, 4, 4))


def _flags(family: str) -> dict[str, Any]:
    if family == "repa":
        return {"convention": "repa", "scaling_factor": REPA_SCALE, "shift_factor": REPA_BIAS}
    return {"convention": family}


def _import_and_decode(
    family: str, path: Path, x: np.ndarray, tmp_path: Path, client: Client,
    precision: Precision = "auto", **flags: Any,
) -> np.ndarray:  # fmt: skip
    tmp_path.mkdir(exist_ok=True)
    source = tmp_path / f"{family}.npy"
    if family == "flux1":  # FLUX.1's sequence latents, packed 2x2 as its pipeline packs them
        packed = _flux_pack(torch.from_numpy(x), len(x), 4, 4, 4).numpy()
        np.save(source, packed)
        flags = {**flags, "packed": True}
    else:
        np.save(source, x)
    store = str(tmp_path / f"{family}.zarr")
    import_latents(path, str(source), store, client=client, **{**_flags(family), **flags})
    out = str(tmp_path / f"{family}-out")
    decode(path, store, out, fmt="png", client=client, precision=precision)
    return read_output(out)[1]


@pytest.mark.parametrize("family", FAMILY_MODELS)
def test_import_then_decode_equals_the_familys_pipeline(
    family: str, family_models: dict[str, Path], tmp_path: Path, client: Client
) -> None:
    x = np.random.default_rng(9).standard_normal((5, *_stored_shape(family))).astype(np.float32)
    ours = _import_and_decode(family, family_models[family], x, tmp_path, client)
    theirs = _pipeline_decode(family, family_models[family], x)
    assert ours.shape == theirs.shape == (5, 32, 32, 3)
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1


@pytest.mark.parametrize(
    ("family", "wrong"),
    [
        ("sd3", {"shift_factor": -0.0609}),  # the shift's sign flipped
        ("sdxl", {"latents_mean": (1.7, 0.6, 2.2, 1.1), "latents_std": (0.3, -0.5, 0.8, 0.1)}),
        ("repa", {"shift_factor": tuple(-b for b in REPA_BIAS)}),
    ],
)
def test_a_wrong_convention_fails_the_comparison(
    family: str, wrong: dict[str, Any], family_models: dict[str, Path], tmp_path: Path,
    client: Client,
) -> None:  # fmt: skip
    """The comparison guards the convention: mean and std swapped, or a shift's sign
    flipped, decode to other images."""
    x = np.random.default_rng(9).standard_normal((5, *_stored_shape(family))).astype(np.float32)
    ours = _import_and_decode(family, family_models[family], x, tmp_path, client, **wrong)
    theirs = _pipeline_decode(family, family_models[family], x)
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() > 1


@pytest.mark.parametrize("family", ["flux2", "dc-ae", "qwen"])
def test_the_new_families_encode_decode_and_show(
    family: str, family_models: dict[str, Path], tmp_path: Path, client: Client,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """DC-AE, FLUX.2 and Qwen-Image encode (a store with their convention and canary),
    decode what they encoded, and ``models show`` names family, convention, default
    precision and memory per 512x512 image."""
    path = family_models[family]
    store = str(tmp_path / "s.zarr")
    encode(path, "photos", store, limit=4, client=client, size=(32, 32))
    opened = open_store(store)
    assert opened.latent_shape == _stored_shape(family)
    assert opened.meta["latent"]["convention"]["formula"] == (
        "scale-shift" if family == "dc-ae" else "mean-std"
    )
    assert "canary" in opened.meta
    decode(path, store, str(tmp_path / "out"), fmt="png", client=client)
    assert read_output(str(tmp_path / "out"))[1].shape == (4, 32, 32, 3)
    assert main(["models", "show", str(path)]) == 0
    shown = " ".join(capsys.readouterr().out.split())
    names = {"flux2": "FLUX.2", "dc-ae": "DC-AE (Sana)", "qwen": "Qwen-Image"}
    assert f"family {names[family]}" in shown and "GiB per 512x512 image" in shown
    assert "convention z = " in shown and "precision auto:" in shown


@pytest.mark.parametrize("family", ["flux2", "dc-ae", "qwen"])
def test_the_new_families_take_any_fitting_size_and_tile_over_the_budget(
    family: str, family_models: dict[str, Path], tmp_path: Path, client: Client,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """The any-size rule (a multiple of the down-sampling factor, refused in a sentence
    otherwise) and tiling (an image over the memory budget decodes through the family's
    own tiled decode) hold for DC-AE, FLUX.2 and Qwen-Image as for the KL."""
    from latentbatch.config import MEMORY_ENV, ConfigError
    from latentbatch.models.checkpoint import read_info
    from latentbatch.stores.store import Layout, create_store

    path = family_models[family]
    info = read_info(path)
    factor = info.config.downsampling
    with pytest.raises(ConfigError, match=f"do not fit the {info.config.preset}: each side"):
        info.config.latent_shape_at(factor * 4 + factor // 2, factor * 4)
    size = (128, 192)
    shape = info.config.latent_shape_at(*size)
    url = str(tmp_path / "big.zarr")
    store = create_store(url, model_id=info.model_id, config=info.config, capacity=2,
                         layout=Layout(2, 2), image=size)  # fmt: skip
    store.write_rows(0, np.random.default_rng(1).standard_normal((2, *shape), dtype=np.float32),
                     ["a", "b"], np.full(2, -1))  # fmt: skip
    store.write_meta(count=2)
    whole = decode(path, url, str(tmp_path / "whole"), fmt="png", client=client)
    monkeypatch.setenv(MEMORY_ENV, "1")  # 1 MiB: under one 128x192 image's estimate
    assert info.config.decode_bytes(*size) > 2**20
    tiles = decode(path, url, str(tmp_path / "tiles"), fmt="png", client=client)
    assert not whole.tiled and tiles.tiled
    in_tiles = read_output(str(tmp_path / "tiles"))[1]
    assert in_tiles.shape == read_output(str(tmp_path / "whole"))[1].shape == (2, *size, 3)
    assert in_tiles.std() > 0


@pytest.fixture(scope="module")
def trained_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each family's model trained briefly on photo patches (tests/helpers.py
    ``train_family_vae``): one KL model for SD, SDXL, SD3, FLUX.1 and REPA, each saved
    with its family's config."""
    root = tmp_path_factory.mktemp("trained")
    trained = {
        family: train_family_vae(save_family_vae(root / family, family))
        for family in ("sd", "flux2", "dc-ae", "qwen")
    }
    weights = _vae(trained["sd"]).state_dict()
    for family in ("sdxl", "sd3", "flux1", "repa"):
        vae = _vae(save_family_vae(root / family, family))
        vae.load_state_dict(weights)
        vae.save_pretrained(str(root / family))
        trained[family] = root / family
    return trained


def _photo_latents(family: str, path: Path) -> np.ndarray:
    """Latents of 32 photo patches spread over the source, as the family's transformer
    sees them (a REPA cache's: scaled and biased from the model's)."""
    from latentbatch.models.weights import load_model
    from latentbatch.sources.images import Geometry, photos

    source = photos(Geometry(32, 3))
    rows = np.linspace(0, len(source) - 1, 32).astype(int)
    images = np.stack([source.read(int(r), int(r) + 1)[0] for r in rows])
    encoder, info = load_model(path, "encoder")
    with torch.no_grad():
        z = encoder(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255).numpy()
    if family == "repa":  # the cache's z = (vae_z - bias) * scale, vae_z = stored / scaling
        scaling = info.config.diffusers["scaling_factor"] if info.config.diffusers else 1.0
        scale = np.asarray(REPA_SCALE, np.float32).reshape(1, 4, 1, 1)
        bias = np.asarray(REPA_BIAS, np.float32).reshape(1, 4, 1, 1)
        z = (z / scaling - bias) * scale
    return np.ascontiguousarray(z, np.float32)


@pytest.mark.parametrize("family", FAMILY_MODELS)
def test_bf16_decodes_of_each_family_are_within_2_levels_of_fp32(
    family: str, trained_models: dict[str, Path], tmp_path: Path, client: Client
) -> None:
    """Import then decode in bf16 (CPU autocast) against fp32, every family and
    convention, on latents of photos: within 2 levels at every pixel, and not equal
    (bf16 ran)."""
    path = trained_models[family]
    x = _photo_latents(family, path)
    fp32 = _import_and_decode(family, path, x, tmp_path / "fp32", client, precision="fp32")
    bf16 = _import_and_decode(family, path, x, tmp_path / "bf16", client, precision="bf16")
    off = np.abs(bf16.astype(int) - fp32.astype(int))
    assert fp32.shape == (32, 32, 32, 3) and 1 <= off.max() <= 2


def test_random_init_weights_are_not_what_bf16_is_judged_on(
    family_models: dict[str, Path],
) -> None:
    """Why the bf16 test trains its models first: random-init KL weights, whose
    activations no image has shaped, put bf16 several levels off fp32."""
    from latentbatch.engine.kernel import decode_latents
    from latentbatch.models.weights import load_model

    decoder, _ = load_model(family_models["sd"], "decoder")
    x = np.random.default_rng(3).standard_normal((4, 4, 4, 4)).astype(np.float32)
    cpu = torch.device("cpu")
    fp32 = decode_latents(decoder, x, cpu).astype(int)
    assert np.abs(decode_latents(decoder, x, cpu, precision="bf16").astype(int) - fp32).max() > 2


def _documented_imports() -> dict[str, list[str]]:
    """docs/real-collections.md's block of one import command per family, by model name."""
    import re
    import shlex

    page = (Path(__file__).resolve().parents[1] / "docs" / "real-collections.md").read_text()
    blocks = [b.strip().splitlines() for b in re.findall(r"^```bash\n(.*?)^```", page, re.M | re.S)]
    (lines,) = [
        b for b in blocks if len(b) > 1 and all(x.startswith("latentbatch import") for x in b)
    ]
    return {line.split("models/", 1)[1].split()[0]: shlex.split(line)[1:] for line in lines}


def test_each_rows_import_command_in_the_docs_runs_offline(
    family_models: dict[str, Path], tiny_vae: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """docs/real-collections.md's import command of every row, run as written against
    the random-init models, with latents of each family's stored shape (FLUX.1's
    packed into sequences, REPA's with its cache's vectors as .npy files)."""
    commands = _documented_imports()
    assert set(commands) == {*FAMILY_MODELS, "taesd"}
    (tmp_path / "models").mkdir()
    rng = np.random.default_rng(2)
    for name, argv in commands.items():
        model = tiny_vae if name == "taesd" else family_models[name]
        (tmp_path / "models" / name).symlink_to(model)
        x = rng.standard_normal((6, *_stored_shape(name))).astype(np.float32)
        if name == "flux1":
            x = _flux_pack(torch.from_numpy(x), 6, 4, 4, 4).numpy()
        np.save(tmp_path / argv[argv.index("--from") + 1], x)
    np.save(tmp_path / "scale.npy", np.asarray(REPA_SCALE, np.float32))
    np.save(tmp_path / "bias.npy", np.asarray(REPA_BIAS, np.float32))
    monkeypatch.chdir(tmp_path)
    for name, argv in commands.items():
        assert main([*argv, "--workers", "1", "--no-progress"]) == 0, capsys.readouterr().err
        store = open_store(argv[argv.index("--store") + 1])
        assert store.count == 6, name
        found = store.meta["lineage"]["parameters"]
        mean_std = name in ("sdxl", "flux2", "qwen")
        assert found["convention"]["formula"] == ("mean-std" if mean_std else "scale-shift")
        assert found["packed"] == (name == "flux1")
        if name == "repa":
            assert found["convention"]["scale"] == pytest.approx(REPA_SCALE)
            assert found["convention"]["shift"] == pytest.approx(REPA_BIAS)
