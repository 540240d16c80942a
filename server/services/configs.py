"""The validated config a run stores, per kind, built from erpd.config's models.

A run's config holds only what is safe to take from a request: no model or data paths (a run
names registered models and datasets by id instead). It is stored with every default filled in,
so a run stays reproducible when a default changes later.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from erpd.config import (
    ArithmeticConfig,
    EvalConfig,
    RuntimeConfig,
    SampleConfig,
    Stage1Config,
    Stage2Config,
)
from server.db import RunKind
from server.services.errors import InvalidInputError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TaskOptions(_Strict):
    arithmetic: ArithmeticConfig | None = Field(
        None, description="Knobs of the built-in arithmetic task (ignored by JSONL datasets)."
    )
    max_new_tokens: int | None = Field(None, ge=1, le=4096, description="Response length cap.")


class SampleRunConfig(_Strict):
    """Draw the fixed batch: G responses for each of N prompts from the base."""

    task: TaskOptions = Field(default_factory=TaskOptions)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)


class Stage1RunConfig(SampleRunConfig):
    """Train one teacher on the fixed batch."""

    stage: Stage1Config = Field(default_factory=Stage1Config)
    eval: EvalConfig = Field(default_factory=EvalConfig)


class Stage2RunConfig(SampleRunConfig):
    """Distil the teachers into the base under the trust region."""

    stage: Stage2Config = Field(default_factory=Stage2Config)
    eval: EvalConfig = Field(default_factory=EvalConfig)


RUN_CONFIGS: dict[RunKind, type[SampleRunConfig]] = {
    RunKind.SAMPLE: SampleRunConfig,
    RunKind.STAGE1: Stage1RunConfig,
    RunKind.STAGE2: Stage2RunConfig,
}


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
