"""Validating the config a run stores against its kind's model (server/run_configs.py).

It is stored with every default filled in, so a run stays reproducible when a default changes
later.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from server.db import RunKind
from server.run_configs import RUN_CONFIGS
from server.services.errors import InvalidInputError


def validate_run_config(kind: RunKind, raw: dict[str, Any]) -> dict[str, Any]:
    """The normalised config (every default filled in), or InvalidInputError naming the first bad
    field as `config.<path>`."""
    try:
        model = RUN_CONFIGS[kind].model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        path = ".".join(str(p) for p in ("config", *first["loc"]))
        more = exc.error_count() - 1
        suffix = f" (and {more} more error{'s' if more > 1 else ''})" if more else ""
        raise InvalidInputError(path, first["msg"] + suffix) from exc
    return model.model_dump(mode="json")
