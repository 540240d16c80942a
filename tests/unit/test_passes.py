"""Length-sorted, trimmed forward passes: less padding, the same numbers."""

from __future__ import annotations

import random

import pytest
import torch

from erpd.config import TinyModelConfig
from erpd.evaluate import policy_vs_pi_k
from erpd.losses import group_advantages
from erpd.models import build_char_tokenizer, build_tiny_model
from erpd.rollout import (
    RolloutBatch,
    Sequences,
    forward_passes,
    pack,
    response_targets,
    sequence_logprobs,
)
from erpd.step import PiKLogSoftmax
from erpd.tasks import ALPHABET

TOKENIZER = build_char_tokenizer(ALPHABET)
PAD, EOS = int(TOKENIZER.pad_token_id), int(TOKENIZER.eos_token_id)


def uneven_batch(rows: int = 24, seed: int = 0) -> Sequences:
    """Prompts of 3-9 tokens, responses of 1-30 (some ending in EOS): plenty of padding."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, 17) for _ in range(rng.randint(3, 9))] for _ in range(rows)]
    responses = []
    for _ in range(rows):
        body = [rng.randrange(3, 17) for _ in range(rng.randint(1, 30))]
        responses.append([*body, EOS] if rng.random() < 0.5 else body)
    return pack(prompts, responses, PAD, EOS)


def padded_size(seqs: Sequences) -> int:
    return seqs.input_ids.numel()


def test_passes_cover_every_row_once_within_their_budgets() -> None:
    seqs = uneven_batch()
    index = torch.randperm(24, generator=torch.Generator().manual_seed(1))[:20]
    passes = forward_passes(seqs, index, max_rows=6, max_tokens=200)
    rows = torch.cat([r for r, _ in passes])
    assert sorted(rows.tolist()) == sorted(index.tolist())
    for rows, part in passes:
        assert len(rows) <= 6
        assert padded_size(part) <= 200 or len(rows) == 1
        # the pass is its own rows, trimmed: same tokens where the rows have them
        assert torch.equal(part.response_mask.sum(1), seqs.response_mask[rows].sum(1))
        assert torch.equal(part.attention_mask.sum(1), seqs.attention_mask[rows].sum(1))
        width = part.response_mask.shape[1]
        assert torch.equal(response_targets(part), response_targets(seqs.rows(rows))[:, :width])
    # sorting by length is what saves the padding
    whole = sum(len(r) for r, _ in passes) * seqs.input_ids.shape[1]
    assert sum(padded_size(p) for _, p in passes) < 0.8 * whole


def test_a_row_longer_than_the_budget_gets_a_pass_of_its_own() -> None:
    seqs = uneven_batch()
    passes = forward_passes(seqs, max_tokens=8)
    assert len(passes) == 24 and all(len(r) == 1 for r, _ in passes)


def test_trimmed_passes_give_the_full_width_log_probs() -> None:
    torch.manual_seed(0)
    model = build_tiny_model(TOKENIZER, TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2))
    model.eval()
    seqs = uneven_batch()
    whole = sequence_logprobs(model, seqs, batch_size=24, max_tokens=10**9)
    split = sequence_logprobs(model, seqs, batch_size=5, max_tokens=120)
    assert whole.shape == split.shape == seqs.response_mask.shape
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-5)
    assert torch.all(split[seqs.response_mask == 0] == 0)

    pi_k = build_tiny_model(TOKENIZER, TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2))
    a = policy_vs_pi_k(model, pi_k, seqs, batch_size=24, max_tokens=10**9)
    b = policy_vs_pi_k(model, pi_k, seqs, batch_size=3, max_tokens=64)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-4, msg=key)


@pytest.mark.parametrize("budget", [None, 50])
def test_passes_of_an_unpadded_batch_keep_every_column(budget: int | None) -> None:
    seqs = pack([[4, 5, 6]] * 4, [[7, 8, EOS]] * 4, PAD, EOS)
    for _, part in forward_passes(seqs, max_tokens=budget):
        assert part.input_ids.shape[1] == seqs.input_ids.shape[1]
        assert part.prompt_len == seqs.prompt_len


def test_cached_pi_k_log_probs_match_a_forward_pass_of_pi_k() -> None:
    torch.manual_seed(0)
    pi_k = build_tiny_model(TOKENIZER, TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2))
    seqs = uneven_batch()
    rewards = torch.tensor([float(i % 2) for i in range(24)])
    batch = RolloutBatch(
        seqs=seqs,
        pi_k_logprobs=sequence_logprobs(pi_k, seqs),
        rewards=rewards,
        advantages=group_advantages(rewards, 4),
        group_size=4,
        problems=[],
        responses=[],
    )
    passes = {"bf16": False, "forward_batch_size": 8, "micro_batch_tokens": 64}
    cached = PiKLogSoftmax(pi_k, batch, **passes)  # type: ignore[arg-type]
    recomputed = PiKLogSoftmax(pi_k, batch, **passes, budget=0)  # type: ignore[arg-type]
    assert cached.cached and not recomputed.cached
    index = torch.tensor([3, 17, 5, 0, 22, 9])
    for rows, part in forward_passes(seqs, index, max_tokens=90):
        keep = part.response_mask.bool()
        a, b = cached(rows, part), recomputed(rows, part)
        assert a.shape == b.shape == (*keep.shape, len(TOKENIZER))
        torch.testing.assert_close(a[keep], b[keep], rtol=1e-5, atol=1e-5)
