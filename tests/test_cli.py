from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from latentbatch.cli import main
from latentbatch.models.checkpoint import read_info
from tests.helpers import train_tiny


@pytest.mark.parametrize(
    "argv", [["--help"], ["train", "--help"], ["models", "--help"], ["models", "list", "--help"],
             ["models", "show", "--help"], ["demo", "--help"], ["encode", "--help"],
             ["decode", "--help"], ["inspect", "--help"], ["verify", "--help"],
             ["generate", "--help"], ["interpolate", "--help"], ["shift", "--help"]]
)  # fmt: skip
def test_help_on_every_command(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 0
    assert "Usage" in capsys.readouterr().out


def test_train_then_list_and_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "models" / "digits"
    argv = ["train", "--data", "digits", "--preset", "compact", "--epochs", "1", "--seed", "3"]
    argv += ["--limit", "64", "--image-size", "16", "--out", str(out), "--no-progress", "--json"]
    assert main(argv) == 0
    trained = json.loads(capsys.readouterr().out)
    assert trained["model_dir"] == str(out) and len(trained["history"]) == 1
    assert Path(trained["reconstructions"]).is_file() and Path(trained["curves"]).is_file()

    assert main(["models", "list", str(tmp_path / "models"), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [m["model_id"] for m in listed["models"]] == [trained["model_id"]]
    assert listed["models"][0]["image"] == "16x16x1" and listed["broken"] == []

    assert main(["models", "show", str(out), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["model_id"] == trained["model_id"]
    assert shown["training"]["config"]["seed"] == 3

    assert main(["models", "show", str(out)]) == 0
    assert trained["model_id"] in capsys.readouterr().out


def test_models_list_reports_broken_directories(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "400")
    train_tiny(tmp_path / "good", epochs=1)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{}")
    assert main(["models", "list", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "good" in out and "unreadable" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--data", "imagenet"], "error: unknown data source 'imagenet'"),
        (["train", "--preset", "huge", "--data", "digits"], "error: unknown preset 'huge'"),
        (["train", "--data", "digits", "--loss", "l1"], "error: unknown loss 'l1'"),
        (["train", "--data", "digits", "--lambda", "0.01"], "error: --lambda is for the codec"),
        (["train", "--data", "digits", "--preset", "codec", "--lambda", "-1"], "error: lambda"),
        (
            ["models", "show", "/nonexistent/model"],
            "error: model directory /nonexistent/model does not exist",
        ),
        (["models", "list", "/nonexistent"], "error: /nonexistent is not a folder"),
    ],
)
def test_bad_input_exits_nonzero_with_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--epochs", "0"]) == 2
    assert "--epochs" in capsys.readouterr().err


def test_installed_entry_point_runs(tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("latentbatch")
    result = subprocess.run([exe, "models", "show", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 1
    assert (
        result.stderr.strip()
        == f"error: {tmp_path} is not a model directory: config.json is missing"
    )


def test_demo_runs_the_chain_then_reuses_the_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["demo", "--models", str(tmp_path / "models"), "--workdir", str(tmp_path / "work")]
    argv += ["--epochs", "1", "--workers", "1", "--no-progress", "--json"]
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["images"] == first["decoded"] == first["encoded"] == 5000
    assert abs(first["psnr_cost_db"]) < 0.2
    assert first["decode_images_per_second"] > 0
    assert (tmp_path / "models" / "seed-mnist5k" / "curves.png").is_file()
    assert (tmp_path / "work" / "mnist5k-seed-decoded" / "manifest.json").is_file()
    assert main([*argv[:-1]]) == 0
    out = capsys.readouterr().out
    assert "reused model" in out
    assert "PSNR, decoded tar shards" in out


def _engine_cli(tmp_path: Path, model: Path, capsys: pytest.CaptureFixture[str]) -> dict:
    store, out = str(tmp_path / "s.zarr"), str(tmp_path / "out")
    common = ["--workers", "1", "--no-progress"]
    argv = ["encode", "--model", str(model), "--data", "synthetic:40", "--store", store]
    assert main([*argv, "--shard-rows", "16", "--chunk-rows", "8", *common]) == 0
    assert "encoded 40 images" in capsys.readouterr().out
    assert main([*argv, *common]) == 0
    assert "already in" in capsys.readouterr().out
    assert main(["decode", "--model", str(model), "--store", store, "--out", out, *common]) == 0
    assert "decoded 40 of 40 images" in capsys.readouterr().out
    assert main(["inspect", store, "--bytes", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_encode_decode_inspect(
    tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = _engine_cli(tmp_path, tiny_model, capsys)
    assert report["count"] == report["written_rows"] == 40
    assert report["shard_rows"] == 16
    assert report["shards"] == 3
    assert report["latent_shape"] == [2, 4, 4]
    assert report["latent_dtype"] == "float16"
    assert report["pending"] is None
    assert report["bits_per_pixel"] == pytest.approx(
        8 * report["bytes"]["latents"] / (40 * 16 * 16)
    )
    assert main(["inspect", str(tmp_path / "s.zarr"), "--bytes"]) == 0
    text = capsys.readouterr().out
    assert "40 committed, 40 written" in text
    assert "bits/pixel" in text
    assert main(["inspect", str(tmp_path / "s.zarr")]) == 0  # metadata only
    text = capsys.readouterr().out
    assert "40 committed, capacity 40" in text and "bits/pixel" not in text
    assert "not measured: --bytes lists every object of the store" in text
    assert main(["inspect", str(tmp_path / "s.zarr"), "--json"]) == 0
    quick = json.loads(capsys.readouterr().out)
    assert (quick["bytes"], quick["bits_per_pixel"], quick["written_rows"]) == (None, None, None)


def test_models_show_gives_a_codec_models_lambda_and_estimated_rate(
    tiny_codec_model: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["models", "show", str(tiny_codec_model)]) == 0
    text = capsys.readouterr().out
    history = read_info(tiny_codec_model).meta["training"]["history"]
    assert "lambda  0.01" in text and f"val_bpp  {history[-1]['val_bpp']}" in text
    assert f"SSIM {history[0]['val_ssim']:.3f}, {history[0]['val_bpp']:.3f} bpp" in text
    assert main(["models", "show", str(tiny_model)]) == 0
    assert "lambda" not in capsys.readouterr().out


def test_a_codec_store_encodes_decodes_and_inspects_as_int8(
    tmp_path: Path, tiny_codec_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = _engine_cli(tmp_path, tiny_codec_model, capsys)
    assert (report["latent_dtype"], report["format"]) == ("int8", 2)
    assert report["chunk_shape"] == [16, 1, 4, 4]
    assert report["quantization"]["prior"] == "logistic"
    assert main(["inspect", str(tmp_path / "s.zarr")]) == 0
    text = capsys.readouterr().out
    assert "4x4x4 int8 (integers, step 1; entropy model: logistic per channel)" in text
    assert "one channel of 16 rows per chunk, 16 per shard" in text
    store = str(tmp_path / "other.zarr")
    argv = ["encode", "--model", str(tiny_codec_model), "--data", "synthetic:4", "--store", store]
    assert main([*argv, "--latent-dtype", "float32", "--workers", "1"]) == 1
    assert "latents are integers, stored as int8; drop --latent-dtype float32" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["inspect", "/nonexistent.zarr"], "error: /nonexistent.zarr does not exist"),
        (["encode", "--model", "/nonexistent", "--data", "digits", "--store", "x"], "error: model"),
        (["decode", "--model", "/nonexistent", "--store", "x", "--out", "y"], "error: model"),
        (
            ["encode", "--model", "m", "--data", "d", "--store", "s", "--storage-option", "x"],
            "error: ",
        ),
    ],
)
def test_engine_commands_refuse_bad_input(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 1
    assert capsys.readouterr().err.startswith(message)


ENGINE = ("torch", "distributed", "matplotlib", "pandas", "xarray", "diffusers")
_PROBE = """
import json, sys
from latentbatch.cli import main
code = main(sys.argv[2:])
print(json.dumps([m for m in {engine!r} if m in sys.modules]), file=open(sys.argv[1], "w"))
sys.exit(code)
"""


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["inspect", "{store}"],
        ["stores", "{root}"],
        ["models", "list", "{models}"],
        ["models", "show", "{model}"],
        ["models", "show", "{vae}"],
        ["query", "{store}", "--label", "3"],
        ["query", "{store}", "--label", "3", "--json"],
        ["stats", "{store}"],
    ],
    ids=lambda argv: " ".join(a for a in argv if not a.startswith("{")),
)
def test_quick_commands_import_no_engine(
    argv: list[str], mnist_store: Path, seed_model: Path, kl_vae: Path, tmp_path: Path
) -> None:
    """Each in a fresh process: torch, distributed, matplotlib, pandas, xarray and
    diffusers stay unimported (the engine is imported by the commands that need it, when
    they run)."""
    places = {
        "{store}": str(mnist_store),
        "{root}": str(mnist_store.parent),
        "{models}": str(seed_model.parent),
        "{model}": str(seed_model),
        "{vae}": str(kl_vae),
    }
    args = [places.get(a, a) for a in argv]
    found = tmp_path / "modules.json"
    probe = _PROBE.format(engine=ENGINE)
    run = subprocess.run(
        [sys.executable, "-c", probe, str(found), *args], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip()
    assert json.loads(found.read_text()) == []


def test_a_command_that_decodes_imports_the_engine(mnist_store: Path, tmp_path: Path) -> None:
    """The probe above can see the engine: ``query --near`` runs Dask."""
    found = tmp_path / "modules.json"
    argv = ["query", str(mnist_store), "--near", "mnist5k-00001", "-k", "2"]
    probe = _PROBE.format(engine=("distributed", "dask"))
    run = subprocess.run(
        [sys.executable, "-c", probe, str(found), *argv], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert "dask" in json.loads(found.read_text())
