"""CUDA placement and bf16 autocast (run with `make test-gpu` on a GPU machine)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from erpd import metrics as M
from erpd.config import PipelineConfig
from erpd.models import load_policy, resolve_device, use_bf16
from erpd.pipeline import run_pipeline
from erpd.rollout import sample_rollout, sequence_logprobs

pytestmark = pytest.mark.gpu


def _config() -> PipelineConfig:
    return PipelineConfig.model_validate(
        {
            "base": {"target_acc": 0.3, "eval_size": 100},
            "sample": {"num_prompts": 64, "group_size": 8},
            "teachers": [{"objective": "sapo", "epochs": 4, "eval_every_epochs": 2}],
            "stage2": {"epochs": 2},
            "eval": {"size": 200, "pass_k": 2},
            "runtime": {"device": "cuda", "precision": "auto"},
        }
    )


def test_auto_precision_is_bf16_on_cuda() -> None:
    device = resolve_device("auto")
    assert device.type == "cuda"
    assert use_bf16(device, "auto") and not use_bf16(torch.device("cpu"), "auto")


def test_pipeline_on_cuda_with_bf16(tmp_path: Path) -> None:
    res = run_pipeline(_config(), tmp_path)
    assert res.status == "completed"
    points = M.read_jsonl(res.metrics)
    for p in points:
        if str(p["name"]).startswith(("kl/", "entropy/", "loss")):
            assert p["value"] is not None and math.isfinite(float(p["value"])), p  # type: ignore[arg-type]
    model, _ = load_policy(res.student, "cuda")
    assert next(model.parameters()).device.type == "cuda"
    assert next(model.parameters()).dtype == torch.float32  # master weights stay fp32


def test_bf16_pi_k_logprobs_are_reproducible() -> None:
    """The first ratio is 1 only if the trainer's bf16 pass matches the sampler's recompute."""
    from erpd.config import TinyModelConfig
    from erpd.models import build_char_tokenizer, build_tiny_model
    from erpd.tasks import ALPHABET, build_task

    tokenizer = build_char_tokenizer(ALPHABET)
    torch.manual_seed(0)
    model = build_tiny_model(tokenizer, TinyModelConfig()).to("cuda")
    task = build_task(_config().task)
    cfg = _config().sample.model_copy(update={"num_prompts": 16})
    batch = sample_rollout(
        model, tokenizer, task, cfg, max_new_tokens=task.max_new_tokens, bf16=True
    )
    again = sequence_logprobs(model, batch.seqs, bf16=True)
    torch.testing.assert_close(again, batch.pi_k_logprobs, rtol=0, atol=1e-6)
