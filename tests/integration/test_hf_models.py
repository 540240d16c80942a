"""Real Hugging Face architectures from local directories: Qwen3 through both stages, and the
left-padding layout giving the same tokens and log-probs as unpadded sequences."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from erpd.config import EvalConfig, SampleConfig, Stage1Config, Stage2Config, TaskSpec
from erpd.errors import CheckpointError
from erpd.models import build_char_tokenizer, load_policy
from erpd.progress import no_progress
from erpd.rollout import encode_prompts, generate, pack, sample_rollout, sequence_logprobs
from erpd.stage import StageEnv
from erpd.stage1 import run_stage1
from erpd.stage2 import run_stage2
from erpd.tasks import ALPHABET, build_task
from tests.conftest import random_model_dir, random_qwen3_dir


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Qwen3 with tied embeddings (as Qwen3-4B), the case resume checkpoints once broke on."""
    return random_qwen3_dir(tmp_path_factory.mktemp("qwen3"))


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Qwen2 (biased QKV projections)."""
    return random_model_dir(tmp_path_factory.mktemp("qwen2"), Qwen2Config, Qwen2ForCausalLM)


def _env() -> StageEnv:
    task = build_task(TaskSpec(arithmetic={"digits": 2, "terms": 3, "style": "steps"}))
    return StageEnv(
        task=task,
        eval=EvalConfig(size=16, pass_k=2),
        device=torch.device("cpu"),
        max_new_tokens=task.max_new_tokens,
        progress=no_progress,
    )


def test_qwen3_runs_one_stage1_and_one_stage2_step(qwen3_dir: Path, tmp_path: Path) -> None:
    env = _env()
    model, tokenizer = load_policy(qwen3_dir)
    batch = sample_rollout(
        model, tokenizer, env.task, SampleConfig(num_prompts=8, group_size=2), max_new_tokens=12
    )
    # random weights score nothing; give the batch one reward so advantages are non-zero
    batch.rewards[0] = 1.0
    batch.advantages = torch.zeros_like(batch.rewards)
    batch.advantages[0], batch.advantages[1] = 1.0, -1.0
    one_step = {"epochs": 1, "minibatch_size": 16, "lr": 1e-3}
    teacher = run_stage1(
        pi_k=qwen3_dir,
        batch=batch,
        cfg=Stage1Config(**one_step),
        env=env,
        run_dir=tmp_path / "teacher",
        run="teacher",
    )
    assert teacher.status == "completed" and teacher.steps == 1
    student = run_stage2(
        pi_k=qwen3_dir,
        teachers=[teacher.checkpoint],
        pinned=[teacher.sha256],
        batch=batch,
        cfg=Stage2Config(**one_step, kl_budget=None),
        env=env,
        run_dir=tmp_path / "student",
        run="student",
    )
    assert student.status == "completed" and student.steps == 1
    loaded = AutoModelForCausalLM.from_pretrained(student.checkpoint)
    assert loaded.config.model_type == "qwen3"
    before = AutoModelForCausalLM.from_pretrained(qwen3_dir).state_dict()
    assert any(not torch.equal(before[k], v) for k, v in loaded.state_dict().items())


def test_stage2_refuses_a_teacher_that_changed(qwen3_dir: Path, tmp_path: Path) -> None:
    env = _env()
    model, tokenizer = load_policy(qwen3_dir)
    batch = sample_rollout(
        model, tokenizer, env.task, SampleConfig(num_prompts=4, group_size=2), max_new_tokens=8
    )
    cfg = Stage1Config(epochs=1, minibatch_size=8)
    teacher = run_stage1(
        pi_k=qwen3_dir, batch=batch, cfg=cfg, env=env, run_dir=tmp_path / "t", run="t"
    )
    assert teacher.checkpoint is not None
    with pytest.raises(CheckpointError, match="sha256"):
        run_stage2(
            pi_k=qwen3_dir,
            teachers=[teacher.checkpoint],
            pinned=["0" * 64],
            batch=batch,
            cfg=Stage2Config(epochs=1),
            env=env,
            run_dir=tmp_path / "s",
            run="s",
        )
    assert not (tmp_path / "s" / "checkpoint").exists()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_left_padding_matches_unpadded_sequences(
    arch: str, qwen2_dir: Path, qwen3_dir: Path
) -> None:
    """Prompts of different lengths in one batch decode and score exactly as they do alone."""
    if arch != "llama":
        model, tokenizer = load_policy(qwen3_dir if arch == "qwen3" else qwen2_dir)
        assert model.config.model_type == arch
    else:
        from erpd.config import TinyModelConfig
        from erpd.models import build_tiny_model

        tokenizer = build_char_tokenizer(ALPHABET)
        torch.manual_seed(1)
        model = build_tiny_model(tokenizer, TinyModelConfig(hidden_size=32, num_heads=4))
    prompts = encode_prompts(tokenizer, ["7+8=", "12+34=", "123*45-6="])
    together = generate(model, tokenizer, prompts, max_new_tokens=6, greedy=True)
    alone = [generate(model, tokenizer, [p], max_new_tokens=6, greedy=True)[0] for p in prompts]
    assert together == alone
    responses = [r or [int(tokenizer.eos_token_id)] for r in together]
    pad, eos = int(tokenizer.pad_token_id), int(tokenizer.eos_token_id)
    batched = sequence_logprobs(model, pack(prompts, responses, pad, eos))
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        single = sequence_logprobs(model, pack([p], [r], pad, eos))[0]
        torch.testing.assert_close(batched[i, : len(r)], single[: len(r)], rtol=0, atol=1e-5)


def test_bf16_autocast_path_runs_on_cpu(qwen3_dir: Path, tmp_path: Path) -> None:
    """The bf16 code path (the GPU default) also runs on CPU, so CI covers it without a GPU."""
    env = _env()
    env.bf16 = True
    model, tokenizer = load_policy(qwen3_dir)
    batch = sample_rollout(
        model,
        tokenizer,
        env.task,
        SampleConfig(num_prompts=4, group_size=2),
        max_new_tokens=8,
        bf16=True,
    )
    assert batch.pi_k_logprobs.dtype == torch.float32  # log-probs are always fp32
    res = run_stage1(
        pi_k=qwen3_dir,
        batch=batch,
        cfg=Stage1Config(epochs=1, minibatch_size=8),
        env=env,
        run_dir=tmp_path / "t",
        run="t",
    )
    assert res.status == "completed"
    assert all(torch.isfinite(torch.tensor(v)) for v in res.summary.values())


@pytest.mark.parametrize("alphabet", [ALPHABET + "abcdef", ALPHABET[::-1]])
def test_a_batch_from_another_tokenizer_is_refused(
    alphabet: str, qwen3_dir: Path, tmp_path: Path
) -> None:
    """A bigger vocabulary, and one of the same size with other ids, are both refused."""
    from erpd.config import TinyModelConfig
    from erpd.models import build_tiny_model

    env = _env()
    model, tokenizer = load_policy(qwen3_dir)
    batch = sample_rollout(
        model, tokenizer, env.task, SampleConfig(num_prompts=2, group_size=2), max_new_tokens=4
    )
    other_tok = build_char_tokenizer(alphabet)
    other = tmp_path / "other"
    build_tiny_model(other_tok, TinyModelConfig(hidden_size=16, num_heads=2)).save_pretrained(other)
    other_tok.save_pretrained(other)
    with pytest.raises(CheckpointError, match="tokenizer"):
        run_stage1(
            pi_k=other,
            batch=batch,
            cfg=Stage1Config(epochs=1),
            env=env,
            run_dir=tmp_path / "r",
            run="r",
        )
