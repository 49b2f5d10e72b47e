"""A store's neighbours index (stores/neighbours.py): exact search equals a scan, an
inverted file finds most true neighbours, the index follows the committed count, and
`query --near` answers from it as from a scan."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from distributed import Client

from latentbatch.encode import encode
from latentbatch.stores import neighbours
from latentbatch.stores.neighbours import build_index, has_index, index_url, load_index, search
from latentbatch.stores.query import nearest
from latentbatch.stores.store import Layout, open_store
from latentbatch.uses.distances import squared_distances


@pytest.fixture(scope="module")
def store_url(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, client: Client) -> str:
    url = str(tmp_path_factory.mktemp("neighbours") / "s.zarr")
    encode(tiny_model, "synthetic:300", url, layout=Layout(64, 16), client=client)
    return url


def _exact(store_url: str, queries: np.ndarray, k: int) -> np.ndarray:
    store = open_store(store_url)
    flat = store.read_latents(0, store.count).reshape(store.count, -1).astype(np.float32)
    squared = squared_distances(queries.reshape(len(queries), -1).astype(np.float32), flat)
    return np.argsort(squared, axis=1, kind="stable")[:, :k]


def test_an_exact_index_finds_what_a_scan_finds(store_url: str, tmp_path: Path) -> None:
    copy = str(shutil.copytree(store_url, tmp_path / "s.zarr"))
    store = open_store(copy)
    assert not has_index(store)
    url = build_index(store)
    assert url == index_url(store) and has_index(store)
    queries = store.read_latents(0, 40)
    squared, rows = search(load_index(url, None), queries, 5)
    assert (rows[:, 0] == np.arange(40)).all() and np.allclose(squared[:, 0], 0, atol=1e-3)
    assert (np.sort(rows, axis=1) == np.sort(_exact(copy, queries, 5), axis=1)).mean() > 0.98


def test_an_inverted_file_finds_most_true_neighbours(
    store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(neighbours, "EXACT_ROWS", 100)
    copy = str(shutil.copytree(store_url, tmp_path / "s.zarr"))
    store = open_store(copy)
    index = load_index(build_index(store), None)
    assert type(index).__name__ == "IndexIVFFlat" and index.nlist == int(4 * 300**0.5)
    queries = store.read_latents(100, 200)
    _, rows = search(index, queries, 5)
    truth = _exact(copy, queries, 5)
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(rows, truth, strict=True)])
    assert recall >= 0.9


def test_the_index_follows_the_count_and_query_near_reads_it(
    store_url: str, tmp_path: Path, tiny_model: Path, client: Client
) -> None:
    copy = str(shutil.copytree(store_url, tmp_path / "s.zarr"))
    store = open_store(copy)
    query = store.read_latents(7, 8)[0]
    scanned = nearest(store, query, 6, exclude=[7])
    first = build_index(store)
    indexed = nearest(store, query, 6, exclude=[7])
    assert [n.row for n in indexed] == [n.row for n in scanned]
    assert np.allclose([n.distance for n in indexed], [n.distance for n in scanned], atol=1e-3)
    encode(tiny_model, "digits", copy, append=True, limit=10, client=client)
    grown = open_store(copy)
    assert not has_index(grown)  # rows appended: that index no longer covers the store
    second = build_index(grown)
    assert second != first and not Path(first).exists() and Path(second).exists()
