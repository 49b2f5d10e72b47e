"""The names people choose from, importable without the engine: the command line's help
and checks, and the flows' forms, list them from here."""

from __future__ import annotations

from typing import Literal

SOURCES = ("mnist5k", "digits", "photos", "synthetic", "folder:PATH")  # latentbatch.sources.images
Format = Literal["tar", "zarr", "png", "npz"]  # output shards (latentbatch.outputs.shards)
FORMATS: tuple[Format, ...] = ("tar", "zarr", "png", "npz")
QUALITIES = (5, 10, 20, 30, 50, 70, 90)  # JPEG/WebP qualities evaluate compares with
