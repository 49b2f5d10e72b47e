"""A store's nearest-neighbour index: faiss over its committed latents (flat, float32,
squared L2), built once and kept beside them in the store's folder, so that every task
that searches the store (``latentbatch score``'s, ``query --near``) loads it instead of
reading the whole store.

::

    STORE/neighbours-UUID12-COUNT.faiss     faiss.serialize_index's bytes

The name holds the store's uuid and committed count: rows appended later make a new
index (the older one is removed when the new one is written); two builders write the
same bytes under a temporary name and rename, so neither sees half an index. A store
whose folder cannot take the file (a read-only reference) is indexed in each process
that searches it instead (:func:`built_index`).

Up to :data:`EXACT_ROWS` rows the index is exact (``IndexFlatL2``). Above, it is an
inverted file (``IndexIVFFlat``: ``4 x sqrt(rows)`` clusters trained by k-means on a
seeded sample of at most 64 rows a cluster, searched in :data:`NPROBE` of them): a query
then compares with about ``NPROBE / clusters`` of the rows, and ``bench/score.py``
measures its recall against exact search. Memory: the index holds every latent once,
``rows x values x 4`` bytes (4 GB for a million 4x16x16 latents), on the process that
builds or loads it. An exact search costs ``rows x values`` multiply-adds a query: 50,000
rows of the seed model's 64x7x7 latents take 157 M, a millisecond or so.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import numpy as np

from latentbatch.storage.fs import StorageOptions, filesystem, join, write_bytes
from latentbatch.stores.store import LatentStore

EXACT_ROWS = 50_000
"""The most rows of an exact index; larger stores get an inverted file."""
NPROBE = 32
"""Clusters an inverted-file index searches per query."""
SAMPLE_PER_CLUSTER = 64
PREFIX = "neighbours-"

_loaded: dict[str, Any] = {}
_lock = threading.Lock()


def index_url(store: LatentStore) -> str:
    """Where the index of ``store``'s committed rows lies (whether it exists or not)."""
    return join(store.url, f"{PREFIX}{store.uuid[:12]}-{store.count}.faiss")


def has_index(store: LatentStore) -> bool:
    fs, path = filesystem(index_url(store), store.storage_options)
    return bool(fs.exists(path))


def _flat(store: LatentStore, start: int, stop: int) -> np.ndarray:
    latents = store.read_latents(start, stop)
    return np.ascontiguousarray(latents.reshape(len(latents), -1), dtype=np.float32)


def make_index(store: LatentStore, exact: bool | None = None) -> Any:
    """The index of ``store``'s committed rows, in memory, built a store shard at a time:
    exact up to :data:`EXACT_ROWS` rows, else an inverted file (``exact`` forces one)."""
    import faiss

    rows = store.count
    dim = int(np.prod(store.latent_shape))
    index: Any
    if rows <= EXACT_ROWS if exact is None else exact:
        index = faiss.IndexFlatL2(dim)
    else:
        clusters = max(1, min(rows, int(4 * math.sqrt(rows))))
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, clusters)
        sample = np.sort(
            np.random.default_rng(0).choice(
                rows, min(rows, clusters * SAMPLE_PER_CLUSTER), replace=False
            )
        )
        index.train(np.asarray(store.read("latents", sample), np.float32).reshape(len(sample), -1))
        index.nprobe = NPROBE
    for start, stop in store.each_shard():
        index.add(_flat(store, start, stop))
    return index


def build_index(store: LatentStore) -> str:
    """Build the index of ``store``'s committed rows (:func:`make_index`), write it beside
    them (removing indexes of an earlier count) and return its URL."""
    import faiss

    url = index_url(store)
    write_bytes(url, faiss.serialize_index(make_index(store)).tobytes(), store.storage_options)
    fs, path = filesystem(store.url, store.storage_options)
    for old in fs.ls(path, detail=False):
        name = old.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith(PREFIX) and name.endswith(".faiss") and join(store.url, name) != url:
            fs.rm(old)
    return url


def load_index(url: str, options: StorageOptions | None) -> Any:
    """The index at ``url``, read once per process (later calls return the same one)."""
    import faiss

    with _lock:
        if url not in _loaded:
            fs, path = filesystem(url, options)
            data = np.frombuffer(fs.cat_file(path), np.uint8)
            _loaded.clear()  # one index at a time per process: they can be large
            _loaded[url] = faiss.deserialize_index(data)
        return _loaded[url]


def built_index(store: LatentStore) -> Any:
    """The index of ``store``'s committed rows built in this process, once (for a store
    whose folder cannot take one: a read-only reference)."""
    key = f"built:{store.url}:{store.uuid}:{store.count}"
    with _lock:
        if key not in _loaded:
            _loaded.clear()
            _loaded[key] = make_index(store)
        return _loaded[key]


def search(index: Any, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Squared L2 distances and rows ``(n, k)`` of each query's ``k`` nearest indexed
    rows, nearest first (rows -1 and distance inf where fewer exist)."""
    flat = np.ascontiguousarray(queries.reshape(len(queries), -1), dtype=np.float32)
    distances, rows = index.search(flat, k)
    distances = np.where(rows < 0, np.inf, np.maximum(distances, 0))
    return distances.astype(np.float32), rows.astype(np.int64)
