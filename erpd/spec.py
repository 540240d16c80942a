"""One object that prepares a stage's inputs and runs it: `StageSpec`.

A spec names what a stage trains from (pi_k, pi_0, the fixed batch, the teachers) as paths and
its config as JSON, so it travels as a file to the ranks of a torchrun group. `run_stage` loads
the batch and runs stage 1 or stage 2 in this process. The CLI pipeline, the worker's one-GPU
path and every torchrun rank go through it; `fixed_batch` and `tiny_base` prepare the inputs
that the pipeline and the worker both need before a stage can run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from erpd.checkpoint import parent_record
from erpd.config import BaseTrainConfig, PipelineConfig, Stage1Config, Stage2Config, TinyModelConfig
from erpd.models import load_policy
from erpd.pretrain import pretrain_base
from erpd.rollout import ROLLOUT_META, RolloutBatch, sample_rollout
from erpd.stage import StageEnv, StageResult
from erpd.stage1 import run_stage1
from erpd.stage2 import run_stage2


class StageSpec(BaseModel):
    """A whole stage as paths and JSON: what it trains from and where it writes. The worker
    builds one from ids (never from a request); a torchrun rank reads it from a file."""

    model_config = ConfigDict(extra="forbid")

    stage: Literal["stage1", "stage2"]
    pipeline: dict[str, object]  # PipelineConfig: task, eval, runtime and model sections
    config: dict[str, object]  # Stage1Config or Stage2Config
    pi_k: str
    pi_0: str | None
    batch: str
    run_dir: str
    run: str
    teachers: list[str] = []
    pinned: list[str | None] = []  # each teacher's sha256, when known
    resume: bool = True  # False: discard the run's resume points first

    def run_stage(self, env: StageEnv, batch: RolloutBatch | None = None) -> StageResult:
        """Run the stage in this process: one rank of a group, or the only process."""
        fixed = batch if batch is not None else RolloutBatch.load(self.batch)
        env.check_batch(fixed)
        if self.stage == "stage1":
            return run_stage1(
                pi_k=self.pi_k,
                batch=fixed,
                cfg=Stage1Config.model_validate(self.config),
                env=env,
                run_dir=self.run_dir,
                run=self.run,
                pi_0=self.pi_0,
                resume=self.resume,
            )
        return run_stage2(
            pi_k=self.pi_k,
            teachers=self.teachers,
            pinned=self.pinned,
            batch=fixed,
            cfg=Stage2Config.model_validate(self.config),
            env=env,
            run_dir=self.run_dir,
            run=self.run,
            pi_0=self.pi_0,
            resume=self.resume,
        )


# --- the inputs every caller prepares ---------------------------------------------------------
def fixed_batch(
    pi_k: str | Path, path: Path, cfg: PipelineConfig, env: StageEnv, round_index: int = 0
) -> RolloutBatch:
    """The round's fixed batch kept at `path`; sampled from pi_k (and kept) if there is none."""
    if (path / ROLLOUT_META).is_file():
        return RolloutBatch.load(path)
    return sample_batch(pi_k, path, cfg, env, round_index)


def sample_batch(
    pi_k: str | Path, path: str | Path, cfg: PipelineConfig, env: StageEnv, round_index: int = 0
) -> RolloutBatch:
    """Sample round `round_index`'s fixed batch from pi_k and save it to `path`."""
    model, tokenizer = load_policy(pi_k, env.device)
    env.check_data(tokenizer, model.config)
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
            model_dir=pi_k,
        )
    batch.meta["policy"] = parent_record(pi_k)
    batch.save(path)
    return batch


def tiny_base(
    shape: TinyModelConfig, cfg: BaseTrainConfig, env: StageEnv, out_dir: Path, seed: int
) -> Path:
    """pi_0 when no model is given: the built-in tiny model, pretrained into `out_dir` once."""
    done = StageResult.finished(out_dir) or pretrain_base(
        shape=shape, cfg=cfg, env=env, out_dir=out_dir, seed=seed
    )
    assert done.checkpoint is not None
    return done.checkpoint
