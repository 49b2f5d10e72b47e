"""Prefect helpers for the flows: artifacts, storage blocks, and the retrying task.

Prefect lives in ``flows/`` only (an import-linter contract in ``pyproject.toml`` keeps
it out of ``latentbatch``); the flows stay thin and call the library for the work.
"""

from __future__ import annotations

import base64
import io
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ParamSpec, TypeVar
from uuid import UUID

import numpy as np
from PIL import Image
from prefect import Task, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State, TaskRun

from latentbatch.engine.cluster import ClusterError
from latentbatch.errors import LatentbatchError
from latentbatch.figures import image_grid
from latentbatch.previews import derived_preview
from latentbatch.progress import Progress
from latentbatch.stores.store import open_store

PREVIEW_MAX_BYTES = 60_000
RETRIES, RETRY_DELAY_SECONDS = 2, 5
P = ParamSpec("P")
R = TypeVar("R")


class StorageBlockError(LatentbatchError):
    """A flow's storage block is missing or does not hold storage options."""


def storage_options(block: str | None) -> dict[str, Any] | None:
    """The s3fs storage options kept in the Prefect ``Secret`` block named ``block``
    (created once in the UI under Blocks, a JSON value such as ``{"key": ..., "secret":
    ..., "endpoint_url": ...}``), or None without a block: then local paths, or S3 through
    the environment's AWS settings. The values never enter parameters or logs."""
    if not block:
        return None
    from prefect.blocks.system import Secret

    try:
        value = Secret.load(block).get()  # type: ignore[union-attr]  # sync here, not awaited
    except ValueError:
        raise StorageBlockError(
            f"there is no Prefect Secret block named {block!r}; create one under Blocks → "
            "Secret whose value is the JSON of your s3fs options (key, secret, endpoint_url)"
        ) from None
    if not isinstance(value, dict):
        raise StorageBlockError(
            f"the Secret block {block!r} holds a {type(value).__name__}, not a JSON object of "
            's3fs options such as {"key": ..., "secret": ..., "endpoint_url": ...}'
        )
    return dict(value)


def is_transient(error: BaseException) -> bool:
    """Whether retrying might succeed: I/O and connection trouble (an object store gone
    for a moment included), not bad input."""
    if isinstance(error, ClusterError):
        return True
    if isinstance(error, LatentbatchError):
        return False
    if isinstance(error, OSError | TimeoutError | ConnectionError):
        return True
    return _is_botocore_connection_error(error)


def _is_botocore_connection_error(error: BaseException) -> bool:
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError
    except ImportError:  # no S3 support installed
        return False
    return isinstance(error, BotoConnectionError)


def retry_transient(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """``retry_condition_fn`` for tasks: retry transient failures only."""
    try:
        state.result()
    except BaseException as error:
        return is_transient(error)
    return False


def retrying_task(
    name: str, task_run_name: str | None = None
) -> Callable[[Callable[P, R]], Task[P, R]]:
    """Prefect's ``@task`` for work that reads and writes stores on a cluster: retried
    :data:`RETRIES` times, :data:`RETRY_DELAY_SECONDS` apart, when the failure is
    transient (:func:`is_transient`), and never cached (a rerun must look at the store
    again). The one definition the encode, decode and nightly flows use."""
    return task(
        name=name,
        task_run_name=task_run_name,
        retries=RETRIES,
        retry_delay_seconds=RETRY_DELAY_SECONDS,
        retry_condition_fn=retry_transient,
        cache_policy=NO_CACHE,
    )


def png_data_url(picture: Image.Image, max_bytes: int = PREVIEW_MAX_BYTES) -> str:
    """A ``data:image/png;base64,...`` URL, halving the picture until it fits."""
    while True:
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG", optimize=True)
        data = buffer.getvalue()
        if len(data) <= max_bytes or picture.width < 64:
            return "data:image/png;base64," + base64.b64encode(data).decode()
        picture = picture.resize(
            (picture.width // 2, picture.height // 2), Image.Resampling.LANCZOS
        )


def preview_artifact(
    key: str, title: str, rows: Sequence[np.ndarray], caption: str, scale: int = 2
) -> str:
    """A markdown artifact showing rows of ``uint8 (n, H, W, C)`` images; returns its id."""
    picture = image_grid(rows, scale=scale)
    markdown = f"### {title}\n\n![{title}]({png_data_url(picture)})\n\n{caption}\n"
    return str(create_markdown_artifact(markdown=markdown, key=key, description=title))


def derived_artifact(
    key: str, title: str, model_dir: str, store_url: str, caption: str, options: Any
) -> str:
    """A preview artifact of a derived store (:func:`latentbatch.previews.derived_preview`:
    samples per label, an interpolation strip, before/after pairs, imported rows)."""
    store = open_store(store_url, options)
    rows = derived_preview(model_dir, store)
    return preview_artifact(key, title, rows, caption, scale=max(1, 64 // store.image_size[0]))


def picture_artifact(key: str, title: str, path: Path, caption: str = "") -> str:
    """A markdown artifact showing a PNG file (shrunk to fit); returns its id."""
    with Image.open(path) as picture:
        url = png_data_url(picture.convert("RGB"))
    markdown = f"### {title}\n\n![{title}]({url})\n\n{caption}\n"
    return str(create_markdown_artifact(markdown=markdown, key=key, description=title))


def summary_artifact(key: str, title: str, rows: list[dict[str, Any]]) -> str:
    """A table artifact; returns its id."""
    return str(create_table_artifact(table=rows, key=key, description=title))


class ProgressReporter:
    """A progress artifact updated from engine progress callbacks (at most once a second).

    Updates are best effort: when the API cannot be reached the work goes on.
    """

    def __init__(self, key: str, description: str, min_interval: float = 1.0) -> None:
        artifact_id = create_progress_artifact(progress=0.0, key=key, description=description)
        if not isinstance(artifact_id, UUID):  # a coroutine only inside an event loop
            raise TypeError("ProgressReporter must be created in synchronous code")
        self.artifact_id = artifact_id
        self._min_interval = min_interval
        self._last = 0.0

    def __call__(self, progress: Progress) -> None:
        now = time.monotonic()
        finished = progress.done_tasks == progress.total_tasks
        if finished or now - self._last >= self._min_interval:
            percent = 100.0 * progress.done_items / max(1, progress.total_items)
            try:
                update_progress_artifact(artifact_id=self.artifact_id, progress=percent)
            except Exception as error:
                # an API outage must not stop the work the progress is about
                logging.getLogger(__name__).warning("progress artifact not updated: %s", error)
            self._last = now
