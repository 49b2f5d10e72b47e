"""What an output folder holds: per-shard records while a decode runs, the manifest after.

::

    OUT/.records/shard-000000.json   one ShardRecord (+ the decode's identity) per finished
                                     shard, written right after the shard itself
    OUT/shards.jsonl                 the shard table: one ShardRecord per line (index,
                                     path, start/stop rows, count, bytes, sha256), in
                                     index order, written once at the end
    OUT/manifest.json                one Manifest, written last, atomically

A :class:`Manifest` (format 2) is a summary whose size does not grow with the output: the
store (url, uuid, committed count), the model id, the output format and the settings that
shape the bytes, the image count, and the shard table's path, length and sha256. Readers
stream the table (:func:`iter_shards`). Format-1 manifests of earlier releases, which list
their shards inline, are still read. A decode of a selection of rows (``latentbatch query
--decode``) lists the selected rows in ``selection``. This module is the only one that
reads or writes these files.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from latentbatch.errors import OutputError
from latentbatch.storage.fs import StorageOptions, filesystem, join, write_bytes, write_json

MANIFEST = "manifest.json"
SHARD_TABLE = "shards.jsonl"
RECORDS = ".records"
MANIFEST_FORMAT = 2


@dataclass(frozen=True, kw_only=True)
class ShardRecord:
    """What one finished output shard holds: store rows ``[start, stop)``; and how its
    decoder calls ran: ``batches``, of which ``fp32_again`` held NaN or Inf in reduced
    precision and were decoded again in fp32 (0 in the records of earlier releases)."""

    index: int
    path: str
    start: int
    stop: int
    bytes: int
    sha256: str
    batches: int = 0
    fp32_again: int = 0

    @property
    def count(self) -> int:
        return self.stop - self.start

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "count": self.count}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShardRecord:
        return cls(
            index=int(data["index"]),
            path=str(data["path"]),
            start=int(data["start"]),
            stop=int(data["stop"]),
            bytes=int(data["bytes"]),
            sha256=str(data["sha256"]),
            batches=int(data.get("batches", 0)),
            fp32_again=int(data.get("fp32_again", 0)),
        )


@dataclass(frozen=True, kw_only=True)
class StoreRef:
    """The store a decode read: where, which one (uuid) and how many committed rows."""

    url: str
    uuid: str
    count: int


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """The summary of a finished decode (see the module docstring). Its shards are in the
    shard table, read by :func:`iter_shards`; a format-1 manifest (older releases) kept
    them inline, in ``inline_shards``."""

    store: StoreRef
    model_id: str
    output_format: str
    count: int
    shard_count: int
    shard_table_sha256: str | None = None
    format_settings: dict[str, Any] | None = None
    selection: tuple[int, ...] | None = None
    inline_shards: tuple[ShardRecord, ...] | None = None
    format: int = field(default=MANIFEST_FORMAT)
    environment: dict[str, Any] | None = None  # what shaped the pixels (not checked)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "format": self.format,
            "store": asdict(self.store),
            "model_id": self.model_id,
            "output_format": self.output_format,
            "count": self.count,
        }
        if self.inline_shards is not None:
            data["shards"] = [s.to_dict() for s in self.inline_shards]
        else:
            data["shard_table"] = {
                "path": SHARD_TABLE,
                "shards": self.shard_count,
                "sha256": self.shard_table_sha256,
            }
        if self.format_settings is not None:
            data["format_settings"] = self.format_settings
        if self.selection is not None:
            data["selection"] = list(self.selection)
        if self.environment is not None:
            data["environment"] = self.environment
        return data

    @classmethod
    def from_dict(cls, data: Any, where: str = MANIFEST) -> Manifest:
        """Parse a manifest of format 2 or 1; anything that is not one raises
        :class:`OutputError`."""
        try:
            if data["format"] not in (1, MANIFEST_FORMAT):
                raise OutputError(
                    f"{where} has manifest format {data['format']!r}; this latentbatch reads "
                    f"formats 1 and {MANIFEST_FORMAT} (upgrade latentbatch, or choose another "
                    "--out)"
                )
            store = data["store"]
            selection = data.get("selection")
            if data["format"] == 1:
                inline = tuple(ShardRecord.from_dict(s) for s in data["shards"])
                table: dict[str, Any] = {"shards": len(inline), "sha256": None}
            else:
                inline, table = None, data["shard_table"]
                if table["path"] != SHARD_TABLE:
                    raise ValueError(f"shard table {table['path']!r} is not {SHARD_TABLE}")
            return cls(
                store=StoreRef(
                    url=str(store["url"]), uuid=str(store["uuid"]), count=int(store["count"])
                ),
                model_id=str(data["model_id"]),
                output_format=str(data["output_format"]),
                count=int(data["count"]),
                shard_count=int(table["shards"]),
                shard_table_sha256=None if table["sha256"] is None else str(table["sha256"]),
                format_settings=data.get("format_settings"),
                selection=None if selection is None else tuple(int(r) for r in selection),
                inline_shards=inline,
                format=int(data["format"]),
                environment=data.get("environment"),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise OutputError(
                f"{where} is not a latentbatch manifest ({type(exc).__name__}: {exc}); "
                "move it away or choose another --out"
            ) from None


def read_manifest(out_url: str, options: StorageOptions | None = None) -> Manifest | None:
    """The manifest of ``out_url``, or None when there is none yet."""
    fs, root = filesystem(out_url, options)
    path = join(root, MANIFEST)
    if not fs.exists(path):
        return None
    where = join(out_url, MANIFEST)
    try:
        data = json.loads(fs.cat_file(path))
    except ValueError as exc:
        raise OutputError(f"{where} is not valid JSON; move it away or delete it") from exc
    return Manifest.from_dict(data, where)


def write_manifest(
    out_url: str,
    options: StorageOptions | None,
    *,
    store: StoreRef,
    model_id: str,
    output_format: str,
    count: int,
    shards: Sequence[ShardRecord],
    format_settings: dict[str, Any] | None = None,
    selection: tuple[int, ...] | None = None,
    environment: dict[str, Any] | None = None,
) -> Manifest:
    """Write ``OUT/shards.jsonl`` (one record per line, in index order), then
    ``OUT/manifest.json`` naming it with its sha256; each atomically. Returns the
    manifest. ``environment`` records what shaped the pixels
    (:func:`latentbatch.engine.kernel.environment` per distinct worker setting)."""
    table = b"".join(json.dumps(s.to_dict(), sort_keys=True).encode() + b"\n" for s in shards)
    write_bytes(join(out_url, SHARD_TABLE), table, options)
    manifest = Manifest(
        store=store,
        model_id=model_id,
        output_format=output_format,
        count=count,
        shard_count=len(shards),
        shard_table_sha256=hashlib.sha256(table).hexdigest(),
        format_settings=format_settings,
        selection=selection,
        environment=environment,
    )
    write_json(join(out_url, MANIFEST), manifest.to_dict(), options)
    return manifest


def iter_shards(
    out_url: str, options: StorageOptions | None, manifest: Manifest
) -> Iterator[ShardRecord]:
    """The shard records of a finished decode, in index order, read line by line (a
    billion-row output's table is never held whole); the table's sha256 is checked
    against the manifest's once it has been read."""
    if manifest.inline_shards is not None:
        yield from manifest.inline_shards
        return
    fs, root = filesystem(out_url, options)
    where = join(out_url, SHARD_TABLE)
    digest = hashlib.sha256()
    try:
        with fs.open(join(root, SHARD_TABLE), "rb") as handle:
            for line in handle:
                digest.update(line)
                yield ShardRecord.from_dict(json.loads(line))
    except FileNotFoundError:
        raise OutputError(f"{where} is missing; run the decode again, which rewrites it") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise OutputError(
            f"{where} is damaged ({exc}); run the decode again, which rewrites it"
        ) from None
    if digest.hexdigest() != manifest.shard_table_sha256:
        raise OutputError(
            f"{where} is not the table its manifest records (sha256 differs); run the "
            "decode again, which rewrites it"
        )


def write_record(
    out_url: str, options: StorageOptions | None, record: ShardRecord, identity: dict[str, Any]
) -> None:
    """Record a finished shard (after the shard itself is in place)."""
    payload = json.dumps({**record.to_dict(), **identity}, indent=1, sort_keys=True).encode()
    write_bytes(join(out_url, RECORDS, f"shard-{record.index:06d}.json"), payload, options)


def begun_settings(
    out_url: str, options: StorageOptions | None, store_uuid: str, manifest: Manifest | None
) -> dict[str, Any] | None:
    """The settings an output at ``out_url`` (whose manifest, read by the caller, is
    ``manifest``) was begun with for the store ``store_uuid``: the manifest's
    ``format_settings``, or else the first readable finished-shard record of that store
    (records carry them); None when neither exists (a new output, or one another store's
    decode began: that one's leftovers are not this decode's)."""
    if manifest is not None:
        return dict(manifest.format_settings or {}) if manifest.store.uuid == store_uuid else None
    fs, root = filesystem(out_url, options)
    folder = join(root, RECORDS)
    if not fs.exists(folder):
        return None
    for path in sorted(fs.ls(folder, detail=False)):
        if path.endswith(".json") and "/." not in path[len(folder) :]:
            try:
                data = json.loads(fs.cat_file(path))
            except ValueError:
                continue
            if isinstance(data, dict) and data.get("store_uuid") == store_uuid:
                return data
    return None


def read_records(
    out_url: str, options: StorageOptions | None, identity: dict[str, Any]
) -> dict[int, ShardRecord]:
    """Records of finished shards that belong to ``identity`` and whose file is present
    with the recorded size."""
    fs, root = filesystem(out_url, options)
    folder = join(root, RECORDS)
    if not fs.exists(folder):
        return {}
    found: dict[int, ShardRecord] = {}
    for path in fs.ls(folder, detail=False):
        if not path.endswith(".json") or "/." in path[len(folder) :]:
            continue
        try:
            data = json.loads(fs.cat_file(path))
            record = ShardRecord.from_dict(data)
        except (ValueError, KeyError, TypeError):
            continue
        if any(data.get(k) != v for k, v in identity.items()):
            continue
        target = join(root, record.path)
        if not fs.exists(target):
            continue
        size = fs.du(target) if fs.isdir(target) else fs.size(target)
        if size == record.bytes:
            found[record.index] = record
    return found
