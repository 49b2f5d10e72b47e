"""Rate–distortion evaluation: the model's point measured as a store holds its latents,
JPEG and WebP on the same images."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from distributed import Client
from PIL import Image

from latentbatch.cli import main
from latentbatch.config import DEFAULT_LAMBDA
from latentbatch.decode import decode_rows
from latentbatch.encode import encode
from latentbatch.errors import ConfigError
from latentbatch.evaluation import codec_point, evaluate, evaluation_images
from latentbatch.models.autoencoder import to_unit
from latentbatch.models.checkpoint import read_info
from latentbatch.models.quality import psnr
from latentbatch.models.weights import load_model
from latentbatch.stores.store import open_store
from tests.helpers import train_tiny_codec


def test_the_models_point_is_what_a_store_of_those_images_holds(
    tmp_path: Path, tiny_model: Path, client: Client
) -> None:
    result = evaluate(tiny_model, "synthetic:40", split="all", qualities=(10, 90))
    assert result.split == "all" and result.images == 40
    store_url = str(tmp_path / "s.zarr")
    encode(tiny_model, "synthetic:40", store_url, client=client)
    store = open_store(store_url)
    assert result.model.bpp == store.report(with_bytes=True)["bits_per_pixel"]  # as inspect
    images = evaluation_images(read_info(tiny_model), "synthetic:40", "all")[0]
    decoded = decode_rows(tiny_model, store, range(40))
    expected = psnr(to_unit(torch.from_numpy(images)), to_unit(torch.from_numpy(decoded)))
    assert result.model.psnr == pytest.approx(expected, abs=1e-9)
    assert 0 < result.model.ms_ssim < 1
    for name in ("jpeg", "webp"):
        low, high = result.codecs[name]
        assert (low.quality, high.quality) == (10, 90)
        assert high.bpp > low.bpp and high.psnr > low.psnr and high.ms_ssim > low.ms_ssim


def test_the_validation_split_is_the_trainings(tiny_model: Path) -> None:
    info = read_info(tiny_model)
    training = info.meta["training"]
    images, used = evaluation_images(info, "synthetic:96")  # the source it was trained on
    assert used == "validation" and len(images) == training["split"]["validation"] == 24
    images, used = evaluation_images(info, "synthetic:30")  # a source it never saw
    assert used == "all" and len(images) == 30


def test_codec_points_count_the_encoded_bytes() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 16, 16, 1), dtype=np.uint8)
    point = codec_point(images, "jpeg", 50)
    total = 0
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image[..., 0]).save(buffer, format="JPEG", quality=50)
        total += buffer.tell()
    assert point.bpp == 8 * total / (5 * 16 * 16)
    with pytest.raises(ConfigError, match="unknown codec 'gif'"):
        codec_point(images, "gif", 50)
    with pytest.raises(ConfigError, match="must be integers from 1 to 100"):
        evaluate(Path("unused"), "synthetic:4", qualities=(0,))


def test_cli_evaluate_prints_json_and_draws_the_plot(
    tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plot = tmp_path / "rd.png"
    argv = ["evaluate", str(tiny_model), "--data", "synthetic:96", "--quality", "20"]
    assert main([*argv, "--quality", "80", "--plot", str(plot), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["split"] == "validation" and report["images"] == 24
    assert set(report["model"]) == {"psnr", "ms_ssim", "bpp"}
    assert [p["quality"] for p in report["jpeg"]] == [20, 80]
    assert set(report["webp"][0]) == {"quality", "psnr", "ms_ssim", "bpp"}
    with Image.open(plot) as picture:
        assert picture.format == "PNG" and picture.width > 500
    assert main([*argv, "--plot", str(plot)]) == 0
    table = capsys.readouterr().out
    assert "Pillow WEBP" in table and "bits/pixel" in table
    assert main([*argv, "--split", "train"]) == 1
    assert "--split 'train' is not validation or all" in capsys.readouterr().err


def test_a_codec_models_point_has_its_estimated_rate_beside_the_stored_one(
    tiny_codec_model: Path,
) -> None:
    result = evaluate(tiny_codec_model, "synthetic:96", qualities=(50,))
    point = result.model
    assert point.estimated_bpp is not None and point.bpp > 0
    model, info = load_model(tiny_codec_model)
    images, _ = evaluation_images(info, "synthetic:96")
    with torch.inference_mode():
        symbols = model.encoder(to_unit(torch.from_numpy(images)))
        bits = float(model.prior.bits(symbols).sum())
    assert point.estimated_bpp == pytest.approx(bits / (len(images) * 16 * 16), rel=1e-6)
    assert result.to_dict()["models"][0]["lambda"] == DEFAULT_LAMBDA


def test_several_models_share_the_images_and_codec_models_make_one_curve(
    tmp_path: Path, tiny_model: Path, tiny_codec_model: Path, seed_model: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    dearer = train_tiny_codec(tmp_path / "dearer", rate_lambda=0.05).model_dir
    result = evaluate([tiny_codec_model, dearer, tiny_model], "synthetic:96", qualities=(50,))
    assert [m.rate_lambda for m in result.models] == [DEFAULT_LAMBDA, 0.05, None]
    alone = evaluate(dearer, "synthetic:96", qualities=(50,))
    assert result.models[1].point == alone.model  # the same images, the same measurement
    curves = result.curves()
    codec = curves["latentbatch codec (lambda)"]
    assert [p["label"] for p in codec] == ["0.01", "0.05"]
    assert [p["bpp"] for p in codec] == [m.point.bpp for m in result.models[:2]]
    assert [p["label"] for p in curves["Pillow JPEG"]] == ["50"]
    assert result.models[2].name in curves  # a model without a lambda is its own point
    with pytest.raises(ConfigError, match="validated on other images"):
        evaluate([tiny_model, seed_model], "synthetic:96", qualities=(50,))
    plot = tmp_path / "rd.png"
    argv = ["evaluate", str(tiny_codec_model), str(dearer), "--data", "synthetic:96"]
    assert main([*argv, "--quality", "50", "--plot", str(plot), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [m["lambda"] for m in report["models"]] == [DEFAULT_LAMBDA, 0.05]
    assert report["model"] == {k: report["models"][0][k] for k in report["model"]}
    assert plot.is_file()
