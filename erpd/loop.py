"""The epoch/minibatch loop both stages share.

A stage hands it an `Objective` (erpd/objective.py) and gets the rest: AdamW with clipping, the
exact KL and entropy against pi_k every step (erpd/step.py), evals on a schedule
(erpd/schedule.py) and where the KL first crosses each `eval_at_kl` mark, resume points
(erpd/resume.py), a cooperative stop, a KL budget (erpd/budget.py) and a step cap (`max_steps`).
Metrics logged at step s always describe the weights after s optimizer steps: step metrics come
from the minibatch about to be used for update s + 1.

How a stage ends (`LoopResult.status`): `completed` after its last epoch or its `max_steps`-th
step (both are the length its config asked for: a step cap is a run length, like epochs, not a
stop), `kl_budget` when the budget stopped it or its final weights are over the budget, and
`stopped` on a cooperative stop (resumable). Every end but `stopped` evaluates the final
weights, and the stage writes its checkpoint.

The loop takes its models and data from the caller (erpd/stage.py), so a sharded run wraps them
without touching any loss code.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel

from erpd import distributed
from erpd import metrics as M
from erpd.budget import KlBudget, KlMarks
from erpd.errors import DivergedError
from erpd.evaluate import Evaluator
from erpd.models import adamw, prepare_to_train
from erpd.objective import LoopParts
from erpd.progress import Advance
from erpd.resume import ResumePoints
from erpd.schedule import EvalSchedule, Evaluations, epoch_order
from erpd.step import MinibatchStep

StopCheck = Callable[[], bool]
MARKS_KEY = "kl_crossings"  # where a resume point keeps the eval_at_kl marks crossed so far


@dataclass
class LoopResult:
    """How a stage ended: `completed`, `kl_budget` or `stopped` (cooperative stop, resumable).

    `last_eval` is the final weights' eval with the whole-batch diagnostics (KL, entropy,
    drift) unless the stage stopped, when it is the last eval that ran.
    """

    status: str
    steps: int
    total_steps: int
    last_eval: dict[str, float] = field(default_factory=dict)
    wall_time: float = 0.0
    kl_crossings: dict[float, int] = field(default_factory=dict)
    """Each `eval_at_kl` mark crossed, with the step whose weights crossed it (evaluated)."""


@dataclass
class LoopControl:
    """How the loop reports and stops: everything but what it trains (`LoopParts`)."""

    points: ResumePoints
    evaluator: Evaluator | None
    sink: M.MetricSink
    bf16: bool = False
    gradient_checkpointing: bool = False
    should_stop: StopCheck | None = None
    advance: Advance | None = None
    eval_start: bool = True  # False: no eval of pi_k at step 0 (the caller measured it)


def run_loop(parts: LoopParts, ctl: LoopControl) -> LoopResult:
    """Train `parts.policy` on the fixed batch for `cfg.epochs` epochs (at most `cfg.max_steps`
    steps), or until the KL budget or a stop ends it."""
    policy, batch, objective, cfg = parts.policy, parts.batch, parts.objective, parts.cfg
    started = time.time()
    optimizer = adamw(policy, lr=cfg.lr, weight_decay=cfg.weight_decay)
    restored = ctl.points.restore(policy, optimizer, objective)
    step = restored.step
    if ctl.advance is not None and step:
        ctl.advance(step)
    schedule, budget = EvalSchedule.of(cfg, len(batch)), KlBudget(cfg.kl_budget)
    total = schedule.last
    marks = KlMarks.of(cfg.eval_at_kl, restored.loop.get(MARKS_KEY))
    # a step evaluated before its resume point was written is not logged a second time
    logged = frozenset({step}) if restored.evaluated else frozenset()
    evals = Evaluations(ctl.evaluator, parts, bf16=ctl.bf16, sink=ctl.sink, logged=logged)
    # a fresh run evaluates pi_k at step 0 (unless told not to); a resumed one evaluates its
    # step if an eval was due there and the point was written before it (a save, then a crash)
    if (not restored.resumed and ctl.eval_start) or (
        restored.resumed and schedule.due(step) and not restored.evaluated
    ):
        evals.at(step, final=step == total)

    def save(at: int) -> None:  # a resume re-evaluates a due step only if it was not yet
        evaluated = at in evals.by_step or (at == restored.step and restored.evaluated)
        M.flush(ctl.sink)  # the points of every step before the point are stored first
        loop: dict[str, object] | None = {MARKS_KEY: marks.state()} if marks.marks else None
        ctl.points.save(at, policy, optimizer, objective, evaluated=evaluated, loop=loop)

    def end(status: str, summary: dict[str, float]) -> LoopResult:
        # stored before the checkpoint exists: a finished stage is never run again, so points
        # lost after it would be lost for good
        M.flush(ctl.sink)
        return LoopResult(status, step, total, summary, time.time() - started, dict(marks.crossed))

    prepare_to_train(policy, gradient_checkpointing=ctl.gradient_checkpointing)
    minibatch = MinibatchStep(policy, parts.pi_k, batch, objective, cfg, bf16=ctl.bf16)
    for epoch in range(step // schedule.per_epoch, schedule.last_epoch):
        order = epoch_order(len(batch), cfg.seed, epoch)
        first = step - epoch * schedule.per_epoch  # > 0 only when resuming mid-epoch
        if first == 0:
            objective.on_epoch_start(epoch, policy)
        for k in range(first, schedule.steps_in_epoch(epoch)):
            # one rank's stop (a signal, a cancel flag) stops all, at the same step
            if ctl.should_stop is not None and distributed.any_rank(ctl.should_stop()):
                save(step)
                return end("stopped", evals.last)
            index = order[k * cfg.minibatch_size : (k + 1) * cfg.minibatch_size]
            tick = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            values = minibatch(index)
            budget.annotate(values)
            over = budget.exceeded(values[M.KL_EXACT])
            if marks.cross(step, values[M.KL_EXACT]) and not over:
                # the weights after `step` updates are the first past a mark: evaluate them
                # (under no_grad: the gradient just accumulated waits for its update)
                evals.at(step)
            if over:
                # the weights after `step` updates already spent the budget: keep them, stop
                optimizer.zero_grad(set_to_none=True)
                ctl.sink.log(parts.run, step, values)
                evals.at(step, final=True)
                return end("kl_budget", evals.final(step))
            _update(policy, optimizer, cfg.grad_clip, values, step=step, lr=cfg.lr)
            tokens = batch.seqs.response_mask[index].sum().item()
            values[M.TOKENS_PER_S] = tokens / max(time.perf_counter() - tick, 1e-9)
            ctl.sink.log(parts.run, step, values)
            step += 1
            if ctl.advance is not None:
                ctl.advance(1)
            if ctl.points.due(step):
                save(step)
        if schedule.due(step):
            evals.at(step, final=step == total)
    summary = evals.final(step)
    # the last update is checked on the whole batch, as the budget is (its eval is the final one)
    marks.cross(step, summary.get(M.KL_EXACT_BATCH, 0.0))
    return end(budget.end_status(summary), summary)


def _update(
    policy: PreTrainedModel,
    optimizer: torch.optim.Optimizer,
    grad_clip: float,
    values: dict[str, float],
    *,
    step: int,
    lr: float,
) -> None:
    """Clip the accumulated gradient (recording its norm) and take the AdamW step, unless the
    loss or the gradient is not finite: then the stage stops before the weights are touched
    (the loss and the norm are the same on every rank, so every rank stops)."""
    # max_norm=inf measures the norm without clipping (0 turns clipping off)
    norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), grad_clip or math.inf)
    grad_norm = distributed.scalar(norm)
    loss = values.get(M.LOSS, 0.0)
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        what = "loss" if not math.isfinite(loss) else "gradient norm"
        raise DivergedError(
            f"training diverged at step {step + 1}: the {what} is not finite "
            f"(loss {loss}, gradient norm {grad_norm}); the learning rate ({lr:g}) is likely "
            "too high: lower lr (or keep grad_clip on). Nothing of this step was saved."
        )
    if grad_clip > 0:
        values[M.GRAD_NORM] = grad_norm
    optimizer.step()
