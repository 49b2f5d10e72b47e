"""Parameter types shared by the flows, so every UI form names them alike, and
:func:`described`, which shows their descriptions in the Prefect UI."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from typing import Annotated, Literal, TypeVar

from pydantic import Field
from pydantic.fields import FieldInfo

F = TypeVar("F", bound=Callable[..., object])


def described(fn: F) -> F:
    """Add an ``Args:`` section built from the parameters' ``Field(description=...)`` to
    ``fn``'s docstring (put it under ``@flow``): Prefect's parameter forms take their
    descriptions from the docstring, not from ``Annotated`` metadata (tested)."""
    hints = typing.get_type_hints(fn, include_extras=True)
    lines = []
    for name in inspect.signature(fn).parameters:
        metadata = getattr(hints.get(name), "__metadata__", ())
        text = next((m.description for m in metadata if isinstance(m, FieldInfo)), None)
        if text:
            lines.append(f"    {name}: {text}")
    # a summary line first (the flow's own, else its module's), or no Args are found; the
    # module's docstring from the function's globals, however the file was loaded
    module_doc = fn.__globals__.get("__doc__") or fn.__name__
    doc = inspect.cleandoc(fn.__doc__ or module_doc.strip().splitlines()[0])
    fn.__doc__ = f"{doc}\n\nArgs:\n" + "\n".join(lines) if lines else doc
    return fn


ModelDir = Annotated[
    str, Field(description="Model directory: local path or s3:// URL (fetched once per worker)")
]
StoreUrl = Annotated[str, Field(description="Latent store: local path or s3:// URL")]
DataSource = Annotated[
    str, Field(description="mnist5k, digits, photos, synthetic[:N] or folder:PATH")
]
OutputFormat = Annotated[
    Literal["tar", "zarr", "png", "npz"],
    Field(description="Shard format (npz: one samples.npz, as evaluation suites read)"),
]
Scheduler = Annotated[
    str | None, Field(description="Dask scheduler address (empty: local cluster)")
]
Workers = Annotated[int | None, Field(ge=1, description="Workers of the local cluster")]
StorageBlock = Annotated[
    str | None,
    Field(
        description="Name of a Prefect Secret block holding s3fs options as JSON "
        '({"key": ..., "secret": ..., "endpoint_url": ...}), created once under Blocks; '
        "empty: local paths, or S3 through the environment's AWS settings"
    ),
]
ImageCodecName = Annotated[
    Literal["png", "webp", "jpeg"],
    Field(description="Images in tar shards: png (lossless), webp or jpeg"),
]
Quality = Annotated[
    int | None,
    Field(ge=1, le=100, description="Quality 1-100 of webp and jpeg images (default 90)"),
]
DecodePrecision = Annotated[
    Literal["auto", "fp32", "bf16", "fp16"],
    Field(
        description="The decoder's precision (auto: fp32 on CPU; on a GPU fp16 where the "
        "model's config allows it, else bf16 where the GPU has it, else fp32); a batch "
        "holding NaN or Inf is decoded again in fp32"
    ),
]
ImagesPerShard = Annotated[
    int | None,
    Field(
        ge=1,
        description="Images per output shard, exactly (empty: 10240, fewer for large images)",
    ),
]
