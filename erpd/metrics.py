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
from collections.abc import Sequence
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
# What each one estimates, on whose samples and in which direction (docs/method.md, "What each KL
# metric estimates"; tests/unit/test_metrics_kl.py checks every expectation below against the
# estimators of erpd.losses by enumeration). The fixed batch's tokens are pi_k's samples.
KL_EXACT = _metric(
    "kl/exact",
    "full-vocabulary KL(pi_theta || pi_k) per context, exact (nothing sampled at the token)",
    "lower_is_better",
    "mean over the response tokens of the step's minibatch, before the update; the contexts "
    "are pi_k's samples (the fixed batch)",
    "step",
    "E_{s from pi_k's responses}[KL(pi_theta || pi_k)(s)]: reverse KL, but over pi_k's "
    "contexts, not pi_theta's own. The unit of the KL budget and of the headline 'N x lower "
    "KL'; read the on-policy kl/seq_k3 beside it.",
)
KL_EXACT_BATCH = _metric(
    "kl/exact_batch",
    "full-vocabulary KL(pi_theta || pi_k) per context, exact",
    "lower_is_better",
    "mean over all response tokens of the fixed batch (pi_k's samples)",
    "eval",
    "KL spent: kl/exact on the whole fixed batch at an eval point, i.e. KL(pi_theta || pi_k) "
    "averaged over pi_k's contexts.",
)
KL_K1 = _metric(
    "kl/k1",
    "k1 = log pi_theta(y_t) - log pi_k(y_t) on the fixed batch's tokens y_t ~ pi_k",
    "neutral",
    "token mean over the minibatch",
    "step",
    "Estimates -KL(pi_k || pi_theta) per context: the forward KL with its sign flipped, so it "
    "is <= 0 in expectation and falls as pi_theta moves away. Not an estimate of kl/exact.",
)
KL_K3 = _metric(
    "kl/k3",
    "k3 = rho - 1 - log rho, rho = pi_k(y_t) / pi_theta(y_t) (exp capped at e^20), on the "
    "fixed batch's tokens y_t ~ pi_k",
    "lower_is_better",
    "token mean over the minibatch",
    "step",
    "Estimates chi2(pi_k || pi_theta) - KL(pi_k || pi_theta) per context, with "
    "chi2(p || q) = sum p^2 / q - 1: the chi-square term makes it heavy-tailed by construction "
    "(a token of pi_k's driven toward 0 under pi_theta blows it up). Not KL(pi_theta || pi_k); "
    "the same quantity as the losses' kl_coef penalty; never the budget.",
)
KL_K3_BATCH = _metric(
    "kl/k3_batch",
    "k3 = rho - 1 - log rho, rho = pi_k(y_t) / pi_theta(y_t) (exp capped at e^20), on the "
    "fixed batch's tokens y_t ~ pi_k",
    "lower_is_better",
    "token mean over all response tokens of the fixed batch",
    "eval",
    "kl/k3 on the whole fixed batch at an eval point: estimates chi2(pi_k || pi_theta) - "
    "KL(pi_k || pi_theta) per context, heavy-tailed; shown beside kl/exact_batch.",
)
KL_SEQ_K3 = _metric(
    "kl/seq_k3",
    "k3 of the sequence log-ratio, rho = pi_k(y) / pi_theta(y) (exp capped at e^20), on fresh "
    "responses y ~ pi_theta (T=1, the first of the eval's avg@k samples of each prompt)",
    "lower_is_better",
    "mean over one sampled response per held-out prompt; nats per response, not per token",
    "eval",
    "Unbiased for the sequence-level KL(pi_theta || pi_k) on pi_theta's own samples (responses "
    "cut at the response budget): the on-policy KL a reader should see beside kl/exact.",
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
    "mean over response tokens of fresh held-out samples (T=1, one per prompt)",
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
    "mean over the held-out split (eval.size problems)",
    "eval",
    "Headline accuracy.",
)
ACC_EVAL_SE = _metric(
    "acc/eval_se",
    "standard error of acc/eval: sample standard deviation (n - 1) of the per-problem 0/1 "
    "greedy rewards / sqrt(n)",
    "neutral",
    "over the n held-out problems (not reported when n < 2)",
    "eval",
    "Sampling error of acc/eval from the finite eval split; 2,500 problems keep it at or "
    "below 1 point.",
)
ACC_EVAL_SAMPLED = _metric(
    "acc/eval_sampled",
    "avg@k: the share of k responses sampled at T=1 that the verifier accepts, "
    "k = eval.pass_k (1 when 0)",
    "higher_is_better",
    "mean over the held-out split of the per-problem avg@k",
    "eval",
    "Greedy and sampled accuracy disagree when entropy moves; report both. Its sampling seed "
    "depends only on the stage's seed, so every eval point and every arm compared on one seed "
    "draws the same random numbers.",
)
ACC_EVAL_SAMPLED_SE = _metric(
    "acc/eval_sampled_se",
    "standard error of acc/eval_sampled: sample standard deviation (n - 1) over problems of "
    "the per-problem avg@k / sqrt(n)",
    "neutral",
    "over the n held-out problems (not reported when n < 2)",
    "eval",
    "Sampling error of acc/eval_sampled, from both the finite eval split and the k samples "
    "per problem.",
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
    "mean over the first base.eval_size problems of the task's validation split",
    "step",
    "The tiny base's stop rule: pretraining ends once this reaches base.target_acc. It reads "
    "the validation split, never the reported eval split.",
)

STEP_METRICS = tuple(n for n, m in CATALOGUE.items() if m.scope == "step")
EVAL_METRICS = tuple(n for n, m in CATALOGUE.items() if m.scope == "eval")


def standard_error(values: Sequence[float]) -> float:
    """Standard error of the mean of `values`: the sample standard deviation (n - 1 in the
    denominator) over sqrt(n); NaN for fewer than two values, where it is undefined.

    For per-problem 0/1 rewards with mean p this is sqrt(p (1 - p) / (n - 1))."""
    n = len(values)
    if n < 2:
        return math.nan
    mean = math.fsum(values) / n
    variance = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return math.sqrt(variance / n)


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
