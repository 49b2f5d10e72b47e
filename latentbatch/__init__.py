"""latentbatch: encode images into sharded Zarr v3 latent stores and decode them at scale.

The public API is the names in ``__all__``; every other module-level name is private by
convention. Names are imported on first use, so ``import latentbatch`` is cheap and
opening or querying a store never imports torch::

    import latentbatch as lb

    model = lb.train_model(lb.preset_config("seed"), lb.TrainConfig("mnist5k", epochs=10),
                           "models/seed-mnist5k").model_dir
    lb.encode_source(model, "mnist5k", "stores/mnist5k.zarr")
    store = lb.open_store("stores/mnist5k.zarr")
    rows = lb.select(store, label=3)
    near = lb.nearest(store, lb.read_rows(store, rows[:1])[0], k=10)
    lb.decode_store(model, "stores/mnist5k.zarr", "decoded/mnist5k")

``train_model``, ``encode_source`` and ``decode_store`` are ``latentbatch.train.train``,
``latentbatch.encode.encode`` and ``latentbatch.decode.decode``: the package cannot call
them ``train``, ``encode`` and ``decode``, the names of the modules that hold them.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import TYPE_CHECKING, Any

__version__ = importlib.metadata.version("latentbatch")  # pyproject.toml's, one source

# public name → (module that owns it, its name there)
_RENAMED = {
    "train_model": ("train", "train"),
    "encode_source": ("encode", "encode"),
    "decode_store": ("decode", "decode"),
}
# public name → module that owns it
_EXPORTS = {
    "LatentbatchError": "errors",
    "ModelConfig": "config",
    "TrainConfig": "config",
    "preset_config": "config",
    "TrainResult": "train",
    "load_model": "models.weights",
    "read_info": "models.checkpoint",
    "ModelInfo": "models.checkpoint",
    "LatentStore": "stores.store",
    "Layout": "stores.store",
    "open_store": "stores.store",
    "create_store": "stores.store",
    "EncodeResult": "encode",
    "decode_selection": "decode",
    "DecodeResult": "decode",
    "Manifest": "outputs.manifest",
    "read_manifest": "outputs.manifest",
    "iter_shards": "outputs.manifest",
    "read_output": "outputs.shards",
    "verify_output": "outputs.verify",
    "Verification": "outputs.verify",
    "select": "stores.query",
    "iter_select": "stores.query",
    "worst": "stores.query",
    "evaluate": "evaluation",
    "Evaluation": "evaluation",
    "read_rows": "stores.query",
    "nearest": "stores.query",
    "statistics": "stores.query",
    "to_xarray": "stores.query",
    "connect": "engine.cluster",
    "run_pipeline": "pipeline",
    "score": "uses.anomaly",
    "ScoreResult": "uses.anomaly",
    "generate": "uses.generation",
    "import_latents": "uses.import_latents",
    "ImportResult": "uses.import_latents",
    "interpolate": "uses.manipulation",
    "shift": "uses.manipulation",
    "DeriveResult": "uses.derive",
    "lineage_of": "uses.derive",
    "fit_latents": "uses.fit",
    "LatentFit": "uses.fit",
}
__all__ = [
    "DecodeResult",
    "DeriveResult",
    "EncodeResult",
    "Evaluation",
    "ImportResult",
    "LatentFit",
    "LatentStore",
    "LatentbatchError",
    "Layout",
    "Manifest",
    "ModelConfig",
    "ModelInfo",
    "ScoreResult",
    "TrainConfig",
    "TrainResult",
    "Verification",
    "connect",
    "create_store",
    "decode_selection",
    "decode_store",
    "encode_source",
    "evaluate",
    "fit_latents",
    "generate",
    "import_latents",
    "interpolate",
    "iter_select",
    "iter_shards",
    "lineage_of",
    "load_model",
    "nearest",
    "open_store",
    "preset_config",
    "read_info",
    "read_manifest",
    "read_output",
    "read_rows",
    "run_pipeline",
    "score",
    "select",
    "shift",
    "statistics",
    "to_xarray",
    "train_model",
    "verify_output",
    "worst",
]

if TYPE_CHECKING:
    from latentbatch.config import ModelConfig, TrainConfig, preset_config
    from latentbatch.decode import DecodeResult, decode_selection
    from latentbatch.decode import decode as decode_store
    from latentbatch.encode import EncodeResult
    from latentbatch.encode import encode as encode_source
    from latentbatch.engine.cluster import connect
    from latentbatch.errors import LatentbatchError
    from latentbatch.evaluation import Evaluation, evaluate
    from latentbatch.models.checkpoint import ModelInfo, read_info
    from latentbatch.models.weights import load_model
    from latentbatch.outputs.manifest import Manifest, iter_shards, read_manifest
    from latentbatch.outputs.shards import read_output
    from latentbatch.outputs.verify import Verification, verify_output
    from latentbatch.pipeline import run_pipeline
    from latentbatch.stores.query import (
        iter_select,
        nearest,
        read_rows,
        select,
        statistics,
        to_xarray,
        worst,
    )
    from latentbatch.stores.store import LatentStore, Layout, create_store, open_store
    from latentbatch.train import TrainResult
    from latentbatch.train import train as train_model
    from latentbatch.uses.anomaly import ScoreResult, score
    from latentbatch.uses.derive import DeriveResult, lineage_of
    from latentbatch.uses.fit import LatentFit, fit_latents
    from latentbatch.uses.generation import generate
    from latentbatch.uses.import_latents import ImportResult, import_latents
    from latentbatch.uses.manipulation import interpolate, shift


def __getattr__(name: str) -> Any:
    module, attribute = _RENAMED.get(name, (_EXPORTS.get(name, ""), name))
    if not module:
        raise AttributeError(f"module 'latentbatch' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"latentbatch.{module}"), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return [*__all__, "__version__"]
