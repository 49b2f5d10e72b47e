"""interpolate and shift: latents changed at the feature level, into derived stores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from distributed import Client
from PIL import Image

from latentbatch.cli import main
from latentbatch.decode import decode_rows
from latentbatch.encode import encode
from latentbatch.stores.query import select
from latentbatch.stores.store import Layout, open_store
from latentbatch.uses.manipulation import ManipulateError, along, interpolate, shift


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, client: Client) -> str:
    """The digits (labels 0-9) encoded by the tiny model, in shards of 64 rows."""
    url = str(tmp_path_factory.mktemp("manipulation") / "digits.zarr")
    encode(tiny_model, "digits", url, layout=Layout(64, 32), limit=600, client=client)
    return url


def test_along_ends_exactly_at_both_latents() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 3, 2, 2))
    t = np.linspace(0, 1, 5)
    for method in ("slerp", "linear"):
        path = along(a, b, t, method)  # type: ignore[arg-type]
        assert path.shape == (5, 3, 2, 2)
        np.testing.assert_array_equal(path[0], a)
        np.testing.assert_array_equal(path[-1], b)
    linear = along(a, b, t, "linear")
    np.testing.assert_allclose(linear[2], (a + b) / 2)
    slerp = along(a, b, t, "slerp")  # norms change linearly along the great circle
    norms = np.linalg.norm(slerp.reshape(5, -1), axis=1)
    np.testing.assert_allclose(norms, np.linspace(np.linalg.norm(a), np.linalg.norm(b), 5))
    parallel = along(a, 2 * a, t, "slerp")  # no angle: the straight line
    np.testing.assert_allclose(parallel[2], 1.5 * a)


def test_interpolation_ends_decode_to_the_two_rows(
    tmp_path: Path, digits: str, tiny_model: Path, client: Client
) -> None:
    parent = open_store(digits)
    first, last = parent.read_ids(0, 1)[0], parent.read_ids(5, 6)[0]
    url = str(tmp_path / "i.zarr")
    result = interpolate(digits, first, last, url, steps=7, model=tiny_model, client=client)
    assert result.rows == 7
    store = open_store(url)
    assert store.read_ids(0, 7)[3] == f"interp-{first}-{last}-03"
    np.testing.assert_array_equal(store.read_latents(0, 1)[0], parent.read_latents(0, 1)[0])
    np.testing.assert_array_equal(store.read_latents(6, 7)[0], parent.read_latents(5, 6)[0])
    ends = decode_rows(tiny_model, store, [0, 6])
    np.testing.assert_array_equal(ends, decode_rows(tiny_model, parent, [0, 5]))
    assert store.meta["lineage"]["parameters"] == {
        "from": first, "to": last, "steps": 7, "method": "linear"
    }  # fmt: skip
    again = str(tmp_path / "again.zarr")
    interpolate(digits, first, last, again, steps=7, client=client)
    assert store.read_latents(0, 7).tobytes() == open_store(again).read_latents(0, 7).tobytes()
    with pytest.raises(ManipulateError, match="--steps 1 must lie between 2"):
        interpolate(digits, first, last, str(tmp_path / "x.zarr"), steps=1)


def test_shift_moves_a_labels_rows_towards_another(
    tmp_path: Path, digits: str, tiny_model: Path, client: Client, process_client: Client
) -> None:
    parent = open_store(digits)
    url, other = str(tmp_path / "s.zarr"), str(tmp_path / "t.zarr")
    result = shift(digits, url, from_label=0, to_label=1, model=tiny_model, client=client)
    zeros = select(parent, label=0)
    assert result.rows == len(zeros) > 0
    store = open_store(url)
    assert store.read_ids(0, 2) == [
        f"shift-L0-L1-{i}" for i in parent.read("ids", zeros[:2]).tolist()
    ]
    assert (store.read_labels(0, store.count) == 1).all()
    shift(digits, other, from_label=0, to_label=1, client=process_client)  # other workers
    assert store.read_latents(0, store.count).tobytes() == (
        open_store(other).read_latents(0, store.count).tobytes()
    )
    flat = parent.read_latents(0, parent.count).reshape(parent.count, -1).astype(np.float32)
    labels = parent.read_labels(0, parent.count)
    moved = store.read_latents(0, store.count).reshape(store.count, -1).astype(np.float32)
    ones = flat[labels == 1].mean(axis=0)
    before = np.linalg.norm(flat[zeros] - ones, axis=1).mean()
    assert np.linalg.norm(moved - ones, axis=1).mean() < before / 2  # now near the ones
    half = str(tmp_path / "half.zarr")  # a chosen few rows, half the way, by the means
    shift(digits, half, from_label=0, to_label=1, strength=0.5, method="mean",
          rows=[(0, 100)], label=0, client=client)  # fmt: skip
    halfway = open_store(half)
    chosen = zeros[zeros < 100]
    assert halfway.count == len(chosen)
    expected = flat[chosen] + 0.5 * (ones - flat[labels == 0].mean(axis=0))
    np.testing.assert_allclose(
        halfway.read_latents(0, halfway.count).reshape(len(chosen), -1), expected, atol=0.02
    )


def test_shift_through_the_cli_leaves_before_and_after_pairs(
    tmp_path: Path, digits: str, tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, grid = str(tmp_path / "s.zarr"), tmp_path / "pairs.png"
    argv = ["shift", digits, "--from-label", "3", "--to-label", "8", "--store", url, "--model",
            str(tiny_model), "--grid", str(grid), "--workers", "1", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    assert "shifted rows into" in capsys.readouterr().out
    with Image.open(grid) as picture:  # two lines: before, after
        assert picture.size[0] > 4 * picture.size[1]
    bad = str(tmp_path / "bad.zarr")
    for labels, extra, message in (
        (("3", "3"), [], "error: --from-label and --to-label are both 3"),
        (
            ("3", "8"),
            ["--method", "push"],
            "error: --method 'push' is not one of matching, gaussian, mean",
        ),
        (("3", "42"), [], "error: label 42 has no rows"),
    ):
        argv = ["shift", digits, "--from-label", labels[0], "--to-label", labels[1],
                "--store", bad, *extra]  # fmt: skip
        assert main(argv) == 1
        assert capsys.readouterr().err.startswith(message)
    assert not (tmp_path / "bad.zarr").exists()
