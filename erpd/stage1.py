"""Stage 1: many weakly constrained off-policy epochs on the fixed batch -> a teacher.

Orchestration only: the objective is looked up by name in erpd.losses.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from erpd.checkpoint import parent_record
from erpd.config import Stage1Config
from erpd.errors import ConfigError
from erpd.losses import Normaliser, Stage1Inputs, stage1_loss
from erpd.models import tokenizer_fingerprint
from erpd.rollout import RolloutBatch, sequence_logprobs
from erpd.trainer import (
    Anchored,
    LoopSettings,
    StageEnv,
    StageResult,
    check_memory,
    load_frozen,
    load_stage_models,
    train_stage,
)


class Stage1Objective(Anchored):
    """Binds a stage-1 objective to the fixed batch; pi_old re-anchors only with anchor=epoch."""

    def __init__(
        self,
        batch: RolloutBatch,
        cfg: Stage1Config,
        *,
        bf16: bool,
        mse_ref_logprobs: Tensor | None = None,
    ) -> None:
        super().__init__(
            batch,
            reanchor=cfg.anchor == "epoch",
            bf16=bf16,
            forward_batch_size=cfg.forward_batch_size,
            pass_tokens=cfg.micro_batch_tokens,
        )
        self.cfg, self.mse_ref = cfg, mse_ref_logprobs
        self.ratio_bounds = (cfg.eps_low, cfg.eps_high)

    def loss(
        self, index: Tensor, logprobs: Tensor, mask: Tensor, norm: Normaliser
    ) -> tuple[Tensor, dict[str, float]]:
        device = logprobs.device
        b = self.batch
        inputs = Stage1Inputs(
            logprobs=logprobs,
            old_logprobs=self.rows(self.anchor, index, logprobs),
            ref_logprobs=self.rows(b.behaviour_logprobs, index, logprobs),
            mask=mask,
            advantages=b.advantages[index].to(device),
            rewards=b.rewards[index].to(device),
            mse_ref_logprobs=None
            if self.mse_ref is None
            else self.rows(self.mse_ref, index, logprobs),
            norm=norm,
        )
        return stage1_loss(inputs, self.cfg)


def run_stage1(
    *,
    base: str | Path,
    batch: RolloutBatch,
    cfg: Stage1Config,
    env: StageEnv,
    run_dir: str | Path,
    run: str,
    initial: str | Path | None = None,
    resume: bool = True,
) -> StageResult:
    """Train a teacher from pi_k (`base`) on `batch`; the checkpoint lands in run_dir/checkpoint."""
    run_dir = Path(run_dir)
    check_memory(base, batch, cfg, env)
    model, ref_model, tokenizer = load_stage_models(base, env.device)
    batch.check_model(model.config.vocab_size, str(base), tokenizer_fingerprint(tokenizer))
    mse_ref = None
    if cfg.objective == "mse" and cfg.mse_reference == "initial":
        if initial is None:
            raise ConfigError("stage1.mse_reference", "'initial' needs pi_0: pass --initial")
        pi0 = load_frozen(initial, env.device)
        mse_ref = sequence_logprobs(
            pi0,
            batch.seqs,
            bf16=env.bf16,
            batch_size=cfg.forward_batch_size,
            max_tokens=cfg.micro_batch_tokens,
        )
        del pi0
    objective = Stage1Objective(batch, cfg, bf16=env.bf16, mse_ref_logprobs=mse_ref)
    return train_stage(
        stage="stage1",
        models=(model, ref_model, tokenizer),
        batch=batch,
        objective=objective,
        settings=LoopSettings.of(
            run, cfg, bf16=env.bf16, gradient_checkpointing=env.gradient_checkpointing
        ),
        env=env,
        run_dir=run_dir,
        resume=resume,
        manifest={"config": cfg.model_dump(), "base": parent_record(base), "teachers": []},
    )
