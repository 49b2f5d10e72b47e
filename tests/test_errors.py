"""Bad inputs through the real command line: a sentence naming the thing, a non-zero exit,
no traceback, and nothing already written changed."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from distributed import Client
from PIL import Image

from latentbatch.encode import encode
from latentbatch.errors import OutputError
from latentbatch.outputs.shards import read_output
from latentbatch.stores.store import Layout, open_store
from tests.helpers import sha256s
from tests.servers import dask_cluster

CLI = str(Path(sys.executable).with_name("latentbatch"))
SHARDS = ["--images-per-shard", "16"]  # one output shard per 16-row store shard


@pytest.fixture(scope="module")
def decoded(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, client: Client
) -> tuple[Path, Path]:
    """A 40-row store of the tiny model and its tar decode."""
    folder = tmp_path_factory.mktemp("errors")
    store, out = folder / "s.zarr", folder / "out"
    encode(tiny_model, "synthetic:40", str(store), layout=Layout(16, 8), client=client)
    argv = _decode_argv(tiny_model, store, out)
    subprocess.run([CLI, *argv, "--workers", "1", "--no-progress"], check=True)
    return store, out


def _decode_argv(model: Path, store: Path, out: Path) -> list[str]:
    return ["decode", "--model", str(model), "--store", str(store), "--out", str(out), *SHARDS]


def _fails(argv: list[str], *named: str, before: list[str] | None = None) -> str:
    """Run the CLI (after ``before``: a command that runs it); it must fail with one
    sentence naming ``named`` and no traceback."""
    done = subprocess.run(
        [*(before or []), CLI, *argv], capture_output=True, text=True, timeout=300
    )
    assert done.returncode != 0
    assert "Traceback" not in done.stdout + done.stderr
    assert "Compute Failed" not in done.stdout + done.stderr
    error = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1, done.stderr
    for thing in named:
        assert thing in error[0]
    return error[0]


def test_foreign_or_malformed_manifest(
    tmp_path: Path, decoded: tuple[Path, Path], tiny_model: Path
) -> None:
    store, _ = decoded
    out = tmp_path / "out"
    out.mkdir()
    for text in ('{"format": 1, "store": "elsewhere"}', "{not json"):
        (out / "manifest.json").write_text(text)
        argv = _decode_argv(tiny_model, store, out)
        _fails([*argv, "--workers", "1"], str(out / "manifest.json"))
        assert sorted(p.name for p in out.iterdir()) == ["manifest.json"]


@pytest.mark.parametrize("array", ["latents", "ids", "labels"])
def test_damaged_chunk(
    tmp_path: Path, decoded: tuple[Path, Path], tiny_model: Path, array: str
) -> None:
    store = Path(shutil.copytree(decoded[0], tmp_path / "s.zarr"))
    shard = store / array / "c" / "1"
    chunk = next(p for p in sorted(shard.rglob("*")) if p.is_file()) if shard.is_dir() else shard
    data = bytearray(chunk.read_bytes())
    data[12] ^= 0xFF
    chunk.write_bytes(bytes(data))
    out = tmp_path / "out"
    argv = _decode_argv(tiny_model, store, out)
    message = _fails([*argv, "--workers", "1", "--no-progress"], str(store), f"'{array}' array")
    # the client reads no rows: the task of the damaged shard (or, for latents, the
    # canary's read of that shard, which comes first) names rows inside it
    found = re.search(r"rows \[(\d+), (\d+)\)", message)
    assert found is not None and 16 <= int(found[1]) < int(found[2]) <= 32, message
    assert not list(out.glob("shard-000001*"))


def _flip(store: Path, array: str, shard: int = 1) -> None:
    """One byte flipped inside a chunk of ``array``'s store shard ``shard``."""
    folder = store / array / "c" / str(shard)
    chunk = next(p for p in sorted(folder.rglob("*")) if p.is_file()) if folder.is_dir() else folder
    data = bytearray(chunk.read_bytes())
    data[12] ^= 0xFF
    chunk.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("array", "argv"),
    [
        ("latents", ["stats", "{store}"]),
        ("latents", ["query", "{store}", "--near", "synthetic-0000001"]),
        ("latents", ["query", "{store}", "--near-image", "{image}", "--model", "{model}"]),
        ("latents", ["query", "{store}", "--rows", "10:30", "--model", "{model}", "--decode",
                     "{out}"]),
        ("quality", ["query", "{store}", "--worst", "3"]),
        ("quality", ["query", "{store}", "--where", "psnr < 20"]),
        ("labels", ["query", "{store}", "--label", "1"]),
        ("ids", ["query", "{store}", "--ids", "synthetic-0000020"]),
        ("zarr.json", ["inspect", "{store}"]),
        ("latents/zarr.json", ["inspect", "{store}"]),
        ("weights", ["evaluate", "{model}", "--data", "synthetic:40"]),
    ],
    ids=lambda v: v if isinstance(v, str) else " ".join(a for a in v if "{" not in a),
)  # fmt: skip
def test_every_read_of_a_damaged_store_is_one_sentence(
    tmp_path: Path, decoded: tuple[Path, Path], tiny_model: Path, array: str, argv: list[str]
) -> None:
    """Each command, through the installed command, reading what was damaged: the arrays
    (a byte flipped in a chunk of the second store shard), the metadata, the weights."""
    store = Path(shutil.copytree(decoded[0], tmp_path / "s.zarr"))
    model = Path(shutil.copytree(tiny_model, tmp_path / "model"))
    if array.endswith("zarr.json"):
        (store / array).write_text("{ damaged")
    elif array == "weights":
        weights = model / "model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-3] ^= 0xFF
        weights.write_bytes(bytes(data))
    else:
        _flip(store, array)
    image = tmp_path / "grey.png"
    Image.new("L", (16, 16), 128).save(image)
    places = {"{store}": str(store), "{model}": str(model), "{image}": str(image),
              "{out}": str(tmp_path / "out")}  # fmt: skip
    named = str(model / "model.safetensors") if array == "weights" else str(store)
    _fails([places.get(a, a) for a in argv], named)


def test_damaged_store_metadata(tmp_path: Path, decoded: tuple[Path, Path]) -> None:
    store = Path(shutil.copytree(decoded[0], tmp_path / "s.zarr"))
    (store / "zarr.json").write_text("{ damaged")
    _fails(["inspect", str(store)], str(store))


@pytest.mark.parametrize("damage", ["missing", "damaged"])
def test_model_directory_without_a_good_config(
    tmp_path: Path, decoded: tuple[Path, Path], tiny_model: Path, damage: str
) -> None:
    model = Path(shutil.copytree(tiny_model, tmp_path / "model"))
    if damage == "missing":
        (model / "config.json").unlink()
    else:
        (model / "config.json").write_text(json.dumps({"model": {"channels": 7}}))
    store, out = decoded
    before = sha256s(out)
    argv = ["decode", "--model", str(model), "--store", str(store), "--out", str(out)]
    _fails(argv, str(model))
    assert sha256s(out) == before


def test_truncated_tar_shard_is_redone(
    tmp_path: Path, decoded: tuple[Path, Path], tiny_model: Path
) -> None:
    store = decoded[0]
    out = Path(shutil.copytree(decoded[1], tmp_path / "out"))
    before = sha256s(out)
    shard = out / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[:1000])
    argv = _decode_argv(tiny_model, store, out)
    done = subprocess.run(
        [CLI, *argv, "--workers", "1", "--no-progress"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "1 shards written, 2 already done" in " ".join(done.stdout.split())
    assert sha256s(out) == before


def test_reading_a_truncated_shard_names_it(tmp_path: Path, decoded: tuple[Path, Path]) -> None:
    out = Path(shutil.copytree(decoded[1], tmp_path / "out"))
    shard = out / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(OutputError, match=r"shard-000001\.tar.*run the decode again"):
        read_output(str(out))


def test_stores_lists_a_damaged_store_and_carries_on(
    tmp_path: Path, decoded: tuple[Path, Path]
) -> None:
    root = tmp_path / "root"
    for name in ("a.zarr", "b.zarr"):
        shutil.copytree(decoded[0], root / name)
    (root / "a.zarr" / "zarr.json").write_text("{ damaged")
    done = subprocess.run([CLI, "stores", str(root), "--json"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)["stores"]
    assert [Path(r["store"]).name for r in rows] == ["a.zarr", "b.zarr"]
    assert "zarr.json" in rows[0]["damaged"] and rows[1]["damaged"] is None
    assert rows[1]["count"] == 40
    shown = subprocess.run(
        [CLI, "stores", str(root)],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "300"},
    )
    assert shown.returncode == 0 and "damaged" in shown.stdout


UNSAFE_IDS = ["../x", "a/../../x", "/tmp/abs", "nul\x00x"]


@pytest.mark.parametrize("unsafe", UNSAFE_IDS)
def test_unsafe_ids_write_nothing_outside_the_output(
    tmp_path: Path, decoded: tuple[Path, Path], tiny_model: Path, unsafe: str
) -> None:
    """A store holding an unsafe id (written by hand or another tool): decode and
    query --decode/--grid refuse it by name and write nothing outside the output (decode
    may finish the shards of other rows inside it)."""
    store = Path(shutil.copytree(decoded[0], tmp_path / "work" / "s.zarr"))
    opened = open_store(str(store), writable=True)
    ids = opened.read_ids(0, 16)
    ids[3] = unsafe
    opened.write_rows(0, opened.read_latents(0, 16), ids, opened.read_labels(0, 16))
    out = tmp_path / "work" / "out"
    model = ["--model", str(tiny_model)]

    def outside() -> list[Path]:
        return sorted(p for p in tmp_path.rglob("*") if not {"s.zarr", "out"} & set(p.parts))

    before = outside()
    argv = ["decode", *model, "--store", str(store), "--out", str(out), "--workers", "1"]
    _fails([*argv, *SHARDS], "id")
    query = ["query", str(store), "--rows", "0:8", *model]
    _fails([*query, "--decode", str(out), "--format", "png"], "id")
    _fails([*query, "--grid", str(tmp_path / "work" / "grid.png")], "id")
    assert outside() == before
    assert not list(out.rglob("*.png"))  # the query wrote none
    assert not [p for p in out.rglob("*") if unsafe.split("/")[-1] in p.name]
    assert not Path("/tmp/abs.png").exists()


def test_query_decode_refuses_a_store_of_another_model(
    tmp_path: Path, decoded: tuple[Path, Path], other_tiny_model: Path
) -> None:
    store = decoded[0]
    argv = ["query", str(store), "--rows", "0:4", "--model", str(other_tiny_model)]
    _fails([*argv, "--decode", str(tmp_path / "out")], str(store), "was encoded by model")
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def other_tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.helpers import train_tiny

    return train_tiny(tmp_path_factory.mktemp("models") / "other", seed=7).model_dir


def test_debug_shows_the_traceback_too(tmp_path: Path) -> None:
    argv = ["inspect", str(tmp_path / "missing.zarr")]
    plain = subprocess.run([CLI, *argv], capture_output=True, text=True)
    debug = subprocess.run([CLI, "--debug", *argv], capture_output=True, text=True)
    assert plain.returncode == debug.returncode == 1
    assert "Traceback" not in plain.stderr and "Traceback" in debug.stderr
    assert plain.stderr.splitlines()[-1] == debug.stderr.splitlines()[-1]
    assert "missing.zarr does not exist" in plain.stderr


def test_gpu_worker_without_cuda_fails_the_decode_naming_the_worker(
    tmp_path: Path, decoded: tuple[Path, Path], tiny_model: Path
) -> None:
    """A worker started with ``--resources GPU=1`` on this CPU-only machine never decodes
    on its CPU: the decode fails, naming it, and writes no shard."""
    store, _ = decoded
    out = tmp_path / "out"
    with dask_cluster(tmp_path, workers=1, worker_args=["--resources", "GPU=1"]) as (address, _):
        argv = _decode_argv(tiny_model, store, out)
        error = _fails([*argv, "--scheduler", address], "Dask worker w0", "GPU=1")
    assert "sees no CUDA device" in error
    assert not list(out.glob("shard-*"))


WRITERS = {
    "decode": lambda m, s, t: ["decode", "--model", m, "--store", s, "--out", t],
    "query --decode": lambda m, s, t: ["query", s, "--rows", "0:4", "--model", m, "--decode", t],
    "encode": lambda m, s, t: ["encode", "--model", m, "--data", "synthetic:8", "--store", t],
    "import": lambda m, s, t: [
        "import",
        "--model",
        m,
        "--from",
        str(Path(s).parent / "rows.npy"),
        "--store",
        t,
    ],
    "generate": lambda m, s, t: ["generate", "--from", s, "--count", "2", "--store", t],
    "interpolate": lambda m, s, t: [
        "interpolate",
        s,
        "--from",
        "synthetic-0000000",
        "--to",
        "synthetic-0000003",
        "--store",
        t,
    ],
    "shift": lambda m, s, t: ["shift", s, "--from-label", "0", "--to-label", "1", "--store", t],
    "score": lambda m, s, t: ["score", t, "--reference", s],
    "stats --save": lambda m, s, t: ["stats", t, "--save"],
}


@pytest.mark.parametrize("where", ["a file", "under a file"])
@pytest.mark.parametrize("command", list(WRITERS))
def test_every_writer_names_a_path_that_cannot_be_a_folder(
    tmp_path: Path, decoded: tuple[Path, Path], tiny_model: Path, command: str, where: str
) -> None:
    store = Path(shutil.copytree(decoded[0], tmp_path / "s.zarr"))
    np.save(tmp_path / "rows.npy", open_store(str(store)).read_latents(0, 4).astype("float32"))
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    target = blocker if where == "a file" else blocker / "out"
    argv = WRITERS[command](str(tiny_model), str(store), str(target))
    before = sha256s(tmp_path)
    in_process = ("stats --save", "query --decode", "score")  # no cluster to size
    _fails(argv if command in in_process else [*argv, "--workers", "1"], str(target))
    assert sha256s(tmp_path) == before  # nothing written anywhere


@pytest.mark.parametrize("command", list(WRITERS))
def test_every_writer_names_a_read_only_parent(
    tmp_path: Path, decoded: tuple[Path, Path], tiny_model: Path, command: str
) -> None:
    """The target's parent is a read-only file system (a tmpfs mounted read-only in a
    user and mount namespace of its own, as root there: permissions alone would not stop
    root): one sentence naming the path, and nothing written."""
    store = Path(shutil.copytree(decoded[0], tmp_path / "s.zarr"))
    np.save(tmp_path / "rows.npy", open_store(str(store)).read_latents(0, 4).astype("float32"))
    parent = tmp_path / "read-only"
    parent.mkdir()
    target = parent / "out"
    argv = WRITERS[command](str(tiny_model), str(store), str(target))
    before = sha256s(tmp_path)
    in_process = ("stats --save", "query --decode", "score")  # no cluster to size
    mounted = ["unshare", "--map-root-user", "--mount", "sh", "-c",
               f'mount -t tmpfs -o ro none "{parent}" && exec "$@"', "sh"]  # fmt: skip
    argv = argv if command in in_process else [*argv, "--workers", "1"]
    error = _fails(argv, str(target), before=mounted)
    if command not in ("score", "stats --save"):  # these name a store that is not there
        assert f"{parent} is on a read-only file system" in error
    assert sha256s(tmp_path) == before  # nothing written anywhere
