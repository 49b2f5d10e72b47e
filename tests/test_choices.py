"""The names people choose from are the ones the engine accepts."""

from __future__ import annotations

import pytest

from latentbatch.choices import FORMATS, QUALITIES, SOURCES
from latentbatch.errors import DataError
from latentbatch.outputs.shards import OutputError, check_format
from latentbatch.sources.images import Geometry, open_source


def test_every_listed_source_opens_and_others_are_refused_naming_them() -> None:
    geometry = Geometry(28, 1)
    for name in SOURCES:
        if name in ("synthetic", "digits"):  # the quick ones; the others in test_datasets
            assert len(open_source(name, geometry, limit=4)) == 4
    with pytest.raises(DataError, match=", ".join(SOURCES)):
        open_source("nope", geometry)


def test_formats_and_qualities() -> None:
    assert [check_format(f) for f in FORMATS] == list(FORMATS)
    with pytest.raises(OutputError, match="choose one of tar, zarr, png"):
        check_format("gif")
    assert list(QUALITIES) == sorted(QUALITIES) and all(1 <= q <= 100 for q in QUALITIES)
