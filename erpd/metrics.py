"""The one list of metric names, what each means, and where metric points go.

"kl" means different things in TRL and verl; here every name carries its estimator, direction and
aggregation, and nothing outside this module spells a metric name as a string literal. The API's
metric catalogue and the dashboard tooltips are generated from `CATALOGUE`.
"""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Protocol, TextIO

Direction = Literal["higher_is_better", "lower_is_better", "neutral"]
Scope = Literal["step", "eval", "summary"]


@dataclass(frozen=True)
class MetricInfo:
    """How a metric is computed and read."""

    name: str
    estimator: str
    direction: Direction
    aggregation: str
    scope: Scope
    description: str


CATALOGUE: dict[str, MetricInfo] = {}


def _metric(
    name: str,
    estimator: str,
    direction: Direction,
    aggregation: str,
    scope: Scope,
    description: str,
) -> str:
    CATALOGUE[name] = MetricInfo(name, estimator, direction, aggregation, scope, description)
    return name


# --- KL to pi_k (the round's frozen base) -------------------------------------------------------
KL_EXACT = _metric(
    "kl/exact",
    "full-vocabulary KL(pi_theta || pi_k) per context",
    "lower_is_better",
    "mean over response tokens of the step's minibatch, before the update",
    "step",
    "The headline KL and the unit of the stage-2 budget. Exact over the vocabulary, so it is not "
    "heavy-tailed like k3 on the fixed data.",
)
KL_EXACT_BATCH = _metric(
    "kl/exact_batch",
    "full-vocabulary KL(pi_theta || pi_k) per context",
    "lower_is_better",
    "mean over all response tokens of the fixed batch",
    "eval",
    "KL spent: the same estimator as kl/exact on the whole fixed batch at an eval point.",
)
KL_K1 = _metric(
    "kl/k1",
    "k1 = log pi_theta - log pi_k on the sampled tokens",
    "lower_is_better",
    "token mean over the minibatch",
    "step",
    "Naive estimator; tokens were sampled from pi_k, not pi_theta, so it can go negative.",
)
KL_K3 = _metric(
    "kl/k3",
    "k3 = rho - 1 - log rho, rho = pi_k / pi_theta, on the sampled tokens",
    "lower_is_better",
    "token mean over the minibatch",
    "step",
    "Heavy-tailed on the fixed data (explodes when a sampled token is driven toward 0); "
    "a secondary series, never the budget.",
)
KL_K3_BATCH = _metric(
    "kl/k3_batch",
    "k3 = rho - 1 - log rho, rho = pi_k / pi_theta, on the sampled tokens",
    "lower_is_better",
    "token mean over all response tokens of the fixed batch",
    "eval",
    "kl/k3 on the whole fixed batch at an eval point; heavy-tailed, shown beside kl/exact_batch.",
)
KL_SEQ_K3 = _metric(
    "kl/seq_k3",
    "k3 of the sequence log-ratio on fresh samples of pi_theta (T=1)",
    "lower_is_better",
    "mean over held-out samples",
    "eval",
    "Sequence-level KL(pi_theta || pi_k) on the policy's own samples.",
)
KL_BUDGET_USED = _metric(
    "kl/budget_used",
    "kl/exact / the stage's kl_budget",
    "neutral",
    "ratio at the step",
    "step",
    "Share of the stage's KL budget spent (stage 2, or an early-stopped stage 1); training "
    "stops past 1.",
)
# --- entropy and drift ----------------------------------------------------------------------
ENTROPY_TOKEN = _metric(
    "entropy/token",
    "full-vocabulary entropy of pi_theta per context",
    "neutral",
    "mean over response tokens of the fixed data (minibatch at steps)",
    "step",
    "Falls when stage 1 collapses onto few responses.",
)
ENTROPY_BATCH = _metric(
    "entropy/batch",
    "full-vocabulary entropy of pi_theta per context",
    "neutral",
    "mean over all response tokens of the fixed batch",
    "eval",
    "entropy/token on the whole fixed batch at an eval point: the entropy-collapse curve.",
)
ENTROPY_SAMPLED = _metric(
    "entropy/sampled",
    "full-vocabulary entropy of pi_theta per context",
    "neutral",
    "mean over response tokens of fresh held-out samples (T=1)",
    "eval",
    "Entropy on the policy's own samples rather than pi_k's.",
)
DRIFT_CORRECT = _metric(
    "logprob/drift_correct",
    "log pi_theta(y) - log pi_k(y), sequence sum",
    "neutral",
    "mean over correct responses of the fixed batch",
    "eval",
    "How far the probability of rewarded responses moved.",
)
DRIFT_INCORRECT = _metric(
    "logprob/drift_incorrect",
    "log pi_theta(y) - log pi_k(y), sequence sum",
    "neutral",
    "mean over incorrect responses of the fixed batch",
    "eval",
    "Trajectory drift of unrewarded responses (pushed down by stage 1).",
)
# --- accuracy and reward --------------------------------------------------------------------
ACC_TRAIN_BATCH = _metric(
    "acc/train_batch",
    "greedy decoding, verifier reward",
    "higher_is_better",
    "mean over the fixed batch's prompts",
    "eval",
    "Accuracy on the prompts the stage trains on (memorisation shows here first).",
)
ACC_EVAL = _metric(
    "acc/eval",
    "greedy decoding, verifier reward",
    "higher_is_better",
    "mean over the held-out split",
    "eval",
    "Headline accuracy.",
)
ACC_EVAL_SAMPLED = _metric(
    "acc/eval_sampled",
    "sampling at T=1, verifier reward",
    "higher_is_better",
    "mean over the held-out split",
    "eval",
    "Greedy and sampled accuracy disagree when entropy moves; report both.",
)
ACC_PASS_K = _metric(
    "acc/pass@k",
    "k samples at T=1, correct if any is",
    "higher_is_better",
    "mean over the held-out split",
    "eval",
    "Coverage; optional (eval.pass_k > 1).",
)
REWARD_MEAN = _metric(
    "reward/mean",
    "verifier reward of the fixed batch's responses",
    "higher_is_better",
    "mean over responses",
    "eval",
    "Quality of the round's fixed batch (constant within a round).",
)
REWARD_TIMEOUTS = _metric(
    "reward/timeouts",
    "answers scored 0 because their check ran past task.jsonl.answer_timeout_s or crashed the "
    "checker process",
    "lower_is_better",
    "count over every answer scored for the eval point (greedy, sampled, the batch's prompts)",
    "eval",
    "Non-zero means some 0 rewards are the verifier's lack of time, not wrong answers; the fixed "
    "batch's own count is in its rollout.json meta as reward_timeouts.",
)
# --- optimisation diagnostics ---------------------------------------------------------------
LOSS = _metric("loss", "objective value", "lower_is_better", "minibatch", "step", "Total loss.")
RATIO_CLIP_FRAC = _metric(
    "ratio/clip_frac",
    "share of tokens with pi_theta/pi_old outside [1-eps_low, 1+eps_high] (stage 2: 1 +- eps); "
    "objectives without a ratio (ce, ce_weighted, mse) report it with grpo's eps as a drift gauge",
    "neutral",
    "token mean over the minibatch",
    "step",
    "How far outside a PPO trust region the update runs.",
)
RATIO_P01 = _metric(
    "ratio/p01",
    "1st percentile of pi_theta/pi_old",
    "neutral",
    "over the minibatch's tokens",
    "step",
    "Lower tail of the importance ratio.",
)
RATIO_P99 = _metric(
    "ratio/p99",
    "99th percentile of pi_theta/pi_old",
    "neutral",
    "over the minibatch's tokens",
    "step",
    "Upper tail of the importance ratio.",
)
GRAD_NORM = _metric(
    "grad/norm", "global L2 norm before clipping", "neutral", "per step", "step", "Step size."
)
SELECTED_FRAC = _metric(
    "stage2/selected_frac",
    "share of response tokens in the extreme region",
    "neutral",
    "over the fixed batch",
    "step",
    "Tokens that carry a non-zero stage-2 signal.",
)
SIGNAL_STD = _metric(
    "stage2/signal_std",
    "standard deviation of the combined signal a_t on selected tokens",
    "neutral",
    "over the fixed batch",
    "step",
    "Scale of the distillation signal.",
)
TOKENS_PER_S = _metric(
    "perf/tokens_per_s",
    "response tokens through forward+backward per second",
    "higher_is_better",
    "per step",
    "step",
    "Training throughput.",
)
BASE_LOSS = _metric(
    "base/loss",
    "cross-entropy on target tokens",
    "lower_is_better",
    "minibatch",
    "step",
    "Supervised pretraining of the tiny base.",
)

BASE_ACC_CHECK = _metric(
    "base/acc_check",
    "greedy decoding, verifier reward",
    "higher_is_better",
    "mean over the first base.eval_size held-out problems",
    "step",
    "The tiny base's stop rule: pretraining ends once this reaches base.target_acc.",
)

STEP_METRICS = tuple(n for n, m in CATALOGUE.items() if m.scope == "step")
EVAL_METRICS = tuple(n for n, m in CATALOGUE.items() if m.scope == "eval")


# --- sinks ----------------------------------------------------------------------------------
class MetricSink(Protocol):
    """Where metric points go. `run` names the stage run (e.g. "round-0/teacher-sapo")."""

    def log(self, run: str, step: int, values: dict[str, float]) -> None: ...

    def close(self) -> None: ...


def flush(sink: MetricSink) -> None:
    """Make every point logged so far durable: a sink that buffers (the worker's, which batches
    its database writes) has a `flush` method. A resume point is written only after this, so a
    lost worker never leaves a step behind its resume point without its points."""
    method = getattr(sink, "flush", None)
    if callable(method):
        method()


class NullSink:
    def log(self, run: str, step: int, values: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


class JsonlSink:
    """One JSON object per metric point: {"run", "step", "name", "value", "wall_time"}.

    Appends and flushes each batch so a crash loses at most the current call; non-finite values
    are written as null (JSON has no NaN) so a downstream parser never chokes.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file: TextIO | None = None  # opened on the first point: a run that fails
        self._lock = threading.Lock()  # validation leaves no empty file behind

    def log(self, run: str, step: int, values: dict[str, float]) -> None:
        if not values:
            return
        now = time.time()
        lines = []
        for name, value in values.items():
            if name not in CATALOGUE:
                raise KeyError(f"unknown metric name {name!r}: add it to erpd/metrics.py")
            v = float(value)
            point = {"run": run, "step": step, "name": name, "wall_time": now}
            point["value"] = v if math.isfinite(v) else None
            lines.append(json.dumps(point))
        with self._lock:
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = self.path.open("a", encoding="utf-8")
            self._file.write("\n".join(lines) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class TeeSink:
    """Send every point to several sinks."""

    def __init__(self, *sinks: MetricSink) -> None:
        self.sinks = sinks

    def log(self, run: str, step: int, values: dict[str, float]) -> None:
        for sink in self.sinks:
            sink.log(run, step, values)

    def flush(self) -> None:
        for sink in self.sinks:
            flush(sink)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


class ConsoleSink:
    """Prints eval points (accuracy, KL, entropy) as rich lines; step points would flood."""

    def __init__(self, console: object | None = None) -> None:
        from rich.console import Console

        self.console = console if console is not None else Console(stderr=True)

    def log(self, run: str, step: int, values: dict[str, float]) -> None:
        shown = {k: v for k, v in values.items() if CATALOGUE[k].scope == "eval"}
        if not shown:
            return
        body = "  ".join(f"{k}={v:.4g}" for k, v in shown.items())
        self.console.print(f"[dim]{run}[/dim] step {step}: {body}")  # type: ignore[attr-defined]

    def close(self) -> None:
        pass


def catalogue_json() -> list[dict[str, str]]:
    """The catalogue as plain dicts (served by the API)."""
    return [asdict(m) for m in CATALOGUE.values()]


def read_jsonl(path: str | Path) -> list[dict[str, object]]:
    """Load a metrics.jsonl file written by JsonlSink, one point per (run, step, name).

    A run resumed after a crash re-writes the points after its last resume checkpoint; the
    later write wins, as the database's upsert does.
    """
    points: dict[tuple[object, object, object], dict[str, object]] = {}
    with Path(path).open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                p = json.loads(line)
                key = (p["run"], p["step"], p["name"])
                points.pop(key, None)
                points[key] = p
    return list(points.values())
