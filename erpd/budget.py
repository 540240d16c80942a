"""The KL budget: a stage stops once the exact KL to pi_k exceeds it.

The budget is counted in `kl/exact` (full-vocabulary KL(pi_theta || pi_k) per response token),
never in k3, which is heavy-tailed on the fixed batch (docs/method.md). The per-step check sees
the weights *before* each update, so the last update is checked once more at the end, on the
whole batch (`kl/exact_batch`).
"""

from __future__ import annotations

from dataclasses import dataclass

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
