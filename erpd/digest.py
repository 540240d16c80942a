"""Checkpoint digests, importable without torch (the API client verifies downloads with them).

A checkpoint's sha256 is one digest over its files: sha256 of the sorted "name sha256" lines,
every file but the manifest that records them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

MANIFEST = "manifest.json"
_HASH_CHUNK = 1 << 20


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def tree_sha256(files: Mapping[str, str]) -> str:
    """One digest for a checkpoint: sha256 over its sorted 'name sha256' lines."""
    lines = "".join(f"{name} {digest}\n" for name, digest in sorted(files.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def hash_files(root: Path) -> dict[str, str]:
    """Every file under `root` but the manifest, by relative path."""
    return {
        str(f.relative_to(root)): file_sha256(f)
        for f in sorted(root.rglob("*"))
        if f.is_file() and f.name != MANIFEST
    }
