"""Supervised pretraining of the tiny base model to a *partial* accuracy.

RL needs room to show gains: the base stops as soon as greedy accuracy on the task's validation
split reaches `base.target_acc` (docs/method.md calibration: ~40% after ~350 steps on `ab+cd=`).
The stop check never reads the eval split, which the base's summary and every later stage report.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import NamedTuple

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from erpd import metrics as M
from erpd.checkpoint import RESUME_DIR, save_model_checkpoint
from erpd.config import BaseTrainConfig, TinyModelConfig
from erpd.errors import DivergedError, StopRequestedError
from erpd.evaluate import Evaluator
from erpd.losses import supervised_loss
from erpd.models import (
    adamw,
    autocast,
    build_char_tokenizer,
    build_tiny_model,
    count_parameters,
    to_device,
)
from erpd.progress import Advance
from erpd.resume import NoState, ResumePoints
from erpd.rollout import Sequences, encode_prompts, pack, response_logits, response_targets
from erpd.stage import StageEnv, StageResult
from erpd.tasks import ALPHABET, Problem

log = logging.getLogger(__name__)

RESUME_EVERY_S = 120.0
"""How often pretraining writes a resume point, as stages do by default."""


def _supervised_batch(tokenizer: PreTrainedTokenizerBase, problems: list[Problem]) -> Sequences:
    """Prompt + target + end token, with the loss mask on the target tokens."""
    prompt_ids = encode_prompts(tokenizer, [p.prompt for p in problems])
    eos = int(tokenizer.eos_token_id)
    targets = [tokenizer(p.target)["input_ids"] + [eos] for p in problems]
    return pack(prompt_ids, targets, int(tokenizer.pad_token_id), eos)


class _Base(NamedTuple):
    model: PreTrainedModel
    optimizer: torch.optim.Optimizer
    tokenizer: PreTrainedTokenizerBase
    points: ResumePoints
    check: Evaluator


def pretrain_base(
    *,
    shape: TinyModelConfig,
    cfg: BaseTrainConfig,
    env: StageEnv,
    out_dir: str | Path,
    seed: int = 0,
    run: str = "base",
) -> StageResult:
    """Build the tiny Llama, train it on task targets until target_acc, save it to out_dir.

    Like a stage, it writes a resume point every `RESUME_EVERY_S` seconds and when stopped (a
    cancel, a worker's SIGTERM), and a later call with the same recipe continues from it."""
    out_dir = Path(out_dir)
    started = time.time()
    tokenizer = build_char_tokenizer(ALPHABET)
    torch.manual_seed(seed)
    model = to_device(build_tiny_model(tokenizer, shape), env.device)
    env.check_data(tokenizer, model.config)  # e.g. a JSONL row with letters: refused, with line
    optimizer = adamw(model, lr=cfg.lr, weight_decay=0.0)
    recipe = {"shape": shape.model_dump(), "base": cfg.model_dump(), "seed": seed}
    fingerprint = hashlib.sha256(
        json.dumps({**recipe, "task": env.task.name}, sort_keys=True).encode()
    ).hexdigest()
    points = ResumePoints(out_dir, fingerprint, every_s=RESUME_EVERY_S)
    first = points.restore(model, optimizer, NoState()).step
    with env.progress(
        f"base ({count_parameters(model) / 1e6:.2f}M params)", cfg.max_steps
    ) as advance:
        if first:
            advance(first)
        base = _Base(model, optimizer, tokenizer, points, env.evaluator(tokenizer, seed))
        step, acc = _train(base, cfg, env, run, first, advance)
    if acc < cfg.target_acc:
        log.warning(
            "base: greedy accuracy %.3f on %d validation problems after base.max_steps=%d "
            "steps, below base.target_acc=%.2f: the base is weaker than asked; raise "
            "base.max_steps (or lower base.target_acc) if that matters",
            acc,
            len(stop_check_problems(env, cfg)),
            cfg.max_steps,
            cfg.target_acc,
        )
    final = env.evaluator(tokenizer, seed)(model, step=step)
    env.sink.log(run, step, final)
    manifest = {
        "stage": "base",
        "run": run,
        "status": "completed",
        "step": step,
        "config": recipe,
        "task": env.task.name,
        "target_reached": acc >= cfg.target_acc,
        "eval_acc": final.get(M.ACC_EVAL),
        "kl_spent": 0.0,
        "summary": final,
        "teachers": [],
        "base": None,
    }
    checkpoint = out_dir / "checkpoint"
    sha = save_model_checkpoint(checkpoint, model, tokenizer, manifest)
    shutil.rmtree(out_dir / RESUME_DIR, ignore_errors=True)  # the base is done
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


def stop_check_problems(env: StageEnv, cfg: BaseTrainConfig) -> list[Problem]:
    """The problems the stop rule reads: the first `base.eval_size` of the task's validation
    split (all of them if it has fewer), never the eval split that results report."""
    return env.task.validation_problems()[: cfg.eval_size]


def _train(
    base: _Base, cfg: BaseTrainConfig, env: StageEnv, run: str, first: int, advance: Advance
) -> tuple[int, float]:
    """Steps `first + 1` on until the check accuracy reaches the target or `max_steps`;
    returns the last step and the last check accuracy (0 if none ran)."""
    model, optimizer, tokenizer, points, check = base
    check_problems = stop_check_problems(env, cfg)
    acc, step = 0.0, first
    for step in range(first + 1, cfg.max_steps + 1):
        if env.should_stop is not None and env.should_stop():
            points.save(step - 1, model, optimizer, NoState(), evaluated=True)
            raise StopRequestedError(
                f"stopped during base pretraining; saved at step {step - 1}, resumes from there"
            )
        problems = env.task.train_problems(cfg.batch_size, seed=cfg.seed * 1_000_003 + step)
        seqs = _supervised_batch(tokenizer, problems).to(env.device)
        model.train()
        with autocast(env.device, env.bf16):
            logits = response_logits(model, seqs)
            loss = supervised_loss(logits, response_targets(seqs), seqs.response_mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if not math.isfinite(loss.item()):
            raise DivergedError(
                f"base pretraining diverged at step {step}: the loss is not finite; lower "
                f"base.lr ({cfg.lr:g})"
            )
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
        if points.due(step):
            points.save(step, model, optimizer, NoState(), evaluated=True)
    return step, acc
