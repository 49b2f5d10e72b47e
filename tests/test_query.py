from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from distributed import Client

from latentbatch.encode import encode
from latentbatch.stores import query as query_module
from latentbatch.stores.query import (
    QueryError,
    iter_select,
    nearest,
    parse_rows,
    read_rows,
    select,
    statistics,
    to_xarray,
    worst,
)
from latentbatch.stores.store import Layout, open_store


@pytest.fixture(scope="module")
def everything(mnist_store: Path) -> np.ndarray:
    store = open_store(str(mnist_store))
    return store.read_latents(0, store.count).astype(np.float32)


def test_selection_by_ids_rows_label_and_predicates(mnist_store: Path) -> None:
    store = open_store(str(mnist_store))
    labels = store.read_labels(0, store.count)
    assert select(store, ids=["mnist5k-00007", "mnist5k-00003"]).tolist() == [3, 7]
    assert select(store, rows=[(10, 13), (4998, -1)]).tolist() == [10, 11, 12, 4998, 4999]
    assert select(store, label=7).tolist() == np.flatnonzero(labels == 7).tolist()
    both = select(store, label=3, where=["row < 1600", "row >= 1550"])
    assert both.tolist() == [r for r in range(1550, 1600) if labels[r] == 3]
    assert select(store, ids=["mnist5k-00001"], label=9).tolist() == []  # empty, not an error
    assert len(select(store)) == 5000


def test_selections_come_a_store_shard_at_a_time(mnist_store: Path) -> None:
    store = open_store(str(mnist_store))
    labels = store.read_labels(0, store.count)
    chunks = list(iter_select(store, where=["label != 4"]))
    assert len(chunks) == len(store.shards())  # every shard holds digits other than 4
    for chunk in chunks:
        assert len(set(chunk // store.shard_rows)) == 1  # each chunk within one shard
    assert np.concatenate(chunks).tolist() == np.flatnonzero(labels != 4).tolist()
    late = list(iter_select(store, rows=[(4990, -1)], where=["row != 4995"]))
    assert [c.tolist() for c in late] == [[4990, 4991, 4992, 4993, 4994, 4996, 4997, 4998, 4999]]
    by_id = list(iter_select(store, ids=["mnist5k-04000", "mnist5k-00002"]))
    assert [c.tolist() for c in by_id] == [[2], [4000]]
    with pytest.raises(QueryError, match="1 ids are not in"):
        next(iter_select(store, ids=["mnist5k-00002", "nope"]))  # before any row comes


def test_worst_reconstructed_and_psnr_predicates_equal_brute_force(mnist_store: Path) -> None:
    store = open_store(str(mnist_store))
    psnrs = store.read_quality(0, store.count).astype(np.float64)
    expected = np.lexsort((np.arange(len(psnrs)), psnrs))[:10]
    assert worst(store, 10).tolist() == expected.tolist()
    assert worst(store, 1).tolist() == [int(np.argmin(psnrs))]
    threshold = float(np.percentile(psnrs, 3))
    chosen = select(store, where=[f"psnr < {threshold:.3f}"])
    assert chosen.tolist() == np.flatnonzero(psnrs < round(threshold, 3)).tolist()
    both = select(store, label=1, where=["psnr >= 25"])
    labels = store.read_labels(0, store.count)
    assert both.tolist() == np.flatnonzero((labels == 1) & (psnrs >= 25)).tolist()
    with pytest.raises(QueryError, match="at least 1"):
        worst(store, 0)


def test_stores_of_earlier_releases_answer_without_psnr(tmp_path: Path, mnist_store: Path) -> None:
    shutil.copytree(mnist_store, tmp_path / "old.zarr")
    shutil.rmtree(tmp_path / "old.zarr" / "quality")  # as an earlier release wrote it
    store = open_store(str(tmp_path / "old.zarr"))
    assert (
        select(store, label=1, rows=[(0, 600)]).tolist()
        == select(open_store(str(mnist_store)), label=1, rows=[(0, 600)]).tolist()
    )
    assert statistics(store).psnr is None
    for attempt in (lambda: worst(store, 3), lambda: select(store, where=["psnr < 20"])):
        with pytest.raises(QueryError, match=r"records no per-image PSNR .*re-encode"):
            attempt()


def test_statistics_report_the_psnr_distribution(mnist_store: Path) -> None:
    store = open_store(str(mnist_store))
    psnrs = store.read_quality(0, store.count).astype(np.float64)
    found = statistics(store).psnr
    assert found is not None and found["measured"] == store.count
    assert found["mean"] == pytest.approx(psnrs.mean())
    assert (found["min"], found["max"]) == (psnrs.min(), psnrs.max())
    for q in (1, 5, 50, 95):
        assert found[f"p{q}"] == pytest.approx(np.percentile(psnrs, q), abs=0.02)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ids": ["mnist5k-00001", "nope"]}, "1 ids are not in .*'nope'"),
        ({"where": ["label = 3"]}, "predicate 'label = 3' is not FIELD OP NUMBER"),
        ({"where": ["colour > 1"]}, "is not FIELD OP NUMBER"),
        ({"where": ["label < 2.5"]}, "is not FIELD OP NUMBER with FIELD row, label .integers"),
    ],
)
def test_bad_selections_are_named(mnist_store: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(QueryError, match=message):
        select(open_store(str(mnist_store)), **kwargs)


def test_row_ranges_parse() -> None:
    assert parse_rows("3:9") == (3, 9)
    assert parse_rows(":5") == (0, 5)
    assert parse_rows("7:") == (7, -1)
    with pytest.raises(QueryError, match="is not I:J"):
        parse_rows("7")


def test_labels_are_required_for_label_queries(
    tmp_path: Path, tiny_model: Path, client: Client
) -> None:
    from tests.helpers import write_image

    for i in range(3):
        write_image(tmp_path / "imgs" / f"{i}.png", i, mode="L")
    url = str(tmp_path / "s.zarr")
    encode(tiny_model, f"folder:{tmp_path / 'imgs'}", url, layout=Layout(4, 2), client=client)
    store = open_store(url)
    assert not store.has_labels
    with pytest.raises(QueryError, match="has no labels"):
        select(store, label=1)


def test_xarray_view(mnist_store: Path, everything: np.ndarray) -> None:
    store = open_store(str(mnist_store))
    rows = select(store, rows=[(100, 103)])
    array = to_xarray(store, rows)
    assert array.dims == ("sample", "channel", "y", "x")
    assert array.sample.values.tolist() == ["mnist5k-00100", "mnist5k-00101", "mnist5k-00102"]
    np.testing.assert_array_equal(array.values, everything[100:103])
    np.testing.assert_array_equal(read_rows(store, np.array([102, 100])), everything[[102, 100]])


def test_statistics_equal_numpy(tmp_path: Path, mnist_store: Path, everything: np.ndarray) -> None:
    import shutil

    store = open_store(str(Path(shutil.copytree(mnist_store, tmp_path / "s.zarr"))), writable=True)
    stats = statistics(store, save=True)
    values = everything.astype(np.float64)
    np.testing.assert_allclose(stats.mean, values.mean(axis=(0, 2, 3)), rtol=1e-9)
    np.testing.assert_allclose(stats.std, values.std(axis=(0, 2, 3)), rtol=1e-9)
    np.testing.assert_array_equal(stats.min, values.min(axis=(0, 2, 3)))
    np.testing.assert_array_equal(stats.max, values.max(axis=(0, 2, 3)))
    assert stats.scaling_factor == pytest.approx(1 / values.std())
    saved = open_store(store.url).meta["stats"]
    assert saved["scaling_factor"] == pytest.approx(stats.scaling_factor)


@pytest.mark.parametrize("window", [1, 32])  # one store shard at a time, or all five
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_nearest_equals_brute_force(
    mnist_store: Path,
    everything: np.ndarray,
    metric: str,
    window: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(query_module, "NEAREST_WINDOW", window)
    store = open_store(str(mnist_store))
    query = everything[1234]
    found = nearest(store, query, k=7, metric=metric)  # type: ignore[arg-type]
    flat = everything.reshape(len(everything), -1).astype(np.float64)
    q = query.reshape(-1).astype(np.float64)
    if metric == "l2":
        distances = np.sqrt(((flat - q) ** 2).sum(axis=1))
    else:
        distances = 1 - flat @ q / (np.linalg.norm(flat, axis=1) * np.linalg.norm(q))
    expected = np.lexsort((np.arange(len(distances)), distances))[:7]
    assert [n.row for n in found] == expected.tolist()
    np.testing.assert_allclose(
        [n.distance for n in found], distances[expected], rtol=1e-4, atol=1e-5
    )
    assert found[0].id == "mnist5k-01234"


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_neighbours_mostly_share_the_label(
    mnist_store: Path, everything: np.ndarray, metric: str
) -> None:
    store = open_store(str(mnist_store))
    labels = store.read_labels(0, store.count)
    queries = np.random.default_rng(0).choice(store.count, size=50, replace=False)
    same = []
    for row in queries:
        found = nearest(store, everything[row], k=10, metric=metric, exclude=[int(row)])  # type: ignore[arg-type]
        same.append(sum(labels[n.row] == labels[row] for n in found))
    print(f"{metric}: {np.mean(same):.2f} of 10 neighbours share the query's label")
    assert np.mean(same) >= 8


def test_bad_neighbour_queries(mnist_store: Path, everything: np.ndarray) -> None:
    store = open_store(str(mnist_store))
    with pytest.raises(QueryError, match="-k must be between 1 and 5000"):
        nearest(store, everything[0], k=5001)
    with pytest.raises(QueryError, match="query latent has shape"):
        nearest(store, everything[0][:3])
    with pytest.raises(QueryError, match="unknown metric"):
        nearest(store, everything[0], metric="l1")  # type: ignore[arg-type]


def test_saving_statistics_waits_for_no_writer_and_keeps_what_it_wrote(
    tmp_path: Path, mnist_store: Path
) -> None:
    """stats --save rewrites the store's metadata: under the store's lease, from metadata
    read afresh, so it neither races an encode nor puts back what another writer changed."""
    import shutil

    from latentbatch.storage.lease import Lease, LeaseHeldError

    url = str(shutil.copytree(mnist_store, tmp_path / "s.zarr"))
    stale = open_store(url, writable=True)
    holder = Lease(url, None, "encode of more digits", 60)
    holder.acquire()
    with pytest.raises(LeaseHeldError, match="being written by another encode of more digits"):
        statistics(stale, save=True)
    other = open_store(url, writable=True)
    other.write_meta(labels=False)  # another writer's change, after `stale` was opened
    holder.release()
    statistics(stale, save=True)
    saved = open_store(url).meta
    assert "stats" in saved and saved["labels"] is False
