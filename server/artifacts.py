"""Serving checkpoint directories: as one tar stream or file by file, with Range and ETag.

Paths are built from the checkpoint's server-made key under the artifact root, and a file is
served only if the checkpoint's manifest lists it: a request's name is a dictionary key, never a
path. Symlinks are refused (lstat, O_NOFOLLOW), so nothing outside the checkpoint can be read
through one. The tar is laid out deterministically (sorted names, fixed owner and mtime), so its
length is known before streaming and a byte range of it can be produced without building it.
"""

from __future__ import annotations

import os
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from server.db import Checkpoint

MANIFEST = "manifest.json"
CHUNK = 1 << 20
BLOCK = 512


class DamagedCheckpointError(Exception):
    """The directory does not match its manifest (missing file, symlink, moved outside)."""


@dataclass(frozen=True)
class Piece:
    """A run of bytes of the response: literal bytes, or `length` bytes of a file."""

    length: int
    data: bytes = b""
    path: Path | None = None


def checkpoint_dir(root: Path, ckpt: Checkpoint) -> Path:
    base = root.resolve()
    path = (base / ckpt.key).resolve()
    # the key is validated at registration; this also catches a symlinked directory on disk
    if not path.is_relative_to(base) or path != base / ckpt.key:
        raise DamagedCheckpointError(f"checkpoint {ckpt.id}: directory escapes the store")
    return path


def listed_files(ckpt: Checkpoint) -> list[str]:
    files = ckpt.manifest.get("files", {})
    return sorted({*files, MANIFEST}) if isinstance(files, dict) else [MANIFEST]


def regular_file(directory: Path, name: str) -> Path:
    """The file `name` of the checkpoint, refusing anything that is not a plain regular file."""
    parts = name.split("/")
    if name.startswith("/") or "\\" in name or any(p in ("", ".", "..") for p in parts):
        raise DamagedCheckpointError(f"{name!r}: not a plain relative name")
    path = directory.joinpath(*parts)
    try:
        info = os.lstat(path)
    except FileNotFoundError as exc:
        raise DamagedCheckpointError(f"{name}: missing") from exc
    # a symlink as the file itself (lstat) or as any directory on the way (resolve) is refused
    if not stat.S_ISREG(info.st_mode) or path.resolve() != path:
        raise DamagedCheckpointError(f"{name}: not a regular file")
    return path


def file_pieces(directory: Path, name: str) -> list[Piece]:
    path = regular_file(directory, name)
    return [Piece(os.lstat(path).st_size, path=path)]


def tar_pieces(directory: Path, ckpt: Checkpoint) -> list[Piece]:
    prefix = f"{ckpt.role}-{ckpt.step}"
    mtime = int(ckpt.created_at.timestamp())
    pieces = []
    for name in listed_files(ckpt):
        path = regular_file(directory, name)
        size = os.lstat(path).st_size
        info = tarfile.TarInfo(f"{prefix}/{name}")
        info.size, info.mode, info.mtime = size, 0o644, mtime
        header = info.tobuf(format=tarfile.GNU_FORMAT, encoding="utf-8", errors="strict")
        pieces += [Piece(len(header), data=header), Piece(size, path=path)]
        if size % BLOCK:
            pieces.append(Piece(BLOCK - size % BLOCK, data=bytes(BLOCK - size % BLOCK)))
    pieces.append(Piece(2 * BLOCK, data=bytes(2 * BLOCK)))  # end-of-archive marker
    return pieces


def read_range(pieces: list[Piece], start: int, end: int) -> Iterator[bytes]:
    """Bytes [start, end] (inclusive) of the concatenated pieces."""
    offset = 0
    for piece in pieces:
        lo, hi = max(start, offset), min(end + 1, offset + piece.length)
        if lo < hi:
            if piece.path is None:
                yield piece.data[lo - offset : hi - offset]
            else:
                yield from _read_file(piece.path, lo - offset, hi - lo)
        offset += piece.length
        if offset > end:
            return


def _read_file(path: Path, start: int, length: int) -> Iterator[bytes]:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as handle:
        handle.seek(start)
        while length > 0:
            chunk = handle.read(min(CHUNK, length))
            if not chunk:
                raise DamagedCheckpointError(f"{path.name}: shorter than when it was listed")
            length -= len(chunk)
            yield chunk


def parse_range(header: str | None, total: int) -> tuple[int, int] | None:
    """(start, end) inclusive for one `bytes=` range; None = whole body. ValueError = 416."""
    if header is None:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip() != "bytes" or "," in spec:
        return None  # unknown units and multipart ranges: send the whole body (RFC 9110)
    first, _, last = spec.strip().partition("-")
    if not first:  # suffix: the last N bytes
        if not last.isdigit() or int(last) == 0:
            raise ValueError(header)
        return max(0, total - int(last)), total - 1
    if not first.isdigit() or (last and not last.isdigit()):
        raise ValueError(header)
    start, end = int(first), int(last) if last else total - 1
    if start >= total or end < start:
        raise ValueError(header)
    return start, min(end, total - 1)
