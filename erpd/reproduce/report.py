"""report.md and one PNG per experiment from results.json (matplotlib, headless).

The report opens with what made it (commit, machine), then states every verdict rule in prose
before any number, then the verdict table (outcome on greedy and on sampled accuracy, the
deciding differences with their 95% intervals and n), then one section per experiment with arm
tables in mean ± standard error over seeds, and ends with what the student is worth against the
matched controls, written from the 2b comparisons.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from erpd import metrics as M
from erpd.reproduce.provenance import describe_machine
from erpd.reproduce.stats import LEVEL, Interval, paired
from erpd.reproduce.verdicts import (
    CONTROLS,
    FAILS,
    GENERAL_RULES,
    HOLDS,
    INCONCLUSIVE,
    KL_CURVES,
    TOL,
    Check,
    Verdict,
    arms_of,
    describe,
)

ACC, ACC_T1, KL, SEQ_K3, K3, ENT = (
    M.ACC_EVAL,
    M.ACC_EVAL_SAMPLED,
    M.KL_EXACT_BATCH,
    M.KL_SEQ_K3,
    M.KL_K3_BATCH,
    M.ENTROPY_BATCH,
)
MARKERS = ("o", "s", "^", "D")
DPI = 72  # small PNGs: the quick report is committed to the repository


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display, no GUI toolkit
    import matplotlib.pyplot as plt

    return plt


def _num(value: Any) -> float:
    return math.nan if value is None else float(value)


def _fmt(stat: dict[str, Any] | None, digits: int = 3) -> str:
    """mean ± standard error over seeds (the mean alone for one seed)."""
    if not stat or not stat.get("n") or math.isnan(_num(stat.get("mean"))):
        return "-"
    if stat["n"] > 1 and stat.get("std") is not None:
        se = _num(stat["std"]) / math.sqrt(stat["n"])
        return f"{stat['mean']:.{digits}f} ± {se:.{digits}f}"
    return f"{stat['mean']:.{digits}f}"


def _se(stat: dict[str, Any]) -> float:
    n = stat.get("n") or 0
    return _num(stat.get("std")) / math.sqrt(n) if n > 1 else 0.0


def markdown_table(rows: Sequence[Sequence[str]], head: Sequence[str]) -> str:
    """A Markdown table of `rows` under `head`."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def arm_table(arms: dict[str, Any]) -> str:
    """One row per arm, mean ± standard error over seeds. kl/exact_batch is KL(pi_theta||pi_k)
    over pi_k's contexts; kl/seq_k3 is the on-policy estimate beside it (where measured)."""
    head = [
        "arm",
        "acc greedy",
        "acc sampled",
        "kl/exact_batch",
        "kl/seq_k3",
        "kl/k3_batch",
        "entropy",
        "steps",
        "n",
    ]
    rows = [
        [
            name,
            _fmt(a.get(ACC)),
            _fmt(a.get(ACC_T1)),
            _fmt(a.get(KL)),
            _fmt(a.get(SEQ_K3)),
            _fmt(a.get(K3), 2),
            _fmt(a.get(ENT)),
            _fmt(a.get("steps"), 0),
            str(len(a.get("per_seed", []))),
        ]
        for name, a in arms.items()
    ]
    return markdown_table(rows, head)


def _band(ax: Any, xs: list[float], points: list[dict[str, Any]], metric: str, **kw: Any) -> Any:
    """The mean over seeds with a min..max band; returns the line's colour."""
    mean = [p.get(metric, {}).get("mean", math.nan) for p in points]
    line = ax.plot(xs, mean, marker="o", ms=3, **kw)[0]
    lo = [p.get(metric, {}).get("min", math.nan) for p in points]
    hi = [p.get(metric, {}).get("max", math.nan) for p in points]
    ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)
    return line.get_color()


def _epoch_axis(ax: Any, title: str, epochs: Sequence[float]) -> None:
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xticks(list(epochs), [f"{e:g}" for e in epochs])
    ax.set_xlabel("epochs on the fixed batch")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)


def plot_curves(path: Path, arms: dict[str, Any], title: str) -> None:
    """Accuracy (greedy, T=1), entropy, exact KL, k3 and drift over epochs, one line per arm."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.5))
    epochs = sorted({p["epoch"] for a in arms.values() for p in a["curve"]})
    panels = [
        (ACC, "greedy: held-out (solid), the fixed batch's prompts (dotted)"),
        (ACC_T1, "acc/eval_sampled (T=1)"),
        (ENT, "entropy/batch (fixed batch)"),
        (KL, "kl/exact_batch to pi_k"),
        (K3, "kl/k3_batch to pi_k (log)"),
    ]
    for ax, (metric, name) in zip(axes.flat, panels, strict=False):
        for label, a in arms.items():
            xs = [p["epoch"] for p in a["curve"]]
            color = _band(ax, xs, a["curve"], metric, label=label)
            if metric == ACC:  # training accuracy beside held-out: the overfitting
                _band(ax, xs, a["curve"], M.ACC_TRAIN_BATCH, color=color, linestyle=":")
        _epoch_axis(ax, name, epochs)
        if metric == K3:
            ax.set_yscale("symlog", linthresh=0.01)
    ax = axes.flat[5]
    for label, a in arms.items():
        xs = [p["epoch"] for p in a["curve"]]
        _band(ax, xs, a["curve"], M.DRIFT_CORRECT, label=f"{label} correct")
        _band(ax, xs, a["curve"], M.DRIFT_INCORRECT, label=f"{label} incorrect", linestyle="--")
    _epoch_axis(ax, "log-prob drift vs pi_k (sequence sum)", epochs)
    for ax in axes.flat:
        ax.legend(fontsize=7)
    fig.suptitle(title + " — mean over seeds, band = min..max", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def plot_tradeoff(path: Path, tasks: dict[str, dict[str, Any]], title: str) -> None:
    """Accuracy against KL spent per arm (the paper's central trade-off), one column per task."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, len(tasks), figsize=(6 * len(tasks), 8), squeeze=False)
    for col, (task, task_arms) in enumerate(tasks.items()):
        arms = arms_of(task_arms)
        for row, metric in enumerate((ACC, ACC_T1)):
            ax = axes[row][col]
            for i, (name, a) in enumerate(arms.items()):
                x, y = a[KL]["mean"], a[metric]["mean"]
                xerr = [[x - a[KL]["min"]], [a[KL]["max"] - x]]
                yerr = [[y - a[metric]["min"]], [a[metric]["max"] - y]]
                marker = MARKERS[i // 10 % len(MARKERS)]  # 10 colours per marker shape
                ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt=marker, ms=6, capsize=2, label=name)
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
            ax.set_xscale("symlog", linthresh=0.01)
            ax.set_xlabel("kl/exact_batch to pi_k (KL spent)")
            ax.set_ylabel("greedy" if metric == ACC else "sampled (T=1)")
            ax.set_title(f"{task}: {metric}", fontsize=9)
            ax.grid(alpha=0.3)
    fig.suptitle(title + " — mean over seeds, bars = min..max", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)


def _curve_xy(
    points: list[dict[str, Any]], metric: str
) -> tuple[list[float], list[float], list[float]]:
    """x = mean kl/exact_batch at each point (the budget where it was not measured), y = mean
    accuracy ± standard error; points without a value, or at KL 0, are left out (log axis)."""
    xs, ys, es = [], [], []
    for p in points:
        y = _num((p.get(metric) or {}).get("mean"))
        x = _num((p.get(KL) or {}).get("mean"))
        if math.isnan(x):
            x = _num(p.get("budget"))
        if math.isnan(y) or not x > 0:
            continue
        xs.append(x)
        ys.append(y)
        es.append(_se(p[metric]))
    return xs, ys, es


def _kl_axis(ax: Any) -> None:
    """A log KL axis labelled in plain decimals at round values, without the crowded minor
    labels (2x10^-2 beside 3x10^-2) matplotlib puts on a short log range."""
    from matplotlib import ticker

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(ticker.FixedLocator([0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1]))
    ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())


def plot_kl_curves(path: Path, curves: dict[str, Any], sweep: dict[str, Any] | None) -> None:
    """Accuracy against KL to pi_k on a log axis: the student and each control evaluated where
    their KL first crossed each budget, and stage 1's teacher trajectory over epochs."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, metric, name in zip(axes, (ACC, ACC_T1), ("greedy", "sampled"), strict=True):
        for label, points in curves.items():
            xs, ys, es = _curve_xy(points, metric)
            student = label.startswith("student")
            ax.errorbar(
                xs,
                ys,
                yerr=es,
                marker="o" if student else "s",
                ms=4,
                capsize=2,
                linewidth=2.2 if student else 1.2,
                linestyle="-" if student else "--",
                label=label,
            )
        for objective, a in (sweep or {}).get("arms", {}).items():
            xs, ys, es = _curve_xy(a["curve"], metric)
            ax.errorbar(xs, ys, yerr=es, marker="^", ms=4, capsize=2, linestyle=":",
                        label=f"stage-1 teacher ({objective}) over epochs")  # fmt: skip
        _kl_axis(ax)
        ax.set_xlabel("kl/exact_batch to pi_k (log)")
        ax.set_ylabel(f"held-out accuracy ({name})")
        ax.grid(alpha=0.3, which="both")
        ax.set_title(f"accuracy at matched KL ({name})", fontsize=9)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle("KL-accuracy curves — mean over seeds, bars = ± standard error", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)


def plot_bars(path: Path, arms: dict[str, Any], title: str) -> None:
    """Greedy and sampled accuracy per arm, bars = mean, whiskers = min..max."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(arms)), 4))
    names = list(arms)
    for offset, metric, label in ((-0.2, ACC, "greedy"), (0.2, ACC_T1, "T=1")):
        means = [arms[n][metric]["mean"] for n in names]
        err = [
            [m - arms[n][metric]["min"] for n, m in zip(names, means, strict=True)],
            [arms[n][metric]["max"] - m for n, m in zip(names, means, strict=True)],
        ]
        xs = [i + offset for i in range(len(names))]
        ax.bar(xs, means, width=0.4, yerr=err, capsize=2, label=label)
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("held-out accuracy")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def plot_rounds(path: Path, rounds: dict[str, Any]) -> None:
    """Greedy accuracy after each round against what the arm spent to get there: KL to pi_0,
    samples drawn and optimizer steps taken (cumulative; one marker per round)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    spent = (
        (KL, "KL to pi_0 (round-0 batch)"),
        ("samples_total", "samples drawn (cumulative)"),
        ("steps_total", "optimizer steps (cumulative)"),
    )
    for name, per_round in rounds["arms"].items():
        ys = [_num(p[ACC]["mean"]) for p in per_round]
        es = [_se(p[ACC]) for p in per_round]
        for ax, (key, _) in zip(axes, spent, strict=True):
            xs = [_num((p.get(key) or {}).get("mean")) for p in per_round]
            ax.errorbar(xs, ys, yerr=es, marker="o", ms=4, capsize=2, label=name)
    for ax, (key, title) in zip(axes, spent, strict=True):
        if key == KL:
            _kl_axis(ax)
        else:
            ax.set_xscale("log")
        ax.set_xlabel(title)
        ax.set_ylabel("held-out accuracy (greedy)")
        ax.grid(alpha=0.3, which="both")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle("Rounds: accuracy after rounds 1..R against what each arm spent "
                 "(mean ± standard error over seeds)", fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)


def _bold(outcome: str) -> str:
    return f"**{outcome}**" if outcome == HOLDS else outcome


def _numbers(checks: Sequence[Check]) -> str:
    """The deciding differences of one verdict: premise and claim comparisons, with intervals."""
    parts = []
    for c in checks:
        if c.ci is None or c.role == "context":
            continue
        head = "premise: " if c.role == "premise" else ""
        ci = c.ci
        if ci["n"] >= 2 and ci["lo"] is not None and not math.isnan(ci["lo"]):
            value = f"{ci['diff']:+.3f} [{ci['lo']:+.3f}, {ci['hi']:+.3f}]"
        elif ci["diff"] is None or math.isnan(ci["diff"]):
            value = "-"
        else:
            value = f"{ci['diff']:+.3f} (no interval)"
        parts.append(f"{head}{c.name} {value} n={ci['n']}")
    return "<br>".join(parts) or "(point rules)"


def _verdict_rows(verdicts: Sequence[Verdict]) -> str:
    rows = [
        [
            v.claim,
            _bold(v.outcome),
            _bold(v.outcome_sampled),
            _numbers(v.checks.get("greedy", [])),
            _numbers(v.checks.get("sampled", [])),
        ]
        for v in verdicts
    ]
    head = [
        "claim",
        "greedy",
        "sampled",
        f"greedy: difference [{LEVEL:.0%} CI] n",
        f"sampled: difference [{LEVEL:.0%} CI] n",
    ]
    return markdown_table(rows, head)


def _rules(verdicts: Sequence[Verdict]) -> list[str]:
    """Every rule in prose, once per claim number, before any number is shown."""
    lines = [
        "## How verdicts are decided",
        "",
        "The rules live in `erpd/reproduce/verdicts.py` and were fixed before these numbers. "
        "Each claim is decided on greedy held-out accuracy and, separately, on sampled accuracy.",
        "",
        *[f"- {rule}" for rule in GENERAL_RULES],
        "",
        'The claims (docs/method.md, "What a correct implementation shows"):',
        "",
    ]
    seen: set[str] = set()
    for v in verdicts:
        number = v.claim.split()[0]
        if number in seen:
            continue
        seen.add(number)
        lines.append(f"- **{number}**: {v.statement} *Rule:* {v.rule}")
    lines.append("")
    return lines


def _evidence(verdicts: Sequence[Verdict], prefix: str) -> str:
    lines = []
    for v in verdicts:
        if not v.claim.startswith(prefix):
            continue
        lines.append(
            f"- **Claim {v.claim}: {v.outcome}** (greedy), **{v.outcome_sampled}** (sampled)."
        )
        for kind in ("greedy", "sampled"):
            checks = v.checks.get(kind, [])
            lines += [f"  - {kind}: {describe(c)}" for c in checks]
    return "\n".join(lines)


def _code_line(meta: dict[str, Any]) -> str:
    commit = meta.get("commit")
    if commit is None:
        state = "**no known commit** (not a git checkout, or no commit yet)"
    elif meta.get("dirty"):
        changed = ", ".join(meta.get("changes") or [])
        state = f"`{commit}` with **uncommitted changes** ({changed})"
    else:
        state = f"`{commit}` (clean tree)"
    commits = [c for c in meta.get("commits", []) if c not in (commit, None, "unknown")]
    if commit is not None and "unknown" in meta.get("commits", []):
        commits.append("an unknown commit")
    also = f"; reuses runs made at {', '.join(commits)}" if commits else ""
    return f"Code: commit {state}, erpd {meta.get('erpd_version', '?')}{also}."


def write_report(
    out: Path, results: dict[str, Any], verdicts: Sequence[Verdict], meta: dict[str, Any]
) -> Path:
    """Write OUT/report.md and OUT/fig_*.png; returns the report path."""
    parts = [
        "# ERPD at tiny scale: reproduction report",
        "",
        _code_line(meta),
        "",
        f"Machine: {describe_machine(meta['machine'])}.",
        "",
        f"Generated by `{meta['command']}` — preset **{meta['preset']}**, {meta['seeds']} fixed "
        f"batches (seeds) per experiment. Wall time "
        f"{meta['wall_time_total_s'] / 60:.1f} min in total over {meta['invocations']} "
        f"invocation(s) (runs are reused across invocations; this one took "
        f"{meta['wall_time_s'] / 60:.1f} min and trained {meta['trained_runs']} runs).",
        "",
        "Only the paper's abstract and secondary descriptions were available: the objectives, "
        "signal constructions, region rule and trust region are our reconstruction "
        "(docs/method.md), so a claim that does not hold here may still hold for the paper's exact "
        "method. Numbers in the tables are mean ± standard error over seeds.",
        "",
        "Settings:",
        "",
        *[f"- {line}" for line in meta["settings"]],
        "",
        *_rules(verdicts),
        "## Verdicts",
        "",
        _verdict_rows(verdicts),
        "",
    ]
    for name, section in SECTIONS.items():
        if name in results:
            parts += section(out, results[name], verdicts, results)
    parts += worth(verdicts, results)
    report = out / "report.md"
    report.write_text("\n".join(parts))
    return report


_SAYS = {
    HOLDS: "the student is better (the interval lies above 0)",
    FAILS: f"the student is not better by {TOL:g} or more (the upper bound is below {TOL:g})",
    INCONCLUSIVE: f"undecided (the interval contains both 0 and {TOL:g})",
}


def worth(verdicts: Sequence[Verdict], results: dict[str, Any]) -> list[str]:
    """'What the method is worth here': the student against each matched control, from the 2b
    comparisons, in plain sentences with their numbers."""
    tasks = results.get("strong_teacher", {}).get("tasks", {})
    found = [v for v in verdicts if v.claim.startswith("2b ")]
    if not found:
        return []
    lines = [
        "## What the method is worth here",
        "",
        "The student against the simple alternatives that spend the same KL on the same batch "
        "(claim 2b's comparisons; differences are student - control in accuracy points, with "
        f"their {LEVEL:.0%} interval and the number of seeds).",
        "",
    ]
    tally = {HOLDS: 0, FAILS: 0, INCONCLUSIVE: 0}
    for v in found:
        task = v.claim.split()[1].split("/")[0]
        arms = arms_of(tasks.get(task, {}))
        controls = [n for n in CONTROLS if n in arms]
        lines.append(f"### Task `{task}`")
        lines.append("")
        objective = v.claim.split("/")[1]
        student = arms.get(f"student-{objective}")
        if controls and student is not None:
            strongest = max(controls, key=lambda n: _num(arms[n][ACC]["mean"]))
            lines += [
                f"The strongest control by mean greedy accuracy is `{strongest}` "
                f"({_fmt(arms[strongest][ACC])}, against the student's {_fmt(student[ACC])}).",
                "",
            ]
        for kind in ("greedy", "sampled"):
            for c in v.checks.get(kind, []):
                if c.role != "claim" or c.ci is None:
                    continue
                if c.outcome in tally:
                    tally[c.outcome] += 1
                says = _SAYS.get(c.outcome, c.outcome)
                lines.append(f"- {kind}, {c.name} ({c.text}): {says}.")
        lines.append("")
    total = sum(tally.values())
    lines += [
        f"Over all {total} comparisons (tasks x controls x greedy/sampled): the student is "
        f"shown better in {tally[HOLDS]}, shown not better by {TOL:g} or more in {tally[FAILS]}, "
        f"and undecided in {tally[INCONCLUSIVE]}.",
        "",
    ]
    return lines


Results = dict[str, Any]


def _stage1_sweep(
    out: Path, r: dict[str, Any], verdicts: Sequence[Verdict], results: Results
) -> list[str]:
    plot_curves(out / "fig_stage1_sweep.png", r["arms"], f"Stage 1 on task {r['task']}")
    parts: list[str] = [
        "## 1. Stage-1 aggressiveness",
        "",
        f"Task `{r['task']}`; one run per objective evaluated after {r['epochs']} epochs.",
        "",
        "![stage-1 sweep](fig_stage1_sweep.png)",
        "",
        "Final values:",
        "",
        arm_table({name: a["final"] for name, a in r["arms"].items()}),
        "",
        _evidence(verdicts, "1a"),
        "",
    ]
    return parts


def _kl_sweep(
    out: Path, r: dict[str, Any], verdicts: Sequence[Verdict], results: Results
) -> list[str]:
    plot_curves(out / "fig_kl_sweep.png", r["arms"], f"Stage-1 kl_coef on task {r['task']}")
    rows = [
        [name, f"{a['ceiling']:.3f}", f"{a['ceiling_sampled']:.3f}", _fmt(a["final"][KL])]
        for name, a in r["arms"].items()
    ]
    parts: list[str] = [
        "## 2. Stage-1 KL coefficient",
        "",
        "![kl sweep](fig_kl_sweep.png)",
        "",
        markdown_table(rows, ["sapo", "ceiling (greedy)", "ceiling (T=1)", "final KL exact"]),
        "",
        _evidence(verdicts, "1b"),
        "",
    ]
    return parts


CONTROL_TEXT = {
    "control-advantage-region": "stage 2 with the outcome advantage as the signal on the "
    "student's region (no teacher signal), the student's steps and budget",
    "control-advantage-random": "the same on a random region of the same size",
    "control-placebo": "stage 2 from the teacher's delta permuted within each response",
    "control-early-stop": "the first teacher's stage 1 stopped once it spent the student's KL",
    "control-advantage": "stage 2 with the plain advantage as the signal on every token, given "
    "the student's KL as budget (results written before the controls were matched)",
}


def _strong_teacher(
    out: Path, r: dict[str, Any], verdicts: Sequence[Verdict], results: Results
) -> list[str]:
    plot_tradeoff(
        out / "fig_strong_teacher.png", r["tasks"], "Strong teachers, students and controls"
    )
    present = [n for n in CONTROLS if any(n in arms for arms in r["tasks"].values())]
    parts: list[str] = [
        "## 3. ERPD with strong teachers, matched controls, stage-2 ablations",
        "",
        "Matched controls of the student from the first teacher:",
        "",
        *[f"- `{n}`: {CONTROL_TEXT[n]}" for n in present],
        "",
        "A KL budget is checked before every update, so an arm can overshoot it by one update: "
        "compare the KL columns. Ablations change one stage-2 field of the student from the "
        "first teacher.",
        "",
        "![strong teacher](fig_strong_teacher.png)",
        "",
    ]
    for task, task_arms in r["tasks"].items():
        parts += [f"### Task `{task}`", "", arm_table(arms_of(task_arms)), ""]
        curves = task_arms.get(KL_CURVES)
        if curves:
            sweep = results.get("stage1_sweep")
            if sweep is not None and sweep.get("task") != task:
                sweep = None
            plot_kl_curves(out / "fig_kl_curves.png", curves, sweep)
            parts += [
                f"KL-accuracy curves on `{task}`: each arm trained until its kl/exact_batch "
                "crossed the largest budget and evaluated the first time it crossed each "
                "budget; the stage-1 sweep's teachers over epochs for comparison.",
                "",
                "![KL-accuracy curves](fig_kl_curves.png)",
                "",
                _curve_table(curves),
                "",
            ]
    parts += [_evidence(verdicts, "2"), ""]
    parts += _ablations(r)
    return parts


_ABLATION_SAYS = {
    "higher": "better than the student (the interval lies above 0)",
    "lower": "worse than the student (the interval lies below 0)",
    "same": f"within {TOL:g} of the student either way (the interval lies inside ±{TOL:g})",
    "open": "undecided (the interval is wider than that)",
}


def _ablation_call(ci: Interval) -> str:
    if not ci.known:
        return "open"
    if ci.lo > 0:
        return "higher"
    if ci.hi < 0:
        return "lower"
    if ci.lo > -TOL and ci.hi < TOL:
        return "same"
    return "open"


def _ablations(r: dict[str, Any]) -> list[str]:
    """Each ablation against the student it varies, paired over seeds, in plain sentences:
    the ones that cut against the method are said as plainly as the others."""
    lines: list[str] = []
    for task, task_arms in r["tasks"].items():
        arms = arms_of(task_arms)
        student = next((a for n, a in arms.items() if n.startswith("student-")), None)
        names = [n for n in arms if n.startswith("ablation ")]
        if student is None or not names:
            continue
        lines += [
            f"Ablations on `{task}`: each variant minus the student it varies (paired over "
            f"seeds, {LEVEL:.0%} interval; KL is kl/exact_batch):",
            "",
        ]
        for name in names:
            arm = arms[name]
            said = []
            for kind, metric in (("greedy", ACC), ("avg@k", ACC_T1)):
                ci = paired(
                    [s.get(metric) for s in arm["per_seed"]],
                    [s.get(metric) for s in student["per_seed"]],
                )
                said.append(f"{kind} {ci.text()}: {_ABLATION_SAYS[_ablation_call(ci)]}")
            kl = f"KL {_fmt(arm.get(KL))} vs {_fmt(student.get(KL))}"
            lines.append(f"- `{name.removeprefix('ablation ')}` ({kl}): " + "; ".join(said) + ".")
        lines.append("")
    return lines


def _curve_table(curves: dict[str, Any]) -> str:
    """Accuracy (greedy / sampled, mean ± s.e.) and seeds reached, per arm and KL budget."""
    budgets = sorted({float(p["budget"]) for points in curves.values() for p in points})
    rows = []
    for name, points in curves.items():
        by = {float(p["budget"]): p for p in points}
        cells = [name]
        for b in budgets:
            p = by.get(b)
            if p is None or not (p.get(ACC) or {}).get("n"):
                cells.append("-")
                continue
            cells.append(f"{_fmt(p[ACC])} / {_fmt(p.get(ACC_T1))} (n={p[ACC]['n']})")
        rows.append(cells)
    return markdown_table(rows, ["arm", *[f"KL {b:g}" for b in budgets]])


def _weak_teacher(
    out: Path, r: dict[str, Any], verdicts: Sequence[Verdict], results: Results
) -> list[str]:
    plot_bars(out / "fig_weak_teacher.png", r["arms"], "Weak teacher and signal constructions")
    parts: list[str] = [
        "## 4. A weak teacher and the signal constructions",
        "",
        f"Teacher `{r['teacher']}` against the unlearned pi_k; the verdict uses "
        f"`{r['primary_signal']}` (fixed in advance), the others are reported.",
        "",
        "![weak teacher](fig_weak_teacher.png)",
        "",
        arm_table(r["arms"]),
        "",
        _evidence(verdicts, "3"),
        "",
    ]
    return parts


def _two_teachers(
    out: Path, r: dict[str, Any], verdicts: Sequence[Verdict], results: Results
) -> list[str]:
    plot_bars(out / "fig_two_teachers.png", r["arms"], "Two teachers combined vs each alone")
    parts: list[str] = [
        "## 5. Two teachers combined",
        "",
        "![two teachers](fig_two_teachers.png)",
        "",
        arm_table(r["arms"]),
        "",
        _evidence(verdicts, "4"),
        "",
    ]
    return parts


def _rounds(
    out: Path, r: dict[str, Any], verdicts: Sequence[Verdict], results: Results
) -> list[str]:
    plot_rounds(out / "fig_rounds.png", r)
    rows = [
        [
            name,
            str(p["round"]),
            _fmt(p[ACC]),
            _fmt(p[ACC_T1]),
            _fmt(p[KL]),
            _fmt(p["kl_round"]) if p.get("kl_round") else "-",
            _fmt(p[ENT]),
            _fmt(p.get("steps_total"), 0),
            _fmt(p.get("samples_total"), 0),
        ]
        for name, per_round in r["arms"].items()
        for p in per_round
    ]
    head = [
        "arm",
        "round",
        "acc greedy",
        "acc T=1",
        "KL to pi_0",
        "KL to round's pi_k",
        "entropy",
        "steps so far",
        "samples so far",
    ]
    parts: list[str] = [
        "## 6. Rounds",
        "",
        "Arms, each starting every round from its own previous result: `erpd` (a teacher "
        "and its student per round), `stage1_repeated` (the teacher becomes the next base), "
        "`no_teacher` (stage 2 with the plain advantage on all tokens, the student's budget), "
        f"`onpolicy_grpo` (one GRPO step per fresh batch, the same {r['samples_per_round']} "
        "samples per round as ERPD) and `onpolicy_grpo_steps` (as many GRPO steps as ERPD "
        "took, each fresh batch feeding several of them: many more samples). KL to pi_0 and "
        "entropy are measured on the round-0 batch.",
        "",
        "![rounds](fig_rounds.png)",
        "",
        markdown_table(rows, head),
        "",
        _evidence(verdicts, "5"),
        "",
    ]
    return parts


# one section per experiment, in the report's order
SECTIONS: dict[str, Callable[[Path, dict[str, Any], Sequence[Verdict], Results], list[str]]] = {
    "stage1_sweep": _stage1_sweep,
    "kl_sweep": _kl_sweep,
    "strong_teacher": _strong_teacher,
    "weak_teacher": _weak_teacher,
    "two_teachers": _two_teachers,
    "rounds": _rounds,
}
