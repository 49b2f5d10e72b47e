"""`latentbatch verify`: an output checked against its manifest and its store."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from distributed import Client

from latentbatch.cli import main
from latentbatch.decode import decode
from latentbatch.encode import encode
from latentbatch.outputs.verify import verify_output
from latentbatch.stores.store import Layout


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, client: Client) -> Path:
    """Two stores of different images (synthetic shapes, digits) decoded in 16-row shards."""
    root = tmp_path_factory.mktemp("verify")
    for name, source in (("t", "synthetic:64"), ("s", "digits")):
        store = str(root / f"{name}.zarr")
        encode(tiny_model, source, store, layout=Layout(16, 8), limit=64, client=client)
        decode(tiny_model, store, str(root / name), images_per_shard=16, client=client)
    return root


def _copy(outputs: Path, tmp_path: Path, name: str = "s") -> Path:
    return Path(shutil.copytree(outputs / name, tmp_path / name))


def _verify(out: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str, str]:
    code = main(["verify", str(out), *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_fresh_output_verifies_with_its_store(
    outputs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _verify(outputs / "s", capsys, "--store", str(outputs / "s.zarr"), "--full")
    assert code == 0
    assert "4 shards, 64 images checked (sha256, ids against" in out and out.rstrip().endswith("ok")
    assert main(["verify", str(outputs / "s"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] and result["shards"] == 4 and result["problems"] == []


def test_a_shard_replaced_by_another_stores_shard_is_named(
    outputs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _copy(outputs, tmp_path)
    shutil.copyfile(outputs / "t" / "shard-000001.tar", out / "shard-000001.tar")
    code, printed, err = _verify(out, capsys, "--store", str(outputs / "s.zarr"))
    assert code == 1
    assert "shard-000001.tar" in printed
    assert err.startswith(f"error: {out} does not match its manifest")
    assert len(err.strip().splitlines()) == 1
    named = {p.shard for p in verify_output(str(out), full=True).problems}
    assert named == {"shard-000001.tar"}  # size or sha256, whichever differs first


def test_plain_verify_finds_another_stores_shard_of_the_same_size(
    outputs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two stores of the same image count and size: a shard of one copied into the other's
    output has the same size (tars pad to 10,240-byte records), so only hashing tells."""
    out = _copy(outputs, tmp_path)
    other = outputs / "t" / "shard-000001.tar"
    assert other.stat().st_size == (out / "shard-000001.tar").stat().st_size
    shutil.copyfile(other, out / "shard-000001.tar")
    code, printed, err = _verify(out, capsys)
    assert code == 1 and "sha256  shard-000001.tar" in printed
    assert f"ids against {outputs / 's.zarr'}" in printed and err.startswith("error: ")
    code, printed, _ = _verify(out, capsys, "--quick")
    assert code == 0 and "sizes only (--quick: a shard of the same size passes)" in printed


def test_a_truncated_shard_is_named(
    outputs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _copy(outputs, tmp_path)
    data = (out / "shard-000002.tar").read_bytes()
    (out / "shard-000002.tar").write_bytes(data[: len(data) // 2])
    code, printed, _ = _verify(out, capsys)
    assert code == 1
    assert "size  shard-000002.tar" in printed and "truncated or replaced" in printed


def test_an_extra_shard_is_named(
    outputs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _copy(outputs, tmp_path)
    shutil.copyfile(out / "shard-000000.tar", out / "shard-000009.tar")
    code, printed, _ = _verify(out, capsys)
    assert code == 1
    assert "extra  shard-000009.tar: not listed in the table" in printed


def test_a_missing_shard_is_named(
    outputs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _copy(outputs, tmp_path)
    (out / "shard-000003.tar").unlink()
    code, printed, _ = _verify(out, capsys)
    assert code == 1
    assert "missing  shard-000003.tar" in printed


def test_the_output_of_another_store_is_named(
    outputs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, printed, _ = _verify(outputs / "t", capsys, "--store", str(outputs / "s.zarr"))
    assert code == 1
    assert "store  manifest.json: the decode of another store" in printed


def test_same_size_replacement_needs_full(outputs: Path, tmp_path: Path) -> None:
    out = _copy(outputs, tmp_path)
    data = bytearray((out / "shard-000000.tar").read_bytes())
    data[600] ^= 0xFF  # inside the first member's image bytes: same size
    (out / "shard-000000.tar").write_bytes(bytes(data))
    assert verify_output(str(out), full=False).ok  # --quick: sizes only
    problems = verify_output(str(out)).problems
    assert [(p.shard, p.kind) for p in problems] == [("shard-000000.tar", "sha256")]


@pytest.mark.parametrize("fmt", ["png", "zarr"])
def test_png_and_zarr_outputs_verify(
    outputs: Path, tiny_model: Path, tmp_path: Path, client: Client, fmt: str
) -> None:
    store = str(outputs / "s.zarr")
    out = tmp_path / fmt
    decode(tiny_model, store, str(out), fmt=fmt, images_per_shard=16, client=client)  # type: ignore[arg-type]
    result = verify_output(str(out), store_url=store, full=True)
    assert result.ok, result.problems
    assert (result.shards, result.images) == (4, 64)
    if fmt == "png":
        victim = next((out / "shard-000001").iterdir())
        victim.write_bytes(victim.read_bytes()[:-1])
        assert [p.kind for p in verify_output(str(out)).problems] == ["size"]


def test_verify_refuses_a_folder_without_a_manifest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["verify", str(tmp_path)]) == 1
    assert "has no manifest.json: it is not a finished decode" in capsys.readouterr().err


def test_the_shards_are_checked_on_a_cluster_when_asked(
    outputs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``verify --workers 2`` hashes and reads the ids of every shard as Dask tasks, and
    finds what the in-process check finds: a good output passes, another store's shard
    of the same size is named, and so is a missing one."""
    good = _copy(outputs, tmp_path, "s")
    code, printed, _ = _verify(good, capsys, "--workers", "2")
    assert code == 0 and "4 shards, 64 images checked (sha256, ids against" in printed
    shutil.copyfile(outputs / "t" / "shard-000002.tar", good / "shard-000002.tar")
    (good / "shard-000003.tar").unlink()
    code, printed, err = _verify(good, capsys, "--workers", "2", "--json")
    found = json.loads(printed)
    assert code == 1 and err.startswith("error: ")
    assert [(p["shard"], p["kind"]) for p in found["problems"]] == [
        ("shard-000002.tar", "sha256"), ("shard-000003.tar", "missing"),
    ]  # fmt: skip
    here = verify_output(str(good))
    assert [(p.shard, p.kind) for p in here.problems] == [
        (p["shard"], p["kind"]) for p in found["problems"]
    ]
