"""Sample ids: validation and derivation.

Ids become file names (``ID.png`` in a tar shard or folder), so only safe ones are kept:
1 to 200 characters from letters, digits and ``_ - + = @ ,``, starting with a letter, digit
or ``_``. That rules out ``/``, ``\\``, ``..``, NUL, whitespace, a leading ``.`` and any
``.`` at all (WebDataset splits a member name at its first dot into key and extension).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from latentbatch.errors import LatentbatchError

MAX_ID_LENGTH = 200
_SAFE = re.compile(r"[\w][\w\-+=@,]*")
_UNSAFE_CHAR = re.compile(r"[^\w\-+=@,]")


class InvalidIdError(LatentbatchError, ValueError):
    """An id is not a safe file name, or ids repeat."""


def validate_id(sample_id: str) -> str:
    """Return ``sample_id`` if it is a safe file name, else raise :class:`InvalidIdError`."""
    if not isinstance(sample_id, str):
        raise InvalidIdError(f"id must be a string, got {type(sample_id).__name__}")
    if not 0 < len(sample_id) <= MAX_ID_LENGTH:
        raise InvalidIdError(f"id {sample_id[:40]!r} must have 1 to {MAX_ID_LENGTH} characters")
    if not _SAFE.fullmatch(sample_id):
        raise InvalidIdError(
            f"id {sample_id!r} is not a safe file name: use letters, digits and _-+=@, only "
            "(no '/', '\\', '.', spaces or control characters), starting with a letter, digit or _"
        )
    return sample_id


def validate_ids(ids: Iterable[str], *, start: int | None = None, where: str = "") -> list[str]:
    """Validate every id and check that none repeats. Ids read from rows ``start, start +
    1, ...`` of ``where`` (a store) are named by row and store when one is bad."""
    seen: set[str] = set()
    out = []
    for offset, sample_id in enumerate(ids):
        try:
            validate_id(sample_id)
            if sample_id in seen:
                raise InvalidIdError(f"id {sample_id!r} appears more than once; ids must be unique")
        except InvalidIdError as error:
            if start is None:
                raise
            raise InvalidIdError(f"row {start + offset} of {where}: {error}") from None
        seen.add(sample_id)
        out.append(sample_id)
    return out


def slug(text: str) -> str:
    """Map arbitrary text to a safe id: unsafe characters become ``-``."""
    cleaned = _UNSAFE_CHAR.sub("-", text)[:MAX_ID_LENGTH]
    if not cleaned or not _SAFE.fullmatch(cleaned):
        cleaned = ("_" + cleaned)[:MAX_ID_LENGTH]
    return cleaned


def unique(ids: Iterable[str]) -> list[str]:
    """Make ids unique in order: a repeat of ``x`` becomes ``x-2``, ``x-3``, ... ."""
    taken: set[str] = set()
    out = []
    for sample_id in ids:
        candidate, n = sample_id, 1
        while candidate in taken:
            n += 1
            suffix = f"-{n}"
            candidate = sample_id[: MAX_ID_LENGTH - len(suffix)] + suffix
        taken.add(candidate)
        out.append(candidate)
    return out


SHORT = 12
"""Hex digits of a model id (or any sha256) that messages and tables show."""


def short_id(digest: str) -> str:
    """The first :data:`SHORT` hex digits of a model id or sha256: what people read."""
    return digest[:SHORT]
