"""Squared L2 distances between the rows of two matrices, by the expansion
``|a|² + |b|² - 2 a·b`` (one matrix product): the neighbour searches of the anomaly
scores, of shift's matching, and of ``bench/uses.py``."""

from __future__ import annotations

import numpy as np


def squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(len(a), len(b))`` squared distances between the rows of ``a`` and of ``b``
    (flat, same width; in their dtype). Rounding can make a distance of equal rows
    slightly negative: clip where that matters."""
    return np.asarray((a**2).sum(axis=1)[:, None] + (b**2).sum(axis=1)[None, :] - 2 * a @ b.T)
