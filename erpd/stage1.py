"""Stage 1: many weakly constrained off-policy epochs on the fixed batch -> a teacher (pi_T).

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
from erpd.objective import AnchoredObjective
from erpd.rollout import RolloutBatch, sequence_logprobs
from erpd.stage import (
    StageEnv,
    StageResult,
    check_memory,
    load_frozen,
    load_stage_models,
    train_stage,
)


class TeacherObjective(AnchoredObjective):
    """Binds a stage-1 objective to the fixed batch; pi_old re-anchors only with anchor=epoch."""

    def __init__(
        self,
        batch: RolloutBatch,
        cfg: Stage1Config,
        *,
        bf16: bool,
        pi_0_logprobs: Tensor | None = None,
    ) -> None:
        super().__init__(
            batch,
            reanchor=cfg.anchor == "epoch",
            bf16=bf16,
            forward_batch_size=cfg.forward_batch_size,
            pass_tokens=cfg.micro_batch_tokens,
        )
        self.cfg, self.pi_0 = cfg, pi_0_logprobs
        self.ratio_bounds = (cfg.eps_low, cfg.eps_high)

    def loss(
        self, index: Tensor, logprobs: Tensor, mask: Tensor, norm: Normaliser
    ) -> tuple[Tensor, dict[str, float]]:
        device = logprobs.device
        b = self.batch
        inputs = Stage1Inputs(
            logprobs=logprobs,
            pi_old_logprobs=self.rows(self.pi_old, index, logprobs),
            pi_k_logprobs=self.rows(b.pi_k_logprobs, index, logprobs),
            mask=mask,
            advantages=b.advantages[index].to(device),
            rewards=b.rewards[index].to(device),
            pi_0_logprobs=None if self.pi_0 is None else self.rows(self.pi_0, index, logprobs),
            norm=norm,
        )
        return stage1_loss(inputs, self.cfg)


def run_stage1(
    *,
    pi_k: str | Path,
    batch: RolloutBatch,
    cfg: Stage1Config,
    env: StageEnv,
    run_dir: str | Path,
    run: str,
    pi_0: str | Path | None = None,
    resume: bool = True,
) -> StageResult:
    """Train a teacher from pi_k on `batch`; the checkpoint lands in run_dir/checkpoint."""
    run_dir = Path(run_dir)
    check_memory(pi_k, batch, cfg, env)
    policy, frozen_pi_k, tokenizer = load_stage_models(pi_k, env.device)
    batch.check_model(policy.config.vocab_size, str(pi_k), tokenizer_fingerprint(tokenizer))
    pi_0_logprobs = None
    if cfg.objective == "mse" and cfg.mse_reference == "initial":
        if pi_0 is None:
            raise ConfigError("stage1.mse_reference", "'initial' needs pi_0: pass --initial")
        model = load_frozen(pi_0, env.device)
        pi_0_logprobs = sequence_logprobs(
            model,
            batch.seqs,
            bf16=env.bf16,
            batch_size=cfg.forward_batch_size,
            max_tokens=cfg.micro_batch_tokens,
        )
        del model
    objective = TeacherObjective(batch, cfg, bf16=env.bf16, pi_0_logprobs=pi_0_logprobs)
    return train_stage(
        stage="stage1",
        models=(policy, frozen_pi_k, tokenizer),
        batch=batch,
        objective=objective,
        cfg=cfg,
        env=env,
        run_dir=run_dir,
        run=run,
        resume=resume,
        manifest={"config": cfg.model_dump(), "base": parent_record(pi_k), "teachers": []},
    )
