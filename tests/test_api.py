"""The public API of ``latentbatch`` (its ``__init__``)."""

from __future__ import annotations

import subprocess
import sys

import pytest

import latentbatch


def test_every_public_name_resolves_to_its_owner() -> None:
    assert latentbatch.__all__ == sorted(latentbatch.__all__)
    for name in latentbatch.__all__:
        value = getattr(latentbatch, name)
        assert value.__module__.startswith("latentbatch.")
    assert latentbatch.decode_store is latentbatch.decode.decode  # type: ignore[attr-defined]
    assert latentbatch.train_model.__name__ == "train"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = latentbatch.nope  # type: ignore[attr-defined]


def test_opening_and_querying_stores_imports_no_torch() -> None:
    code = (
        "import sys, latentbatch, latentbatch.stores.query, latentbatch.stores.store;"
        "import latentbatch.outputs.manifest;"
        "latentbatch.open_store; latentbatch.select; latentbatch.read_manifest;"
        "print('torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
