"""A stage's resume points: where they live, what they belong to, and when one is written.

A resume point holds the weights, AdamW state, RNG state and the objective's tensors after some
optimizer step (erpd/checkpoint.py writes it atomically; several ranks write shards). It is
written when the stage is stopped cooperatively and every `checkpoint_every_steps` steps. Each
carries the stage's fingerprint (config, pi_k, teachers, fixed batch): a point of anything else
is refused, never silently continued.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel

from erpd.checkpoint import RESUME_DIR, latest_resume, load_resume, read_resume_meta, save_resume
from erpd.errors import ConfigError
from erpd.objective import Objective
from erpd.rollout import RolloutBatch


def stage_fingerprint(stage: str, batch: RolloutBatch, manifest: dict[str, object]) -> str:
    """What is being trained: the stage, its fixed batch and its manifest (config, lineage)."""
    identity = {"stage": stage, "batch": batch.fingerprint(), **manifest}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class Restored:
    """Where a stage starts: step 0, or the step of the resume point it continues."""

    step: int = 0
    evaluated: bool = False  # the point's step was evaluated before it was written
    resumed: bool = False


class ResumePoints:
    def __init__(
        self, run_dir: Path, fingerprint: str, *, every_steps: int, fresh: bool = False
    ) -> None:
        self.run_dir, self.fingerprint, self.every_steps = run_dir, fingerprint, every_steps
        if fresh:  # discard the run's resume points first
            shutil.rmtree(run_dir / RESUME_DIR, ignore_errors=True)

    def restore(
        self, policy: PreTrainedModel, optimizer: torch.optim.Optimizer, objective: Objective
    ) -> Restored:
        """Load the newest point into the policy, optimizer and objective, if there is one."""
        point = latest_resume(self.run_dir)
        if point is None:
            return Restored()
        if read_resume_meta(point).get("fingerprint") != self.fingerprint:
            raise ConfigError(
                "resume",
                f"{self.run_dir} holds a stopped run of another config, base or batch; "
                "pass --fresh to start over, or use another --out",
            )
        step, tensors, meta = load_resume(point, model=policy, optimizer=optimizer)
        objective.load_state(tensors)
        return Restored(step, bool(meta.get("evaluated")), resumed=True)

    def due(self, step: int) -> bool:
        return bool(self.every_steps) and step % self.every_steps == 0

    def save(
        self,
        step: int,
        policy: PreTrainedModel,
        optimizer: torch.optim.Optimizer,
        objective: Objective,
        *,
        evaluated: bool,
    ) -> None:
        save_resume(
            self.run_dir,
            step=step,
            model=policy,
            optimizer=optimizer,
            tensors=objective.state(),
            meta={"evaluated": evaluated, "fingerprint": self.fingerprint},
        )
