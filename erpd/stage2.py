"""Stage 2: distil one or more teachers' token-level signal into pi_k under a trust region.

The teachers' log-probs on the fixed batch are computed once, then their weights are freed: the
student never shares memory with a teacher. The signal, its extreme-region selection and its
normalisation are built once for the whole batch (batch-wide statistics), then the shared loop
runs a PPO-clipped update with a k3 penalty to pi_k and a hard KL budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from erpd import metrics as M
from erpd.checkpoint import parent_record, verify_checkpoint
from erpd.config import Stage2Config
from erpd.errors import CheckpointError, ConfigError
from erpd.losses import (
    Normaliser,
    Stage2Inputs,
    combine_signals,
    permute_within_rows,
    random_score,
    region_score,
    select_region,
    stage2_loss,
    teacher_signal,
)
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


@dataclass
class Signal:
    """The stage-2 signal of the whole batch: a_t (zero outside the region) and its statistics."""

    values: Tensor  # (B, R)
    selected: Tensor  # (B, R) bool
    stats: dict[str, float]


def check_inputs(cfg: Stage2Config, num_teachers: int) -> None:
    """Refuse, before any work and in one line naming the field, a signal or region that needs
    a teacher's delta when no teacher is given."""
    if num_teachers:
        return
    if cfg.signal != "advantage":
        raise ConfigError(
            "stage2.signal",
            f"{cfg.signal!r} needs at least one teacher (only 'advantage' does not)",
        )
    if cfg.region in ("top_frac", "threshold"):
        raise ConfigError(
            "stage2.region",
            f"{cfg.region!r} ranks tokens by a teacher's delta and no teacher was given: pass "
            "the teachers (advantage on their region) or use region 'random' or 'all'",
        )
    if cfg.permute_delta:
        raise ConfigError(
            "stage2.permute_delta", "shuffles a teacher's delta and no teacher was given"
        )


def build_signal(
    batch: RolloutBatch,
    cfg: Stage2Config,
    teacher_logprobs: Sequence[Tensor],
    pi_0_logprobs: Tensor | None = None,
) -> Signal:
    """Combine per-teacher signals, then keep only the extreme region (docs/method.md).

    The teachers' deltas are taken first (against pi_k, or pi_0 for `contrast`); with
    `permute_delta` each response's deltas are shuffled among its own tokens (one seeded
    permutation per response, shared by every teacher). Both the signal and the region are
    built from those deltas. `advantage` takes no value from them: a_t = A_i, kept on the region
    the teachers' deltas select (a control matched in tokens to the student, where the teachers
    only choose the tokens); region `random` (seeded by the stage's seed) and `all` need no
    teacher.
    """
    check_inputs(cfg, len(teacher_logprobs))
    mask = batch.seqs.response_mask
    # delta_t = log pi_T - log pi_k; `contrast` takes it against pi_0 instead
    baseline = batch.pi_k_logprobs
    if cfg.signal == "contrast" and pi_0_logprobs is not None:
        baseline = pi_0_logprobs
    deltas = [(t - baseline) * mask for t in teacher_logprobs]
    if cfg.permute_delta:
        deltas = permute_within_rows(deltas, mask, cfg.seed)
    if cfg.signal == "advantage":
        # no teacher value enters the signal: the same a_t = A_i with or without teachers
        values = teacher_signal("advantage", torch.zeros_like(mask), batch.advantages, mask)
    else:
        per_teacher = [
            teacher_signal(cfg.signal, d, batch.advantages, mask, gate_c=cfg.gate_c) for d in deltas
        ]
        values = combine_signals(per_teacher, cfg.teacher_weights)
    if cfg.region == "random":
        score = random_score(mask, cfg.seed)
    elif deltas:
        score = region_score(deltas, mask, cfg.teacher_weights)
    else:  # region `all` without teachers (check_inputs refused the rest)
        score = torch.zeros_like(mask)
    selected = select_region(
        score, mask, cfg.region, top_frac=cfg.top_frac, threshold=cfg.threshold
    )
    values = values * selected
    chosen = values[selected]
    stats = {
        M.SELECTED_FRAC: (selected.sum() / mask.sum().clamp_min(1)).item(),
        M.SIGNAL_STD: chosen.std().item() if chosen.numel() > 1 else 0.0,
    }
    return Signal(values, selected, stats)


class DistillObjective(AnchoredObjective):
    """Trust-region distillation on the fixed batch; pi_old is re-anchored every epoch."""

    def __init__(self, batch: RolloutBatch, cfg: Stage2Config, signal: Signal, *, bf16: bool):
        super().__init__(
            batch,
            reanchor=True,
            bf16=bf16,
            forward_batch_size=cfg.forward_batch_size,
            pass_tokens=cfg.micro_batch_tokens,
        )
        self.cfg, self.signal = cfg, signal
        self.ratio_bounds = (cfg.clip_eps, cfg.clip_eps)

    def loss(
        self, index: Tensor, logprobs: Tensor, mask: Tensor, norm: Normaliser
    ) -> tuple[Tensor, dict[str, float]]:
        inputs = Stage2Inputs(
            logprobs=logprobs,
            pi_old_logprobs=self.rows(self.pi_old, index, logprobs),
            pi_k_logprobs=self.rows(self.batch.pi_k_logprobs, index, logprobs),
            signal=self.rows(self.signal.values, index, logprobs),
            mask=mask,
            norm=norm,
        )
        loss, values = stage2_loss(inputs, self.cfg)
        values.update(self.signal.stats)
        return loss, values


def teacher_logprobs(
    teachers: Sequence[str | Path],
    batch: RolloutBatch,
    env: StageEnv,
    *,
    vocab_size: int,
    pinned: Sequence[str | None] | None = None,
    batch_size: int = 256,
    max_tokens: int | None = None,
) -> list[Tensor]:
    """Each teacher's per-token log-probs on the fixed batch, one teacher in memory at a time."""
    out = []
    for i, path in enumerate(teachers):
        expected = pinned[i] if pinned else None
        if expected is not None or (Path(path) / "manifest.json").is_file():
            verify_checkpoint(path, expected)
        teacher = load_frozen(path, env.device, verify=False)  # verified just above
        if teacher.config.vocab_size != vocab_size:
            raise CheckpointError(
                f"{path}: teacher vocabulary {teacher.config.vocab_size} != student's {vocab_size}"
            )
        out.append(
            sequence_logprobs(
                teacher, batch.seqs, bf16=env.bf16, batch_size=batch_size, max_tokens=max_tokens
            )
        )
        del teacher
    return out


def run_stage2(
    *,
    pi_k: str | Path,
    teachers: Sequence[str | Path],
    batch: RolloutBatch,
    cfg: Stage2Config,
    env: StageEnv,
    run_dir: str | Path,
    run: str,
    pi_0: str | Path | None = None,
    pinned: Sequence[str | None] | None = None,
    resume: bool = True,
) -> StageResult:
    """Distil `teachers` into pi_k; the student (pi_{k+1}) lands in run_dir/checkpoint."""
    run_dir = Path(run_dir)
    if cfg.teacher_weights is not None and len(cfg.teacher_weights) != len(teachers):
        raise ValueError("stage2.teacher_weights must have one weight per teacher")
    check_inputs(cfg, len(teachers))
    check_memory(pi_k, batch, cfg, env)
    policy, frozen_pi_k, tokenizer = load_stage_models(pi_k, env.device)
    batch.check_model(policy.config.vocab_size, str(pi_k), tokenizer_fingerprint(tokenizer))
    # `advantage` takes its region from the teachers when they are given, so they are scored too
    teacher_lp = teacher_logprobs(
        teachers,
        batch,
        env,
        vocab_size=policy.config.vocab_size,
        pinned=pinned,
        batch_size=cfg.forward_batch_size,
        max_tokens=cfg.micro_batch_tokens,
    )
    pi_0_lp = None
    if cfg.signal == "contrast":
        if pi_0 is None:
            raise ConfigError("stage2.signal", "'contrast' needs pi_0: pass --initial")
        pi_0_lp = sequence_logprobs(
            load_frozen(pi_0, env.device),
            batch.seqs,
            bf16=env.bf16,
            batch_size=cfg.forward_batch_size,
            max_tokens=cfg.micro_batch_tokens,
        )
    signal = build_signal(batch, cfg, teacher_lp, pi_0_lp)
    objective = DistillObjective(batch, cfg, signal, bf16=env.bf16)
    lineage = [parent_record(t) for t in teachers]
    return train_stage(
        stage="stage2",
        models=(policy, frozen_pi_k, tokenizer),
        batch=batch,
        objective=objective,
        cfg=cfg,
        env=env,
        run_dir=run_dir,
        run=run,
        resume=resume,
        manifest={"config": cfg.model_dump(), "base": parent_record(pi_k), "teachers": lineage},
    )
