from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from latentbatch.cli import main
from tests.helpers import train_tiny


@pytest.mark.parametrize(
    "argv", [["--help"], ["train", "--help"], ["models", "--help"], ["models", "list", "--help"],
             ["models", "show", "--help"], ["demo", "--help"]]
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


def test_demo_trains_then_reuses(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["demo", "--models", str(tmp_path), "--epochs", "1", "--no-progress"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert "trained model" in first and "reconstructions" in first
    assert (tmp_path / "seed-mnist5k" / "curves.png").is_file()
    assert main(argv) == 0
    assert "reused model" in capsys.readouterr().out
