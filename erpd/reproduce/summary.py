"""The README's summary of the committed reproductions, rendered from their results.json.

The table is never typed by hand: `python -m erpd.reproduce.summary` rewrites the block between
the README's markers from `docs/reproduction/<preset>/results.json`, and a test checks that the
committed README matches what the committed results give.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

BEGIN = "<!-- reproduction-summary:begin -->"
END = "<!-- reproduction-summary:end -->"
PRESETS = ("quick", "full")


def load(root: Path) -> dict[str, dict[str, Any]]:
    """The committed results of each preset found under `root` (docs/reproduction)."""
    found = {}
    for preset in PRESETS:
        path = root / preset / "results.json"
        if path.is_file():
            found[preset] = json.loads(path.read_text())
    return found


def _deciding(verdict: Mapping[str, Any], kind: str) -> str:
    """The claim comparison of a verdict that decided it, as 'diff [lo, hi]' (the first one
    when there are several: the report lists them all)."""
    for check in verdict.get("checks", {}).get(kind, []):
        ci = check.get("ci")
        if check.get("role") != "claim" or not ci or ci.get("lo") is None:
            continue
        return f"{ci['diff']:+.3f} [{ci['lo']:+.3f}, {ci['hi']:+.3f}]"
    return ""


def _cell(verdict: Mapping[str, Any] | None, kind: str) -> str:
    if verdict is None:
        return "–"
    outcome = verdict["outcome" if kind == "greedy" else "outcome_sampled"]
    numbers = _deciding(verdict, kind)
    outcome = f"**{outcome}**" if outcome == "holds" else outcome
    return f"{outcome} {numbers}".strip()


def table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """One row per claim; per preset, the greedy and the sampled outcome with the interval of
    its first deciding comparison."""
    presets = [p for p in PRESETS if p in results]
    by_preset = {p: {v["claim"]: v for v in results[p]["verdicts"]} for p in presets}
    claims: list[str] = []
    for p in presets:
        claims += [c for c in by_preset[p] if c not in claims]
    head = ["claim"]
    for p in presets:
        meta = results[p]["meta"]
        head += [f"{p} ({meta['seeds']} seeds): greedy", f"{p}: avg@k"]
    rows = [
        [claim, *[_cell(by_preset[p].get(claim), k) for p in presets for k in ("greedy", "s")]]
        for claim in claims
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    commits = sorted({str(results[p]["meta"].get("commit", "?"))[:10] for p in presets})
    lines += [
        "",
        f"Differences are accuracy, 95% paired t intervals over seeds; from commit "
        f"{', '.join(f'`{c}`' for c in commits)}.",
    ]
    return "\n".join(lines)


def render(readme: str, results: Mapping[str, Mapping[str, Any]]) -> str:
    """`readme` with the block between the markers replaced by the table of `results`."""
    start, end = readme.index(BEGIN) + len(BEGIN), readme.index(END)
    return readme[:start] + "\n" + table(results) + "\n" + readme[end:]


def main(argv: Sequence[str] | None = None) -> int:
    root = Path(argv[0] if argv else ".")
    readme = root / "README.md"
    results = load(root / "docs" / "reproduction")
    if not results:
        print(f"no results.json under {root / 'docs' / 'reproduction'}", file=sys.stderr)
        return 1
    readme.write_text(render(readme.read_text(), results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
