"""Shared test setup: a small but real ERPD configuration, and the GPU marker's skip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from erpd.config import PipelineConfig
from erpd.models import build_char_tokenizer
from erpd.tasks import ALPHABET


def tiny_pipeline_config(**overrides: object) -> PipelineConfig:
    """A pipeline that trains for real but fits the suite's time budget (~1 minute on 2 cores)."""
    data: dict[str, object] = {
        "base": {"target_acc": 0.3, "eval_size": 100},
        "sample": {"num_prompts": 64, "group_size": 8},
        "teachers": [{"objective": "sapo", "epochs": 6, "eval_every_epochs": 3}],
        "stage2": {"epochs": 2},
        "eval": {"size": 200, "pass_k": 2},
        "runtime": {"device": "cpu"},
    }
    data.update(overrides)
    return PipelineConfig.model_validate(data)


def random_model_dir(path: Path, config_cls: type, model_cls: type, **extra: object) -> Path:
    """A randomly initialised tiny model saved as a normal HF directory (nothing downloaded)."""
    tokenizer = build_char_tokenizer(ALPHABET)
    torch.manual_seed(0)
    config = config_cls(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **extra,
    )
    model_cls(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def random_qwen3_dir(path: Path) -> Path:
    """Qwen3 with tied embeddings (as Qwen3-4B), the case resume checkpoints once broke on."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return random_model_dir(
        path, Qwen3Config, Qwen3ForCausalLM, head_dim=8, tie_word_embeddings=True
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


class ListSink:
    """Collects metric points in memory (the test's own sink, not a mock of ours)."""

    def __init__(self) -> None:
        self.points: list[tuple[str, int, str, float]] = []

    def log(self, run: str, step: int, values: dict[str, float]) -> None:
        self.points.extend((run, step, k, float(v)) for k, v in values.items())

    def close(self) -> None:
        pass

    def series(self, name: str) -> list[tuple[int, float]]:
        return [(s, v) for _, s, n, v in self.points if n == name]

    def steps(self, name: str) -> list[int]:
        return [s for s, _ in self.series(name)]
