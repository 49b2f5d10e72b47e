"""Anomaly scores against a reference store, and the queries that read them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from distributed import Client

from latentbatch.cli import main
from latentbatch.encode import encode
from latentbatch.stores.query import select, worst
from latentbatch.stores.store import Layout, open_store
from latentbatch.uses.anomaly import ScoreError, score


def _auroc(normal: np.ndarray, anomalous: np.ndarray) -> float:
    """The chance that an anomalous row scores above a normal one (ties count half)."""
    greater = (anomalous[:, None] > normal[None, :]).mean()
    ties = (anomalous[:, None] == normal[None, :]).mean()
    return float(greater + ties / 2)


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, client: Client) -> Path:
    """A reference of 240 synthetic shapes; a store of 60 digits (anomalous) then 160
    shapes the reference does not hold (synthetic rows 240-399: normal)."""
    root = tmp_path_factory.mktemp("anomaly")
    layout = Layout(32, 16)
    encode(tiny_model, "synthetic:240", str(root / "ref.zarr"), layout=layout, client=client)
    target = str(root / "t.zarr")
    encode(tiny_model, "digits", target, layout=layout, limit=60, client=client)
    encode(tiny_model, "synthetic:400", target, append=True, client=client)
    return root


def test_scores_separate_digits_from_unseen_shapes(stores: Path, client: Client) -> None:
    target = str(stores / "t.zarr")
    result = score(target, str(stores / "ref.zarr"), k=5, quantile=0.95, client=client)
    store = open_store(target)
    assert store.has_anomaly and result.scored == store.count == 460
    scores = store.read_anomaly(0, store.count)
    assert not np.isnan(scores).any()
    digits, shapes = scores[:60], scores[300:]  # shapes 240..399 of the synthetic source
    assert _auroc(shapes, digits) >= 0.9
    assert 0.02 <= result.reference_above <= 0.08  # 1 - quantile, by construction
    meta = store.meta["anomaly"]
    assert meta["threshold"] == pytest.approx(result.threshold)
    assert meta["reference"]["uuid"] == open_store(str(stores / "ref.zarr")).uuid
    assert (meta["k"], meta["quantile"]) == (5, 0.95)
    top = worst(store, 10, by="anomaly")
    assert list(scores[top]) == sorted(scores[top], reverse=True)
    assert (top < 60).mean() >= 0.8  # the most anomalous are digits
    above = select(store, where=[f"anomaly > {result.threshold}"])
    assert len(above) == result.above


def test_score_and_query_through_the_cli(
    stores: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reference = str(stores / "ref.zarr")
    assert main(["score", reference, "--reference", reference, "--json"]) == 0  # itself
    result = json.loads(capsys.readouterr().out)
    assert result["scored"] == 240 and result["quantile"] == 0.99
    assert main(["query", reference, "--worst", "3", "--by", "anomaly", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["results"]
    assert [r["anomaly"] for r in rows] == sorted((r["anomaly"] for r in rows), reverse=True)
    assert main(["query", reference, "--where", "anomaly > 1000000"]) == 0
    assert "0 rows" in capsys.readouterr().out
    assert main(["query", reference, "--worst", "3", "--by", "size"]) == 1
    assert "error: --by 'size' is not psnr or anomaly" in capsys.readouterr().err


def test_unscored_stores_and_other_models_are_refused(
    stores: Path, other_seed_model: Path, tmp_path: Path, client: Client,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    other = str(tmp_path / "other.zarr")
    encode(other_seed_model, "synthetic:40", other, layout=Layout(16, 8), client=client)
    with pytest.raises(ScoreError, match="the same model"):
        score(other, str(stores / "ref.zarr"), client=client)
    assert main(["query", other, "--worst", "3", "--by", "anomaly"]) == 1
    assert "has no anomaly scores; score it first" in capsys.readouterr().err
    assert main(["query", other, "--where", "anomaly > 1"]) == 1
    assert "has no anomaly scores" in capsys.readouterr().err


def test_rows_appended_after_scoring_are_not_scored(
    stores: Path, tiny_model: Path, tmp_path: Path, client: Client
) -> None:
    import shutil

    copy = str(shutil.copytree(stores / "ref.zarr", tmp_path / "ref.zarr"))
    score(copy, copy, k=3, client=client)
    encode(tiny_model, "digits", copy, append=True, limit=20, client=client)
    store = open_store(copy)  # every array grew alike: the store validates
    scores = store.read_anomaly(0, store.count)
    assert store.count == 260 and np.isnan(scores[240:]).all()
    assert not np.isnan(scores[:240]).any()


def test_a_scoring_the_full_disk_stops_is_never_read_as_done(
    stores: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, client: Client
) -> None:
    import errno
    import shutil
    from typing import Any

    import zarr.storage

    from latentbatch.storage.fs import WriteError
    from latentbatch.stores.store import StoreError

    copy = str(shutil.copytree(stores / "ref.zarr", tmp_path / "ref.zarr"))
    original = zarr.storage.LocalStore.set

    async def set_(self: Any, key: str, value: Any) -> None:
        if key.startswith("anomaly/c/1"):
            raise OSError(errno.ENOSPC, "No space left on device")
        await original(self, key, value)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", set_)
    with pytest.raises(WriteError, match=r"anomaly scores of rows \[32, 64\) .* No space left"):
        score(copy, copy, k=3, client=client)
    half = open_store(copy)
    assert not half.has_anomaly and half.meta["anomaly"]["pending"]
    with pytest.raises(StoreError, match="its anomaly scoring did not finish"):
        worst(half, 3, by="anomaly")
    monkeypatch.undo()
    score(copy, copy, k=3, client=client)
    done = open_store(copy)
    assert done.has_anomaly and not np.isnan(done.read_anomaly(0, done.count)).any()


def test_a_reference_that_cannot_keep_an_index_is_indexed_by_each_worker(
    stores: Path, tmp_path: Path, client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read-only reference (its folder refuses the index file): each worker builds the
    index itself, and the scores are those of a scoring through the kept index."""
    import shutil

    from latentbatch.storage.fs import WriteError
    from latentbatch.stores import neighbours

    kept, built = (str(shutil.copytree(stores / "t.zarr", tmp_path / n)) for n in ("a", "b"))
    reference = str(shutil.copytree(stores / "ref.zarr", tmp_path / "ref.zarr"))
    for old in Path(reference).glob("neighbours-*.faiss"):
        old.unlink()

    def refuse(*_: object, **__: object) -> None:
        raise WriteError(f"{reference} is read-only")

    monkeypatch.setattr(neighbours, "write_bytes", refuse)
    score(built, reference, k=5, client=client)
    assert not list(Path(reference).glob("neighbours-*"))
    assert open_store(built).meta["anomaly"]["index"] == "built by each worker"
    monkeypatch.undo()
    score(kept, reference, k=5, client=client)
    assert list(Path(reference).glob("neighbours-*.faiss"))
    np.testing.assert_array_equal(
        open_store(built).read_anomaly(0, 460), open_store(kept).read_anomaly(0, 460)
    )
