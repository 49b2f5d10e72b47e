from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from latentbatch.errors import OutputError
from latentbatch.outputs.codecs import (
    PNG,
    ImageCodec,
    check_codec,
    codec_of_settings,
    decode_image,
    encode_png,
    encode_pngs,
)
from latentbatch.outputs.shards import build_tar

LOSSY = (ImageCodec(name="webp", quality=90), ImageCodec(name="jpeg", quality=90))


def digits(count: int, channels: int = 1) -> np.ndarray:
    """Digit-like images: dark background, a bright smooth blob."""
    y, x = np.mgrid[:28, :28]
    rng = np.random.default_rng(count)
    images = []
    for _ in range(count):
        cy, cx, r = rng.uniform(8, 20), rng.uniform(8, 20), rng.uniform(4, 8)
        blob = np.clip(255 * (1.5 - np.hypot(y - cy, x - cx) / r), 0, 255)
        images.append(np.repeat(blob[..., None], channels, axis=-1))
    return np.stack(images).astype(np.uint8)


@settings(max_examples=80, deadline=None)
@given(
    height=st.integers(1, 70),
    width=st.integers(1, 70),
    channels=st.sampled_from([1, 3]),
    seed=st.integers(0, 2**32 - 1),
    smooth=st.booleans(),
)
def test_png_of_every_mode_and_size_decodes_exactly_with_pillow(
    height: int, width: int, channels: int, seed: int, smooth: bool
) -> None:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    if smooth:  # digit-like: large flat areas, which compress
        image = (image > 200).astype(np.uint8) * 255
    data = encode_png(image)
    assert data == encode_png(image.copy())
    with Image.open(io.BytesIO(data)) as opened:
        assert opened.mode == ("L" if channels == 1 else "RGB")
        np.testing.assert_array_equal(np.asarray(opened).reshape(image.shape), image)
    assert encode_pngs(image[None].repeat(2, axis=0)) == [data, data]


def test_png_is_no_larger_than_pillows_on_digits() -> None:
    images = digits(32)
    ours = sum(len(d) for d in encode_pngs(images))
    pillow = 0
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image[..., 0]).save(buffer, format="PNG")
        pillow += len(buffer.getvalue())
    assert ours <= pillow * 1.1


@pytest.mark.parametrize("codec", [PNG, *LOSSY], ids=lambda c: c.name)
@pytest.mark.parametrize("channels", [1, 3])
def test_every_codec_is_deterministic_and_opens_with_webdataset(
    tmp_path: Path, codec: ImageCodec, channels: int
) -> None:
    import webdataset as wds

    images = digits(6, channels)
    encoded = codec.encode(images)
    assert encoded == codec.encode(images.copy())
    shard = tmp_path / "shard.tar"
    shard.write_bytes(build_tar([(f"k{i}.{codec.extension}", d) for i, d in enumerate(encoded)]))
    samples = list(wds.WebDataset(str(shard), shardshuffle=False).decode("rgb8"))
    assert [s["__key__"] for s in samples] == [f"k{i}" for i in range(6)]
    for sample, image in zip(samples, images, strict=True):
        pixels = sample[codec.extension].astype(int)  # webdataset gives RGB for every mode
        error = np.abs(pixels - np.repeat(image, 3 // channels, axis=-1)).mean()
        assert error == 0 if codec.lossless else error < 6
        ours = decode_image(encoded[0], "x", channels)
        assert ours.shape == images[0].shape


def test_lossy_quality_changes_the_bytes() -> None:
    images = digits(4)
    for name in ("webp", "jpeg"):
        low = check_codec(name, 10).encode(images)
        high = check_codec(name, 95).encode(images)
        assert sum(map(len, low)) < sum(map(len, high))


def test_codec_choices_and_settings() -> None:
    assert check_codec("png") == PNG
    assert check_codec("webp") == ImageCodec(name="webp", quality=90)
    assert check_codec("jpeg", 40).extension == "jpg"
    with pytest.raises(OutputError, match="unknown image codec 'gif'; choose one of png, webp"):
        check_codec("gif")
    with pytest.raises(OutputError, match="--quality applies to webp and jpeg"):
        check_codec("png", 50)
    with pytest.raises(OutputError, match="--quality 0 is out of range"):
        check_codec("jpeg", 0)
    for codec in (PNG, *LOSSY):
        assert codec_of_settings(codec.settings()) == codec
    assert codec_of_settings(None) == PNG  # outputs of releases before codecs


def test_images_that_cannot_be_encoded_are_named() -> None:
    with pytest.raises(OutputError, match=r"expected uint8 \(N, H, W, C\) with 1 or 3 channels"):
        PNG.encode(np.zeros((2, 4, 4, 2), np.uint8))
    with pytest.raises(OutputError, match="dtype float32"):
        PNG.encode(np.zeros((2, 4, 4, 1), np.float32))


def test_unreadable_image_is_named() -> None:
    with pytest.raises(OutputError, match=r"shard-000001\.tar: a\.png is not a readable image"):
        decode_image(b"\x89PNG broken", "shard-000001.tar: a.png")


def test_tar_member_names_follow_the_codec(tmp_path: Path) -> None:
    from latentbatch.outputs.shards import write_shard

    images = digits(2)
    record = write_shard(
        str(tmp_path),
        None,
        "tar",
        index=0,
        start=0,
        ids=["a", "b"],
        images=images,
        codec=LOSSY[1],
    )
    with tarfile.open(tmp_path / record.path) as tar:
        assert tar.getnames() == ["a.jpg", "b.jpg"]
    with pytest.raises(OutputError, match="the png format holds PNG images, not webp"):
        write_shard(
            str(tmp_path),
            None,
            "png",
            index=1,
            start=2,
            ids=["c"],
            images=images[:1],
            codec=LOSSY[0],
        )


# sha256 of fixed images through each codec, with the pinned imagecodecs (constraints.txt):
# byte-identical shards across machines need the same bytes on every host, whatever its
# CPU (this test also runs on the GPU machine, bench/gpu_check.sh)
GOLDEN = {
    "png": "0a8ec0cd4403b9651fdcf34c50de397fd1c50f980700d8bc6fc29bb832271b4b",
    "webp": "e36bd74cadf9a5d7ec2bff5805df160ef85b8924380a1e9be4020d70a0406513",
    "jpeg": "c7e1b61b0c0f9882591eb16a8208ca9d5d155b67e590edafdf9ea8cdb32b421e",
}


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_codec_bytes_are_the_same_on_every_machine(name: str) -> None:
    import hashlib

    rng = np.random.default_rng(20261127)
    grey = (rng.random((16, 28, 28, 1)) ** 3 * 255).astype(np.uint8)
    rgb = (rng.random((4, 64, 64, 3)) * 255).astype(np.uint8)
    codec = check_codec(name)
    encoded = codec.encode(grey) + (codec.encode(rgb) if name == "png" else [])
    assert hashlib.sha256(b"".join(encoded)).hexdigest() == GOLDEN[name]
