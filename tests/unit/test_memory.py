"""The memory estimate a stage makes before it loads anything."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import Qwen3Config

from erpd.config import TinyModelConfig
from erpd.errors import ConfigError
from erpd.memory import GIB, check_fits, count_parameters, estimate
from erpd.models import build_char_tokenizer, build_tiny_model
from erpd.models import count_parameters as counted
from erpd.tasks import ALPHABET


def qwen3(hidden: int, layers: int, vocab: int = 151_936) -> Qwen3Config:
    return Qwen3Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 128,
        num_key_value_heads=max(1, hidden // 512),
        head_dim=128,
        tie_word_embeddings=False,
    )


def test_parameters_are_counted_without_allocating_them() -> None:
    model = build_tiny_model(build_char_tokenizer(ALPHABET), TinyModelConfig())
    assert count_parameters(model.config) == counted(model)


def test_the_parts_add_up_and_scale_as_they_should() -> None:
    config = qwen3(1024, 8)
    one = estimate(config, pass_tokens=4096, bf16=True, params=500_000_000)
    # fp32 master weights, gradients, two AdamW moments and the frozen pi_k: 20 bytes a parameter
    assert one.weights + one.gradients + one.optimizer + one.pi_k == 20 * 500_000_000
    assert one.total == 20 * 500_000_000 + one.activations
    # activations grow with the pass, and the logits of a 150k vocabulary dominate them
    longer = estimate(config, pass_tokens=8192, bf16=True, params=500_000_000)
    assert longer.activations == 2 * one.activations
    assert one.activations > 4096 * 151_936 * 8
    # sharding divides the states, not a device's own activations
    sharded = estimate(config, pass_tokens=4096, bf16=True, params=500_000_000, devices=4)
    assert sharded.weights == one.weights // 4 and sharded.activations == one.activations
    assert "sharded over 4" in sharded.describe() and "GiB" in sharded.describe()
    fp32 = estimate(config, pass_tokens=4096, bf16=False, params=500_000_000)
    assert fp32.activations > one.activations
    # recomputing layers in backward keeps one tensor per layer instead of ~34
    recomputed = estimate(
        config, pass_tokens=4096, bf16=True, params=500_000_000, gradient_checkpointing=True
    )
    logits = 4096 * 151_936 * 14
    assert recomputed.activations - logits < (one.activations - logits) / 4


def test_a_stage_that_cannot_fit_is_refused_before_loading(tmp_path: Path) -> None:
    qwen3(2048, 4).save_pretrained(tmp_path)  # a config only: no weights are ever made
    found = check_fits(
        tmp_path, device=torch.device("cpu"), pass_tokens=1024, bf16=True, available=1000 * GIB
    )
    assert found.total < 1000 * GIB
    with pytest.raises(ConfigError) as refused:
        check_fits(
            tmp_path, device=torch.device("cpu"), pass_tokens=32768, bf16=True, available=GIB
        )
    assert refused.value.field == "runtime"
    assert "micro_batch_tokens" in str(refused.value) and "1.0 GiB is available" in str(
        refused.value
    )
