"""Small files written whole or not at all, importable without torch.

Every JSON file erpd writes for another process or a later run to read (a pipeline's config and
summary, the relay files of a torchrun group, reproduce's results) goes through `write_json`:
written beside its target and moved into place with one rename, so a reader never sees half of
it. Directories (checkpoints, batches) have `erpd.checkpoint.atomic_dir`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_json(path: str | Path, body: object, **dumps: Any) -> None:
    """Replace the JSON file `path` in one rename, creating its directory; `dumps` goes to
    json.dumps (indent, default, allow_nan)."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(body, **dumps))
    os.replace(tmp, final)
