"""Image codecs of output shards: PNG (lossless), WebP and JPEG (lossy, ``quality``).

::

    ImageCodec(name="png")                  own small PNG writer: the batch's rows are
                                            filtered in one numpy step, each image is one
                                            zlib-ng call (imagecodecs, GIL released), level 1
    ImageCodec(name="webp", quality=90)     libwebp through imagecodecs
    ImageCodec(name="jpeg", quality=90)     libjpeg-turbo through imagecodecs (4:2:0 for RGB)

Every codec gives the same bytes for the same pixels and settings, so shards stay
byte-identical across runs. :meth:`ImageCodec.settings` is what a decode records in its
manifest and shard records: outputs made with other settings are never mixed.

Why a PNG writer of our own: a decoded 28×28 digit costs Pillow about 65–85 µs, and
imagecodecs' libpng and libspng encoders 40–45 µs; the stdlib's zlib alone takes 11–19 µs
for its 812 bytes, zlib-ng's level 1 (``deflate_quick``) about 6 µs for the same size. The
writer below is the PNG format's minimum (signature, IHDR, one IDAT, IEND, filter type 0)
around one zlib-ng call. ``bench/decode.py`` measures it against Pillow. Pillow and the
``webdataset`` library decode it pixel-exact (tested with hypothesis-generated images of
every supported mode and size). Its bytes are fixed by the writer and zlib-ng's version,
both recorded in the settings.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from typing import Any, Literal

import imagecodecs
import numpy as np
from PIL import Image

from latentbatch.errors import OutputError

CodecName = Literal["png", "webp", "jpeg"]
CODECS: tuple[CodecName, ...] = ("png", "webp", "jpeg")
EXTENSIONS: dict[str, str] = {"png": "png", "webp": "webp", "jpeg": "jpg"}
DEFAULT_QUALITY = 90
PNG_LEVEL = 1  # zlib-ng level: files as small as Pillow's level 6 on digits
PNG_WRITER = "latentbatch-png-1"  # names the PNG writer's bytes; another writer, other name

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLOUR_TYPES = {1: 0, 3: 2}  # channels → PNG colour type (grey, RGB)


@dataclass(frozen=True, kw_only=True)
class ImageCodec:
    """How decoded images become files: the codec, and its quality when lossy."""

    name: CodecName = "png"
    quality: int | None = None

    @property
    def extension(self) -> str:
        """File extension of its images (``png``, ``webp``, ``jpg``)."""
        return EXTENSIONS[self.name]

    @property
    def lossless(self) -> bool:
        return self.name == "png"

    @property
    def useful_threads(self) -> int:
        """Encoding threads beyond which this codec gets slower, not faster: each call
        holds the GIL around a short codec run, and more threads only fight over it.
        Measured by ``bench/encode.py`` on a 16-core host (bench/results): PNG 73k
        images/s on 1 thread, 31k on 16; JPEG best on 2; WebP (long codec runs) scales to
        16."""
        return {"png": 1, "jpeg": 2}.get(self.name, 64)

    def settings(self) -> dict[str, Any]:
        """What shapes the bytes: recorded in manifests and shard records."""
        if self.name == "png":
            return {
                "image_codec": "png",
                "png_writer": PNG_WRITER,
                "png_level": PNG_LEVEL,
                "zlib_ng": imagecodecs.zlibng_version(),
            }
        return {
            "image_codec": self.name,
            "quality": self.quality,
            "encoder": f"imagecodecs-{imagecodecs.__version__}",
        }

    def encode(self, images: np.ndarray) -> list[bytes]:
        """Every image of a batch ``uint8 (N, H, W, C)`` (C = 1 or 3) as file bytes."""
        _check_images(images)
        if self.name == "png":
            return encode_pngs(images)
        quality = DEFAULT_QUALITY if self.quality is None else self.quality
        if self.name == "jpeg":
            return [bytes(imagecodecs.jpeg8_encode(_planes(i), level=quality)) for i in images]
        # libwebp takes RGB only: a grey image goes in as three equal planes
        rgb = images if images.shape[-1] == 3 else np.repeat(images, 3, axis=-1)
        return [
            bytes(imagecodecs.webp_encode(i, level=quality, lossless=False, method=4)) for i in rgb
        ]


PNG = ImageCodec(name="png")


def check_codec(name: str, quality: int | None = None) -> ImageCodec:
    """The codec called ``name`` (with ``quality`` for a lossy one), or an
    :class:`OutputError` saying what to choose."""
    for known in CODECS:
        if name == known:
            break
    else:
        raise OutputError(f"unknown image codec {name!r}; choose one of {', '.join(CODECS)}")
    if known == "png":
        if quality is not None:
            raise OutputError("--quality applies to webp and jpeg; png is lossless")
        return PNG
    quality = DEFAULT_QUALITY if quality is None else quality
    if not 1 <= quality <= 100:
        raise OutputError(f"--quality {quality} is out of range; choose 1 to 100")
    return ImageCodec(name=known, quality=quality)


def codec_of_settings(settings: dict[str, Any] | None) -> ImageCodec:
    """The codec recorded in a manifest's ``format_settings`` (PNG when absent: the
    outputs of releases before codecs)."""
    settings = settings or {}
    name = str(settings.get("image_codec", "png"))
    if name == "png":
        return PNG
    return ImageCodec(name=check_codec(name).name, quality=settings.get("quality"))


def _check_images(images: np.ndarray) -> None:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in _COLOUR_TYPES:
        raise OutputError(
            f"images of dtype {images.dtype} and shape {images.shape} cannot be encoded; "
            "expected uint8 (N, H, W, C) with 1 or 3 channels"
        )


def _planes(image: np.ndarray) -> np.ndarray:
    return image[..., 0] if image.shape[-1] == 1 else image


def _chunk(tag: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(data, zlib.crc32(tag))
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)


def encode_pngs(images: np.ndarray) -> list[bytes]:
    """PNGs of a batch ``uint8 (N, H, W, C)``, C = 1 (grey) or 3 (RGB), deterministic."""
    _check_images(images)
    count, height, width, channels = images.shape
    # filter type 0 (None) on every scanline: one zero byte in front of each row
    rows = np.zeros((count, height, 1 + width * channels), np.uint8)
    rows[:, :, 1:] = images.reshape(count, height, width * channels)
    header = struct.pack(">IIBBBBB", width, height, 8, _COLOUR_TYPES[channels], 0, 0, 0)
    head = _SIGNATURE + _chunk(b"IHDR", header)
    tail = _chunk(b"IEND", b"")
    return [
        head + _chunk(b"IDAT", bytes(imagecodecs.zlibng_encode(r, level=PNG_LEVEL))) + tail
        for r in rows
    ]


def encode_png(image: np.ndarray) -> bytes:
    """One ``uint8 (H, W, C)`` image as PNG bytes (see :func:`encode_pngs`)."""
    return encode_pngs(image[None])[0]


def decode_image(data: bytes, where: str, channels: int | None = None) -> np.ndarray:
    """File bytes of any codec here → ``uint8 (H, W, C)``; ``channels=1`` turns a lossy
    codec's RGB back into grey. Unreadable bytes raise an :class:`OutputError` naming
    ``where``."""
    try:
        with Image.open(io.BytesIO(data)) as opened:
            image = opened.convert("L") if channels == 1 and opened.mode != "L" else opened
            pixels = np.asarray(image)
    except OSError as exc:  # PIL's UnidentifiedImageError included
        raise OutputError(
            f"{where} is not a readable image ({exc}); run the decode again, which redoes it"
        ) from None
    return pixels[..., None] if pixels.ndim == 2 else pixels
