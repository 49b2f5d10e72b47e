"""dev.py's set-up output: one line per step with its time, the installers' output in a
log that is shown (its last lines and its path) only when a step fails."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import dev


def test_a_step_prints_one_line_and_logs_its_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "setup.log"
    dev.step("saying hello", [sys.executable, "-c", "print('hello\\n' * 50)"], log)
    out = capsys.readouterr().out
    assert out.startswith("saying hello ... ") and out.endswith(" s\n") and out.count("\n") == 1
    assert log.read_text().count("hello\n") == 50


def test_a_failed_step_shows_the_last_lines_of_its_log_and_its_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "setup.log"
    failing = "import sys\nfor i in range(100): print(f'line {i}')\nsys.exit(3)"
    with pytest.raises(dev.StepFailedError) as raised:
        dev.step("installing", [sys.executable, "-c", failing], log)
    assert raised.value.code == 3
    out = capsys.readouterr().out
    assert out.startswith("installing ... failed (exit 3, ")
    assert "line 99" in out and "line 75" in out and "line 74\n" not in out
    assert out.rstrip().endswith(f"the whole output: {log}")


def test_a_check_is_one_line_unless_it_fails(capsys: pytest.CaptureFixture[str]) -> None:
    env = dev.offline_env()
    dev.check("quiet", [sys.executable, "-c", "print('all good')"], env)
    assert capsys.readouterr().out.startswith("quiet ... ok, ")
    with pytest.raises(dev.StepFailedError):
        dev.check(
            "loud", [sys.executable, "-c", "print('E501 too long'); raise SystemExit(1)"], env
        )
    assert "E501" in capsys.readouterr().out
