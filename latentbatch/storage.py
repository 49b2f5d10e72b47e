"""Locations: local paths and ``s3://`` URLs, through fsspec.

S3 endpoint and keys come from the usual AWS environment variables
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``) or from storage
options (``--storage-option endpoint_url=http://127.0.0.1:9000``), passed to s3fs.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import fsspec
from fsspec import AbstractFileSystem

from latentbatch.errors import ConfigError

StorageOptions = Mapping[str, Any]


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def parse_options(pairs: Iterable[str]) -> dict[str, Any]:
    """``["key=value", ...]`` → dict; ``true``/``false`` and integers are converted."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"storage option {pair!r} is not KEY=VALUE")
        lowered = value.lower()
        options[key] = (
            lowered == "true"
            if lowered in ("true", "false")
            else int(value)
            if value.isdigit()
            else value
        )
    return options


def _s3_defaults(options: StorageOptions) -> dict[str, Any]:
    merged = dict(options)
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
    if endpoint and "endpoint_url" not in merged and "client_kwargs" not in merged:
        merged["endpoint_url"] = endpoint
    return merged


def filesystem(url: str, options: StorageOptions | None = None) -> tuple[AbstractFileSystem, str]:
    """The fsspec filesystem of ``url`` and the path inside it."""
    options = dict(options or {})
    if url.startswith("s3://"):
        options = _s3_defaults(options)
    fs, path = fsspec.core.url_to_fs(url, **options)
    return fs, path


def zarr_options(url: str, options: StorageOptions | None) -> dict[str, Any] | None:
    """Storage options to hand to zarr for ``url`` (None for local paths)."""
    if not is_remote(url):
        return None
    return _s3_defaults(options or {}) if url.startswith("s3://") else dict(options or {})


def join(url: str, *names: str) -> str:
    """Join names onto a path or URL with ``/``."""
    return "/".join([url.rstrip("/"), *names])
