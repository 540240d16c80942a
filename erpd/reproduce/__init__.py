"""`erpd reproduce`: the paper's experiments at tiny scale -> report.md, PNG plots, results.json.

    OUT/reproduce.json   the config of the last invocation (marks OUT as a reproduction)
    OUT/results.json     every arm's per-seed values, means and spreads, curves, verdicts
    OUT/report.md        tables, one figure per experiment, a verdict per docs/method.md claim
    OUT/fig_*.png
    OUT/invocations.jsonl  wall time, runs trained and git commit per invocation
    OUT/runs/            every base, batch and stage run, reused by a later invocation

Running the same command again reuses every finished run (and resumes a stopped one), so a
reproduction interrupted with Ctrl-C loses at most the steps since its stage's last checkpoint.

results.json records what made it (erpd/reproduce/provenance.py): the git commit and whether the
tree was dirty, the full config, the machine, the wall time and the erpd version. An OUT inside
the repository's docs/ is refused unless the code is at a known commit with a clean tree, checked
before the first run and again before results.json is written.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from erpd.config import TaskSpec
from erpd.errors import ConfigError
from erpd.files import write_json
from erpd.progress import ProgressFactory, no_progress
from erpd.reproduce.config import EXPERIMENTS, ReproduceConfig, preset
from erpd.reproduce.provenance import check_publishable, provenance, source_root
from erpd.reproduce.verdicts import Verdict

__all__ = ["EXPERIMENTS", "ReproduceConfig", "ReproduceResult", "preset", "run_reproduce"]

MARKER = "reproduce.json"


@dataclass
class ReproduceResult:
    report: Path
    results: Path
    verdicts: list[Verdict]
    wall_time: float
    trained: int  # stage runs trained by this invocation (the rest were reused)


def _claim(out: Path, cfg: ReproduceConfig) -> None:
    """OUT must be new, empty, or a previous reproduction (whose runs are then reused)."""
    if out.exists() and not out.is_dir():
        raise ConfigError("--out", f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise ConfigError("--out", f"{out} is not empty and holds no erpd reproduction")
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / MARKER, _finite(cfg.model_dump(mode="json")), indent=1, allow_nan=False)


def _finite(value: Any) -> Any:
    """JSON has no NaN: a metric a run lacks is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _invocations(out: Path) -> list[dict[str, Any]]:
    """OUT's earlier invocations (none for a new OUT)."""
    path = out / "invocations.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _record_invocation(out: Path, entry: dict[str, Any]) -> list[dict[str, Any]]:
    """Append this invocation to OUT/invocations.jsonl; returns all of them."""
    with (out / "invocations.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps({"finished": time.time(), **entry}))
        f.write("\n")
    return _invocations(out)


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _describe(task: TaskSpec) -> str:
    if task.kind == "jsonl" and task.jsonl is not None:
        return f"JSONL {Path(task.jsonl.train_path).name}"
    a = task.arithmetic
    return f"{a.terms} x {a.digits}-digit '{a.operators}', answer style {a.style}"


def _settings(cfg: ReproduceConfig) -> list[str]:
    """The knobs a reader needs to interpret the numbers, one line each."""
    t, s = cfg.teacher, cfg.student
    tasks = ", ".join(f"`{name}` ({_describe(spec)})" for name, spec in cfg.tasks.items())
    budget = "none" if s.kl_budget is None else f"{s.kl_budget:g}"
    region = f"{s.region}" + (f" {s.top_frac:g}" if s.region == "top_frac" else "")
    return [
        f"tasks: {tasks}; the first is used by every experiment",
        f"fixed batch: {cfg.sample.num_prompts} prompts x {cfg.sample.group_size} responses "
        f"(T={cfg.sample.temperature:g}) from pi_k, one per seed",
        f"teachers (stage 1): {t.epochs} epochs, lr {t.lr:g}, minibatch {t.minibatch_size}, "
        f"anchor {t.anchor}, kl_coef {t.kl_coef:g}",
        f"students (stage 2): signal {s.signal}, region {region}, {s.epochs} epochs, lr {s.lr:g}, "
        f"clip {s.clip_eps:g}, kl_coef {s.kl_coef:g}, kl_budget {budget}",
        _eval_line(cfg),
    ]


def _eval_line(cfg: ReproduceConfig) -> str:
    e = cfg.eval
    held = ", ".join(
        f"{spec.arithmetic.eval_size:,} on `{name}`"
        if spec.kind == "arithmetic"
        else f"the held-out rows of `{name}`"
        for name, spec in cfg.tasks.items()
    )
    final = f"the first {e.size}" if e.size else f"all held-out problems ({held})"
    interim = f"; points inside a run on the first {e.interim_size}" if e.interim_size else ""
    k = max(1, e.pass_k)
    return (
        f"eval: the final weights of every run on {final}, greedy and avg@{k} at T=1 (the "
        f"same sampling draws in every arm of a seed){interim}"
    )


def run_reproduce(
    cfg: ReproduceConfig,
    out_dir: str | Path,
    *,
    command: str = "erpd reproduce",
    progress: ProgressFactory = no_progress,
    should_stop: Callable[[], bool] | None = None,
    log: Callable[[str], None] = lambda line: None,
    repo: Path | None = None,
) -> ReproduceResult:
    """Run the configured experiments into out_dir and write the report.

    `repo` is the code's git checkout (default: the one holding the erpd package): its commit
    is recorded, and it decides whether out_dir is in the committed docs/.
    """
    from erpd.reproduce.experiments import RUNNERS
    from erpd.reproduce.lab import Lab
    from erpd.reproduce.report import write_report
    from erpd.reproduce.verdicts import as_json, decide_all

    started = time.time()
    out = Path(out_dir)
    repo = source_root() if repo is None else repo
    lab = Lab(cfg, out, progress=progress, should_stop=should_stop, log=log)
    device = str(lab.env(cfg.primary).device)  # validates tasks and device before any write
    check_publishable(out, repo, _invocations(out))
    code = provenance(repo, out, device)
    _claim(out, cfg)
    results: dict[str, Any] = {}
    for name in EXPERIMENTS:  # docs/method.md's order, whatever order the config lists them in
        if name in cfg.experiments:
            log(f"experiment {name}")
            results[name] = RUNNERS[name](lab)
    verdicts = decide_all(results)
    # the code must not have moved under a committed reproduction while it ran
    check_publishable(out, repo, [{"commit": code["commit"]}])
    wall = time.time() - started
    history = _record_invocation(
        out,
        {
            "wall_time_s": wall,
            "trained": lab.trained,
            "commit": code["commit"],
            "dirty": code["dirty"],
        },
    )
    meta = {
        "command": command,
        "preset": cfg.preset,
        "seeds": cfg.seeds,
        "wall_time_s": wall,
        "trained_runs": lab.trained,
        # a later invocation reuses runs: the total is what the whole reproduction cost
        "wall_time_total_s": sum(h["wall_time_s"] for h in history),
        "invocations": len(history),
        "started": _iso(started),
        "finished": _iso(time.time()),
        **code,
        # the commits of every invocation whose runs this reproduction reuses
        "commits": sorted({str(h.get("commit") or "unknown") for h in history}),
        "settings": _settings(cfg),
    }
    results_path = out / "results.json"
    body = {"meta": meta, "config": cfg.model_dump(mode="json"), "verdicts": as_json(verdicts)}
    write_json(results_path, _finite({**body, "experiments": results}), indent=1, allow_nan=False)
    report = write_report(out, results, verdicts, meta)
    return ReproduceResult(report, results_path, verdicts, wall, lab.trained)
