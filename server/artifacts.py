"""Serving checkpoint directories: as one tar stream or file by file, with Range and ETag.

Paths are built from the checkpoint's server-made key under the artifact root, and a file is
served only if the checkpoint's manifest lists it: a request's name is a dictionary key, never a
path. Symlinks are refused (lstat, O_NOFOLLOW), so nothing outside the checkpoint can be read
through one. The tar is laid out deterministically (sorted names, fixed owner and mtime), so its
length is known before streaming and a byte range of it can be produced without building it.

Giving space back: a run's directory (`<artifacts>/runs/<run id hex>/`) is first moved into
`<artifacts>/.trash/` with one rename (atomic: nothing ever sees it half deleted), then removed;
whatever a crash leaves in the trash is emptied by the reaper's next retention pass.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tarfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from server.db import Checkpoint

MANIFEST = "manifest.json"
CHUNK = 1 << 20
BLOCK = 512
RUNS = "runs"
TRASH = ".trash"
_RUN_DIR = re.compile(r"^[0-9a-f]{32}$")


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


_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


class UnsatisfiableRangeError(ValueError):
    """A well-formed range that selects no byte of the body: 416 (RFC 9110, section 15.5.17)."""


def parse_range(header: str | None, total: int) -> tuple[int, int] | None:
    """(start, end) inclusive for one `bytes=` range; None = send the whole body (no Range, a
    unit other than bytes, several ranges, or a malformed one: RFC 9110 has a server ignore a
    Range it cannot parse). UnsatisfiableRangeError = 416."""
    if header is None:
        return None
    match = _RANGE.match(header.strip().replace(" ", ""))
    if match is None or not (match[1] or match[2]):
        return None
    first, last = match[1], match[2]
    if not first:  # suffix: the last N bytes
        if int(last) == 0 or total == 0:
            raise UnsatisfiableRangeError(header)
        return max(0, total - int(last)), total - 1
    start = int(first)
    if last and int(last) < start:
        return None  # invalid (last-pos before first-pos): ignored, not refused
    if start >= total:
        raise UnsatisfiableRangeError(header)
    end = int(last) if last else total - 1
    return start, min(end, total - 1)


def run_dir(root: Path, run_id: uuid.UUID) -> Path:
    """Where a run's batch, checkpoints and resume points live (the worker writes there)."""
    return root / RUNS / run_id.hex


def run_dirs(root: Path) -> list[tuple[uuid.UUID, Path]]:
    """Every run directory on disk, with the run id its name is (anything else is left alone)."""
    try:
        entries = list(os.scandir(root / RUNS))
    except FileNotFoundError:
        return []
    return [
        (uuid.UUID(hex=e.name), Path(e.path))
        for e in entries
        if _RUN_DIR.match(e.name) and e.is_dir(follow_symlinks=False)
    ]


def discard(root: Path, directory: Path) -> Path | None:
    """Move `directory` (under `root`) into the trash with one rename; None if it is not there.
    Returns where it went, for `restore` or `empty`."""
    trash = root / TRASH
    trash.mkdir(parents=True, exist_ok=True)
    target = trash / f"{directory.parent.name}-{directory.name}-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(directory, target)
    except FileNotFoundError:
        return None
    return target


def restore(discarded: Path | None, directory: Path) -> None:
    """Undo `discard` (the transaction that deleted its rows did not commit)."""
    if discarded is not None:
        os.rename(discarded, directory)


def empty(discarded: Path | None) -> None:
    if discarded is not None:
        shutil.rmtree(discarded, ignore_errors=True)


def empty_trash(root: Path) -> int:
    """Remove what is left in the trash (a process died between the move and the removal)."""
    try:
        entries = list(os.scandir(root / TRASH))
    except FileNotFoundError:
        return 0
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            Path(entry.path).unlink(missing_ok=True)
    return len(entries)
