"""ERPD rounds: sample from pi_k -> stage 1 (teachers) -> stage 2 -> pi_{k+1}.

Output layout (every directory is written atomically, so a pipeline re-run after a crash reuses
what completed and resumes what was stopped):

    OUT/base/checkpoint              the tiny base (when no model.path is given)
    OUT/round-K/batch                the fixed RolloutBatch of round K
    OUT/round-K/teacher-NAME/        stage-1 run (checkpoint/, resume/)
    OUT/round-K/student/             stage-2 run (checkpoint/ = pi_{K+1})
    OUT/metrics.jsonl                every metric point of every run
    OUT/summary.json                 the base / teacher / student table
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from erpd import distributed
from erpd import metrics as M
from erpd.checkpoint import parent_record, read_manifest
from erpd.config import PipelineConfig
from erpd.errors import CheckpointError, ConfigError
from erpd.evaluate import batch_diagnostics
from erpd.models import load_policy, resolve_device, use_bf16
from erpd.pretrain import pretrain_base
from erpd.progress import ProgressFactory, no_progress
from erpd.rollout import RolloutBatch, sample_rollout
from erpd.stage1 import run_stage1
from erpd.stage2 import run_stage2
from erpd.tasks import build_task
from erpd.trainer import StageEnv, StageResult


@dataclass
class Row:
    """One line of the summary table: a policy, its accuracy, and what it cost in KL."""

    round: int
    role: str  # base | teacher | student
    name: str
    acc_eval: float | None
    acc_eval_sampled: float | None
    kl_exact: float | None  # full-vocabulary KL to the round's pi_k on the fixed batch
    entropy: float | None  # token entropy on the fixed batch
    steps: int
    status: str
    path: str


@dataclass
class PipelineResult:
    status: str  # completed | stopped (resumable: run the same command again)
    rows: list[Row]
    student: Path
    metrics: Path
    summary: Path
    wall_time: float


def make_env(cfg: PipelineConfig, sink: M.MetricSink, progress: ProgressFactory) -> StageEnv:
    # under torchrun, this rank's device in the process group (a no-op otherwise)
    device = distributed.join(resolve_device(cfg.runtime.device))
    task = build_task(cfg.task)
    return StageEnv(
        task=task,
        eval=cfg.eval,
        device=device,
        max_new_tokens=cfg.task.max_new_tokens or task.max_new_tokens,
        bf16=use_bf16(device, cfg.runtime.precision),
        gradient_checkpointing=cfg.runtime.gradient_checkpointing,
        chat_template=cfg.model.chat_template,
        sink=sink,
        progress=progress,
    )


def completed(run_dir: Path) -> StageResult | None:
    """A stage whose final checkpoint exists (manifest written last) is not run again."""
    checkpoint = run_dir / "checkpoint"
    try:
        manifest = read_manifest(checkpoint)
    except CheckpointError:
        return None
    return StageResult(
        run=manifest["run"],
        status=manifest["status"],
        run_dir=run_dir,
        checkpoint=checkpoint,
        sha256=manifest["sha256"],
        summary=manifest.get("summary", {}),
        steps=manifest["step"],
        total_steps=manifest.get("total_steps", manifest["step"]),
        wall_time=0.0,
    )


def _row(k: int, role: str, res: StageResult) -> Row:
    s = res.summary
    return Row(
        round=k,
        role=role,
        name=res.run,
        acc_eval=s.get(M.ACC_EVAL),
        acc_eval_sampled=s.get(M.ACC_EVAL_SAMPLED),
        kl_exact=s.get(M.KL_EXACT_BATCH),
        entropy=s.get(M.ENTROPY_BATCH),
        steps=res.steps,
        status=res.status,
        path=str(res.checkpoint),
    )


def _base_row(k: int, path: Path, batch: RolloutBatch, env: StageEnv) -> Row:
    """pi_k measured the same way as its teachers and student (KL to itself is 0 by definition)."""
    model, tokenizer = load_policy(path, env.device)
    values = env.evaluator(tokenizer, 0)(model, step=0)
    values.update(batch_diagnostics(model, None, batch, bf16=env.bf16))
    return Row(
        round=k,
        role="base",
        name=f"round-{k}/base",
        acc_eval=values.get(M.ACC_EVAL),
        acc_eval_sampled=values.get(M.ACC_EVAL_SAMPLED),
        kl_exact=0.0,
        entropy=values.get(M.ENTROPY_BATCH),
        steps=0,
        status="completed",
        path=str(path),
    )


def sample_batch(
    base: str | Path, path: str | Path, cfg: PipelineConfig, env: StageEnv, round_index: int = 0
) -> RolloutBatch:
    """Sample round `round_index`'s fixed batch from pi_k = `base` and save it to `path`."""
    model, tokenizer = load_policy(base, env.device)
    total = cfg.sample.num_prompts * cfg.sample.group_size
    with env.progress(f"round {round_index}: sample {total} responses", total) as advance:
        batch = sample_rollout(
            model,
            tokenizer,
            env.task,
            cfg.sample,
            max_new_tokens=env.max_new_tokens,
            chat_template=cfg.model.chat_template,
            round_index=round_index,
            bf16=env.bf16,
            advance=advance,
            model_dir=base,
        )
    batch.meta["policy"] = parent_record(base)
    batch.save(path)
    return batch


def _sample(k: int, base: Path, out: Path, cfg: PipelineConfig, env: StageEnv) -> RolloutBatch:
    path = out / f"round-{k}" / "batch"
    if (path / "rollout.json").is_file():
        return RolloutBatch.load(path)
    batch = sample_batch(base, path, cfg, env, k)
    env.sink.log(f"round-{k}/sample", 0, {M.REWARD_MEAN: batch.rewards.mean().item()})
    return batch


def run_pipeline(
    cfg: PipelineConfig,
    out_dir: str | Path,
    *,
    sink: M.MetricSink | None = None,
    progress: ProgressFactory = no_progress,
    should_stop: Callable[[], bool] | None = None,
) -> PipelineResult:
    """Run `cfg.rounds` ERPD rounds into out_dir; returns the summary rows and the final student."""
    started = time.time()
    out = Path(out_dir)
    jsonl = M.JsonlSink(out / "metrics.jsonl")
    env = make_env(cfg, M.TeeSink(jsonl, sink) if sink else jsonl, progress)  # validates first
    _claim_output_dir(out, cfg)
    env.should_stop = should_stop
    rows: list[Row] = []
    try:
        if cfg.model.path is not None:
            initial = Path(cfg.model.path)
        else:
            base = completed(out / "base") or pretrain_base(
                shape=cfg.model.tiny,
                cfg=cfg.base,
                env=env,
                out_dir=out / "base",
                seed=cfg.runtime.seed,
            )
            assert base.checkpoint is not None
            initial = base.checkpoint
        current = initial
        for k in range(cfg.rounds):
            batch = _sample(k, current, out, cfg, env)
            rows.append(_base_row(k, current, batch, env))
            teachers: list[StageResult] = []
            for t in cfg.teachers:
                run_dir = out / f"round-{k}" / f"teacher-{t.label}"
                res = completed(run_dir) or run_stage1(
                    base=current,
                    batch=batch,
                    cfg=t,
                    env=env,
                    run_dir=run_dir,
                    run=f"round-{k}/teacher-{t.label}",
                    initial=initial,
                )
                if res.status == "stopped":
                    return _finish(out, rows, current, jsonl, started, "stopped")
                teachers.append(res)
                rows.append(_row(k, "teacher", res))
            run_dir = out / f"round-{k}" / "student"
            student = completed(run_dir) or run_stage2(
                base=current,
                teachers=[t.checkpoint for t in teachers],  # type: ignore[misc]
                pinned=[t.sha256 for t in teachers],
                batch=batch,
                cfg=cfg.stage2,
                env=env,
                run_dir=run_dir,
                run=f"round-{k}/student",
                initial=initial,
            )
            if student.status == "stopped" or student.checkpoint is None:
                return _finish(out, rows, current, jsonl, started, "stopped")
            rows.append(_row(k, "student", student))
            current = student.checkpoint
        return _finish(out, rows, current, jsonl, started, "completed")
    finally:
        env.sink.close()


def _artefact_fields(cfg: PipelineConfig) -> dict[str, object]:
    """The parts of a config that shape the checkpoints. Device, eval settings and the number
    of rounds do not: a finished run may be re-evaluated, moved to a GPU or extended."""
    data = cfg.model_dump(mode="json", exclude={"eval": True, "rounds": True})
    data["runtime"].pop("device")
    return data


def _claim_output_dir(out: Path, cfg: PipelineConfig) -> None:
    """Reuse an output directory only for the same config: finished stages are not re-run, so
    a changed config over an old run would silently mix the two."""
    if out.exists() and not out.is_dir():
        raise ConfigError("--out", f"{out} exists and is not a directory")
    recorded = out / "config.json"
    if recorded.is_file():
        try:
            previous = _artefact_fields(PipelineConfig.model_validate_json(recorded.read_text()))
        except ValueError as exc:
            raise ConfigError(
                "--out", f"{out}/config.json is unreadable or from another erpd version"
            ) from exc
        if previous != _artefact_fields(cfg):
            raise ConfigError(
                "--out", f"{out} holds a pipeline with another config; use a new --out or delete it"
            )
    elif out.is_dir() and any(out.iterdir()):
        raise ConfigError("--out", f"{out} is not empty and holds no erpd pipeline")
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".config.json.{os.getpid()}"
    tmp.write_text(cfg.model_dump_json(indent=2))
    os.replace(tmp, recorded)  # the latest eval/rounds/device win; the rest is unchanged


def _finish(
    out: Path, rows: list[Row], student: Path, jsonl: M.JsonlSink, started: float, status: str
) -> PipelineResult:
    summary = out / "summary.json"
    wall = time.time() - started
    body = {
        "status": status,
        "rows": [asdict(r) for r in rows],
        "student": str(student),
        "wall_time_s": wall,
    }
    summary.write_text(json.dumps(body, indent=2))
    return PipelineResult(status, rows, student, jsonl.path, summary, wall)
