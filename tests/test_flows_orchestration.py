from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

from flows.orchestration import is_transient, png_data_url
from latentbatch.engine.cluster import ClusterError
from latentbatch.errors import DataError
from latentbatch.stores.store import StoreError


def test_only_transient_failures_are_retried() -> None:
    assert is_transient(OSError("connection reset"))
    assert is_transient(TimeoutError())
    assert is_transient(ClusterError("scheduler unreachable"))
    assert not is_transient(StoreError("not a store"))
    assert not is_transient(DataError("bad image"))
    assert not is_transient(ValueError("bug"))


def test_data_url_shrinks_to_fit() -> None:
    noise = np.random.default_rng(0).integers(0, 256, (600, 600, 3), dtype=np.uint8)
    url = png_data_url(Image.fromarray(noise), max_bytes=50_000)
    data = base64.b64decode(url.removeprefix("data:image/png;base64,"))
    assert len(data) <= 50_000
    assert Image.open(io.BytesIO(data)).width < 600
