"""Pictures of what the engine did: rows of images for the flows' artifacts and --grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from distributed import Client

from latentbatch.decode import decode_rows
from latentbatch.encode import encode
from latentbatch.errors import LatentbatchError
from latentbatch.previews import anomaly_preview, selection_preview
from latentbatch.sources.images import Geometry, open_source
from latentbatch.stores.store import Layout, open_store


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


def test_derived_previews_follow_the_operation(
    tmp_path: Path, tiny_model: Path, client: Client
) -> None:
    from latentbatch.previews import derived_preview
    from latentbatch.uses.generation import generate
    from latentbatch.uses.manipulation import interpolate, shift

    digits = str(tmp_path / "digits.zarr")
    encode(tiny_model, "digits", digits, layout=Layout(64, 32), limit=200, client=client)
    generate(digits, str(tmp_path / "g.zarr"), count=12, labels=[1, 2, 3], client=client)
    lines = derived_preview(tiny_model, open_store(str(tmp_path / "g.zarr")))
    assert [len(line) for line in lines] == [10, 10, 10]  # a line per label
    generated = open_store(str(tmp_path / "g.zarr"))
    np.testing.assert_array_equal(lines[1], decode_rows(tiny_model, generated, range(12, 22)))
    ids = open_store(digits).read_ids(0, 2)
    interpolate(digits, *ids, str(tmp_path / "i.zarr"), steps=25, client=client)
    (strip,) = derived_preview(tiny_model, open_store(str(tmp_path / "i.zarr")))
    assert len(strip) == 10  # evenly spaced, both ends
    shift(digits, str(tmp_path / "s.zarr"), from_label=7, to_label=1, client=client)
    shifted = open_store(str(tmp_path / "s.zarr"))
    before, after = derived_preview(tiny_model, shifted, per_row=4)
    sevens = open_store(digits).read_labels(0, 200) == 7
    first = np.flatnonzero(sevens)[:4]
    np.testing.assert_array_equal(before, decode_rows(tiny_model, open_store(digits), first))
    np.testing.assert_array_equal(after, decode_rows(tiny_model, shifted, range(4)))
    with pytest.raises(LatentbatchError, match="not a derived store"):
        derived_preview(tiny_model, open_store(digits))
