"""Pictures of what the engine did: rows of images for the flows' artifacts and --grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from distributed import Client

from latentbatch.datasets import Geometry, open_source
from latentbatch.decode import decode_rows
from latentbatch.encode import encode
from latentbatch.previews import anomaly_preview, selection_preview
from latentbatch.store import Layout, open_store


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, client: Client) -> str:
    url = str(tmp_path_factory.mktemp("previews") / "s.zarr")
    encode(tiny_model, "synthetic:30", url, layout=Layout(16, 8), client=client)
    encode(tiny_model, "digits", url, append=True, limit=10, client=client)
    return url


def test_anomaly_preview_puts_source_images_above_reconstructions(
    store: str, tiny_model: Path
) -> None:
    opened = open_store(store)
    rows = [35, 2, 31]  # two sources
    top, bottom = anomaly_preview(tiny_model, opened, rows)
    geometry = Geometry(16, 1)
    np.testing.assert_array_equal(top[0], open_source("digits", geometry).read(5, 6)[0])
    np.testing.assert_array_equal(top[1], open_source("synthetic:30", geometry).read(2, 3)[0])
    np.testing.assert_array_equal(bottom, decode_rows(tiny_model, opened, rows))


def test_anomaly_preview_without_sources_shows_reconstructions(
    store: str, tiny_model: Path, tmp_path: Path
) -> None:
    import shutil

    copy = str(shutil.copytree(store, tmp_path / "s.zarr"))
    opened = open_store(copy, writable=True)
    opened.write_meta(sources=[])  # where the images came from is unknown
    assert len(anomaly_preview(tiny_model, open_store(copy), [1, 2])) == 1


def test_selection_preview_lays_rows_out_eight_to_a_line(store: str, tiny_model: Path) -> None:
    lines = selection_preview(tiny_model, open_store(store), range(20))
    assert [len(line) for line in lines] == [8, 8, 4]
    near = selection_preview(
        tiny_model,
        open_store(store),
        range(12),
        query_latent=open_store(store).read_latents(0, 1)[0],
    )
    assert [len(line) for line in near] == [11]  # the query, then its first ten neighbours
