"""A run's metric series as the page holds them between polls: the first read is downsampled by
the API, later reads fetch only what is new (`since_step`) and are merged in."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Steps = list[int]
Values = list[float | None]


@dataclass
class RunSeries:
    series: dict[str, tuple[Steps, Values]] = field(default_factory=dict)
    last_step: int | None = None

    def since(self) -> int:
        """Where the next poll starts: the last step again (a step's eval points may land after
        its training points; a later step's points never land before them)."""
        return -1 if self.last_step is None else self.last_step - 1

    def merge(self, body: dict[str, Any]) -> int:
        """Merge a /metrics response; returns how many new points it added."""
        added = 0
        for s in body["series"]:
            steps, values = self.series.setdefault(s["name"], ([], []))
            if not s["steps"]:
                continue
            first = s["steps"][0]
            keep = len(steps)
            while keep and steps[keep - 1] >= first:  # re-sent steps replace what we had
                keep -= 1
            added += len(s["steps"]) - (len(steps) - keep)
            del steps[keep:], values[keep:]
            steps.extend(s["steps"])
            values.extend(s["values"])
        if body["last_step"] is not None:
            self.last_step = max(self.last_step or 0, body["last_step"])
        return added
