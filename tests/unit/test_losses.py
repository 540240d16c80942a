"""Every function of erpd/losses.py on small tensors whose expected values are worked out by hand.

The expected numbers are literals (with the arithmetic in a comment), never the formula re-run, so
a sign or normalisation slip in losses.py cannot be mirrored by the test.
"""

from __future__ import annotations

import math
import typing

import pytest
import torch
from torch import Tensor

from erpd import config as C
from erpd import metrics as M
from erpd.config import Stage1Config, Stage2Config
from erpd.losses import (
    LOG_RATIO_CLAMP,
    REGIONS,
    STAGE1_OBJECTIVES,
    STAGE2_SIGNALS,
    Normaliser,
    Registry,
    Stage1Inputs,
    Stage2Inputs,
    combine_signals,
    exact_kl,
    group_advantages,
    kl_estimators,
    masked_mean,
    ratio_stats,
    region_score,
    select_region,
    stage1_loss,
    stage2_loss,
    supervised_loss,
    teacher_signal,
    token_entropy,
    token_logprobs,
)

LN2 = 0.6931471805599453
LN3 = 1.0986122886681098
# the ratio statistics are the loop's, once per minibatch (erpd/step.py), not a loss's
STAGE1_METRIC_KEYS = {M.LOSS, M.KL_K1, M.KL_K3}


def t(*rows: object) -> Tensor:
    """A float32 tensor from nested literals."""
    return torch.tensor(rows if len(rows) > 1 else rows[0], dtype=torch.float32)


def close(actual: Tensor | float, expected: object, atol: float = 1e-5) -> None:
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=torch.float32),
        torch.as_tensor(expected, dtype=torch.float32),
        atol=atol,
        rtol=1e-5,
    )


def leaf(values: list[list[float]]) -> Tensor:
    return torch.tensor(values, dtype=torch.float32, requires_grad=True)


def s1_inputs(
    logprobs: Tensor,
    *,
    advantages: list[float],
    mask: list[list[float]] | None = None,
    pi_old: Tensor | None = None,
    pi_k: Tensor | None = None,
    rewards: list[float] | None = None,
    pi_0: Tensor | None = None,
) -> Stage1Inputs:
    base = logprobs.detach()
    return Stage1Inputs(
        logprobs=logprobs,
        pi_old_logprobs=base.clone() if pi_old is None else pi_old,
        pi_k_logprobs=base.clone() if pi_k is None else pi_k,
        mask=torch.ones_like(base) if mask is None else t(mask),
        advantages=t(advantages),
        rewards=t(rewards if rewards is not None else [1.0 if a > 0 else 0.0 for a in advantages]),
        pi_0_logprobs=pi_0,
    )


# --- token-level primitives -----------------------------------------------------------------
def test_masked_mean_averages_only_masked_positions() -> None:
    # (1 + 3 + 4) / 3 = 2.666667
    close(masked_mean(t([1.0, 2.0], [3.0, 4.0]), t([1.0, 0.0], [1.0, 1.0])), 8.0 / 3.0)


def test_masked_mean_of_empty_mask_is_zero() -> None:
    out = masked_mean(t([5.0, -7.0]), t([0.0, 0.0]))
    assert out.item() == 0.0
    assert not torch.isnan(out)


def test_masked_mean_accepts_bool_mask() -> None:
    close(masked_mean(t([2.0, 4.0, 9.0]), torch.tensor([True, True, False])), 3.0)


def test_token_logprobs_matches_hand_log_softmax() -> None:
    # softmax([0, 0, ln 2]) = [1/4, 1/4, 1/2]: log p = [-1.386294, -1.386294, -0.693147]
    logits = t([[[0.0, 0.0, LN2], [0.0, 0.0, LN2]]])  # (1, 2, 3)
    out = token_logprobs(logits, torch.tensor([[2, 0]]))
    assert out.shape == (1, 2)
    assert out.dtype == torch.float32
    close(out, [[-0.693147, -1.386294]])


def test_token_logprobs_upcasts_low_precision_logits() -> None:
    logits = t([[[0.0, 0.0, LN2]]]).to(torch.bfloat16)
    out = token_logprobs(logits, torch.tensor([[2]]))
    assert out.dtype == torch.float32
    close(out, [[-0.693147]], atol=1e-2)


def test_token_entropy_uniform_is_log_vocab() -> None:
    # uniform over V = 5: H = ln 5 = 1.609438
    close(token_entropy(torch.zeros(2, 3, 5)), torch.full((2, 3), 1.609438))


def test_token_entropy_by_hand() -> None:
    # p = [1/4, 1/4, 1/2]: H = 2 * 1/4 * ln 4 + 1/2 * ln 2 = 0.693147 + 0.346574 = 1.039721
    close(token_entropy(t([[[0.0, 0.0, LN2]]])), [[1.039721]])
    # a near-one-hot distribution has ~0 entropy
    assert token_entropy(t([[[0.0, 100.0, 0.0]]])).item() < 1e-6


def test_exact_kl_of_identical_logits_is_zero() -> None:
    logits = torch.randn(2, 3, 7, generator=torch.Generator().manual_seed(0))
    close(exact_kl(logits, logits), torch.zeros(2, 3), atol=1e-6)
    # softmax is shift invariant, so a constant offset is still the same distribution
    close(exact_kl(logits, logits + 3.0), torch.zeros(2, 3), atol=1e-5)


def test_exact_kl_two_tokens_by_hand() -> None:
    # p = softmax([0, ln 3]) = [1/4, 3/4], q = [1/2, 1/2]
    # KL(p||q) = 1/4 ln(1/2) + 3/4 ln(3/2) = -0.173287 + 0.304099 = 0.130812
    p = t([[[0.0, LN3]]])
    q = t([[[0.0, 0.0]]])
    close(exact_kl(p, q), [[0.130812]])
    # KL(q||p) = 1/2 ln 2 + 1/2 ln(2/3) = 0.346574 - 0.202733 = 0.143841 (not symmetric)
    close(exact_kl(q, p), [[0.143841]])


def test_kl_estimators_by_hand() -> None:
    # token 0: pi = 1/2, ref = 1/4 -> log rho = -ln 2
    #   k1 = ln 2 = 0.693147, k2 = (ln 2)^2 / 2 = 0.240227, k3 = 1/2 - 1 + ln 2 = 0.193147
    # token 1: pi = 1/4, ref = 1/2 -> log rho = ln 2
    #   k1 = -0.693147, k2 = 0.240227, k3 = 2 - 1 - ln 2 = 0.306853
    logprobs = t([math.log(0.5), math.log(0.25)])
    ref = t([math.log(0.25), math.log(0.5)])
    kl = kl_estimators(logprobs, ref)
    assert set(kl) == {"k1", "k2", "k3"}
    close(kl["k1"], [0.693147, -0.693147])
    close(kl["k2"], [0.240227, 0.240227])
    close(kl["k3"], [0.193147, 0.306853])


def test_kl_estimators_equal_policies_are_zero() -> None:
    x = t([-0.3, -2.0, -5.0])
    for value in kl_estimators(x, x.clone()).values():
        assert torch.equal(value, torch.zeros(3))


def test_k3_is_non_negative() -> None:
    g = torch.Generator().manual_seed(1)
    logprobs = -5.0 * torch.rand(64, generator=g)
    ref = -5.0 * torch.rand(64, generator=g)
    assert (kl_estimators(logprobs, ref)["k3"] >= 0).all()


def test_kl_estimators_clamp_only_inside_exp() -> None:
    # log rho = 100: k1 = -100, k2 = 5000, k3 = e^20 (clamped exp) - 1 - 100 = 485165095.41
    # log rho = -100: k1 = 100, k2 = 5000, k3 = e^-100 - 1 + 100 = 99
    assert LOG_RATIO_CLAMP == 20.0
    kl = kl_estimators(t([-100.0, 0.0]), t([0.0, -100.0]))
    close(kl["k1"], [-100.0, 100.0])
    close(kl["k2"], [5000.0, 5000.0])
    assert torch.isfinite(kl["k3"]).all()
    close(kl["k3"][0], 485165095.41, atol=100.0)
    close(kl["k3"][1], 99.0)


def test_k3_gradient_survives_the_clamp() -> None:
    # d k3 / d log pi = 1 - rho; with rho's exp clamped at e^20 the linear term still gives 1
    logp = torch.tensor([-100.0], requires_grad=True)
    kl_estimators(logp, t([0.0]))["k3"].sum().backward()
    assert logp.grad is not None and logp.grad.item() == 1.0


def test_ratio_stats_clip_fraction_and_percentiles() -> None:
    # r = [0.7, 0.9, 1.0, 1.1, 1.3] on the mask (5.0 is masked out); low 0.2, high 0.28:
    # outside [0.8, 1.28] are 0.7 and 1.3 -> clip_frac = 2/5 = 0.4
    # linear quantiles of the sorted 5 values: p01 at 0.04 -> 0.7 + 0.04 * 0.2 = 0.708,
    # p99 at 3.96 -> 1.1 + 0.96 * 0.2 = 1.292
    r = t([[0.7, 0.9, 1.0], [1.1, 1.3, 5.0]])
    mask = t([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    out = ratio_stats(r.log(), mask, 0.2, 0.28)
    assert set(out) == {M.RATIO_CLIP_FRAC, M.RATIO_P01, M.RATIO_P99}
    assert all(isinstance(v, float) for v in out.values())
    close(out[M.RATIO_CLIP_FRAC], 0.4)
    close(out[M.RATIO_P01], 0.708)
    close(out[M.RATIO_P99], 1.292)


def test_ratio_stats_uses_the_asymmetric_bounds() -> None:
    # r = 1.25 is inside [0.8, 1.28] but outside [0.8, 1.2]
    r = t([1.25, 1.0])
    assert ratio_stats(r.log(), torch.ones(2), 0.2, 0.28)[M.RATIO_CLIP_FRAC] == 0.0
    close(ratio_stats(r.log(), torch.ones(2), 0.2, 0.2)[M.RATIO_CLIP_FRAC], 0.5)


def test_ratio_stats_empty_mask() -> None:
    out = ratio_stats(t([0.5, 3.0]), torch.zeros(2), 0.2, 0.2)
    assert out == {M.RATIO_CLIP_FRAC: 0.0, M.RATIO_P01: 1.0, M.RATIO_P99: 1.0}


def test_group_advantages_all_equal_groups_are_exactly_zero() -> None:
    adv = group_advantages(t([1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]), 4)
    assert torch.equal(adv, torch.zeros(8))


def test_group_advantages_by_hand_population_std() -> None:
    # group [1, 0, 0, 0]: mean 1/4, population std sqrt(1/4 - 1/16) = sqrt(3)/4 = 0.433013
    # A = 0.75 / 0.433013 = 1.732047 (sqrt 3), -0.25 / 0.433013 = -0.577349 (-1/sqrt 3)
    # (the unbiased std 1/2 would give 1.5 / -0.5 instead)
    # group [0, 1]: mean 1/2, std 1/2 -> [-1, 1]; groups are consecutive blocks
    adv = group_advantages(t([1.0, 0.0, 0.0, 0.0]), 4)
    close(adv, [1.732047, -0.577349, -0.577349, -0.577349])
    adv2 = group_advantages(torch.tensor([0, 1, 1, 1, 1, 0]), 2)  # ints are accepted
    close(adv2, [-1.0, 1.0, 0.0, 0.0, 1.0, -1.0], atol=1e-5)
    assert adv2[2].item() == 0.0 and adv2[3].item() == 0.0


# --- stage 1 --------------------------------------------------------------------------------
def test_registry_has_exactly_the_configured_objectives() -> None:
    expected = {"sapo", "grpo", "ce", "ce_weighted", "mse"}
    assert set(STAGE1_OBJECTIVES) == expected
    # every name the config accepts has an implementation, and nothing else is registered
    assert set(typing.get_args(C.Stage1ObjectiveName)) == expected


def test_signal_and_region_registries_match_the_config() -> None:
    assert set(STAGE2_SIGNALS) == set(typing.get_args(C.Stage2SignalName))
    assert (
        set(REGIONS)
        == set(typing.get_args(C.RegionName))
        == {"top_frac", "threshold", "all", "random"}
    )


def test_a_registry_refuses_a_config_it_does_not_implement() -> None:
    registry: Registry[object] = Registry("stage2.region")
    registry.register("all")(object())
    registry.check(typing.Literal["all"])  # the same names: fine
    with pytest.raises(RuntimeError, match=r"stage2\.region"):
        registry.check(typing.Literal["all", "top_frac"])


@pytest.mark.parametrize("name", sorted(STAGE1_OBJECTIVES))
def test_every_objective_follows_the_contract(name: str) -> None:
    lp = leaf([[-0.5, -1.0, -2.0], [-0.1, -3.0, -0.7]])
    x = s1_inputs(
        lp,
        advantages=[1.0, -1.0],
        mask=[[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]],
        pi_old=t([[-0.6, -1.1, -2.0], [-0.2, -2.5, -0.7]]),
        pi_k=t([[-0.7, -0.9, -2.0], [-0.3, -2.0, -0.8]]),
        rewards=[1.0, 0.0],
    )
    loss, metrics = STAGE1_OBJECTIVES[name](x, Stage1Config(objective=name))  # type: ignore[arg-type]
    assert isinstance(loss, Tensor) and loss.dim() == 0 and torch.isfinite(loss)
    assert isinstance(metrics, dict)
    assert all(k in M.CATALOGUE for k in metrics)
    loss.backward()
    assert lp.grad is not None and lp.grad.abs().sum() > 0
    # masked-out tokens never receive a gradient
    assert lp.grad[0, 2].item() == 0.0


@pytest.mark.parametrize("name", sorted(STAGE1_OBJECTIVES))
def test_stage1_loss_returns_the_catalogue_metrics(name: str) -> None:
    x = s1_inputs(leaf([[-0.5, -1.0], [-0.2, -3.0]]), advantages=[1.0, -1.0])
    loss, metrics = stage1_loss(x, Stage1Config(objective=name))  # type: ignore[arg-type]
    assert set(metrics) == STAGE1_METRIC_KEYS
    assert all(isinstance(v, float) for v in metrics.values())
    close(metrics[M.LOSS], loss.item())


def test_sapo_value_and_gradient_at_ratio_one() -> None:
    # r = 1 everywhere, so gate = (4/tau) * sigmoid(0) = 2 / tau
    # row 0: A = 1 (tau 1): g A = 2 on 2 tokens; row 1: A = -0.5 (tau 1.05): g A = -0.952381 on 1
    # loss = -(2 + 2 - 0.952381) / 3 = -1.015873
    # d gate / d log pi = gate'(1) * r = (4/tau) * tau * 1/4 = 1: the plain policy gradient
    # d loss / d log pi = -A * mask / 3 = [[-1/3, -1/3], [0.5/3, 0]]
    lp = leaf([[-0.5, -1.0], [-0.2, -3.0]])
    x = s1_inputs(lp, advantages=[1.0, -0.5], mask=[[1.0, 1.0], [1.0, 0.0]])
    loss, _ = stage1_loss(x, Stage1Config(objective="sapo"))
    close(loss, -1.015873)
    loss.backward()
    assert lp.grad is not None
    close(lp.grad, [[-0.333333, -0.333333], [0.166667, 0.0]])


def test_sapo_gate_away_from_ratio_one() -> None:
    # log r = 0.1: r = e^0.1 = 1.105171
    # A = +1, tau 1:    g = 4 * sigmoid(0.105171) = 2.105074
    # A = -1, tau 1.05: g = (4/1.05) * sigmoid(1.05 * 0.105171) = 2.009826
    # loss = -(2.105074 - 2.009826) / 2 = -0.047624
    x = s1_inputs(leaf([[0.1], [0.1]]), advantages=[1.0, -1.0], pi_old=t([[0.0], [0.0]]))
    loss, _ = stage1_loss(x, Stage1Config(objective="sapo"))
    close(loss, -0.047624)


def test_sapo_temperature_follows_the_sign_of_the_advantage() -> None:
    # at r = 1, g A = (2 / tau) A: A = +1 with tau_pos = 2 -> 1; A = -1 with tau_neg = 0.5 -> -4;
    # A = 0 contributes 0.  loss = -(1 - 4 + 0) / 3 = 1.0
    x = s1_inputs(leaf([[-1.0], [-1.0], [-1.0]]), advantages=[1.0, -1.0, 0.0])
    loss, _ = stage1_loss(x, Stage1Config(objective="sapo", tau_pos=2.0, tau_neg=0.5))
    close(loss, 1.0)
    # swapped (tau_pos 0.5, tau_neg 2): g A = 4 and -1 -> loss = -(4 - 1 + 0) / 3 = -1
    loss2, _ = stage1_loss(x, Stage1Config(objective="sapo", tau_pos=0.5, tau_neg=2.0))
    close(loss2, -1.0)


def test_grpo_clips_only_in_the_direction_of_the_advantage() -> None:
    # eps_low 0.2, eps_high 0.28 -> clip range [0.8, 1.28]; 6 tokens
    # row 0, A = +1: r = 1.5 -> min(1.5, 1.28) = 1.28 clipped (no grad)
    #                r = 0.5 -> min(0.5, 0.8) = 0.5 unclipped (grad -A r / 6 = -0.083333)
    #                r = 1.25 -> inside the wide upper bound, unclipped (grad -1.25/6 = -0.208333)
    # row 1, A = -1: r = 0.5 -> min(-0.5, -0.8) = -0.8 clipped (no grad)
    #                r = 1.5 -> min(-1.5, -1.28) = -1.5 unclipped (grad +1.5/6 = 0.25)
    #                r = 0.78 -> min(-0.78, -0.8) = -0.8 clipped (no grad)
    # loss = -(1.28 + 0.5 + 1.25 - 0.8 - 1.5 - 0.8) / 6 = 0.07 / 6 = 0.011667
    ratios = [[1.5, 0.5, 1.25], [0.5, 1.5, 0.78]]
    lp = leaf([[math.log(v) for v in row] for row in ratios])
    x = s1_inputs(lp, advantages=[1.0, -1.0], pi_old=torch.zeros(2, 3), pi_k=torch.zeros(2, 3))
    loss, _ = stage1_loss(x, Stage1Config(objective="grpo"))
    close(loss, 0.011667)
    loss.backward()
    assert lp.grad is not None
    close(lp.grad, [[0.0, -0.083333, -0.208333], [0.0, 0.25, 0.0]])
    # r outside [0.8, 1.28]: 1.5, 0.5, 0.5, 1.5, 0.78 -> 5/6, with the objective's bounds
    stats = ratio_stats(lp.detach() - x.pi_old_logprobs, x.mask, 0.2, 0.28)
    close(stats[M.RATIO_CLIP_FRAC], 0.833333)


def test_ce_counts_only_correct_responses() -> None:
    # rewards [1, 0]: only row 0 counts; mask drops its second token: loss = -(-0.5) / 1 = 0.5
    lp = leaf([[-0.5, -1.0], [-2.0, -3.0]])
    x = s1_inputs(lp, advantages=[1.0, -1.0], rewards=[1.0, 0.0], mask=[[1.0, 0.0], [1.0, 1.0]])
    loss, _ = stage1_loss(x, Stage1Config(objective="ce"))
    close(loss, 0.5)
    loss.backward()
    assert lp.grad is not None
    close(lp.grad, [[-1.0, 0.0], [0.0, 0.0]])


def test_ce_with_no_correct_response_is_zero() -> None:
    x = s1_inputs(leaf([[-0.5, -1.0]]), advantages=[0.0], rewards=[0.0])
    loss, _ = stage1_loss(x, Stage1Config(objective="ce"))
    assert loss.item() == 0.0


def test_ce_weighted_by_hand() -> None:
    # -(1*(-0.5) + 1*(-1) + (-0.5)(-2) + (-0.5)(-3)) / 4 = -(-1.5 + 2.5) / 4 = -0.25
    lp = leaf([[-0.5, -1.0], [-2.0, -3.0]])
    x = s1_inputs(lp, advantages=[1.0, -0.5])
    loss, _ = stage1_loss(x, Stage1Config(objective="ce_weighted"))
    close(loss, -0.25)
    loss.backward()
    assert lp.grad is not None
    close(lp.grad, [[-0.25, -0.25], [0.125, 0.125]])  # -A / 4


def test_mse_by_hand() -> None:
    # log pi - log ref on the mask: row 0 (0.5 + 0) = 0.5, row 1 (-1; token 2 masked) = -1
    # beta 0.1: 0.05 and -0.1; minus A = [1, -0.5]: residuals -0.95, 0.4
    # loss = (0.9025 + 0.16) / 2 = 0.53125 (mean over responses, not tokens)
    lp = leaf([[-0.5, -1.0], [-2.0, -3.0]])
    pi_k = t([[-1.0, -1.0], [-1.0, -1.0]])
    x = s1_inputs(lp, advantages=[1.0, -0.5], mask=[[1.0, 1.0], [1.0, 0.0]], pi_k=pi_k)
    loss, _ = stage1_loss(x, Stage1Config(objective="mse"))
    close(loss, 0.53125)
    # d/d log pi = 2 * residual * beta / B on masked tokens: row 0 -0.095, row 1 0.04
    loss.backward()
    assert lp.grad is not None
    close(lp.grad, [[-0.095, -0.095], [0.04, 0.0]])


def test_mse_beta_is_used() -> None:
    # beta 0.5: 0.25 - 1 = -0.75 -> 0.5625; -0.5 + 0.5 = 0 -> 0; mean 0.28125
    lp = leaf([[-0.5, -1.0], [-2.0, -3.0]])
    pi_k = t([[-1.0, -1.0], [-1.0, -1.0]])
    x = s1_inputs(lp, advantages=[1.0, -0.5], mask=[[1.0, 1.0], [1.0, 0.0]], pi_k=pi_k)
    loss, _ = stage1_loss(x, Stage1Config(objective="mse", mse_beta=0.5))
    close(loss, 0.28125)


def test_mse_uses_pi_0_logprobs_when_given() -> None:
    # against pi_0 = [[-0.5, -0.5], [-2, -2]]: row 0 0 + (-0.5) = -0.5 -> -0.05 - 1 = -1.05;
    # row 1 0 (token 2 masked) -> 0 + 0.5 = 0.5; loss = (1.1025 + 0.25) / 2 = 0.67625
    lp = leaf([[-0.5, -1.0], [-2.0, -3.0]])
    x = s1_inputs(
        lp,
        advantages=[1.0, -0.5],
        mask=[[1.0, 1.0], [1.0, 0.0]],
        pi_k=t([[-1.0, -1.0], [-1.0, -1.0]]),
        pi_0=t([[-0.5, -0.5], [-2.0, -2.0]]),
    )
    loss, _ = stage1_loss(x, Stage1Config(objective="mse"))
    close(loss, 0.67625)


def test_kl_coef_adds_coef_times_k3() -> None:
    # one token: pi = 1/2, pi_k = 1/4, A = 1; ce_weighted = -1 * ln(1/2) = 0.693147
    # k3 = 1/2 - 1 + ln 2 = 0.193147, k1 = ln 2
    # kl_coef 0.5: 0.693147 + 0.5 * 0.193147 = 0.789721
    lp = leaf([[math.log(0.5)]])
    x = s1_inputs(lp, advantages=[1.0], pi_k=t([[math.log(0.25)]]))
    loss, metrics = stage1_loss(x, Stage1Config(objective="ce_weighted", kl_coef=0.5))
    close(loss, 0.789721)
    close(metrics[M.LOSS], 0.789721)
    close(metrics[M.KL_K3], 0.193147)
    close(metrics[M.KL_K1], 0.693147)
    # d/d log pi: -A + 0.5 * d k3 = -1 + 0.5 * (1 - rho) = -1 + 0.5 * 0.5 = -0.75
    loss.backward()
    assert lp.grad is not None
    close(lp.grad, [[-0.75]])
    # without the penalty the loss is the objective alone, and k3 is still reported
    loss0, metrics0 = stage1_loss(
        s1_inputs(leaf([[math.log(0.5)]]), advantages=[1.0], pi_k=t([[math.log(0.25)]])),
        Stage1Config(objective="ce_weighted"),
    )
    close(loss0, 0.693147)
    close(metrics0[M.KL_K3], 0.193147)


# --- stage 2 --------------------------------------------------------------------------------
DELTA = t([[1.0, -1.0, 100.0], [2.0, 0.0, -50.0]])
DMASK = t([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])


@pytest.mark.parametrize("signal", ["logratio", "contrast"])
def test_teacher_signal_logratio_has_unit_std_on_the_mask(signal: str) -> None:
    # masked deltas [1, -1, 2, 0]: mean 0.5, population var (0.25+2.25+2.25+0.25)/4 = 1.25,
    # std 1.118034 -> a = delta / 1.118034 = [0.894427, -0.894427, 1.788854, 0]
    a = teacher_signal(signal, DELTA, t([1.0, -1.0]), DMASK)
    close(a, [[0.894427, -0.894427, 0.0], [1.788854, 0.0, 0.0]])
    on = a[DMASK.bool()]
    close(on.std(unbiased=False), 1.0)


def test_teacher_signal_sign() -> None:
    a = teacher_signal("sign", DELTA, t([1.0, -1.0]), DMASK)
    assert torch.equal(a, t([[1.0, -1.0, 0.0], [1.0, 0.0, 0.0]]))


def test_teacher_signal_gated_advantage() -> None:
    # c = 0.2 -> weights clipped to [0.8, 1.2]
    # row 0, A = +1: exp(0.1) = 1.105171 -> 1.105171; exp(-0.5) = 0.606531 -> 0.8; exp(0) -> 1
    # row 1, A = -2: exp(-0.1) = 0.904837 -> -1.809675; exp(0.5) = 1.648721 -> 1.2 -> -2.4;
    #                masked -> 0
    # row 2, A = 0: a = 0 whatever delta
    delta = t([[0.1, -0.5, 0.0], [0.1, -0.5, 3.0], [5.0, -5.0, 1.0]])
    mask = t([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    a = teacher_signal("gated_advantage", delta, t([1.0, -2.0, 0.0]), mask)
    close(
        a,
        [[1.105171, 0.8, 1.0], [-1.809675, -2.4, 0.0], [0.0, 0.0, 0.0]],
    )
    assert (a[0] > 0).all() and (a[1, :2] < 0).all()  # a weak teacher cannot flip the sign


def test_teacher_signal_gated_advantage_custom_c() -> None:
    # c = 0.5 -> [0.5, 1.5]: exp(-0.5) = 0.606531 survives, exp(1) = 2.718 -> 1.5
    a = teacher_signal("gated_advantage", t([[-0.5, 1.0]]), t([1.0]), t([[1.0, 1.0]]), gate_c=0.5)
    close(a, [[0.606531, 1.5]])


def test_teacher_signal_advantage_broadcasts() -> None:
    a = teacher_signal("advantage", DELTA, t([0.5, -1.0]), DMASK)
    assert torch.equal(a, t([[0.5, 0.5, 0.0], [-1.0, -1.0, 0.0]]))


def test_teacher_signal_unknown_name() -> None:
    with pytest.raises(ValueError, match="unknown stage-2 signal"):
        teacher_signal("nope", DELTA, t([1.0, 1.0]), DMASK)


@pytest.mark.parametrize("signal", ["logratio", "contrast", "sign", "gated_advantage", "advantage"])
def test_teacher_signal_is_zero_outside_the_mask(signal: str) -> None:
    a = teacher_signal(signal, DELTA, t([1.0, -1.0]), DMASK)
    assert (a[~DMASK.bool()] == 0).all()


def test_combine_signals_normalises_weights() -> None:
    s1, s2 = t([1.0, 0.0]), t([0.0, 4.0])
    close(combine_signals([s1, s2]), [0.5, 2.0])  # 1/2 each
    close(combine_signals([s1, s2], [1.0, 3.0]), [0.25, 3.0])  # 1/4, 3/4
    close(combine_signals([s1, s2], [2.0, 6.0]), [0.25, 3.0])  # same after normalising
    close(combine_signals([s2]), [0.0, 4.0])
    with pytest.raises(ValueError):
        combine_signals([])


def test_region_score_one_teacher_is_standardised_abs_delta() -> None:
    # masked deltas [1, -2, 4]: mean 1, var (0 + 9 + 9)/3 = 6, std 2.449490
    # score = |delta| / 2.449490 = [0.408248, 0.816497, 1.632993]; masked token -> 0
    d = t([[1.0, -2.0], [4.0, 9.0]])
    mask = t([[1.0, 1.0], [1.0, 0.0]])
    close(region_score([d], mask, None), [[0.408248, 0.816497], [1.632993, 0.0]])


def test_region_score_disagreeing_teachers_cancel() -> None:
    # standardised deltas [1, -1] and [-1, 1] (each std 1): combined 0 -> nothing is extreme
    mask = torch.ones(1, 2)
    close(region_score([t([[1.0, -1.0]]), t([[-1.0, 1.0]])], mask, None), [[0.0, 0.0]])


def test_region_score_two_teachers_scale_free() -> None:
    # teacher 2 masked deltas [2, 0, 0]: mean 2/3, var 24/27, std 0.942809 -> [2.121320, 0, 0]
    # equal weights: [(0.408248 + 2.121320)/2, 0.816497/2, 1.632993/2]
    #              = [1.264784, 0.408248, 0.816497]
    d1 = t([[1.0, -2.0], [4.0, 9.0]])
    d2 = t([[2.0, 0.0], [0.0, 7.0]])
    mask = t([[1.0, 1.0], [1.0, 0.0]])
    expected = [[1.264784, 0.408248], [0.816497, 0.0]]
    close(region_score([d1, d2], mask, None), expected)
    # a teacher with a 100x larger log-ratio scale does not own the region
    close(region_score([d1, 100.0 * d2], mask, None), expected, atol=1e-4)
    # weights [3, 1]: 0.75 * s1 + 0.25 * s2
    close(
        region_score([d1, d2], mask, [3.0, 1.0]),
        [[0.836516, 0.612372], [1.224745, 0.0]],
    )


SCORE = t([[5.0, 1.0, 9.0, 3.0, 100.0], [2.0, 8.0, 4.0, 7.0, 6.0]])
SMASK = t([[1.0, 1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0]])


def test_select_region_top_frac_exact_count() -> None:
    # 9 valid distinct scores; top 1/3 -> 3 tokens: 9, 8, 7 (the masked 100 is never selected)
    sel = select_region(SCORE, SMASK, "top_frac", top_frac=1.0 / 3.0)
    assert sel.dtype == torch.bool
    expected = torch.zeros(2, 5, dtype=torch.bool)
    expected[0, 2] = expected[1, 1] = expected[1, 3] = True
    assert torch.equal(sel, expected)


def test_select_region_top_frac_edges() -> None:
    # top_frac 1 keeps every valid token; a tiny top_frac keeps at least one (the max, 9)
    assert torch.equal(select_region(SCORE, SMASK, "top_frac", top_frac=1.0), SMASK.bool())
    tiny = select_region(SCORE, SMASK, "top_frac", top_frac=1e-6)
    assert tiny.sum().item() == 1 and tiny[0, 2]
    # an empty mask selects nothing
    none = select_region(SCORE, torch.zeros(2, 5), "top_frac", top_frac=0.5)
    assert not none.any()


def test_select_region_top_frac_keeps_ties() -> None:
    # k = round(0.25 * 4) = 1, the cut-off 3 is shared by three tokens: all three are kept
    sel = select_region(t([[3.0, 3.0, 1.0, 3.0]]), torch.ones(1, 4), "top_frac", top_frac=0.25)
    assert sel.tolist() == [[True, True, False, True]]


def test_select_region_top_frac_rounds_half_up() -> None:
    # 0.5 of 5 valid tokens = 2.5 -> 3 kept (half up, not Python's round-half-to-even 2)
    sel = select_region(t([[1.0, 2.0, 3.0, 4.0, 5.0]]), torch.ones(1, 5), "top_frac", top_frac=0.5)
    assert sel.tolist() == [[False, False, True, True, True]]


def test_select_region_threshold() -> None:
    # score > 4.5 on the mask: 5, 9, 8, 7, 6 (not the masked 100, not 4.5 itself)
    score = SCORE.clone()
    score[1, 2] = 4.5
    sel = select_region(score, SMASK, "threshold", threshold=4.5)
    assert sel.tolist() == [
        [True, False, True, False, False],
        [False, True, False, True, True],
    ]
    with pytest.raises(ValueError, match="threshold"):
        select_region(SCORE, SMASK, "threshold")


def test_select_region_all_and_unknown() -> None:
    assert torch.equal(select_region(SCORE, SMASK, "all"), SMASK.bool())
    with pytest.raises(ValueError, match="unknown region"):
        select_region(SCORE, SMASK, "middle")


def test_stage2_loss_by_hand() -> None:
    # clip_eps 0.2 -> [0.8, 1.2]; kl_coef 0.1; 4 tokens, old = 0 on tokens 0-2
    # t0: r = 1.5, a = 1  -> min(1.5, 1.2) = 1.2 (clipped: no policy grad)
    # t1: r = 0.5, a = -1 -> min(-0.5, -0.8) = -0.8 (clipped: no policy grad)
    # t2: r = 1.1, a = 2  -> 2.2 (grad -a r / 4 = -0.55)
    # t3: r = 1, a = 0 (unselected): only KL. pi = 1/2, pi_k = 1/4 -> k3 = 0.193147,
    #     d k3 / d log pi = 1 - rho = 0.5 -> grad 0.1 * 0.5 / 4 = 0.0125
    # tokens 0-2 have ref = pi: k3 = 0 and zero KL gradient
    # policy = -(1.2 - 0.8 + 2.2 + 0) / 4 = -0.65; loss = -0.65 + 0.1 * 0.193147 / 4 = -0.645171
    values = [math.log(1.5), math.log(0.5), math.log(1.1), math.log(0.5)]
    lp = torch.tensor([values], requires_grad=True)
    x = Stage2Inputs(
        logprobs=lp,
        pi_old_logprobs=t([[0.0, 0.0, 0.0, math.log(0.5)]]),
        pi_k_logprobs=t([[*values[:3], math.log(0.25)]]),
        signal=t([[1.0, -1.0, 2.0, 0.0]]),
        mask=torch.ones(1, 4),
    )
    loss, metrics = stage2_loss(x, Stage2Config(clip_eps=0.2, kl_coef=0.1))
    close(loss, -0.645171)
    loss.backward()
    assert lp.grad is not None
    close(lp.grad, [[0.0, 0.0, -0.55, 0.0125]])
    assert set(metrics) == STAGE1_METRIC_KEYS
    close(metrics[M.LOSS], -0.645171)
    close(metrics[M.KL_K3], 0.193147 / 4)
    close(metrics[M.KL_K1], 0.693147 / 4)
    stats = ratio_stats(lp.detach() - x.pi_old_logprobs, x.mask, 0.2, 0.2)
    close(stats[M.RATIO_CLIP_FRAC], 0.5)  # 1.5 and 0.5 are outside [0.8, 1.2]


def test_stage2_loss_masked_tokens_do_nothing() -> None:
    lp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    x = Stage2Inputs(
        logprobs=lp,
        pi_old_logprobs=t([[-1.0, -1.0]]),
        pi_k_logprobs=t([[-1.0, -5.0]]),
        signal=t([[0.0, 3.0]]),
        mask=t([[1.0, 0.0]]),
    )
    loss, _ = stage2_loss(x, Stage2Config())
    assert loss.item() == 0.0
    loss.backward()
    assert lp.grad is not None and lp.grad.abs().sum().item() == 0.0


def test_supervised_loss_by_hand() -> None:
    # p(target 2) = 1/2 -> 0.693147; p(target 0) = 1/4 -> 1.386294 masked out
    logits = t([[[0.0, 0.0, LN2], [0.0, 0.0, LN2]]])
    loss = supervised_loss(logits, torch.tensor([[2, 0]]), t([[1.0, 0.0]]))
    close(loss, 0.693147)


@pytest.mark.parametrize("objective", ["sapo", "grpo", "ce", "ce_weighted", "mse"])
def test_micro_batches_sum_to_the_minibatch_loss_and_gradient(objective: str) -> None:
    """Gradient accumulation is exact: halves normalised by the whole minibatch's counts add
    up to the whole, for every objective (token means, correct-token mean, response mean)."""
    torch.manual_seed(0)
    logits = torch.randn(4, 3, requires_grad=True)  # stands in for log pi_theta
    mask = t([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    old = torch.randn(4, 3) * 0.1
    fields = {
        "pi_old_logprobs": old,
        "pi_k_logprobs": old * 0.5,
        "mask": mask,
        "advantages": t([1.0, -1.0, 0.5, -0.5]),
        "rewards": t([1.0, 0.0, 1.0, 0.0]),
    }
    cfg = Stage1Config(objective=objective, kl_coef=0.1)  # type: ignore[arg-type]
    whole, _ = stage1_loss(Stage1Inputs(logprobs=logits, **fields), cfg)
    (grad_whole,) = torch.autograd.grad(whole, logits)
    norm = Normaliser.of(mask, fields["rewards"])
    total = torch.zeros(())
    for rows in (slice(0, 1), slice(1, 4)):
        part = {k: v[rows] for k, v in fields.items()}
        loss, _ = stage1_loss(Stage1Inputs(logprobs=logits[rows], norm=norm, **part), cfg)
        total = total + loss
    (grad_parts,) = torch.autograd.grad(total, logits)
    close(total, whole.item(), atol=1e-6)
    torch.testing.assert_close(grad_parts, grad_whole, rtol=0, atol=1e-6)
