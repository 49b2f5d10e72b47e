"""What a run shows: where its tasks stand (:class:`Progress`, which the engine reports
and progress bars and artifacts show), and whether INFO logs are wanted (:func:`verbose`,
``latentbatch -v``)."""

from __future__ import annotations

import os
from dataclasses import dataclass

VERBOSE_ENV = "LATENTBATCH_VERBOSE"


@dataclass(frozen=True, kw_only=True)
class Progress:
    """Where a run of tasks stands."""

    done_items: int
    total_items: int
    done_tasks: int
    total_tasks: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.done_items / self.seconds if self.seconds > 0 else 0.0

    @property
    def eta(self) -> float | None:
        return (self.total_items - self.done_items) / self.rate if self.rate > 0 else None


def verbose() -> bool:
    """Whether INFO logs of Dask (and the engine) are wanted: ``$LATENTBATCH_VERBOSE``,
    which ``latentbatch -v`` sets."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")
