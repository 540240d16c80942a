"""The method's math, and nothing else: pure functions on tensors.

Shapes: B responses, T response-aligned token positions (targets), V vocabulary. Every per-token
tensor is aligned to the *predicted* token: `logprobs[b, t] = log pi(y[b, t+1] | y[b, :t+1])`, and
`mask[b, t]` is 1 on response tokens up to and including the first end token. Losses average over
masked tokens of the minibatch (token mean). Stage-1 objectives, stage-2 signal constructions
and regions are registered by name (`Registry`) and checked against the config's names at import;
the loops look them up and know nothing about the algorithm. docs/method.md says which parts are
stated by the paper and which are our reconstruction, and defines the notation: pi_theta (the
policy being trained), pi_old (the PPO anchor of the ratio), pi_k (the round's base and sampler),
pi_0 (the pipeline's initial policy), T (a teacher).
"""

from __future__ import annotations

import hashlib
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import torch
from torch import Tensor

from erpd import config as C
from erpd import metrics as M
from erpd.config import Stage1Config, Stage2Config

F = TypeVar("F")

# exp() of a log-ratio beyond +-20 overflows float32 gradients long before it carries meaning;
# the clamp only bites on tokens whose probability already moved by a factor of ~5e8.
LOG_RATIO_CLAMP = 20.0


class Registry(dict[str, F], Generic[F]):
    """Named implementations of one config choice; `check` ties them to the config's Literal,
    so a name the config accepts always has an implementation and nothing else is registered."""

    def __init__(self, choice: str) -> None:
        super().__init__()
        self.choice = choice

    def register(self, name: str) -> Callable[[F], F]:
        def add(fn: F) -> F:
            self[name] = fn
            return fn

        return add

    def check(self, names: object) -> None:
        accepted = set(typing.get_args(names))
        if set(self) != accepted:
            raise RuntimeError(
                f"{self.choice}: the config accepts {sorted(accepted)}, "
                f"the registry implements {sorted(self)}"
            )


# --- token-level primitives -----------------------------------------------------------------
def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of x over positions where mask is 1 (0 if the mask is empty)."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp_min(1.0)


@dataclass(frozen=True)
class Normaliser:
    """Denominators of a whole minibatch.

    With gradient accumulation every micro-batch divides by the minibatch's counts, so the
    micro-batch losses (and their gradients) add up to exactly the minibatch's.
    """

    tokens: float  # response tokens
    correct_tokens: float  # response tokens of rewarded responses (ce)
    responses: float  # rows (mse)

    @classmethod
    def of(cls, mask: Tensor, rewards: Tensor | None = None) -> Normaliser:
        correct = mask if rewards is None else mask * (rewards > 0).to(mask.dtype).unsqueeze(1)
        return cls(float(mask.sum()), float(correct.sum()), float(mask.shape[0]))


def normalised_sum(x: Tensor, mask: Tensor, denominator: float) -> Tensor:
    """sum(x * mask) / denominator: masked_mean with the count taken from the whole minibatch."""
    return (x * mask.to(x.dtype)).sum() / max(denominator, 1.0)


def token_logprobs(logits: Tensor, targets: Tensor) -> Tensor:
    """log softmax(logits)[target]: (B, T, V), (B, T) -> (B, T), in float32."""
    logits = logits.float()
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, T)
    return picked - torch.logsumexp(logits, dim=-1)


def token_entropy(logits: Tensor) -> Tensor:
    """Full-vocabulary entropy per context: (B, T, V) -> (B, T)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def exact_kl(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """KL(p || q) over the full vocabulary per context: (B, T, V) x2 -> (B, T)."""
    logp = torch.log_softmax(logits_p.float(), dim=-1)
    logq = torch.log_softmax(logits_q.float(), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1)


def entropy_and_kl(logits: Tensor, pi_k_logprobs: Tensor) -> tuple[Tensor, Tensor]:
    """Token entropy of `logits` and KL(softmax(logits) || pi_k) per context, from one
    log-softmax: (B, T, V), (B, T, V) log-probs -> (B, T), (B, T)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    return -(p * logp).sum(-1), (p * (logp - pi_k_logprobs.float())).sum(-1)


def kl_estimators(logprobs: Tensor, pi_k_logprobs: Tensor) -> dict[str, Tensor]:
    """Schulman's k1/k2/k3 per token, from log-probs of sampled tokens.

    With log rho = log pi_k - log pi_theta: k1 = -log rho, k2 = (log rho)^2 / 2,
    k3 = rho - 1 - log rho. They estimate KL(pi_theta || pi_k) only on pi_theta's own samples;
    on pi_k's samples (the fixed batch) E[k1] = -KL(pi_k || pi_theta) and
    E[k3] = chi2(pi_k || pi_theta) - KL(pi_k || pi_theta) (docs/method.md, "What each KL metric
    estimates").
    The clamp sits inside exp only, so the linear term keeps pulling collapsed tokens back.
    """
    log_rho = pi_k_logprobs - logprobs
    return {
        "k1": -log_rho,
        "k2": 0.5 * log_rho.square(),
        "k3": log_rho.clamp(max=LOG_RATIO_CLAMP).exp() - 1.0 - log_rho,
    }


def ratio_stats(log_ratio: Tensor, mask: Tensor, low: float, high: float) -> dict[str, float]:
    """Diagnostics of r = exp(log_ratio) on masked tokens: clip fraction and 1st/99th percentile."""
    with torch.no_grad():
        r = log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()[mask.bool()]
        if r.numel() == 0:
            return {M.RATIO_CLIP_FRAC: 0.0, M.RATIO_P01: 1.0, M.RATIO_P99: 1.0}
        q = torch.quantile(r.float(), torch.tensor([0.01, 0.99], device=r.device))
        clipped = ((r < 1.0 - low) | (r > 1.0 + high)).float().mean()
        return {
            M.RATIO_CLIP_FRAC: clipped.item(),
            M.RATIO_P01: q[0].item(),
            M.RATIO_P99: q[1].item(),
        }


def group_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """A_i = (R_i - mean_group R) / (std_group R + 1e-6); all-equal groups give exactly 0.

    rewards: (N * G,) ordered group by group -> (N * G,).
    """
    grouped = rewards.float().view(-1, group_size)  # (N, G)
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True, unbiased=False)
    return ((grouped - mean) / (std + 1e-6)).view(-1)


# --- stage 1 --------------------------------------------------------------------------------
@dataclass
class Stage1Inputs:
    """One minibatch for a stage-1 objective. Per-token tensors are (B, T); per-response (B,)."""

    logprobs: Tensor  # log pi_theta, carries the gradient
    pi_old_logprobs: Tensor  # pi_k (anchor=behaviour) or the epoch's start (anchor=epoch)
    pi_k_logprobs: Tensor  # the round's frozen base, for KL
    mask: Tensor
    advantages: Tensor
    rewards: Tensor
    pi_0_logprobs: Tensor | None = None  # the mse reference when mse_reference == "initial"
    norm: Normaliser | None = None  # the minibatch's counts when this is one micro-batch of it

    @property
    def n(self) -> Normaliser:
        return self.norm if self.norm is not None else Normaliser.of(self.mask, self.rewards)


class Stage1Loss(Protocol):
    def __call__(self, x: Stage1Inputs, cfg: Stage1Config) -> tuple[Tensor, dict[str, float]]: ...


STAGE1_OBJECTIVES: Registry[Stage1Loss] = Registry("stage1.objective")


def _ratio(x: Stage1Inputs) -> Tensor:
    return (x.logprobs - x.pi_old_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()


@STAGE1_OBJECTIVES.register("sapo")
def sapo_loss(x: Stage1Inputs, cfg: Stage1Config) -> tuple[Tensor, dict[str, float]]:
    """Soft-gated policy gradient: g = (4/tau) sigmoid(tau (r - 1)); loss = -mean(g A).

    At r = 1 the gate's slope is exactly 1 (the plain policy gradient); away from 1 it decays
    smoothly instead of PPO's hard cut, so many epochs keep a (shrinking) gradient.
    """
    adv = x.advantages.unsqueeze(1)  # (B, 1)
    tau = torch.where(adv > 0, cfg.tau_pos, cfg.tau_neg)  # (B, 1)
    gate = (4.0 / tau) * torch.sigmoid(tau * (_ratio(x) - 1.0))  # (B, T)
    loss = -normalised_sum(gate * adv, x.mask, x.n.tokens)
    return loss, {}


@STAGE1_OBJECTIVES.register("grpo")
def grpo_loss(x: Stage1Inputs, cfg: Stage1Config) -> tuple[Tensor, dict[str, float]]:
    """PPO-clipped surrogate with wide, asymmetric clip: -min(r A, clip(r, 1-lo, 1+hi) A)."""
    adv = x.advantages.unsqueeze(1)
    r = _ratio(x)
    unclipped = r * adv
    clipped = r.clamp(1.0 - cfg.eps_low, 1.0 + cfg.eps_high) * adv
    loss = -normalised_sum(torch.minimum(unclipped, clipped), x.mask, x.n.tokens)
    return loss, {}


@STAGE1_OBJECTIVES.register("ce")
def ce_loss(x: Stage1Inputs, cfg: Stage1Config) -> tuple[Tensor, dict[str, float]]:
    """Rejection-sampling fine-tuning: cross-entropy on the tokens of correct responses only."""
    correct = (x.rewards > 0).to(x.mask.dtype).unsqueeze(1)  # (B, 1)
    loss = -normalised_sum(x.logprobs, x.mask * correct, x.n.correct_tokens)
    return loss, {}


@STAGE1_OBJECTIVES.register("ce_weighted")
def ce_weighted_loss(x: Stage1Inputs, cfg: Stage1Config) -> tuple[Tensor, dict[str, float]]:
    """Advantage-weighted cross-entropy: -A_i log pi (REINFORCE without a ratio)."""
    loss = -normalised_sum(x.advantages.unsqueeze(1) * x.logprobs, x.mask, x.n.tokens)
    return loss, {}


@STAGE1_OBJECTIVES.register("mse")
def mse_loss(x: Stage1Inputs, cfg: Stage1Config) -> tuple[Tensor, dict[str, float]]:
    """Weak teacher: regress beta * sum_t [log pi_theta - log pi_ref] onto A_i, per response.

    pi_ref is an *unlearned* policy: pi_k, or pi_0 with mse_reference=initial. Only the
    sequence-level log-ratio is fitted, so the token-level credit the teacher learns is weak.
    """
    pi_ref = x.pi_0_logprobs if x.pi_0_logprobs is not None else x.pi_k_logprobs
    seq_log_ratio = ((x.logprobs - pi_ref) * x.mask).sum(dim=1)  # (B,)
    residual = cfg.mse_beta * seq_log_ratio - x.advantages
    loss = residual.square().sum() / max(x.n.responses, 1.0)
    return loss, {}


def stage1_loss(x: Stage1Inputs, cfg: Stage1Config) -> tuple[Tensor, dict[str, float]]:
    """The configured objective, plus the optional k3 penalty to pi_k, plus diagnostics.

    The importance-ratio statistics are not among them: they need the whole minibatch's
    tokens (a quantile), so the loop computes them once per step with `ratio_stats`."""
    objective_loss, out = STAGE1_OBJECTIVES[cfg.objective](x, cfg)
    kl = kl_estimators(x.logprobs, x.pi_k_logprobs)
    k3 = normalised_sum(kl["k3"], x.mask, x.n.tokens)
    loss = objective_loss + cfg.kl_coef * k3 if cfg.kl_coef > 0 else objective_loss
    with torch.no_grad():
        out[M.LOSS] = loss.item()
        out[M.KL_K1] = normalised_sum(kl["k1"], x.mask, x.n.tokens).item()
        out[M.KL_K3] = k3.item()
    return loss, out


# --- stage 2 --------------------------------------------------------------------------------
def _masked_std(x: Tensor, mask: Tensor) -> Tensor:
    m = mask.to(x.dtype)
    mean = masked_mean(x, m)
    return masked_mean((x - mean).square(), m).sqrt()


class SignalFn(Protocol):
    def __call__(self, delta: Tensor, adv: Tensor, mask: Tensor, gate_c: float) -> Tensor: ...


STAGE2_SIGNALS: Registry[SignalFn] = Registry("stage2.signal")
"""a_t of one teacher from delta_t: (B, T) delta, (B, 1) advantages, (B, T) float mask."""


@STAGE2_SIGNALS.register("logratio")
@STAGE2_SIGNALS.register("contrast")  # logratio of a delta the caller takes against pi_0
def _logratio(delta: Tensor, adv: Tensor, mask: Tensor, gate_c: float) -> Tensor:
    return delta / (_masked_std(delta, mask) + 1e-6)


@STAGE2_SIGNALS.register("sign")
def _sign(delta: Tensor, adv: Tensor, mask: Tensor, gate_c: float) -> Tensor:
    return torch.sign(delta)


@STAGE2_SIGNALS.register("gated_advantage")
def _gated_advantage(delta: Tensor, adv: Tensor, mask: Tensor, gate_c: float) -> Tensor:
    # the teacher only re-weights the outcome advantage by how much it moved the token in the
    # advantage's direction, inside [1-c, 1+c]: a weak teacher cannot flip its sign
    weight = torch.exp(torch.sign(adv) * delta.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    return adv * weight.clamp(1.0 - gate_c, 1.0 + gate_c)


@STAGE2_SIGNALS.register("advantage")  # the no-teacher control
def _advantage(delta: Tensor, adv: Tensor, mask: Tensor, gate_c: float) -> Tensor:
    return adv.expand_as(delta)


def teacher_signal(
    signal: str, delta: Tensor, advantages: Tensor, mask: Tensor, *, gate_c: float = 0.2
) -> Tensor:
    """Per-token signal a_t of ONE teacher from delta_t = log pi_T - log pi_k (or - log pi_0).

    delta: (B, T) for the whole fixed batch (normalisation statistics are batch-wide);
    advantages: (B,). `contrast` is `logratio` applied to a delta taken against pi_0 (the caller
    passes that delta). Returns (B, T), zero outside the mask.
    """
    if signal not in STAGE2_SIGNALS:
        raise ValueError(f"unknown stage-2 signal {signal!r}")
    m = mask.to(delta.dtype)
    return STAGE2_SIGNALS[signal](delta, advantages.unsqueeze(1), m, gate_c) * m


def combine_signals(signals: Sequence[Tensor], weights: Sequence[float] | None = None) -> Tensor:
    """a_t = sum_m w_m a_t^(m) with weights normalised to sum 1 (default 1/M)."""
    if not signals:
        raise ValueError("no teacher signals to combine")
    w = torch.tensor(weights if weights is not None else [1.0] * len(signals), dtype=torch.float32)
    w = w / w.sum()
    return sum(wi.item() * s for wi, s in zip(w, signals, strict=True))


def region_score(deltas: Sequence[Tensor], mask: Tensor, weights: Sequence[float] | None) -> Tensor:
    """How extreme each token is: |sum_m w_m delta_m / std(delta_m)| (one teacher: |delta|/std).

    Teachers are combined before selection, as the paper states; standardising each delta keeps
    a teacher with a larger log-ratio scale from owning the region, and teachers that disagree
    on a token cancel instead of spending the region on it. The score is built from deltas, not
    from the constructed signal, so `sign` and `gated_advantage` select the same tokens as
    `logratio` (our reconstruction).
    """
    scaled = [d / (_masked_std(d, mask) + 1e-6) for d in deltas]
    return combine_signals(scaled, weights).abs() * mask.to(scaled[0].dtype)


class RegionFn(Protocol):
    def __call__(
        self, score: Tensor, valid: Tensor, top_frac: float, threshold: float | None
    ) -> Tensor: ...


REGIONS: Registry[RegionFn] = Registry("stage2.region")
"""Which tokens keep their signal, from the (B, T) score and the bool response mask."""


@REGIONS.register("all")
def _all_tokens(score: Tensor, valid: Tensor, top_frac: float, threshold: float | None) -> Tensor:
    return valid


@REGIONS.register("threshold")
def _above_threshold(
    score: Tensor, valid: Tensor, top_frac: float, threshold: float | None
) -> Tensor:
    if threshold is None:
        raise ValueError("region 'threshold' needs a threshold")
    return valid & (score > threshold)


@REGIONS.register("top_frac")
@REGIONS.register("random")  # the caller passes a seeded random score instead of |delta|
def _top_share(score: Tensor, valid: Tensor, top_frac: float, threshold: float | None) -> Tensor:
    values = score[valid]
    if values.numel() == 0:
        return valid
    k = max(1, int(top_frac * values.numel() + 0.5))  # round half up, not to even
    cutoff = torch.topk(values, k).values.min()
    return valid & (score >= cutoff)


def select_region(
    score: Tensor,
    mask: Tensor,
    region: str,
    *,
    top_frac: float = 0.2,
    threshold: float | None = None,
) -> Tensor:
    """Boolean (B, T) of the tokens that keep their signal ("the extreme region").

    top_frac keeps the tokens whose score is among the top share of the batch's response tokens
    (ties at the cut-off are kept); threshold keeps score > threshold; all keeps every token;
    random is top_frac on a score the caller draws at random (`random_score`).
    """
    if region not in REGIONS:
        raise ValueError(f"unknown region {region!r}")
    return REGIONS[region](score, mask.bool(), top_frac, threshold)


def seeded_generator(seed: int, purpose: str) -> torch.Generator:
    """A CPU generator for one use of a stage's seed: each purpose gets its own stream, so the
    random region and the placebo's permutations of one stage are not drawn from the same
    numbers."""
    digest = hashlib.sha256(f"{purpose}:{seed}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def random_score(mask: Tensor, seed: int) -> Tensor:
    """A seeded uniform (B, T) score for region `random`: the top `top_frac` share of it is a
    region of the same size as the extreme region's, chosen without looking at any teacher."""
    score = torch.rand(mask.shape, generator=seeded_generator(seed, "region"))
    return (score * mask.bool().cpu()).to(mask.device)


def permute_within_rows(deltas: Sequence[Tensor], mask: Tensor, seed: int) -> list[Tensor]:
    """The placebo teacher: each response's delta shuffled among that response's own valid
    tokens, by one seeded permutation per response that every teacher's delta shares (so
    teachers that agreed on a token still agree on where it lands). Each response keeps its
    multiset of delta values, hence the teacher's scale and sign balance, and loses which token
    each value belonged to. Positions outside the mask are left as they are."""
    valid = mask.bool().cpu()
    width = valid.shape[1]
    positions = torch.arange(width).expand_as(valid)
    # the valid positions of each row first (in order), then the rest: the slots to fill ...
    slots = torch.argsort(torch.where(valid, positions, width + positions), dim=1, stable=True)
    # ... and the same positions in a random order (the rest again last, in order): the sources
    keys = torch.rand(valid.shape, generator=seeded_generator(seed, "permute_delta"))
    sources = torch.argsort(torch.where(valid, keys, 2.0 + positions), dim=1, stable=True)
    slots, sources = slots.to(mask.device), sources.to(mask.device)
    return [d.clone().scatter_(1, slots, d.gather(1, sources)) for d in deltas]


@dataclass
class Stage2Inputs:
    """One minibatch for the trust-region distillation loss (per-token tensors (B, T))."""

    logprobs: Tensor  # log pi_theta, carries the gradient
    pi_old_logprobs: Tensor  # re-anchored at the start of each epoch
    pi_k_logprobs: Tensor
    signal: Tensor  # a_t, already zero outside the selected region
    mask: Tensor
    norm: Normaliser | None = None  # the minibatch's counts when this is one micro-batch of it


def stage2_loss(x: Stage2Inputs, cfg: Stage2Config) -> tuple[Tensor, dict[str, float]]:
    """-mean_t min(r a_t, clip(r, 1-eps, 1+eps) a_t) + kl_coef * k3(pi_theta || pi_k).

    The mean runs over all response tokens: unselected tokens have a_t = 0 and only feel the
    KL term, which pulls them back toward pi_k (the "drop drift" half of the method). As in
    stage 1, the ratio statistics are the loop's, once per minibatch.
    """
    r = (x.logprobs - x.pi_old_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()
    unclipped = r * x.signal
    clipped = r.clamp(1.0 - cfg.clip_eps, 1.0 + cfg.clip_eps) * x.signal
    tokens = x.norm.tokens if x.norm is not None else float(x.mask.sum())
    policy_loss = -normalised_sum(torch.minimum(unclipped, clipped), x.mask, tokens)
    kl = kl_estimators(x.logprobs, x.pi_k_logprobs)
    k3 = normalised_sum(kl["k3"], x.mask, tokens)
    loss = policy_loss + cfg.kl_coef * k3
    with torch.no_grad():
        out = {
            M.LOSS: loss.item(),
            M.KL_K1: normalised_sum(kl["k1"], x.mask, tokens).item(),
            M.KL_K3: k3.item(),
        }
    return loss, out


# every name the config accepts has an implementation, and nothing else is registered
STAGE1_OBJECTIVES.check(C.Stage1ObjectiveName)
STAGE2_SIGNALS.check(C.Stage2SignalName)
REGIONS.check(C.RegionName)


def supervised_loss(logits: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """Cross-entropy on masked target tokens (pretraining the tiny base)."""
    return -masked_mean(token_logprobs(logits, targets), mask)
