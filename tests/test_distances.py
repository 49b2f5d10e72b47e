"""Squared distances between rows, by one matrix product."""

from __future__ import annotations

import numpy as np

from latentbatch.uses.distances import squared_distances


def test_squared_distances_equal_the_direct_sums() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((5, 7)), rng.standard_normal((3, 7))
    direct = ((a[:, None, :] - b[None, :, :]) ** 2).sum(axis=2)
    np.testing.assert_allclose(squared_distances(a, b), direct, atol=1e-12)
    np.testing.assert_allclose(squared_distances(a, a).diagonal(), 0, atol=1e-12)
