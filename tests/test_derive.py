"""The derived-store engine: lineage, shards written by tasks, resume, refusals."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from distributed import Client

from latentbatch.encode import encode
from latentbatch.stores.store import Layout, StoreError, open_store
from latentbatch.uses.derive import (
    DeriveResult,
    Lineage,
    Parent,
    as_stored,
    derive,
    like,
    lineage_of,
)


@dataclass(frozen=True, kw_only=True)
class CountingPart:
    """Rows whose every value is the row number; fails while ``fail_flag`` exists and
    the rows reach ``fail_at``."""

    shape: tuple[int, int, int]
    start: int
    stop: int
    fail_flag: str = ""
    fail_at: int = 1 << 30

    def make(self) -> tuple[np.ndarray, list[str], np.ndarray]:
        if self.fail_flag and Path(self.fail_flag).exists() and self.stop > self.fail_at:
            raise OSError(f"rows [{self.start}, {self.stop}) failed on purpose")
        rows = np.arange(self.start, self.stop, dtype=np.float32)
        latents = np.broadcast_to(rows[:, None, None, None], (len(rows), *self.shape)).copy()
        return (
            latents,
            [f"row-{r}" for r in range(self.start, self.stop)],
            rows.astype(np.int32) % 3,
        )


@pytest.fixture(scope="module")
def parent(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, client: Client) -> str:
    url = str(tmp_path_factory.mktemp("derive") / "parent.zarr")
    encode(tiny_model, "synthetic:40", url, layout=Layout(16, 8), client=client)
    return url


def _lineage(parent: str, **parameters: object) -> Lineage:
    return Lineage(
        operation="count", parameters=dict(parameters), seed=7,
        parents=(Parent.of(open_store(parent)),),
    )  # fmt: skip


def _derive(
    url: str, parent: str, rows: int, client: Client, fail_flag: str = "", **options: object
) -> DeriveResult:
    """A derive of ``rows`` counting rows into ``url``, like ``parent`` (rows from 32 on
    failing while ``fail_flag`` exists)."""
    opened = open_store(parent)
    return derive(
        url, create=lambda meta: like(opened, url, rows, None, meta), model_id=opened.model_id,
        lineage=_lineage(parent, n=rows), rows=rows, client=client,
        part=lambda a, b: CountingPart(
            shape=opened.latent_shape, start=a, stop=b, fail_flag=fail_flag, fail_at=32
        ),
        **options,  # type: ignore[arg-type]
    )  # fmt: skip


def test_a_derived_store_records_its_lineage_and_its_rows(
    tmp_path: Path, parent: str, tiny_model: Path, client: Client
) -> None:
    opened = open_store(parent)
    url = str(tmp_path / "d.zarr")
    result = _derive(url, parent, 50, client, model=tiny_model)
    assert (result.rows, result.written, result.shards) == (50, 50, 4)  # shards of 16 rows
    store = open_store(url)
    assert store.count == 50 and store.pending is None and store.has_labels
    assert store.model_id == opened.model_id and store.shard_rows == opened.shard_rows
    assert store.meta["canary"]["rows"]  # recorded, as an encode does
    lineage = lineage_of(store)
    assert lineage is not None and lineage["operation"] == "count" and lineage["seed"] == 7
    assert lineage["parents"] == [{"url": parent, "uuid": opened.uuid, "count": 40}]
    assert lineage["created"]
    np.testing.assert_array_equal(store.read_latents(0, 50)[:, 0, 0, 0], np.arange(50))
    assert store.read_ids(48, 50) == ["row-48", "row-49"]
    assert store.report()["lineage"] == lineage
    again = _derive(url, parent, 50, client)
    assert again.skipped and again.written == 0
    with pytest.raises(StoreError, match=r"already exists \(made by count, with other inputs\)"):
        _derive(url, parent, 51, client)
    with pytest.raises(StoreError, match="made by an encode"):
        _derive(parent, parent, 1, client)


def test_a_failed_derive_is_never_read_as_done_and_resumes(
    tmp_path: Path, parent: str, client: Client
) -> None:
    flag = tmp_path / "fail"
    flag.touch()
    url = str(tmp_path / "d.zarr")
    with pytest.raises(OSError, match="failed on purpose"):
        _derive(url, parent, 64, client, fail_flag=str(flag))
    store = open_store(url)
    assert store.pending is not None and store.count <= 32  # the failed shard: not committed
    flag.unlink()
    result = _derive(url, parent, 64, client, fail_flag=str(flag))
    assert result.resumed and result.written == 64 - store.count
    done = open_store(url)
    assert done.pending is None and done.count == 64
    np.testing.assert_array_equal(done.read_latents(0, 64)[:, 0, 0, 0], np.arange(64))


def test_integer_latents_are_rounded_and_clamped(
    tmp_path: Path, tiny_codec_model: Path, client: Client
) -> None:
    url = str(tmp_path / "codec.zarr")
    encode(tiny_codec_model, "synthetic:8", url, client=client)
    store = open_store(url)
    stored = as_stored(np.array([[-300.0, -1.6, 0.4, 2.5, 300.0]]), store)
    assert stored.dtype == np.int8
    low, high = store.quantization["range"]  # type: ignore[index]
    assert stored.tolist() == [[low, -2, 0, 2, high]]  # half to even, as the encoder rounds


def test_a_second_writer_is_refused_and_writes_nothing(
    tmp_path: Path, parent: str, client: Client
) -> None:
    from latentbatch.storage.lease import Lease, LeaseHeldError

    url = str(tmp_path / "d.zarr")
    holder = Lease(url, None, "a generate by hand", 60)
    holder.acquire()  # another writer is at it
    try:
        with pytest.raises(LeaseHeldError, match="being written by another a generate by hand"):
            _derive(url, parent, 20, client)
    finally:
        holder.release()
    assert not (Path(url) / "zarr.json").exists()
    assert _derive(url, parent, 20, client).written == 20  # once the other has finished
