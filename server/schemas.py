"""Request and response bodies of the REST API. Run configs embed erpd.config's models (through
server/run_configs.py), never redefine them; every request model forbids unknown keys. Nothing
here imports the service layer: routes translate between the two."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, field_validator

from erpd.config import (
    ControlName,
    EvalConfig,
    PipelineConfig,
    RuntimeConfig,
    SampleConfig,
    Stage1Config,
    Stage2Config,
)
from server.db import RunKind, RunStatus
from server.run_configs import SampleRunConfig, Stage1RunConfig, Stage2RunConfig, TaskOptions

# no control characters (Postgres cannot store NUL in text; none belongs in a name anyway)
Name = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$")]
RegistryName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,99}$")]
Tag = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:=-]{0,63}$")]


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class _RunCreateBase(Request):
    name: Name | None = Field(None, description="Shown in listings; defaults to kind + time.")
    model: RegistryName = Field("tiny", description="A registered model (GET /models).")
    dataset: RegistryName = Field("arithmetic", description="A registered dataset (GET /datasets).")
    tags: list[Tag] = Field(default_factory=list, max_length=32)
    max_attempts: int = Field(3, ge=1, le=10, description="Claims before a lost worker fails it.")
    notify_url: HttpUrl | None = Field(
        None, description="POSTed when the run ends; its host must be on the server's allow-list."
    )
    base_run: uuid.UUID | None = Field(
        None,
        description="A stage2 run whose student is this run's starting policy (pi_k of a later "
        "round); the run waits until it succeeds. None = the registered model.",
    )
    gpu: int | None = Field(
        None,
        ge=0,
        le=63,
        description="Run only on the worker of GPU N (`erpd-hub worker --gpus N`); it waits "
        "while none runs. None = any worker.",
    )


class SampleRunCreate(_RunCreateBase):
    kind: Literal["sample"]
    config: SampleRunConfig = Field(default_factory=SampleRunConfig)


class Stage1RunCreate(_RunCreateBase):
    kind: Literal["stage1"]
    config: Stage1RunConfig = Field(default_factory=Stage1RunConfig)
    batch_run: uuid.UUID | None = Field(
        None, description="A `sample` run whose fixed batch to train on; none = sample its own."
    )


class Stage2RunCreate(_RunCreateBase):
    kind: Literal["stage2"]
    config: Stage2RunConfig = Field(default_factory=Stage2RunConfig)
    teachers: list[uuid.UUID] = Field(
        min_length=1, max_length=8, description="Stage-1 runs to distil; waits until they succeed."
    )
    batch_run: uuid.UUID | None = Field(None, description="The teachers' `sample` run.")


RunCreate = Annotated[
    SampleRunCreate | Stage1RunCreate | Stage2RunCreate, Field(discriminator="kind")
]


class PipelineCreate(Request):
    """One ERPD round (or several): sample once, train the teachers, distil them into the base."""

    name: Name | None = None
    model: RegistryName = "tiny"
    dataset: RegistryName = "arithmetic"
    task: TaskOptions = Field(default_factory=TaskOptions)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    teachers: list[Stage1Config] = Field(
        default_factory=lambda: [Stage1Config()], min_length=1, max_length=8
    )
    stage2: Stage2Config = Field(default_factory=Stage2Config)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    rounds: int = Field(1, ge=1, le=20, description="Round k+1 starts from round k's student.")
    controls: list[ControlName] = Field(
        default_factory=list,
        max_length=4,
        description=str(PipelineConfig.model_fields["controls"].description)
        + " Each round runs one more run per control (the quota counts them); GET "
        "/pipelines/{id} compares the student with each.",
    )
    max_attempts: int = Field(
        3, ge=1, le=10, description="Claims before a lost worker fails a run (each run's)."
    )
    gpu: int | None = Field(None, ge=0, le=63, description="Pin every run to GPU N's worker.")
    tags: list[Tag] = Field(default_factory=list, max_length=32)
    notify_url: HttpUrl | None = None

    @field_validator("controls")
    @classmethod
    def _distinct(cls, controls: list[ControlName]) -> list[ControlName]:
        if len(set(controls)) != len(controls):
            raise ValueError(f"controls must be distinct, got {controls}")
        return controls


class RunPatch(Request):
    name: Name | None = None
    tags: list[Tag] | None = Field(None, max_length=32)


class TeacherOut(BaseModel):
    run: uuid.UUID
    sha256: str | None = Field(description="Pinned when the teacher succeeded.")


class RunOut(BaseModel):
    id: uuid.UUID
    name: str
    kind: RunKind
    status: RunStatus
    pipeline: uuid.UUID | None
    round: int
    attempt: int
    max_attempts: int
    model: uuid.UUID
    dataset: uuid.UUID
    batch_run: uuid.UUID | None
    base_run: uuid.UUID | None
    base_sha256: str | None = Field(description="Pinned when the base run succeeded.")
    gpu: int | None
    teachers: list[TeacherOut]
    config: dict[str, Any]
    tags: list[str]
    cancel_requested: bool
    worker: str | None
    device: str | None
    progress: dict[str, int | None]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    heartbeat_at: datetime | None
    summary: dict[str, float | None]
    final_accuracy: float | None
    kl_spent: float | None
    entropy: float | None
    error: str | None


class RunPage(BaseModel):
    items: list[RunOut]
    next: str | None = Field(description="Pass as `cursor` for the next page; null at the end.")


class EventOut(BaseModel):
    id: int
    at: datetime
    event: str
    from_status: RunStatus | None
    to_status: RunStatus
    attempt: int
    actor: str
    reason: str | None


class PipelineOut(BaseModel):
    id: uuid.UUID
    name: str
    rounds: int
    runs: list[uuid.UUID] = Field(
        description="Round by round: the sample run, the teachers, the student, the controls."
    )


PipelineRole = Literal["sample", "teacher", "student", "control"]
Verdict = Literal["student better", "control better", "no difference shown"]


class PipelineRunOut(RunOut):
    role: PipelineRole
    control: ControlName | None = Field(description="The control this run is; null otherwise.")


class ArmOut(BaseModel):
    role: Literal["student", "control"]
    name: str = Field(description="`student`, or the control's name.")
    run: uuid.UUID
    status: RunStatus
    steps: int | None = Field(description="Optimizer steps taken.")
    eval_step: int | None = Field(description="The step of the eval point read; null if none.")
    acc_eval: float | None
    acc_eval_se: float | None
    acc_eval_sampled: float | None
    acc_eval_sampled_se: float | None
    kl_exact_batch: float | None
    point: str = Field(
        description="Which eval point stands for the arm: the final one, or for early_stop the "
        "first at or past the student's final kl/exact_batch; or why there is none."
    )


class DifferenceOut(BaseModel):
    student: float | None
    control: float | None
    diff: float | None = Field(description="Student minus control.")
    ci95: tuple[float, float] | None = Field(
        description="diff ± 1.96·sqrt(se_student² + se_control²): the evaluation-sampling "
        "interval of one seed. Both arms are scored on the same problems, so it is "
        "conservative; it does not cover seed-to-seed variation."
    )
    verdict: Verdict | None = Field(description="From the interval; null without one.")


class ComparisonOut(BaseModel):
    control: ControlName
    greedy: DifferenceOut = Field(description="acc/eval, greedy decoding.")
    sampled: DifferenceOut = Field(description="acc/eval_sampled, avg@k at T=1.")
    verdict: Verdict | None = Field(
        description="A direction only when greedy and sampled intervals both show it (either "
        "alone when only one has an interval); else 'no difference shown'; null while a run "
        "is missing."
    )
    note: str


class RoundOut(BaseModel):
    round: int
    runs: list[PipelineRunOut] = Field(description="Sample, teachers, student, controls.")
    arms: list[ArmOut] = Field(description="The student first, then each control.")
    comparisons: list[ComparisonOut] = Field(description="Student minus each control.")


class PipelineDetail(BaseModel):
    id: uuid.UUID
    name: str
    rounds: int
    controls: list[ControlName]
    created_at: datetime
    by_round: list[RoundOut]


class RegistryOut(BaseModel):
    id: uuid.UUID = Field(description="What runs name as their `model` / `dataset`.")
    name: str
    kind: str
    metadata: dict[str, Any]
    created_at: datetime


class MetricInfoOut(BaseModel):
    name: str
    estimator: str
    direction: str
    aggregation: str
    scope: str
    description: str


class SeriesOut(BaseModel):
    name: str
    steps: list[int]
    values: list[float | None]
    downsampled: bool


class MetricsOut(BaseModel):
    run: uuid.UUID
    series: list[SeriesOut]
    last_step: int | None
    # more points follow: pass it as `since_step` for the next page (null on the last page)
    next_since_step: int | None = None


class CompareRow(BaseModel):
    id: uuid.UUID
    name: str
    kind: RunKind
    status: RunStatus
    final_accuracy: float | None
    kl_spent: float | None
    entropy: float | None


class CompareOut(BaseModel):
    runs: list[CompareRow]
    config_diff: dict[str, list[Any]] = Field(
        description="Dotted config keys whose values differ, with one value per run."
    )


class ErrorBody(BaseModel):
    code: str
    message: str
    field: str | None = None


class ErrorOut(BaseModel):
    error: ErrorBody


class CheckpointOut(BaseModel):
    id: uuid.UUID
    run: uuid.UUID
    role: str
    step: int
    bytes: int
    sha256: str
    created_at: datetime
    files: list[str] = Field(description="Downloadable one by one under /files/{name}.")


class CheckpointDetail(CheckpointOut):
    manifest: dict[str, Any]
