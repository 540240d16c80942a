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
from erpd.pretrain import pretrain_base
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
