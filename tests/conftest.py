"""Shared test setup: a small but real ERPD configuration, and the GPU marker's skip."""

from __future__ import annotations

import pytest
import torch

from erpd.config import PipelineConfig


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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
