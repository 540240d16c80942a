"""Supervised pretraining of the tiny base model to a *partial* accuracy.

RL needs room to show gains: the base stops as soon as greedy held-out accuracy reaches
`base.target_acc` (docs/method.md calibration: ~40% after ~350 steps on `ab+cd=`).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from erpd import metrics as M
from erpd.checkpoint import save_model_checkpoint
from erpd.config import BaseTrainConfig, TinyModelConfig
from erpd.errors import StopRequestedError
from erpd.losses import supervised_loss
from erpd.models import (
    adamw,
    autocast,
    build_char_tokenizer,
    build_tiny_model,
    count_parameters,
    to_device,
)
from erpd.rollout import Sequences, encode_prompts, pack, response_logits, response_targets
from erpd.stage import StageEnv, StageResult
from erpd.tasks import ALPHABET, Problem


def _supervised_batch(tokenizer: PreTrainedTokenizerBase, problems: list[Problem]) -> Sequences:
    """Prompt + target + end token, with the loss mask on the target tokens."""
    prompt_ids = encode_prompts(tokenizer, [p.prompt for p in problems])
    eos = int(tokenizer.eos_token_id)
    targets = [tokenizer(p.target)["input_ids"] + [eos] for p in problems]
    return pack(prompt_ids, targets, int(tokenizer.pad_token_id), eos)


def pretrain_base(
    *,
    shape: TinyModelConfig,
    cfg: BaseTrainConfig,
    env: StageEnv,
    out_dir: str | Path,
    seed: int = 0,
    run: str = "base",
) -> StageResult:
    """Build the tiny Llama, train it on task targets until target_acc, save it to out_dir."""
    out_dir = Path(out_dir)
    started = time.time()
    tokenizer = build_char_tokenizer(ALPHABET)
    torch.manual_seed(seed)
    model = to_device(build_tiny_model(tokenizer, shape), env.device)
    optimizer = adamw(model, lr=cfg.lr, weight_decay=0.0)
    check = env.evaluator(tokenizer, seed)
    check_problems = env.task.eval_problems()[: cfg.eval_size]
    acc, step = 0.0, 0
    with env.progress(
        f"base ({count_parameters(model) / 1e6:.2f}M params)", cfg.max_steps
    ) as advance:
        for step in range(1, cfg.max_steps + 1):
            if env.should_stop is not None and env.should_stop():
                # the tiny base takes seconds to a minute: restarting beats resume bookkeeping
                raise StopRequestedError("stopped during base pretraining; nothing was saved")
            problems = env.task.train_problems(cfg.batch_size, seed=cfg.seed * 1_000_003 + step)
            seqs = _supervised_batch(tokenizer, problems).to(env.device)
            model.train()
            with autocast(env.device, env.bf16):
                logits = response_logits(model, seqs)
                loss = supervised_loss(logits, response_targets(seqs), seqs.response_mask)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            advance(1)
            if step % cfg.eval_every == 0:
                values = {M.BASE_LOSS: loss.item()}
                if step >= cfg.min_steps:
                    acc = check.accuracy(model, check_problems)
                    values[M.BASE_ACC_CHECK] = acc
                env.sink.log(run, step, values)
                if step >= cfg.min_steps and acc >= cfg.target_acc:
                    break
    final = env.evaluator(tokenizer, seed)(model, step=step)
    env.sink.log(run, step, final)
    manifest = {
        "stage": "base",
        "run": run,
        "status": "completed",
        "step": step,
        "config": {"shape": shape.model_dump(), "base": cfg.model_dump()},
        "task": env.task.name,
        "eval_acc": final.get(M.ACC_EVAL),
        "kl_spent": 0.0,
        "summary": final,
        "teachers": [],
        "base": None,
    }
    checkpoint = out_dir / "checkpoint"
    sha = save_model_checkpoint(checkpoint, model, tokenizer, manifest)
    return StageResult(
        run,
        "completed",
        out_dir,
        checkpoint,
        sha,
        final,
        step,
        cfg.max_steps,
        time.time() - started,
    )
