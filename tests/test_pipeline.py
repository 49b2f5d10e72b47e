from __future__ import annotations

from pathlib import Path

import pytest
from distributed import Client

from latentbatch.decode import decode
from latentbatch.pipeline import measure_quality


def test_measure_quality_compares_output_with_float32(
    tmp_path: Path, seed_model: Path, mnist_store: Path, client: Client
) -> None:
    out = tmp_path / "out"
    decode(seed_model, str(mnist_store), str(out), fmt="zarr", client=client)
    quality = measure_quality(seed_model, "mnist5k", str(out))
    assert quality.images == 5000
    assert quality.pipeline_psnr > 15
    assert quality.cost_db == pytest.approx(quality.float32_psnr - quality.pipeline_psnr)
    assert abs(quality.cost_db) < 0.2
