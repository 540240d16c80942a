"""The KL budget: a stage stops once the exact KL to pi_k exceeds it; and the KL marks
(`eval_at_kl`): the stage is evaluated where the same KL first exceeds each mark.

The budget is counted in `kl/exact` (full-vocabulary KL(pi_theta || pi_k) per response token),
never in k3, which is heavy-tailed on the fixed batch (docs/method.md). The per-step check sees
the weights *before* each update, so the last update is checked once more at the end, on the
whole batch (`kl/exact_batch`). Marks are checked on the same numbers at the same places, so a
mark equal to the budget is crossed at the step the budget stops on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from erpd import metrics as M


@dataclass(frozen=True)
class KlBudget:
    limit: float | None  # None: no budget, the stage runs every epoch

    def annotate(self, values: dict[str, float]) -> None:
        """Add the share of the budget the step's weights have spent."""
        if self.limit is not None:
            values[M.KL_BUDGET_USED] = values[M.KL_EXACT] / self.limit

    def exceeded(self, kl: float) -> bool:
        return self.limit is not None and kl > self.limit

    def end_status(self, summary: dict[str, float]) -> str:
        """`kl_budget` if the final weights are over the budget on the whole batch."""
        over = self.limit is not None and summary[M.KL_EXACT_BATCH] > self.limit
        return "kl_budget" if over else "completed"


@dataclass
class KlMarks:
    """The `eval_at_kl` values and the step at which each was first exceeded.

    A mark is crossed by the first weights whose `kl/exact` is above it: the minibatch's before
    an update (the number the budget is checked on), or the whole batch's for the final
    weights. `crossed` travels in resume points, so a resumed stage neither evaluates a crossing
    again nor skips one.
    """

    marks: tuple[float, ...] = ()
    crossed: dict[float, int] = field(default_factory=dict)

    @classmethod
    def of(cls, values: Sequence[float] | None, saved: object = None) -> KlMarks:
        """The marks of a config, with the crossings a resume point recorded (`state()`)."""
        found = cls(tuple(sorted(set(values or ()))))
        if isinstance(saved, list):
            found.crossed = {float(mark): int(step) for mark, step in saved}
        return found

    def cross(self, step: int, kl: float) -> list[float]:
        """Record and return the marks the weights after `step` updates cross first."""
        new = [m for m in self.marks if m not in self.crossed and kl > m]
        for m in new:
            self.crossed[m] = step
        return new

    def state(self) -> list[list[float]]:
        """The crossings as JSON: [[mark, step], ...] in the order of the marks."""
        return [[m, self.crossed[m]] for m in self.marks if m in self.crossed]
