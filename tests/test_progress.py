"""What a run shows: its progress, and whether INFO logs are wanted."""

from __future__ import annotations

import pytest

from latentbatch.progress import VERBOSE_ENV, Progress, verbose


def test_rate_and_eta() -> None:
    progress = Progress(done_items=300, total_items=1000, done_tasks=3, total_tasks=10, seconds=2)
    assert progress.rate == 150
    assert progress.eta == pytest.approx(700 / 150)
    idle = Progress(done_items=0, total_items=10, done_tasks=0, total_tasks=1, seconds=0)
    assert (idle.rate, idle.eta) == (0.0, None)


@pytest.mark.parametrize(
    ("value", "wanted"), [(None, False), ("", False), ("0", False), ("1", True)]
)
def test_verbose_follows_the_environment(
    monkeypatch: pytest.MonkeyPatch, value: str | None, wanted: bool
) -> None:
    if value is None:
        monkeypatch.delenv(VERBOSE_ENV, raising=False)
    else:
        monkeypatch.setenv(VERBOSE_ENV, value)
    assert verbose() is wanted
