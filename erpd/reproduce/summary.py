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

from erpd.reproduce.report import markdown_table

BEGIN = "<!-- reproduction-summary:begin -->"
END = "<!-- reproduction-summary:end -->"
PRESETS = ("quick", "full")
KINDS = ("greedy", "sampled")


def load(root: Path) -> dict[str, dict[str, Any]]:
    """The committed results of each preset found under `root` (docs/reproduction)."""
    found = {}
    for preset in PRESETS:
        path = root / preset / "results.json"
        if path.is_file():
            found[preset] = json.loads(path.read_text())
    return found


def _outcome(verdict: Mapping[str, Any], kind: str) -> str:
    return str(verdict["outcome" if kind == "greedy" else "outcome_sampled"])


def _deciding(verdict: Mapping[str, Any], kind: str) -> str:
    """The claim comparison that decided a verdict, as 'diff [lo, hi] (name)': the first whose
    own outcome is the verdict's (the first one when none is)."""
    checks = [
        c
        for c in verdict.get("checks", {}).get(kind, [])
        if c.get("role") == "claim" and c.get("ci") and c["ci"].get("lo") is not None
    ]
    if not checks:
        return ""
    outcome = _outcome(verdict, kind)
    check = next((c for c in checks if c.get("outcome") == outcome), checks[0])
    ci = check["ci"]
    return f"{ci['diff']:+.3f} [{ci['lo']:+.3f}, {ci['hi']:+.3f}] ({check['name']})"


def _cell(verdict: Mapping[str, Any] | None, kind: str) -> str:
    if verdict is None:
        return "–"
    outcome = _outcome(verdict, kind)
    outcome = f"**{outcome}**" if outcome == "holds" else outcome
    return f"{outcome} {_deciding(verdict, kind)}".strip()


def table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """One row per claim; per preset, the greedy and the sampled outcome with the comparison
    that decided it (the report lists every one, premises included)."""
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
        [claim, *[_cell(by_preset[p].get(claim), k) for p in presets for k in KINDS]]
        for claim in claims
    ]
    lines = [markdown_table(rows, head), ""]
    for p in presets:
        meta = results[p]["meta"]
        runs = [str(c)[:10] for c in meta.get("commits", []) if c != meta.get("commit")]
        made = f", reusing runs trained at {', '.join(f'`{c}`' for c in runs)}" if runs else ""
        lines.append(
            f"{p}: report written at commit `{str(meta.get('commit'))[:10]}`{made}; "
            f"{meta['wall_time_total_s'] / 60:.0f} min on the reference machine."
        )
    lines += ["", "Differences are accuracy, 95% paired t intervals over seeds."]
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
