"""Base pretraining says when it falls short of its target, and resumes like a stage."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from erpd import metrics as M
from erpd.checkpoint import latest_resume, read_manifest
from erpd.config import BaseTrainConfig, TinyModelConfig
from erpd.errors import StopRequestedError
from erpd.pretrain import pretrain_base, stop_check_problems
from erpd.progress import no_progress
from erpd.stage import StageEnv
from tests.conftest import tiny_pipeline_config

SHAPE = TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
# a target no 8-step base reaches: the run ends at max_steps
CFG = BaseTrainConfig(target_acc=0.99, min_steps=1, max_steps=8, eval_every=4, eval_size=10)


def env() -> StageEnv:
    cfg = tiny_pipeline_config(eval={"size": 10, "pass_k": 0, "sampled": False})
    return StageEnv.of(cfg, M.NullSink(), progress=no_progress)


def test_a_base_short_of_its_target_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="erpd.pretrain"):
        done = pretrain_base(shape=SHAPE, cfg=CFG, env=env(), out_dir=tmp_path)
    assert done.checkpoint is not None and done.steps == CFG.max_steps
    [line] = [r.getMessage() for r in caplog.records if r.name == "erpd.pretrain"]
    assert "below base.target_acc=0.99" in line and "base.max_steps=8" in line, line
    assert read_manifest(done.checkpoint)["target_reached"] is False
    assert not (tmp_path / "resume").exists()  # the finished base keeps no resume point


def test_a_stopped_base_resumes_to_the_same_weights(tmp_path: Path) -> None:
    whole = pretrain_base(shape=SHAPE, cfg=CFG, env=env(), out_dir=tmp_path / "whole")
    stopped = env()
    calls = {"n": 0}

    def stop_at_step_four() -> bool:
        calls["n"] += 1
        return calls["n"] == 4  # checked before step 4: steps 1-3 are done

    stopped.should_stop = stop_at_step_four
    with pytest.raises(StopRequestedError, match="saved at step 3"):
        pretrain_base(shape=SHAPE, cfg=CFG, env=stopped, out_dir=tmp_path / "cut")
    point = latest_resume(tmp_path / "cut")
    assert point is not None and point.name == "step-00000003"
    stopped.should_stop = None
    resumed = pretrain_base(shape=SHAPE, cfg=CFG, env=stopped, out_dir=tmp_path / "cut")
    assert resumed.checkpoint is not None and whole.checkpoint is not None
    a = load_file(str(whole.checkpoint / "model.safetensors"))
    b = load_file(str(resumed.checkpoint / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


def _pairs() -> list[tuple[int, int]]:
    return [(a, b) for a in range(20) for b in range(10)]


class Points:
    """The base's metric points, as a sink receives them."""

    def __init__(self) -> None:
        self.points: list[tuple[int, dict[str, float]]] = []

    def log(self, run: str, step: int, values: dict[str, float]) -> None:
        self.points.append((step, dict(values)))

    def close(self) -> None:
        pass


def test_the_stop_check_reads_the_validation_split_never_the_eval_split(tmp_path: Path) -> None:
    """Every training row (so every validation row) answers 5 and every eval row answers 7: a
    base that learns to say 5 passes a check on validation rows at once and never one on eval
    rows, so it stops early only if the check reads the validation split."""
    train = tmp_path / "fives.jsonl"
    train.write_text("".join(f'{{"prompt": "{a}+{b}=", "answer": "5"}}\n' for a, b in _pairs()))
    held_out = tmp_path / "sevens.jsonl"
    held_out.write_text(
        "".join(f'{{"prompt": "{a}*{b}=", "answer": "7"}}\n' for a in range(10) for b in range(10))
    )
    task = {
        "kind": "jsonl",
        "max_new_tokens": 2,
        "jsonl": {"train_path": str(train), "eval_path": str(held_out), "validation_size": 40},
    }
    cfg = tiny_pipeline_config(task=task, eval={"size": 50, "pass_k": 0, "sampled": False})
    points = Points()
    stage_env = StageEnv.of(cfg, points, progress=no_progress)
    base = BaseTrainConfig(
        target_acc=0.9, min_steps=1, max_steps=60, eval_every=5, eval_size=40, lr=3e-3
    )
    assert stop_check_problems(stage_env, base) == stage_env.task.validation_problems()
    done = pretrain_base(shape=SHAPE, cfg=base, env=stage_env, out_dir=tmp_path / "base")
    checks = [(s, v[M.BASE_ACC_CHECK]) for s, v in points.points if M.BASE_ACC_CHECK in v]
    assert done.steps < base.max_steps, checks  # stopped on the check, not by running out
    assert checks[-1] == (done.steps, pytest.approx(1.0, abs=0.1))
    assert done.checkpoint is not None
    assert read_manifest(done.checkpoint)["target_reached"] is True
    assert done.summary[M.ACC_EVAL] == 0.0  # the reported split: never a 7


def test_the_arithmetic_stop_check_reads_validation_problems_only() -> None:
    stage_env = env()
    check = stop_check_problems(stage_env, CFG)
    assert check == stage_env.task.validation_problems()[: CFG.eval_size]
    assert not {p.prompt for p in check} & {p.prompt for p in stage_env.task.eval_problems()}
