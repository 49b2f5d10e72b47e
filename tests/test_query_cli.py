"""`latentbatch stores`, `query` and `stats` through main(argv), locally and on S3, and
the store read by other Zarr v3 readers (xarray, tensorstore)."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from distributed import Client
from PIL import Image

from latentbatch.cli import main
from latentbatch.encode import encode
from latentbatch.models.checkpoint import WEIGHTS
from latentbatch.sources.images import open_source
from latentbatch.stores.store import Layout, open_store
from tests.helpers import write_image


def _json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_query_commands(
    tmp_path: Path, mnist_store: Path, seed_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = str(mnist_store)
    got = _json(["query", store, "--ids", "mnist5k-00010,mnist5k-00002"], capsys)
    assert [r["row"] for r in got["results"]] == [2, 10]
    first = got["results"][0]
    assert {k: first[k] for k in ("row", "id", "label")} == {
        "row": 2,
        "id": "mnist5k-00002",
        "label": 0,
    }
    assert first["psnr"] == round(float(open_store(store).read_quality(2, 3)[0]), 3)
    worst = _json(["query", store, "--worst", "5"], capsys)["results"]
    assert [r["psnr"] for r in worst] == sorted(r["psnr"] for r in worst)
    got = _json(["query", store, "--rows", "4990:", "--where", "label == 9"], capsys)
    assert got["count"] == 10
    assert _json(["query", store, "--label", "4", "--rows", "0:100"], capsys)["count"] == 0

    near = _json(
        ["query", store, "--near", "mnist5k-00600", "-k", "5", "--metric", "cosine"], capsys
    )
    assert len(near["results"]) == 5
    assert all(r["row"] != 600 for r in near["results"])
    assert [r["distance"] for r in near["results"]] == sorted(
        r["distance"] for r in near["results"]
    )

    digit = Image.fromarray(open_source("mnist5k").read(600, 601)[0, :, :, 0]).resize((56, 56))
    digit.convert("RGB").save(tmp_path / "digit.png")  # other size and mode: converted
    argv = ["query", store, "--near-image", str(tmp_path / "digit.png"), "--model", str(seed_model)]
    argv += ["--grid", str(tmp_path / "grid.png")]
    by_image = _json(argv, capsys)
    assert by_image["results"][0]["id"] == "mnist5k-00600"
    assert Image.open(tmp_path / "grid.png").width > 11 * 28

    argv = ["query", store, "--label", "3", "--rows", "1500:1520", "--model", str(seed_model)]
    assert main([*argv, "--decode", str(tmp_path / "sel"), "--format", "png"]) == 0
    capsys.readouterr()
    manifest = json.loads((tmp_path / "sel" / "manifest.json").read_text())
    assert manifest["count"] == len(list((tmp_path / "sel" / "shard-000000").iterdir())) > 0
    assert main([*argv, "--decode", str(tmp_path / "npz"), "--format", "npz"]) == 0
    capsys.readouterr()
    with np.load(tmp_path / "npz" / "samples.npz") as found:  # grey digits as RGB
        assert found["arr_0"].shape == (manifest["count"], 28, 28, 3)
        assert found["arr_1"].tolist() == [3] * manifest["count"]
    assert not list((tmp_path / "npz").glob("shard-*"))

    stats = _json(["stats", store], capsys)
    assert len(stats["mean"]) == 64
    assert stats["scaling_factor"] > 0


_WEIGHT_OPENS: list[str] = []


def _count_weight_opens(event: str, args: tuple[object, ...]) -> None:
    if event == "open" and str(args[0]).endswith(WEIGHTS):
        _WEIGHT_OPENS.append(str(args[0]))


sys.addaudithook(_count_weight_opens)  # every open of a weights file, by this process


def test_a_query_that_encodes_decodes_and_draws_reads_the_weights_once(
    tmp_path: Path, mnist_store: Path, seed_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    digit = Image.fromarray(open_source("mnist5k").read(7, 8)[0, :, :, 0])
    digit.save(tmp_path / "digit.png")
    argv = ["query", str(mnist_store), "--near-image", str(tmp_path / "digit.png")]
    argv += ["--model", str(seed_model), "--decode", str(tmp_path / "d"), "--grid"]
    _WEIGHT_OPENS.clear()
    assert main([*argv, str(tmp_path / "grid.png")]) == 0
    assert [str(seed_model / WEIGHTS)] == _WEIGHT_OPENS
    assert (tmp_path / "grid.png").is_file() and (tmp_path / "d" / "manifest.json").is_file()
    assert "mnist5k-00007" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--ids", "mnist5k-00001,ghost"], "error: 1 ids are not in"),
        (["--where", "label ~ 3"], "error: predicate 'label ~ 3' is not FIELD OP NUMBER"),
        (["--near", "mnist5k-00001", "-k", "6000"], "error: -k must be between 1 and 4999"),
        (["--rows", "12"], "error: row range '12' is not I:J"),
        (["--grid", "x.png"], "error: --near-image, --decode and --grid need --model"),
        (
            ["--worst", "3", "--label", "2", "--rows", "0:9"],
            "error: --worst ranks every row of the store and cannot be combined with --rows, "
            "--label",
        ),
        (["--near", "mnist5k-00001", "--worst", "3"], "error: --near and --worst are two"),
    ],
)
def test_bad_queries(
    mnist_store: Path, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["query", str(mnist_store), *argv]) == 1
    assert capsys.readouterr().err.startswith(message)


def test_stores_catalog(
    tmp_path: Path,
    tiny_model: Path,
    client: Client,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COLUMNS", "400")
    for name in ("a.zarr", "deep/b.zarr"):
        encode(
            tiny_model,
            "synthetic:20",
            str(tmp_path / "root" / name),
            layout=Layout(8, 4),
            client=client,
        )
    got = _json(["stores", str(tmp_path / "root"), "--outputs", str(tmp_path / "out")], capsys)
    assert [Path(s["store"]).relative_to(tmp_path / "root").as_posix() for s in got["stores"]] == [
        "a.zarr",
        "deep/b.zarr",
    ]
    assert {s["count"] for s in got["stores"]} == {20}
    assert {s["output"] for s in got["stores"]} == {"missing"}
    assert {s["bytes"] for s in got["stores"]} == {None}  # from metadata only
    sized = _json(["stores", str(tmp_path / "root"), "--bytes"], capsys)["stores"]
    assert all(s["bytes"] > 0 for s in sized)
    assert main(["stores", str(tmp_path / "root")]) == 0
    text = capsys.readouterr().out
    assert "a.zarr" in text and "bytes not measured: --bytes lists every object" in text


def test_other_zarr_readers_see_the_same_latents(mnist_store: Path) -> None:
    import tensorstore as ts
    import xarray as xr

    expected = open_store(str(mnist_store)).read_latents(0, 5000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dataset = xr.open_zarr(str(mnist_store), consolidated=False, zarr_format=3)
    assert dataset["latents"].dims == ("sample", "channel", "y", "x")
    np.testing.assert_array_equal(dataset["latents"].values, expected)
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(mnist_store / "latents")}}
    array = ts.open(spec, read=True).result()
    np.testing.assert_array_equal(array[0:5000].read().result(), expected)


@pytest.mark.slow
def test_query_commands_on_s3(
    tmp_path: Path, mnist_store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import s3fs

    from tests.servers import moto_server

    with moto_server(tmp_path) as endpoint:
        fs = s3fs.S3FileSystem(endpoint_url=endpoint, key="testing", secret="testing")
        fs.mkdir("queries")
        fs.put(str(mnist_store), "queries/root/m.zarr", recursive=True)
        opts = [f"--storage-option=endpoint_url={endpoint}", "--storage-option=key=testing"]
        opts += ["--storage-option=secret=testing"]
        remote = "s3://queries/root/m.zarr"
        for argv in (
            ["query", "{}", "--ids", "mnist5k-00010,mnist5k-00002"],
            ["query", "{}", "--near", "mnist5k-00600", "-k", "5"],
            ["stats", "{}"],
            ["query", "{}", "--where", "psnr < 21.5", "--label", "8"],
            ["query", "{}", "--worst", "10"],
        ):
            local = _json([a.format(str(mnist_store)) for a in argv], capsys)
            there = _json([a.format(remote) for a in argv] + opts, capsys)
            assert (there.pop("store", remote), local.pop("store", str(mnist_store))) == (
                remote,
                str(mnist_store),
            )
            assert there == local
        listed = _json(["stores", "s3://queries/root", *opts], capsys)
        assert [s["store"] for s in listed["stores"]] == [remote]


def test_query_decode_is_bounded(
    tmp_path: Path,
    mnist_store: Path,
    seed_model: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An in-process decode of a selection takes at most SELECTION_LIMIT rows (one output
    shard's worth; lowered here): more is refused before anything is read or written."""
    from latentbatch import decode as decode_module

    monkeypatch.setattr(decode_module, "SELECTION_LIMIT", 100)
    argv = ["query", str(mnist_store), "--label", "3", "--model", str(seed_model)]
    assert main([*argv, "--decode", str(tmp_path / "big")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: the selection has more than 100 rows, which --decode")
    assert "latentbatch decode" in err and not (tmp_path / "big").exists()
    assert main([*argv, "--rows", "1500:1560", "--decode", str(tmp_path / "small"), "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    manifest = json.loads((tmp_path / "small" / "manifest.json").read_text())
    assert manifest["count"] == answer["count"] == len(manifest["selection"]) <= 100


@pytest.mark.parametrize(
    ("vae", "size"), [("kl_vae", (256, 256)), ("tiny_vae", (512, 768)), ("kl_vae", (512, 768))]
)
def test_near_image_encodes_the_query_as_the_stores_rows_were(
    tmp_path: Path,
    vae: str,
    size: tuple[int, int],
    client: Client,
    request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """At the store's image size (not the model config's) and by the same crop rule, for
    a diffusers model of any family: each image finds its own row first."""
    model: Path = request.getfixturevalue(vae)
    folder = tmp_path / "photos"
    for i in range(5):  # 600x400 and other sizes: resized and cropped to the store's size
        write_image(folder / f"photo{i}.png", seed=i, size=(600 + 40 * i, 400 + 20 * i))
    store = str(tmp_path / "photos.zarr")
    encode(model, f"folder:{folder}", store, size=size, client=client)
    assert open_store(store).image_size == size
    for i in (0, 3):
        argv = ["query", store, "--near-image", str(folder / f"photo{i}.png"), "--model"]
        found = _json([*argv, str(model), "-k", "2"], capsys)
        assert found["results"][0]["id"] == f"photo{i}" and found["results"][0]["distance"] < 1e-2
