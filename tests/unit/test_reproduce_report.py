"""report.md from results: provenance at the top, every rule before any number, intervals in the
verdict table, mean ± standard error in the arm tables, the KL-accuracy figure when curves exist,
and the section on what the method is worth against the controls."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
from matplotlib import image

from erpd import metrics as M
from erpd.reproduce.experiments import spread
from erpd.reproduce.report import _code_line, arm_table, write_report
from erpd.reproduce.verdicts import GENERAL_RULES, Verdict, decide_all

ROOT = Path(__file__).resolve().parents[2]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def committed() -> dict[str, Any]:
    return json.loads((ROOT / "docs/reproduction/quick/results.json").read_text())


def meta_of(body: dict[str, Any], **extra: Any) -> dict[str, Any]:
    machine = {"cpu": "Test CPU", "cores": 2, "cores_usable": 2, "cpu_bf16": False,
               "torch": "2.x", "torch_threads": 2, "device": "cpu"}  # fmt: skip
    return {**body["meta"], "commit": COMMIT, "dirty": False, "erpd_version": "0.1.0",
            "commits": [COMMIT], "machine": machine, **extra}  # fmt: skip


def with_curves(body: dict[str, Any]) -> dict[str, Any]:
    """The committed results, with KL-accuracy curves shaped as the experiments write them
    where the committed ones have none."""
    results = copy.deepcopy(body["experiments"])
    if "kl_curves" in results["strong_teacher"]["tasks"]["final"]:
        return results
    seeds = len(results["strong_teacher"]["tasks"]["final"]["base"]["per_seed"])

    def curve(level: float, slope: float) -> list[dict[str, Any]]:
        rows = []
        for j, budget in enumerate((0.01, 0.05, 0.2)):
            per_seed = [
                {"seed": s, M.ACC_EVAL: level + slope * j + 0.01 * s,
                 M.ACC_EVAL_SAMPLED: level - 0.2 + slope * j, M.KL_EXACT_BATCH: budget * 1.1}
                for s in range(seeds)
            ]  # fmt: skip
            row: dict[str, Any] = {"budget": budget, "per_seed": per_seed}
            for m in (M.ACC_EVAL, M.ACC_EVAL_SAMPLED, M.KL_EXACT_BATCH):
                row[m] = spread([p[m] for p in per_seed])
            rows.append(row)
        return rows

    results["strong_teacher"]["tasks"]["final"]["kl_curves"] = {
        "student": curve(0.5, 0.04),
        "control-advantage": curve(0.5, 0.01),
    }
    return results


@pytest.fixture(scope="module")
def rendered(
    tmp_path_factory: pytest.TempPathFactory, committed: dict[str, Any]
) -> tuple[Path, str, list[Verdict]]:
    """The committed quick results with KL curves added, rendered once (figures take seconds)."""
    out = tmp_path_factory.mktemp("report")
    results = with_curves(committed)
    verdicts = decide_all(results)
    return out, write_report(out, results, verdicts, meta_of(committed)).read_text(), verdicts


def test_report_opens_with_provenance_and_rules_before_numbers(
    rendered: tuple[Path, str, list[Verdict]],
) -> None:
    _, report, verdicts = rendered
    head = report.split("## How verdicts are decided")[0]
    assert f"commit `{COMMIT}` (clean tree)" in head and "Test CPU" in head
    rules_at, table_at = report.index("## How verdicts are decided"), report.index("## Verdicts")
    assert rules_at < table_at
    rules = report[rules_at:table_at]
    for rule in GENERAL_RULES:
        assert rule in rules
    for v in verdicts:
        assert v.rule in rules  # each claim's rule in prose, before any number
        row = next(line for line in report.splitlines() if line.startswith(f"| {v.claim} |"))
        assert v.outcome in row and v.outcome_sampled in row
    # the verdict table names the deciding differences with their interval and n
    assert "95% CI" in report and "n=2" in report
    assert "## What the method is worth here" in report


def test_a_dirty_tree_or_no_commit_is_written_on_the_report(committed: dict[str, Any]) -> None:
    line = _code_line(meta_of(committed, dirty=True, changes=["erpd/loop.py"]))
    assert line.startswith("Code: commit `") and "**uncommitted changes** (erpd/loop.py)" in line
    line = _code_line(meta_of(committed, commit=None, commits=["unknown"]))
    assert "**no known commit**" in line and "reuses" not in line
    line = _code_line(meta_of(committed, commits=[COMMIT, "f" * 40]))
    assert f"reuses runs made at {'f' * 40}" in line


def test_arm_tables_show_mean_and_standard_error(committed: dict[str, Any]) -> None:
    arms = committed["experiments"]["weak_teacher"]["arms"]
    table = arm_table(arms)
    name, a = next(iter(arms.items()))
    stat = a[M.ACC_EVAL_SAMPLED]
    se = stat["std"] / math.sqrt(stat["n"])
    row = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
    assert f"{stat['mean']:.3f} ± {se:.3f}" in row
    assert "kl/seq_k3" in table.splitlines()[0] and "kl/exact_batch" in table.splitlines()[0]


def test_kl_accuracy_figure_and_what_the_method_is_worth(
    rendered: tuple[Path, str, list[Verdict]],
) -> None:
    tmp_path, report, verdicts = rendered
    assert "](fig_kl_curves.png)" in report
    pixels = image.imread(tmp_path / "fig_kl_curves.png")
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert (tmp_path / "fig_kl_curves.png").stat().st_size < 300_000
    worth = report.split("## What the method is worth here")[1]
    assert "area over log KL" in worth and "The strongest control" in worth
    # one sentence per deciding comparison, with its numbers, and a count that adds up
    v = next(v for v in verdicts if v.claim == "2b final/sapo")
    deciding = [c for kind in ("greedy", "sampled") for c in v.checks[kind] if c.role == "claim"]
    for c in deciding:
        assert c.text in worth
    assert "kl_curves" not in report.split("### Task `final`")[1].split("\n\n")[1]
