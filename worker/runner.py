"""Execute one claimed run: build the erpd environment from the stored config and registries,
run the stage (resuming from its own checkpoints after a lost worker), register the checkpoint,
complete the run, and publish the runs that were waiting for it.

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
from erpd.checkpoint import verify_checkpoint
from erpd.config import (
    BaseTrainConfig,
    JsonlConfig,
    ModelSpec,
    PipelineConfig,
    TaskSpec,
    TinyModelConfig,
)
from erpd.launch import LaunchSpec, run_spec
from erpd.pipeline import completed, make_env, sample_batch
from erpd.pretrain import pretrain_base
from erpd.rollout import RolloutBatch
from erpd.trainer import StageEnv, StageResult
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
    base: tuple[Path, str | None] | None = None


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
            jsonl=JsonlConfig(train_path=str(path)),
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


def base_model(inputs: Inputs, pcfg: PipelineConfig, env: StageEnv, settings: Settings) -> Path:
    """pi_k: a registered directory, or the built-in tiny model pretrained once per shape and
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
        done = completed(out)
        if done is None:
            # its points would share the run's step axis with the stage's: keep them out
            quiet = dataclasses.replace(env, sink=M.NullSink())
            done = pretrain_base(
                shape=pcfg.model.tiny, cfg=base_cfg, env=quiet, out_dir=out, seed=pcfg.runtime.seed
            )
    assert done.checkpoint is not None
    return done.checkpoint


def current_policy(inputs: Inputs, initial: Path) -> Path:
    """pi_k: the registered (or built-in) model in round 0, the previous round's student after;
    a student whose files no longer match the sha256 pinned when it succeeded fails the run."""
    if inputs.base is None:
        return initial
    path, pinned = inputs.base
    verify_checkpoint(path, pinned)
    return path


def fixed_batch(
    inputs: Inputs, base: Path, pcfg: PipelineConfig, env: StageEnv, own: Path
) -> RolloutBatch:
    """The batch run's saved batch; a stage without one samples (and keeps) its own."""
    if inputs.batch_dir is not None:
        return RolloutBatch.load(inputs.batch_dir)
    if (own / "rollout.json").is_file():
        return RolloutBatch.load(own)
    return sample_batch(base, own, pcfg, env, inputs.run.round)


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


def execute(store: Store, inputs: Inputs, sink: DbSink) -> StageResult | dict[str, float] | None:
    """Run the stage; returns its result (a summary for a sample run), or None if it stopped."""
    run, settings = inputs.run, store.settings
    if clean_partial(run_dir(settings, run.id)):
        log.info("run %s: removed partial files of an earlier attempt", run.id)
    pcfg = pipeline_config(inputs, settings)
    if run.kind is not RunKind.SAMPLE:  # before anything is loaded or sampled
        check_gpus(pcfg.runtime.gpus, settings.worker_gpus)
    env = make_env(pcfg, sink, sink.progress)
    env.should_stop = sink.should_stop
    initial = base_model(inputs, pcfg, env, settings)
    base = current_policy(inputs, initial)
    here = run_dir(settings, run.id)
    batch = fixed_batch(inputs, base, pcfg, env, here / "batch")
    batch_dir = inputs.batch_dir or here / "batch"
    if run.kind is RunKind.SAMPLE:
        reward = float(batch.rewards.mean().item())
        sink.log(run.name, 0, {M.REWARD_MEAN: reward})
        return {M.REWARD_MEAN: reward}
    spec = launch_spec(inputs, pcfg, base=base, initial=initial, batch=batch_dir, here=here)
    if pcfg.runtime.gpus > 1:
        return completed(here) or run_sharded(spec, gpus=pcfg.runtime.gpus, sink=sink)
    result = completed(here) or run_spec(spec, env, batch)
    return None if result.status == "stopped" or result.checkpoint is None else result


def launch_spec(
    inputs: Inputs, pcfg: PipelineConfig, *, base: Path, initial: Path, batch: Path, here: Path
) -> LaunchSpec:
    """What every rank of a multi-GPU stage reads: paths built from ids, never from a request."""
    run = inputs.run
    return LaunchSpec(
        stage="stage1" if run.kind is RunKind.STAGE1 else "stage2",
        pipeline=pcfg.model_dump(mode="json"),
        config=run.config["stage"],
        base=str(base),
        initial=str(initial),
        batch=str(batch),
        run_dir=str(here),
        run=run.name,
        teachers=[str(p) for p, _ in inputs.teachers],
        pinned=[sha for _, sha in inputs.teachers],
    )


def finish(store: Store, inputs: Inputs, outcome: StageResult | dict[str, float]) -> None:
    """Register the checkpoint and complete the run in one transaction (the caller then
    publishes the runs that waited for it)."""
    run = inputs.run
    summary = outcome if isinstance(outcome, dict) else outcome.summary

    def write() -> None:
        with store.writes.begin() as session:
            if isinstance(outcome, StageResult) and outcome.checkpoint is not None:
                ckpt = outcome.checkpoint
                manifest: dict[str, Any] = json.loads((ckpt / "manifest.json").read_text())
                register_checkpoint(
                    session,
                    run_id=run.id,
                    attempt=run.attempt,
                    role=CheckpointRole.TEACHER
                    if run.kind is RunKind.STAGE1
                    else CheckpointRole.STUDENT,
                    step=outcome.steps,
                    key=ckpt.relative_to(store.settings.artifacts).as_posix(),
                    size=sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file()),
                    sha256=str(outcome.sha256),
                    manifest=manifest,
                )
            complete_run(
                session,
                run_id=run.id,
                attempt=run.attempt,
                summary=summary,
                actor=f"worker:{run.worker}",
                steps=outcome.steps if isinstance(outcome, StageResult) else None,
                total=outcome.total_steps if isinstance(outcome, StageResult) else None,
            )

    retrying(write)
