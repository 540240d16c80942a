"""Matched controls: what a student is compared with to tell whether the teachers' token signal
did the work (docs/method.md, "Matched controls").

A student distils its teachers' delta_t = log pi_T - log pi_k on an extreme region of tokens.
Each control keeps everything of the student (batch, pi_k, optimiser, steps, KL budget) and takes
away one thing the teacher contributes:

    advantage_region  the outcome advantage A on the student's own tokens: the teacher only
                      chooses *which* tokens; is its per-token size and sign worth anything?
    advantage_random  the outcome advantage on a seeded random region of the same size: is the
                      teacher's choice of tokens worth anything?
    placebo           the student's signal with each response's delta shuffled across its
                      tokens: the same scale and sign per response, pointing at the wrong tokens
    early_stop        no distillation: the first teacher's stage-1 objective at stage 2's
                      learning rate, stopped once it has spent the student's KL

This module only derives the controls' configs; the stages run them like any other run.
"""

from __future__ import annotations

from erpd.config import ControlName, Stage1Config, Stage2Config

STAGE2_CONTROLS: tuple[ControlName, ...] = ("advantage_region", "advantage_random", "placebo")
"""Controls that are stage-2 runs (early_stop is a stage-1 run)."""


def uses_teachers(name: ControlName) -> bool:
    """Whether the control reads the teachers' log-probs (to choose or shuffle tokens)."""
    return name in ("advantage_region", "placebo")


def stage2_control(student: Stage2Config, name: ControlName) -> Stage2Config:
    """The stage-2 config of a control of `student`: same steps, budget and optimiser."""
    if name == "advantage_region":
        return student.model_copy(update={"signal": "advantage"})
    if name == "advantage_random":
        return student.model_copy(update={"signal": "advantage", "region": "random"})
    if name == "placebo":
        return student.model_copy(update={"permute_delta": True})
    raise ValueError(f"{name!r} is not a stage-2 control")


def early_stop_control(
    teacher: Stage1Config, student: Stage2Config, kl_budget: float, *, max_epochs: int
) -> Stage1Config:
    """Stage 1 with the teacher's objective at the student's learning rate, minibatch and seed
    (so its evals draw the student's sampling numbers), stopped once kl/exact to pi_k exceeds
    `kl_budget`, for at most `max_epochs` epochs. The reproduction passes the KL the student
    spent; a pipeline, which creates every run before the student has trained, passes twice
    the student's budget and reads the control at the student's KL from its eval_at_kl marks."""
    return teacher.model_copy(
        update={
            "lr": student.lr,
            "minibatch_size": student.minibatch_size,
            "seed": student.seed,
            "kl_budget": kl_budget,
            "epochs": max_epochs,
            "eval_at_epochs": None,
            "eval_every_epochs": max_epochs,
            "name": None,
        }
    )
