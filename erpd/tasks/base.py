"""The task contract shared by every problem source the trainer can post-train on.

A task hands out prompts with a reference answer, keeps two fixed held-out splits (validation, for
every stopping and calibration decision, and eval, for the numbers a run reports), and scores a
decoded completion with a binary reward. Keeping the contract this small lets the trainer,
the evaluator and the tokenizer builder stay ignorant of where problems come from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class Problem:
    """One prompt with its reference answer and the completion used for supervised warm-up.

    Frozen so problems can be shared between the sampler, the trainer and the evaluator (and used
    as dict keys) without anyone mutating a reference answer by accident.
    """

    prompt: str
    """Text given to the model, e.g. ``"47+38="``."""
    answer: str
    """Reference final answer, e.g. ``"85"``."""
    target: str
    """Full supervised completion without the end token, e.g. ``"85"`` or ``"46+56=102"``."""
    source: str | None = field(default=None, compare=False)
    """Where the row came from, for error messages, e.g. ``"train.jsonl line 3"``; None for
    generated problems. Not part of equality or hashing: the same prompt is the same problem."""


@runtime_checkable
class Task(Protocol):
    """A source of training problems, fixed validation and evaluation splits and a reward.

    Implementations must keep ``train_problems``, ``validation_problems`` and ``eval_problems``
    pairwise disjoint (compared by prompt): evaluation numbers are only meaningful if the policy
    never trained on those prompts, and if no decision (when to stop pretraining, which setting
    to keep) was taken by looking at them.
    """

    name: str
    """Short identifier used in logs and run metadata, e.g. ``"arithmetic"``."""
    max_new_tokens: int
    """Generation budget in response tokens (end token included) that fits every target."""

    def train_problems(self, n: int, seed: int) -> list[Problem]:
        """Return ``n`` distinct problems, deterministic for (task, n, seed), none in the
        validation or eval split."""
        ...

    def validation_problems(self) -> list[Problem]:
        """Return the fixed, deterministic split that stopping and calibration decisions read."""
        ...

    def eval_problems(self) -> list[Problem]:
        """Return the fixed, deterministic held-out split that results report."""
        ...

    def reward(self, problem: Problem, response: str) -> float:
        """Score a decoded completion (end token stripped): 1.0 if correct else 0.0; no raise."""
        ...
