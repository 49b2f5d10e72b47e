"""Find latent stores under a root and tell whether their decoded output is current.

Used by ``latentbatch stores ROOT`` and by the nightly bulk decode. A store's output in
a bulk decode lives at the same relative path under the output root, without ``.zarr``:
``ROOT/a/b.zarr`` → ``OUT_ROOT/a/b``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from latentbatch.errors import LatentbatchError
from latentbatch.models.checkpoint import find_models
from latentbatch.outputs.manifest import read_manifest
from latentbatch.storage.fs import StorageOptions, filesystem, is_remote, join
from latentbatch.stores.store import ATTRS, open_store

Status = Literal["missing", "stale", "complete", "foreign", "damaged"]


@dataclass(frozen=True, kw_only=True)
class StoreEntry:
    """A store found under a root: where it is and what its metadata says."""

    url: str
    relative: str
    meta: dict[str, Any]
    damage: str | None = None  # why a store-shaped folder cannot be opened as a store

    @property
    def count(self) -> int:
        return int(self.meta.get("count", 0))

    @property
    def uuid(self) -> str:
        return str(self.meta.get("uuid", ""))


def _url(fs_path: str, root_url: str, root_path: str) -> str:
    if not is_remote(root_url):
        return fs_path
    scheme = root_url.split("://", 1)[0]
    return f"{scheme}://{fs_path}" if not fs_path.startswith(f"{scheme}://") else fs_path


def find_stores(root: str, options: StorageOptions | None = None) -> list[StoreEntry]:
    """Every latent store (a Zarr group with latentbatch attributes) under ``root``,
    sorted by path. Folders inside a store are not searched. A folder whose ``zarr.json``
    is damaged but which holds a ``latents`` array is listed with its ``damage``."""
    fs, root_path = filesystem(root, options)
    if not fs.isdir(root_path):
        return []
    found: list[StoreEntry] = []
    for folder, dirs, files in fs.walk(root_path, topdown=True):
        if "zarr.json" not in files:
            continue
        url = _url(folder, root, root_path)
        relative = folder[len(root_path.rstrip("/")) :].strip("/")
        try:
            meta = json.loads(fs.cat_file(join(folder, "zarr.json")))
        except OSError:
            continue
        except ValueError:
            meta = None
        if not isinstance(meta, dict):
            if "latents" in dirs and fs.exists(join(folder, "latents", "zarr.json")):
                damage = "its zarr.json is not a Zarr group's metadata (damaged)"
                found.append(StoreEntry(url=url, relative=relative, meta={}, damage=damage))
                dirs.clear()
            continue
        if meta.get("node_type") != "group":
            continue
        attrs = meta.get("attributes", {}).get(ATTRS)
        if isinstance(attrs, dict) and attrs.get("format") is not None:
            found.append(StoreEntry(url=url, relative=relative, meta=attrs))
            dirs.clear()
    return sorted(found, key=lambda e: e.relative)


def output_url(entry: StoreEntry, out_root: str) -> str:
    """Where a bulk decode puts ``entry``'s output."""
    return join(out_root, entry.relative.removesuffix(".zarr") or "store")


def output_status(entry: StoreEntry, out_url: str, options: StorageOptions | None = None) -> Status:
    """``damaged`` (the store cannot be opened), ``missing`` (no manifest), ``foreign``
    (another store's), ``stale`` (the store has grown or its model changed since) or
    ``complete``."""
    if entry.damage is not None:
        return "damaged"
    manifest = read_manifest(out_url, options)
    if manifest is None:
        return "missing"
    if manifest.store.uuid != entry.uuid:
        return "foreign"
    if manifest.count != entry.count or manifest.model_id != entry.meta.get("model_id"):
        return "stale"
    return "complete"


@dataclass(frozen=True, kw_only=True)
class BulkItem:
    """One store of a bulk decode: where its output goes and what state it is in."""

    entry: StoreEntry
    out: str
    status: Status
    detail: str | None = None  # why a store is damaged or an output foreign, when known

    @property
    def needs_decode(self) -> bool:
        return self.status in ("missing", "stale")


def plan_bulk(root: str, out_root: str, options: StorageOptions | None = None) -> list[BulkItem]:
    """Every store under ``root`` with the state of its output under ``out_root``."""
    items = []
    for entry in find_stores(root, options):
        out = output_url(entry, out_root)
        try:
            status = output_status(entry, out, options)
            detail = entry.damage
        except LatentbatchError as exc:  # an output folder that is not ours
            status, detail = "foreign", str(exc)
        items.append(BulkItem(entry=entry, out=out, status=status, detail=detail))
    return items


def describe_stores(
    root: str,
    outputs: str | None = None,
    options: StorageOptions | None = None,
    with_bytes: bool = False,
) -> list[dict[str, Any]]:
    """One row per store under ``root`` (what ``latentbatch stores`` shows): rows, latent
    shape and dtype, model id, creation time, and with ``outputs`` the status of its
    bulk-decode output under that root; all from metadata, so a store's size does not
    matter. ``with_bytes`` adds each store's bytes on disk (a listing of all its objects;
    None otherwise). A store that cannot be opened gets a row with only ``store`` and
    ``damaged`` (the reason), and the listing carries on."""
    rows: list[dict[str, Any]] = []
    for entry in find_stores(root, options):
        damage = entry.damage
        if damage is None:
            try:
                store = open_store(entry.url, options)
            except LatentbatchError as exc:
                damage = str(exc)
        if damage is not None:
            rows.append({"store": entry.url, "damaged": damage})
            continue
        status = None
        if outputs is not None:
            try:
                status = output_status(entry, output_url(entry, outputs), options)
            except LatentbatchError:
                status = "damaged"
        rows.append(
            {
                "store": entry.url,
                "count": store.count,
                "latent_shape": list(store.latent_shape),
                "latent_dtype": str(store.latents.dtype),
                "model_id": store.model_id,
                "created": store.meta["created"],
                "derived": (store.meta.get("lineage") or {}).get("operation"),
                "bytes": store.bytes_on_disk()["total"] if with_bytes else None,
                "output": status,
                "damaged": None,
            }
        )
    return rows


def models_by_id(models_root: str, options: StorageOptions | None = None) -> dict[str, str]:
    """Model directories under ``models_root`` (a folder or URL prefix) keyed by model id
    (unreadable ones left out)."""
    found: dict[str, str] = {}
    for info in find_models(models_root, options).models:
        found.setdefault(info.model_id, info.location)
    return found
