"""What both stages share around the loop: the environment, loading pi_theta and a frozen pi_k,
and the checkpoint at the end.

Stage 1 and stage 2 (erpd/stage1.py, erpd/stage2.py) build their objective and hand it to
`train_stage`, which loads the models, runs the shared loop (erpd/loop.py) and writes the
checkpoint, manifest last. Callers reach a stage through `StageSpec` (erpd/spec.py).
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from erpd import distributed
from erpd import metrics as M
from erpd.checkpoint import read_manifest, save_model_checkpoint
from erpd.config import EvalConfig, PipelineConfig, StageConfig
from erpd.errors import CheckpointError, ConfigError
from erpd.evaluate import Evaluator
from erpd.loop import LoopControl, LoopResult, StopCheck, run_loop
from erpd.memory import check_fits
from erpd.models import (
    empty_model,
    load_model,
    load_tokenizer,
    resolve_device,
    set_threads,
    use_bf16,
)
from erpd.objective import LoopParts, Objective
from erpd.progress import ProgressFactory, no_progress
from erpd.resume import ResumePoints, stage_fingerprint
from erpd.rollout import RolloutBatch, pass_tokens
from erpd.schedule import planned_steps
from erpd.tasks import Task, build_task
from erpd.tasks.checks import check_task, max_positions_of

log = logging.getLogger(__name__)


@dataclass
class StageEnv:
    """What a stage needs besides its config: the task, eval settings, device and outputs."""

    task: Task
    eval: EvalConfig
    device: torch.device
    max_new_tokens: int
    bf16: bool = False
    gradient_checkpointing: bool = False
    chat_template: bool = False
    sink: M.MetricSink = field(default_factory=M.NullSink)
    should_stop: StopCheck | None = None
    progress: ProgressFactory = no_progress
    evaluate: bool = True
    """False skips held-out evals inside stages (the final whole-batch diagnostics remain):
    for callers that evaluate checkpoints themselves, e.g. many one-step on-policy stages."""
    eval_start: bool = True
    """False skips the eval of pi_k at step 0, for callers that measured pi_k already."""

    @classmethod
    def of(
        cls,
        cfg: PipelineConfig,
        sink: M.MetricSink | None = None,
        progress: ProgressFactory = no_progress,
    ) -> StageEnv:
        """The environment a pipeline config describes; under torchrun, on this rank's device
        in the process group (joined here; a no-op otherwise)."""
        device = distributed.join(resolve_device(cfg.runtime.device))
        set_threads(cfg.runtime.threads, ranks=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        task = build_task(cfg.task)
        return cls(
            task=task,
            eval=cfg.eval,
            device=device,
            max_new_tokens=cfg.task.max_new_tokens or task.max_new_tokens,
            bf16=use_bf16(device, cfg.runtime.precision),
            gradient_checkpointing=cfg.runtime.gradient_checkpointing,
            chat_template=cfg.model.chat_template,
            sink=sink if sink is not None else M.NullSink(),
            progress=progress,
        )

    def check_data(self, tokenizer: PreTrainedTokenizerBase, model_config: object) -> None:
        """Refuse, before any work, rows this model cannot take (too long for its positions,
        characters its tokenizer does not know) with their file and line, and a response
        budget that leaves no room for a prompt (erpd/tasks/checks.py)."""
        check_task(
            self.task,
            tokenizer,
            max_positions=max_positions_of(model_config),
            max_new_tokens=self.max_new_tokens,
            chat_template=self.chat_template,
        )

    def check_batch(self, batch: RolloutBatch) -> None:
        """Refuse a fixed batch sampled on another task than the one this stage evaluates on:
        its evals would measure something else, silently."""
        sampled_on = batch.meta.get("task")
        if sampled_on is not None and sampled_on != self.task.name:
            raise ConfigError(
                "task",
                f"the batch was sampled on task {sampled_on!r}, but this config's task is "
                f"{self.task.name!r}: pass the config the batch was sampled with",
            )

    def evaluator(self, tokenizer: PreTrainedTokenizerBase, seed: int) -> Evaluator:
        return Evaluator(
            self.task,
            tokenizer,
            self.eval,
            self.max_new_tokens,
            chat_template=self.chat_template,
            bf16=self.bf16,
            seed=seed,
        )


@dataclass
class StageResult:
    """A finished (or stopped) stage: where its checkpoint is and what it measured."""

    run: str
    status: str  # completed (every epoch, or max_steps) | kl_budget | stopped (resumable)
    run_dir: Path
    checkpoint: Path | None  # None when stopped
    sha256: str | None
    summary: dict[str, float]
    steps: int
    total_steps: int
    wall_time: float = 0.0
    kl_crossings: dict[float, int] = field(default_factory=dict)
    """eval_at_kl: each mark crossed and the step whose weights crossed it (an eval point)."""

    @property
    def stopped(self) -> bool:
        return self.status == "stopped"

    @classmethod
    def finished(cls, run_dir: Path) -> StageResult | None:
        """The stage in `run_dir` if its final checkpoint exists (manifest written last): a
        finished stage is never run again."""
        checkpoint = run_dir / "checkpoint"
        try:
            manifest = read_manifest(checkpoint)
        except CheckpointError:
            return None
        return cls(
            run=manifest["run"],
            status=manifest["status"],
            run_dir=run_dir,
            checkpoint=checkpoint,
            sha256=manifest["sha256"],
            summary=manifest.get("summary", {}),
            steps=manifest["step"],
            total_steps=manifest.get("total_steps", manifest["step"]),
            kl_crossings={float(m): int(s) for m, s in manifest.get("kl_crossings", [])},
        )


@dataclass
class SampleResult:
    """A sample run: the fixed batch it saved, measured by its mean reward. It trains nothing,
    so it has no checkpoint and no steps (the fields a stage's result has, left empty, so a
    caller records either kind the same way)."""

    run: str
    batch_dir: Path
    summary: dict[str, float]
    checkpoint: None = None
    sha256: None = None
    steps: None = None
    total_steps: None = None
    stopped: bool = False


# --- models -------------------------------------------------------------------------------------
StageModels = tuple[PreTrainedModel, PreTrainedModel, PreTrainedTokenizerBase]
"""(pi_theta, a frozen pi_k, the tokenizer)."""


def check_memory(pi_k: str | Path, batch: RolloutBatch, cfg: StageConfig, env: StageEnv) -> None:
    """Estimate the stage's memory on its device before loading anything; log it, or refuse
    with what to change when it cannot fit (erpd.memory)."""
    width = batch.seqs.input_ids.shape[1]
    tokens = pass_tokens(env.device, cfg.micro_batch_tokens)
    if cfg.micro_batch_size is not None:
        tokens = min(tokens, cfg.micro_batch_size * width)
    found = check_fits(
        pi_k,
        device=env.device,
        devices=distributed.size(),
        pass_tokens=max(tokens, width),
        bf16=env.bf16,
        gradient_checkpointing=env.gradient_checkpointing,
    )
    log.info(found.describe())


def load_stage_models(pi_k: str | Path, device: torch.device) -> StageModels:
    """The trainable policy and a frozen copy of pi_k (for exact KL), both from `pi_k`."""
    if distributed.size() == 1:
        policy = load_model(pi_k, device)
        frozen_pi_k = copy.deepcopy(policy).eval().requires_grad_(False)  # no second read
        return policy, frozen_pi_k, load_tokenizer(pi_k)
    # one read of pi_k (rank 0) serves both the policy and its frozen copy
    source = _read_on_main(pi_k, verify=True)
    policy = distributed.shard_from_main(empty_model(pi_k), *source, device)
    frozen_pi_k = distributed.shard_from_main(empty_model(pi_k), *source, device)
    return policy, frozen_pi_k.eval().requires_grad_(False), load_tokenizer(pi_k)


def load_frozen(path: str | Path, device: torch.device, *, verify: bool = True) -> PreTrainedModel:
    """A model that is only scored (pi_k, pi_0, a teacher): sharded like the policy when the
    stage runs on several ranks, since its forwards then run in step with theirs."""
    if distributed.size() == 1:
        return load_model(path, device, verify=verify).eval().requires_grad_(False)
    source = _read_on_main(path, verify=verify)
    model = distributed.shard_from_main(empty_model(path), *source, device)
    return model.eval().requires_grad_(False)


def _read_on_main(path: str | Path, *, verify: bool) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(weights, buffers) of the model in `path`, read by rank 0 alone into host memory (empty
    elsewhere): the other ranks build the model on the meta device and receive their shards,
    so host memory holds one copy of the model, not one per rank."""
    if not distributed.is_main():
        return {}, {}
    model = load_model(path, "cpu", verify=verify)
    return dict(model.state_dict()), dict(model.named_buffers())


# --- the stage itself ---------------------------------------------------------------------------
def train_stage(
    *,
    stage: str,
    models: StageModels,
    batch: RolloutBatch,
    objective: Objective,
    cfg: StageConfig,
    env: StageEnv,
    run_dir: Path,
    run: str,
    resume: bool,
    manifest: dict[str, object],
) -> StageResult:
    """Run the loop with the env's progress, sink and stop flag, then write the checkpoint."""
    policy, pi_k, tokenizer = models
    env.check_data(tokenizer, policy.config)
    points = ResumePoints(
        run_dir,
        stage_fingerprint(stage, batch, manifest),
        every_steps=cfg.checkpoint_every_steps,
        every_s=cfg.checkpoint_every_s,
        keep=cfg.checkpoint_keep,
        fresh=not resume,
    )
    with env.progress(f"{stage} {run}", planned_steps(cfg, len(batch))) as advance:
        control = LoopControl(
            points=points,
            evaluator=env.evaluator(tokenizer, cfg.seed) if env.evaluate else None,
            sink=env.sink,
            bf16=env.bf16,
            gradient_checkpointing=env.gradient_checkpointing,
            should_stop=env.should_stop,
            advance=advance,
            eval_start=env.eval_start,
        )
        result = run_loop(LoopParts(policy, pi_k, batch, objective, cfg, run), control)
    return finalize(stage, run, result, policy, tokenizer, run_dir, manifest)


def finalize(
    stage: str,
    run: str,
    result: LoopResult,
    policy: PreTrainedModel,
    tokenizer: object,
    run_dir: Path,
    manifest: dict[str, object],
) -> StageResult:
    """Save the final checkpoint (manifest last) and summary; a stopped run saves nothing more."""
    done = StageResult(
        run=run,
        status=result.status,
        run_dir=run_dir,
        checkpoint=None,
        sha256=None,
        summary={},
        steps=result.steps,
        total_steps=result.total_steps,
        wall_time=result.wall_time,
        kl_crossings=result.kl_crossings,
    )
    if result.status == "stopped":
        return done
    summary = dict(result.last_eval)  # the final weights' eval, batch diagnostics included
    body = {
        "stage": stage,
        "run": run,
        "status": result.status,
        "step": result.steps,
        "total_steps": result.total_steps,
        "kl_spent": summary.get(M.KL_EXACT_BATCH),
        "eval_acc": summary.get(M.ACC_EVAL),
        "summary": summary,
        "kl_crossings": [[m, s] for m, s in sorted(result.kl_crossings.items())],
        **manifest,
    }
    checkpoint = run_dir / "checkpoint"
    done.sha256 = save_model_checkpoint(checkpoint, policy, tokenizer, body)
    done.checkpoint, done.summary = checkpoint, summary
    return done
