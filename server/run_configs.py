"""The config a run stores, per kind, built from erpd.config's models.

A run's config holds only what is safe to take from a request: no model or data paths (a run
names registered models and datasets by id instead). These models sit outside the service layer
so that the API's request bodies (server/schemas.py) can embed them without importing services;
server/services/configs.py validates a run's config against them before it is stored.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from erpd.config import (
    ArithmeticConfig,
    EvalConfig,
    RuntimeConfig,
    SampleConfig,
    Stage1Config,
    Stage2Config,
)
from server.db import RunKind

# the hold-out of an uploaded dataset when a run does not set task.eval_size (erpd's default)
JSONL_EVAL_SIZE = 200


class _Strict(BaseModel):
    """Unknown keys are refused; the API also validates request bodies as strict JSON
    (server/api/strict.py), so `"epochs": "3"` or `true` is refused, not coerced."""

    model_config = ConfigDict(extra="forbid")


class TaskOptions(_Strict):
    arithmetic: ArithmeticConfig | None = Field(
        None, description="Knobs of the built-in arithmetic task (ignored by JSONL datasets)."
    )
    max_new_tokens: int | None = Field(None, ge=1, le=4096, description="Response length cap.")
    eval_size: int | None = Field(
        None,
        ge=1,
        le=1_000_000,
        description=f"Uploaded (JSONL) datasets: distinct prompts held out for evaluation (None = "
        f"{JSONL_EVAL_SIZE}); the rest are the training prompts `sample.num_prompts` draws from "
        "(ignored by the arithmetic task).",
    )


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
