"""Parameter types shared by the flows, so every UI form names them alike."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

ModelDir = Annotated[str, Field(description="Model directory")]
StoreUrl = Annotated[str, Field(description="Latent store: local path or s3:// URL")]
DataSource = Annotated[
    str, Field(description="mnist5k, digits, photos, synthetic[:N] or folder:PATH")
]
OutputFormat = Annotated[Literal["tar", "zarr", "png"], Field(description="Shard format")]
Scheduler = Annotated[
    str | None, Field(description="Dask scheduler address (empty: local cluster)")
]
Workers = Annotated[int | None, Field(ge=1, description="Workers of the local cluster")]
