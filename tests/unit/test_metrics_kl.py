"""What each KL metric estimates, checked against the code that computes it.

On a small categorical pair (p = pi_k, q = pi_theta over 6 tokens) the exact expectation of each
estimator of `erpd.losses` under the distribution its metric samples from is computed by
enumeration (no Monte Carlo) and compared with the closed form the catalogue states; each also
differs from the other direction's KL, so a catalogue that named the wrong direction would fail.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from erpd import metrics as M
from erpd.losses import exact_kl, kl_estimators

# pi_theta has moved mass off pi_k's likeliest tokens, as training does: KL(p || q) = 0.912,
# KL(q || p) = 0.780, chi2(p || q) - KL(p || q) = 2.924
P = torch.tensor([0.40, 0.25, 0.15, 0.10, 0.06, 0.04], dtype=torch.float64)  # pi_k
Q = torch.tensor([0.04, 0.10, 0.16, 0.20, 0.25, 0.25], dtype=torch.float64)  # pi_theta


def kl(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * (a / b).log()).sum())


def chi2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * a / b).sum() - 1.0)


def expectation(estimator: str, sampled_from: torch.Tensor) -> float:
    """E[estimator] over y ~ sampled_from, by enumeration of the six outcomes."""
    per_outcome = kl_estimators(Q.log(), P.log())[estimator]  # (log pi_theta, log pi_k)
    return float((sampled_from * per_outcome).sum())


# metric -> (estimator, whose samples, the closed form, the words its catalogue entry must say)
ON_SAMPLES: dict[str, tuple[str, torch.Tensor, Callable[[], float], tuple[str, ...]]] = {
    M.KL_K1: ("k1", P, lambda: -kl(P, Q), ("-KL(pi_k || pi_theta)", "y_t ~ pi_k")),
    M.KL_K3: (
        "k3",
        P,
        lambda: chi2(P, Q) - kl(P, Q),
        ("chi2(pi_k || pi_theta) - KL(pi_k || pi_theta)", "y_t ~ pi_k"),
    ),
    M.KL_K3_BATCH: (
        "k3",
        P,
        lambda: chi2(P, Q) - kl(P, Q),
        ("chi2(pi_k || pi_theta) - KL(pi_k || pi_theta)", "y_t ~ pi_k"),
    ),
    # the sequence estimator is k3 of a log-ratio of whole responses, drawn from pi_theta: a
    # six-outcome response space is the same computation
    M.KL_SEQ_K3: ("k3", Q, lambda: kl(Q, P), ("KL(pi_theta || pi_k)", "y ~ pi_theta")),
}


def catalogue_text(name: str) -> str:
    info = M.CATALOGUE[name]
    return f"{info.estimator} {info.aggregation} {info.description}"


def test_the_pair_is_far_enough_apart_to_tell_the_directions_apart() -> None:
    assert abs(kl(P, Q) - kl(Q, P)) > 0.05
    assert abs(chi2(P, Q) - kl(P, Q) - kl(Q, P)) > 0.05


@pytest.mark.parametrize("name", sorted(ON_SAMPLES))
def test_each_sampled_kl_metric_estimates_what_its_catalogue_entry_says(name: str) -> None:
    estimator, sampled_from, closed_form, words = ON_SAMPLES[name]
    for phrase in words:
        assert phrase in catalogue_text(name), (name, phrase)
    value = expectation(estimator, sampled_from)
    assert value == pytest.approx(closed_form(), abs=1e-12)
    # and not the other direction, nor the headline reverse KL unless that is what it says
    if sampled_from is P:
        assert not math.isclose(value, kl(Q, P), abs_tol=1e-3)
        assert not math.isclose(value, -kl(Q, P), abs_tol=1e-3)
    else:
        assert not math.isclose(value, kl(P, Q), abs_tol=1e-3)


def test_the_same_estimator_on_the_other_samples_is_another_quantity() -> None:
    # k3 is unbiased for KL(pi_theta || pi_k) only on pi_theta's samples; on pi_k's (the fixed
    # batch) it is chi2 - KL of the forward direction, heavy-tailed where pi_theta is small
    assert expectation("k3", Q) == pytest.approx(kl(Q, P), abs=1e-12)
    assert expectation("k3", P) > 3 * kl(Q, P)
    # k1 on pi_theta's samples would be KL(pi_theta || pi_k); on pi_k's it is negative
    assert expectation("k1", Q) == pytest.approx(kl(Q, P), abs=1e-12)
    assert expectation("k1", P) < 0


@pytest.mark.parametrize("name", [M.KL_EXACT, M.KL_EXACT_BATCH])
def test_the_exact_kl_is_reverse_kl_over_the_vocabulary(name: str) -> None:
    # kl/exact compares pi_theta's full distribution with pi_k's at each context: nothing is
    # sampled at the token, and the direction is KL(pi_theta || pi_k)
    value = exact_kl(Q.log().view(1, 1, -1), P.log().view(1, 1, -1)).item()  # in float32
    assert value == pytest.approx(kl(Q, P), abs=1e-6)
    assert not math.isclose(value, kl(P, Q), abs_tol=1e-3)
    text = catalogue_text(name)
    assert "KL(pi_theta || pi_k)" in text and "pi_k's" in text  # whose contexts
