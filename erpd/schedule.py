"""When a stage evaluates, and the evaluations themselves: each step's once, logged once.

A stage evaluates pi_k at step 0, after every `eval_every_epochs` epochs (or after exactly the
`eval_at_epochs`), and after its last step: the last epoch's, or step `max_steps` when that comes
first. The loop also evaluates where the KL first crosses each `eval_at_kl` value
(erpd/budget.py). `Evaluations` runs the evaluator at a step at most once: a KL-budget stop on an
epoch's first step would otherwise evaluate (and log) the step the previous epoch ended on a
second time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from erpd import metrics as M
from erpd.config import StageConfig
from erpd.evaluate import Evaluator, batch_diagnostics
from erpd.objective import LoopParts


def epoch_order(n: int, seed: int, epoch: int) -> Tensor:
    """The epoch's minibatch order: one generator per epoch, so a resumed run reproduces the
    same order without saving RNG state."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen)


def planned_steps(cfg: StageConfig, num_rows: int) -> int:
    """The optimizer steps a stage runs unless stopped earlier (KL budget, a stop): every
    epoch's, or `max_steps` if that is fewer."""
    total = cfg.total_steps(num_rows)
    return total if cfg.max_steps is None else min(total, cfg.max_steps)


@dataclass(frozen=True)
class EvalSchedule:
    per_epoch: int  # optimizer steps per epoch
    epochs: int
    every: int
    at_epochs: tuple[int, ...] | None
    last: int  # the stage's last step (`planned_steps`)

    @classmethod
    def of(cls, cfg: StageConfig, num_rows: int) -> EvalSchedule:
        at = tuple(cfg.eval_at_epochs) if cfg.eval_at_epochs else None
        per_epoch, last = cfg.steps_per_epoch(num_rows), planned_steps(cfg, num_rows)
        return cls(per_epoch, cfg.epochs, cfg.eval_every_epochs, at, last)

    def steps_in_epoch(self, epoch: int) -> int:
        """The steps of `epoch` (0-based) the stage runs: all of them, or up to `last`."""
        return max(0, min(self.per_epoch, self.last - epoch * self.per_epoch))

    @property
    def last_epoch(self) -> int:
        """How many epochs the stage enters (the last one possibly cut short by max_steps)."""
        return -(-self.last // self.per_epoch)

    def due(self, step: int) -> bool:
        """Whether the weights after `step` updates are evaluated (never step 0: see the loop)."""
        if step >= self.last:
            return step == self.last > 0
        epochs_done = step // self.per_epoch
        if step % self.per_epoch or epochs_done == 0:
            return False
        if epochs_done == self.epochs:
            return True
        if self.at_epochs is not None:
            return epochs_done in self.at_epochs
        return epochs_done % self.every == 0


class Evaluations:
    """The evaluations of one stage's policy, by step; `last` is the latest one asked for."""

    def __init__(
        self,
        evaluator: Evaluator | None,
        parts: LoopParts,
        *,
        bf16: bool,
        sink: M.MetricSink,
        logged: frozenset[int] = frozenset(),
    ) -> None:
        self.evaluator, self.parts, self.bf16, self.sink = evaluator, parts, bf16, sink
        self.by_step: dict[int, dict[str, float]] = {}
        self.last: dict[str, float] = {}
        # steps whose eval a run before a resume logged already: evaluated again if needed
        # (for the summary), never logged twice
        self.logged = logged
        self.whole: set[int] = set()  # steps evaluated on every problem (`at(final=True)`)

    def at(self, step: int, *, final: bool = False) -> dict[str, float]:
        """Evaluate the current weights as those after `step` updates, and log the eval metrics.
        `final`: the weights the stage ends with, measured on every eval problem (an interim
        point reads the first `eval.interim_size`)."""
        if self.evaluator is None:
            self.last = {}
            return self.last
        if step not in self.by_step or (final and step not in self.whole):
            p = self.parts
            found = self.evaluator(p.policy, step=step, pi_k=p.pi_k, batch=p.batch, final=final)
            again = step in self.by_step  # an interim point that turned out to be the last
            self.by_step[step] = found
            if final or self.evaluator.interim_is_whole:
                self.whole.add(step)
            # a step is logged once: its interim point stays in the metrics, while the summary
            # (and the checkpoint's manifest) hold the eval on every problem
            if step not in self.logged and not again:
                scoped = {k: v for k, v in found.items() if M.CATALOGUE[k].scope == "eval"}
                self.sink.log(p.run, step, scoped)
        self.last = self.by_step[step]
        return self.last

    def final(self, step: int) -> dict[str, float]:
        """The final weights' eval with the whole-batch diagnostics (KL, entropy, drift); the
        diagnostics are computed here only if no eval ran at this step (no evaluator, or a
        resume that landed on the last step)."""
        if step in self.by_step and M.ENTROPY_BATCH in self.by_step[step]:
            return self.by_step[step]
        p = self.parts
        diagnostics = batch_diagnostics(
            p.policy,
            p.pi_k,
            p.batch,
            bf16=self.bf16,
            batch_size=p.cfg.forward_batch_size,
            max_tokens=p.cfg.micro_batch_tokens,
        )
        return {**self.last, **diagnostics}
