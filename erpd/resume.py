"""A stage's resume points: where they live, what they belong to, and when one is written.

A resume point holds the weights, AdamW state, RNG state and the objective's tensors after some
optimizer step (erpd/checkpoint.py writes it atomically; several ranks write shards). It is
written when the stage is stopped cooperatively (a cancel, a worker's SIGTERM), every
`checkpoint_every_s` seconds of training (by default: a lost worker loses at most that much work)
and every `checkpoint_every_steps` steps; only the newest `checkpoint_keep` stay on disk. Each
carries the stage's fingerprint (config, pi_k, teachers, fixed batch): a point of anything else
is refused, never silently continued. How often points are written is not part of what is
trained, so a changed cadence still resumes.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from transformers import PreTrainedModel

from erpd import distributed
from erpd.checkpoint import RESUME_DIR, latest_resume, load_resume, read_resume_meta, save_resume
from erpd.errors import ConfigError
from erpd.rollout import RolloutBatch


class Stateful(Protocol):
    """What a resume point keeps besides weights and AdamW: an objective's own tensors."""

    def state(self) -> dict[str, torch.Tensor]: ...

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None: ...


class NoState:
    """A loop with no tensors of its own (base pretraining)."""

    def state(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        return None


SAVE_SHARE = 20
"""A time-based point waits at least this many times the last save's duration, so saving a
large model's weights and AdamW state never takes more than 1/20 of the stage's time."""


def stage_fingerprint(stage: str, batch: RolloutBatch, manifest: dict[str, object]) -> str:
    """What is being trained: the stage, its fixed batch and its manifest (config, lineage),
    less the resume cadence (`checkpoint_*`), which changes where points are, not the weights."""
    config = manifest.get("config")
    if isinstance(config, dict):
        config = {k: v for k, v in config.items() if not k.startswith("checkpoint_")}
        manifest = {**manifest, "config": config}
    identity = {"stage": stage, "batch": batch.fingerprint(), **manifest}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class Restored:
    """Where a stage starts: step 0, or the step of the resume point it continues."""

    step: int = 0
    evaluated: bool = False  # the point's step was evaluated before it was written
    resumed: bool = False
    loop: dict[str, object] = field(default_factory=dict)  # the loop's own record (`save`)


class ResumePoints:
    """A stage's resume points: restore the newest, and write one when `due` or stopped."""

    def __init__(
        self,
        run_dir: Path,
        fingerprint: str,
        *,
        every_steps: int = 0,
        every_s: float = 0.0,
        keep: int = 1,
        fresh: bool = False,
    ) -> None:
        self.run_dir, self.fingerprint, self.keep = run_dir, fingerprint, keep
        self.every_steps, self.every_s = every_steps, every_s
        self.last_save_s = 0.0  # how long the last save took
        self.saved_at = time.monotonic()  # the clock starts with the stage
        self.saved: tuple[int, bool, str] | None = None  # the (step, evaluated, loop) last written
        if fresh:  # discard the run's resume points first
            shutil.rmtree(run_dir / RESUME_DIR, ignore_errors=True)

    def restore(
        self, policy: PreTrainedModel, optimizer: torch.optim.Optimizer, objective: Stateful
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
        loop = meta.get("loop")
        loop = loop if isinstance(loop, dict) else {}  # points written before it have none
        return Restored(step, bool(meta.get("evaluated")), resumed=True, loop=loop)

    def due(self, step: int) -> bool:
        """Whether a point is due after `step` updates: every rank gets the same answer (rank
        clocks differ, so a time-based point is written when any rank's interval is up)."""
        by_steps = bool(self.every_steps) and step % self.every_steps == 0
        if not self.every_s:
            return by_steps
        wait = max(self.every_s, SAVE_SHARE * self.last_save_s)
        return distributed.any_rank(by_steps or time.monotonic() - self.saved_at >= wait)

    def save(
        self,
        step: int,
        policy: PreTrainedModel,
        optimizer: torch.optim.Optimizer,
        objective: Stateful,
        *,
        evaluated: bool,
        loop: dict[str, object] | None = None,
    ) -> None:
        """Write a point after `step` updates; `loop` is what the loop records beside the
        weights (JSON: e.g. the KL marks crossed so far), given back as `Restored.loop`."""
        loop = loop or {}
        key = (step, evaluated, json.dumps(loop, sort_keys=True))
        if key == self.saved:  # a stop right after a due point: on disk already
            return
        started = time.monotonic()
        # when the write began: with the files' times, how long a save takes (the next point
        # waits 20x that if it is longer than every_s)
        began = time.time()
        save_resume(
            self.run_dir,
            step=step,
            model=policy,
            optimizer=optimizer,
            tensors=objective.state(),
            meta={
                "evaluated": evaluated,
                "fingerprint": self.fingerprint,
                "began": began,
                "loop": loop,
            },
            keep=self.keep,
        )
        self.saved_at = time.monotonic()
        self.last_save_s, self.saved = self.saved_at - started, key
