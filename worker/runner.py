"""Execute one claimed run: build the erpd environment from the stored config and registries,
prepare the stage's inputs (pi_0, pi_k, the fixed batch), run it through erpd's `StageSpec`
(resuming from its own checkpoints after a lost worker), register the checkpoint and complete
the run; the task then publishes the runs that were waiting for it.

Directories are built from ids only: `<artifacts>/runs/<run id>/` for a run's batch, stage
checkpoints and resume points; `<home>/models/tiny-<hash>/` for a pretrained built-in base.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from erpd import metrics as M
from erpd.checkpoint import RESUME_DIR, verify_checkpoint
from erpd.config import (
    BaseTrainConfig,
    JsonlConfig,
    ModelSpec,
    PipelineConfig,
    TaskSpec,
    TinyModelConfig,
)
from erpd.rollout import RolloutBatch, batch_timeouts
from erpd.spec import StageSpec, fixed_batch, tiny_base
from erpd.stage import SampleResult, StageEnv, StageResult
from server.db import CheckpointRole, Dataset, Model, RegistryKind, Run, RunKind
from server.services import complete_run, register_checkpoint
from server.services.outbox import Publisher
from server.settings import Settings
from worker.group import check_gpus, run_sharded
from worker.sinks import DbSink, retrying

log = logging.getLogger("erpd.worker")


@dataclass
class Store:
    settings: Settings
    writes: sessionmaker[Session]
    reads: sessionmaker[Session]
    broker: Publisher


@dataclass
class Inputs:
    """Everything a stage needs, read from the store once at the start of an attempt."""

    run: Run
    model: Model
    dataset: Dataset
    batch_dir: Path | None
    teachers: list[tuple[Path, str | None]]
    # a later round's pi_k: the previous student's checkpoint and its pinned sha256
    pi_k: tuple[Path, str | None] | None = None


def run_dir(settings: Settings, run_id: uuid.UUID) -> Path:
    return settings.artifacts / "runs" / run_id.hex


def pipeline_config(inputs: Inputs, settings: Settings) -> PipelineConfig:
    cfg = inputs.run.config
    task = cfg.get("task", {})
    if inputs.dataset.kind is RegistryKind.BUILTIN:
        spec = TaskSpec(kind="arithmetic", max_new_tokens=task.get("max_new_tokens"))
        if task.get("arithmetic"):
            spec = spec.model_copy(update={"arithmetic": task["arithmetic"]})
    else:
        path = settings.home / "datasets" / inputs.dataset.location
        spec = TaskSpec(
            kind="jsonl",
            jsonl=JsonlConfig(train_path=str(path), eval_size=task.get("eval_size") or 200),
            max_new_tokens=task.get("max_new_tokens"),
        )
    model = ModelSpec()
    if inputs.model.kind is not RegistryKind.BUILTIN:
        model = ModelSpec(path=inputs.model.location)
    elif "tiny" in inputs.model.meta:
        model = ModelSpec(tiny=TinyModelConfig.model_validate(inputs.model.meta["tiny"]))
    return PipelineConfig.model_validate(
        {
            "model": model.model_dump(),
            "task": spec.model_dump(),
            "sample": cfg["sample"],
            "eval": cfg.get("eval", {}),
            "runtime": cfg["runtime"],
        }
    )


def initial_policy(inputs: Inputs, pcfg: PipelineConfig, env: StageEnv, settings: Settings) -> Path:
    """pi_0: a registered directory, or the built-in tiny model pretrained once per shape and
    base config and cached (a file lock keeps two workers from training it twice)."""
    if inputs.model.kind is not RegistryKind.BUILTIN:
        return Path(inputs.model.location)
    base_cfg = BaseTrainConfig.model_validate(inputs.model.meta.get("base", {}))
    recipe = {
        "tiny": pcfg.model.tiny.model_dump(),
        "base": base_cfg.model_dump(),
        "task": pcfg.task.model_dump(),
        "seed": pcfg.runtime.seed,
    }
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    out = settings.home / "models" / f"tiny-{digest}"
    out.parent.mkdir(parents=True, exist_ok=True)
    with (out.parent / f".tiny-{digest}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        # its points would share the run's step axis with the stage's: keep them out
        quiet = dataclasses.replace(env, sink=M.NullSink())
        return tiny_base(pcfg.model.tiny, base_cfg, quiet, out, pcfg.runtime.seed)


def current_policy(inputs: Inputs, pi_0: Path) -> Path:
    """pi_k: pi_0 in round 0, the previous round's student after; a student whose files no
    longer match the sha256 pinned when it succeeded fails the run."""
    if inputs.pi_k is None:
        return pi_0
    path, pinned = inputs.pi_k
    verify_checkpoint(path, pinned)
    return path


def clean_partial(directory: Path) -> int:
    """Remove what a killed attempt left mid-write (erpd's atomic_dir temp and old copies).
    Only the claiming attempt owns the run's directory, so nothing else can be writing there."""
    removed = 0
    for leftover in [*directory.rglob(".*.tmp-*"), *directory.rglob(".*.old-*")]:
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
        removed += 1
    return removed


RunOutcome = SampleResult | StageResult
"""What a run leaves to record: either kind has a summary, and a stage's a checkpoint."""


def execute(store: Store, inputs: Inputs, sink: DbSink) -> RunOutcome:
    """Run the sample or the stage (`stopped` when a cancel stopped it)."""
    run, settings = inputs.run, store.settings
    here = run_dir(settings, run.id)
    if clean_partial(here):
        log.info("run %s: removed partial files of an earlier attempt", run.id)
    pcfg = pipeline_config(inputs, settings)
    if run.kind is not RunKind.SAMPLE:  # before anything is loaded or sampled
        check_gpus(pcfg.runtime.gpus, settings.worker_gpus)
    env = StageEnv.of(pcfg, sink, sink.progress)
    env.should_stop = sink.should_stop
    pi_0 = initial_policy(inputs, pcfg, env, settings)
    pi_k = current_policy(inputs, pi_0)
    # the batch run's saved batch; a stage without one samples (and keeps) its own
    batch_dir = inputs.batch_dir or here / "batch"
    if inputs.batch_dir is not None:
        batch = RolloutBatch.load(inputs.batch_dir)
    else:
        batch = fixed_batch(pi_k, batch_dir, pcfg, env, run.round)
    if run.kind is RunKind.SAMPLE:
        reward = float(batch.rewards.mean().item())
        values = {M.REWARD_MEAN: reward, M.REWARD_TIMEOUTS: batch_timeouts(batch)}
        sink.log(run.name, 0, values)
        return SampleResult(run.name, batch_dir, values)
    spec = stage_spec(inputs, pcfg, pi_k=pi_k, pi_0=pi_0, batch=batch_dir, here=here)
    done = StageResult.finished(here)
    if done is not None:
        return done
    if pcfg.runtime.gpus > 1:
        return run_sharded(spec, gpus=pcfg.runtime.gpus, sink=sink)
    return spec.run_stage(env, batch)


def stage_spec(
    inputs: Inputs, pcfg: PipelineConfig, *, pi_k: Path, pi_0: Path, batch: Path, here: Path
) -> StageSpec:
    """The stage every rank runs: paths built from ids, never from a request."""
    run = inputs.run
    return StageSpec(
        stage="stage1" if run.kind is RunKind.STAGE1 else "stage2",
        pipeline=pcfg.model_dump(mode="json"),
        config=run.config["stage"],
        pi_k=str(pi_k),
        pi_0=str(pi_0),
        batch=str(batch),
        run_dir=str(here),
        run=run.name,
        teachers=[str(p) for p, _ in inputs.teachers],
        pinned=[sha for _, sha in inputs.teachers],
    )


def finish(store: Store, inputs: Inputs, outcome: RunOutcome) -> None:
    """Register the checkpoint (a stage's) and complete the run in one transaction, then drop
    the stage's resume points (the caller then publishes the runs that waited for it)."""
    run = inputs.run

    def write() -> None:
        with store.writes.begin() as session:
            if outcome.checkpoint is not None:
                ckpt = outcome.checkpoint
                manifest: dict[str, Any] = json.loads((ckpt / "manifest.json").read_text())
                register_checkpoint(
                    session,
                    run_id=run.id,
                    attempt=run.attempt,
                    role=CheckpointRole.TEACHER
                    if run.kind is RunKind.STAGE1
                    else CheckpointRole.STUDENT,
                    step=outcome.steps or 0,
                    key=ckpt.relative_to(store.settings.artifacts).as_posix(),
                    size=sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file()),
                    sha256=str(outcome.sha256),
                    manifest=manifest,
                )
            complete_run(
                session,
                run_id=run.id,
                attempt=run.attempt,
                summary=outcome.summary,
                actor=f"worker:{run.worker}",
                steps=outcome.steps,
                total=outcome.total_steps,
            )

    retrying(write)
    # the checkpoint is registered: the stage's resume points can never be used again
    shutil.rmtree(run_dir(store.settings, run.id) / RESUME_DIR, ignore_errors=True)
