"""latentbatch: encode images into sharded Zarr v3 latent stores and decode them at scale."""

from __future__ import annotations

__version__ = "0.1.0"
