"""Stages on two gloo ranks under torchrun (FSDP2) against the same stage in one process.

The base is a random Qwen3 with tied embeddings (the case sharded checkpoints must handle);
the fixed batch is sampled from it and rewarded by response parity, so every group has
non-zero advantages and the weights move. Both runs read the same base, batch and config;
the sharded one must log the same per-step metrics and end at the same weights, up to the
float error of summing the ranks' gradients in another order.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from erpd import metrics as M
from erpd.checkpoint import verify_checkpoint
from erpd.config import SampleConfig, TaskSpec
from erpd.losses import group_advantages
from erpd.models import load_policy
from erpd.rollout import sample_rollout
from erpd.tasks import build_task
from tests.conftest import random_qwen3_dir

CONFIG = {
    "task": {"max_new_tokens": 8},
    # 20-row minibatches in passes of 4 rows: 5 passes, so one rank also runs a filler pass
    "teachers": [
        {
            "objective": "sapo",
            "epochs": 3,
            "minibatch_size": 20,
            "micro_batch_size": 4,
            "checkpoint_every_steps": 2,
            "checkpoint_keep": 2,  # the resume test drops the newest and resumes the one before
            "eval_every_epochs": 1,
        }
    ],
    "stage2": {"epochs": 2, "minibatch_size": 20, "micro_batch_size": 4},
    "eval": {"size": 8, "pass_k": 0},
    "runtime": {"device": "cpu"},
}


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_work(tmp_path_factory.mktemp("distributed"), CONFIG)


def make_work(root: Path, config: dict[str, object]) -> Path:
    """A random tied Qwen3 base, a parity-rewarded fixed batch from it, and `config`."""
    base = random_qwen3_dir(root / "base")
    model, tokenizer = load_policy(base)
    batch = sample_rollout(
        model,
        tokenizer,
        build_task(TaskSpec()),
        SampleConfig(num_prompts=8, group_size=5),
        max_new_tokens=8,
    )
    batch.rewards = torch.tensor([float(len(r) % 2 == 0) for r in batch.responses])
    batch.advantages = group_advantages(batch.rewards, 5)
    assert batch.advantages.abs().sum() > 0
    batch.save(root / "batch")
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    return root


def erpd(work: Path, ranks: int, *args: str) -> None:
    """`erpd ARGS` in one process, or under torchrun on `ranks` gloo processes."""
    launch = [sys.executable, "-m", "erpd.cli"]
    if ranks > 1:
        launch = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={ranks}",
            "-m",
            "erpd.cli",
        ]
    common = ["--model", str(work / "base"), "--batch", str(work / "batch")]
    proc = subprocess.run(
        [*launch, *args, *common, "--config", str(work / "config.yaml")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def metrics(out: Path) -> dict[tuple[str, int, str], float]:
    points = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        p = json.loads(line)
        if not p["name"].startswith("perf/") and p["value"] is not None:
            points[(p["run"], p["step"], p["name"])] = p["value"]
    return points


def assert_same_run(one: Path, two: Path, rel: float = 1e-3, abs: float = 1e-6) -> None:
    a, b = metrics(one), metrics(two)
    assert a.keys() == b.keys()
    for key in a:
        assert b[key] == pytest.approx(a[key], rel=rel, abs=abs), key


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    verify_checkpoint(checkpoint)
    return load_file(str(checkpoint / "model.safetensors"))


def assert_same_weights(one: Path, two: Path, atol: float = 1e-6) -> None:
    a, b = weights(one), weights(two)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=atol), name


@pytest.fixture(scope="module")
def teachers(work: Path) -> tuple[Path, Path]:
    """Stage 1 in one process and on two ranks: (single, sharded) output dirs."""
    single, sharded = work / "single-1", work / "sharded-1"
    erpd(work, 1, "stage1", "--out", str(single))
    erpd(work, 2, "stage1", "--out", str(sharded))
    return single, sharded


def test_stage1_on_two_ranks_logs_and_ends_like_one_process(teachers: tuple[Path, Path]) -> None:
    single, sharded = teachers
    assert_same_run(single, sharded)
    assert_same_weights(
        single / "teacher-sapo" / "checkpoint", sharded / "teacher-sapo" / "checkpoint"
    )
    base = weights(single / "teacher-sapo" / "checkpoint")
    assert any(v.abs().sum() > 0 for v in base.values())


def test_sharded_stage_exports_one_merged_checkpoint(teachers: tuple[Path, Path]) -> None:
    checkpoint = teachers[1] / "teacher-sapo" / "checkpoint"
    files = sorted(p.name for p in checkpoint.iterdir())
    assert "model.safetensors" in files and not [f for f in files if "shard" in f], files
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    assert model.config.tie_word_embeddings
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    # resume points of the sharded run are DCP shards in safetensors, never pickles
    resume = sorted((teachers[1] / "teacher-sapo" / "resume").glob("step-*"))
    assert resume and all((r / "shards").is_dir() for r in resume)
    assert not [p for r in resume for p in r.rglob("*") if p.suffix in {".pt", ".bin", ".pkl"}]
    assert not [p for r in resume for p in r.rglob(".metadata")]


@pytest.mark.parametrize("ranks", [2, 1])
def test_a_sharded_resume_point_continues_to_the_same_weights(
    work: Path, teachers: tuple[Path, Path], ranks: int
) -> None:
    """Lose the end of the two-rank run (final checkpoint and last resume point), then resume
    it from step 4 on two ranks, or on one process (DCP reshards)."""
    sharded = teachers[1]
    resumed = work / f"resumed-{ranks}"
    shutil.copytree(sharded, resumed)
    run = resumed / "teacher-sapo"
    shutil.rmtree(run / "checkpoint")
    last = sorted((run / "resume").glob("step-*"))[-1]
    assert last.name == "step-00000006"
    shutil.rmtree(last)
    (resumed / "metrics.jsonl").unlink()
    erpd(work, ranks, "stage1", "--out", str(resumed))
    steps = {step for (_, step, name) in metrics(resumed) if name == M.LOSS}
    assert steps == {4, 5}  # continued from the resume point, not from the start
    atol = 0.0 if ranks == 2 else 1e-6  # the same ranks redo the same sums exactly
    assert_same_weights(sharded / "teacher-sapo" / "checkpoint", run / "checkpoint", atol=atol)


def test_stage2_on_two_ranks_logs_and_ends_like_one_process(
    work: Path, teachers: tuple[Path, Path]
) -> None:
    teacher = str(teachers[0] / "teacher-sapo" / "checkpoint")
    single, sharded = work / "single-2", work / "sharded-2"
    erpd(work, 1, "stage2", "--out", str(single), "--teacher", teacher)
    erpd(work, 2, "stage2", "--out", str(sharded), "--teacher", teacher)
    assert_same_run(single, sharded)
    assert_same_weights(single / "checkpoint", sharded / "checkpoint")


def test_gradient_checkpointing_on_two_ranks_gives_the_same_run(
    work: Path, teachers: tuple[Path, Path]
) -> None:
    """Recomputing layers under FSDP2 changes memory, not the update."""
    out = work / "checkpointed-1"
    erpd(work, 2, "stage1", "--out", str(out), "--set", "runtime.gradient_checkpointing=true")
    assert_same_run(teachers[0], out)
    assert_same_weights(
        teachers[0] / "teacher-sapo" / "checkpoint", out / "teacher-sapo" / "checkpoint"
    )
