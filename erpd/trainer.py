"""The epoch/minibatch loop both stages share: optimizer, clipping, eval, checkpoints, resume, stop.

A stage plugs in a `StageObjective` (how to turn a minibatch's log-probs into a loss) and gets the
rest: exact KL and entropy against pi_k every step, evals every k epochs, resume checkpoints, a
cooperative stop, and a KL budget. Metrics logged at step s always describe the weights after s
optimizer steps (step metrics come from the minibatch about to be used for update s + 1).

The loop takes its model, reference model and data from the caller, so a later multi-GPU path
can wrap them without touching any loss code.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from erpd import distributed
from erpd import metrics as M
from erpd.checkpoint import RESUME_DIR, latest_resume, load_resume, read_resume_meta, save_resume
from erpd.config import EvalConfig, Stage1Config, Stage2Config
from erpd.errors import ConfigError
from erpd.evaluate import Evaluator
from erpd.losses import Normaliser, entropy_and_kl, ratio_stats, token_logprobs
from erpd.models import adamw, autocast, frozen, train_without_dropout
from erpd.progress import ProgressFactory, no_progress
from erpd.rollout import (
    RolloutBatch,
    Sequences,
    forward_passes,
    pass_tokens,
    response_logits,
    response_targets,
    sequence_logprobs,
)
from erpd.tasks import Task

StopCheck = Callable[[], bool]
Advance = Callable[[int], None]
log = logging.getLogger(__name__)

REFERENCE_CACHE_BYTES = 1 << 30
"""pi_k's full-vocabulary log-probs on the fixed batch are kept when they fit in this much
memory (response tokens x vocabulary x 4 bytes): the exact KL of every step then needs no
forward pass of pi_k. That holds for small vocabularies (the built-in tiny model's 17 tokens:
~0.5 MB for a 128 x 48 batch); a 150k-token vocabulary fits only ~1,800 tokens, so real models
run pi_k on every pass instead."""


class StageObjective(Protocol):
    """What a stage contributes to the shared loop."""

    def on_epoch_start(self, epoch: int, model: PreTrainedModel) -> None:
        """Re-anchor pi_old if the stage does so (called before the epoch's first step)."""

    ratio_bounds: tuple[float, float]
    """(low, high): ratio/clip_frac counts tokens outside [1 - low, 1 + high]."""

    def loss(
        self, index: Tensor, logprobs: Tensor, mask: Tensor, norm: Normaliser
    ) -> tuple[Tensor, dict[str, float]]:
        """Loss of rows `index` given pi_theta's log-probs (B, R), normalised by `norm`."""

    def old_logprobs(self, index: Tensor) -> Tensor:
        """pi_old's log-probs of rows `index` (the denominator of the importance ratio)."""

    def state(self) -> dict[str, Tensor]:
        """Tensors a resume checkpoint must carry (e.g. the epoch's anchor log-probs)."""

    def load_state(self, tensors: dict[str, Tensor]) -> None: ...


class Anchored:
    """pi_old bookkeeping both stages share: the anchor log-probs, re-anchoring, resume state.

    pi_old starts as pi_k (the batch's behaviour log-probs, so the first ratio is exactly 1);
    with `reanchor` it is recomputed from the current weights at the start of every epoch.
    """

    def __init__(
        self,
        batch: RolloutBatch,
        *,
        reanchor: bool,
        bf16: bool,
        forward_batch_size: int,
        pass_tokens: int | None = None,
    ) -> None:
        self.batch, self.reanchor, self.bf16 = batch, reanchor, bf16
        self.forward_batch_size, self.pass_tokens = forward_batch_size, pass_tokens
        self.anchor = batch.behaviour_logprobs  # (B, R)

    def on_epoch_start(self, epoch: int, model: PreTrainedModel) -> None:
        if self.reanchor and epoch > 0:
            self.anchor = sequence_logprobs(
                model,
                self.batch.seqs,
                bf16=self.bf16,
                batch_size=self.forward_batch_size,
                max_tokens=self.pass_tokens,
            )

    def old_logprobs(self, index: Tensor) -> Tensor:
        return self.anchor[index]

    @staticmethod
    def rows(values: Tensor, index: Tensor, like: Tensor) -> Tensor:
        """values[index] cut to the width of `like` (a trimmed pass) and on its device."""
        return values[index, : like.shape[1]].to(like.device)

    def state(self) -> dict[str, Tensor]:
        return {"anchor": self.anchor}

    def load_state(self, tensors: dict[str, Tensor]) -> None:
        if "anchor" in tensors:
            self.anchor = tensors["anchor"]


class ReferenceLogprobs:
    """pi_k's log-softmax over the vocabulary at the response positions of the fixed batch.

    Computed once and kept (packed: masked positions only) when it fits `budget` bytes;
    otherwise every call runs pi_k on the pass. Either way it is what exact_kl compares with.
    """

    def __init__(
        self,
        ref_model: PreTrainedModel,
        batch: RolloutBatch,
        settings: LoopSettings,
        budget: int = REFERENCE_CACHE_BYTES,
    ) -> None:
        self.model, self.bf16 = ref_model, settings.bf16
        self.device = next(ref_model.parameters()).device
        mask = batch.seqs.response_mask.bool()
        vocab = int(ref_model.get_output_embeddings().weight.shape[0])
        count = int(mask.sum())
        self.table: Tensor | None = None
        if count * vocab * 4 > budget:
            return
        self.slot = torch.full(mask.shape, -1, dtype=torch.long)
        self.slot[mask] = torch.arange(count)
        table = torch.zeros(count, vocab, device=self.device)
        passes = forward_passes(
            batch.seqs,
            max_rows=settings.forward_batch_size,
            max_tokens=pass_tokens(self.device, settings.micro_batch_tokens),
        )
        split = distributed.Split(ref_model)
        for (rows, part), real in split.passes(passes):
            part = part.to(self.device)
            logprobs = self._forward(part)
            if real:
                keep = part.response_mask.bool()
                slots = self.slot[rows, : keep.shape[1]].to(self.device)
                table[slots[keep]] = logprobs[keep]
        self.table = split.sum_(table)  # each rank filled its own passes' rows

    @torch.no_grad()
    def _forward(self, part: Sequences) -> Tensor:
        with frozen(self.model), autocast(self.device, self.bf16):
            return torch.log_softmax(response_logits(self.model, part).float(), dim=-1)

    @property
    def cached(self) -> bool:
        return self.table is not None

    def __call__(self, rows: Tensor, part: Sequences) -> Tensor:
        """(b, w, V) log-probs of pi_k for the pass `part` (rows `rows` of the batch, trimmed);
        positions outside the response mask hold arbitrary (finite) values."""
        if self.table is None:
            return self._forward(part)
        slots = self.slot[rows, : part.response_mask.shape[1]].clamp_min(0)
        return self.table[slots.to(self.table.device)]


@dataclass
class StageEnv:
    """What a stage needs besides its config: the task, eval settings, device and outputs."""

    task: Task
    eval: EvalConfig
    device: torch.device
    max_new_tokens: int
    bf16: bool = False
    gradient_checkpointing: bool = False
    chat_template: bool = False
    sink: M.MetricSink = field(default_factory=M.NullSink)
    should_stop: StopCheck | None = None
    progress: ProgressFactory = no_progress
    evaluate: bool = True
    """False skips held-out evals inside stages (the final whole-batch diagnostics remain):
    for callers that evaluate checkpoints themselves, e.g. many one-step on-policy stages."""
    eval_start: bool = True
    """False skips the eval of pi_k at step 0, for callers that measured pi_k already."""

    def evaluator(self, tokenizer: PreTrainedTokenizerBase, seed: int) -> Evaluator:
        return Evaluator(
            self.task,
            tokenizer,
            self.eval,
            self.max_new_tokens,
            chat_template=self.chat_template,
            bf16=self.bf16,
            seed=seed,
        )


@dataclass
class LoopSettings:
    """The orchestration knobs common to both stage configs."""

    run: str
    epochs: int
    minibatch_size: int
    micro_batch_size: int | None
    lr: float
    weight_decay: float
    grad_clip: float
    eval_every_epochs: int
    checkpoint_every_steps: int
    seed: int
    kl_budget: float | None = None
    bf16: bool = False
    eval_at_epochs: tuple[int, ...] | None = None
    micro_batch_tokens: int | None = None
    gradient_checkpointing: bool = False

    @classmethod
    def of(
        cls,
        run: str,
        cfg: Stage1Config | Stage2Config,
        *,
        bf16: bool,
        gradient_checkpointing: bool = False,
    ) -> LoopSettings:
        return cls(
            run=run,
            epochs=cfg.epochs,
            minibatch_size=cfg.minibatch_size,
            micro_batch_size=cfg.micro_batch_size,
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            grad_clip=cfg.grad_clip,
            eval_every_epochs=cfg.eval_every_epochs,
            checkpoint_every_steps=cfg.checkpoint_every_steps,
            seed=cfg.seed,
            kl_budget=cfg.kl_budget,
            bf16=bf16,
            eval_at_epochs=tuple(cfg.eval_at_epochs) if cfg.eval_at_epochs else None,
            micro_batch_tokens=cfg.micro_batch_tokens,
            gradient_checkpointing=gradient_checkpointing,
        )

    @property
    def forward_batch_size(self) -> int:
        return self.micro_batch_size or self.minibatch_size

    def total_steps(self, num_rows: int) -> int:
        return self.epochs * math.ceil(num_rows / self.minibatch_size)


@dataclass
class LoopResult:
    """How a stage ended: `completed`, `kl_budget` or `stopped` (cooperative stop, resumable).

    `last_eval` is the final weights' eval with the whole-batch diagnostics (KL, entropy,
    drift) unless the stage stopped, when it is the last eval that ran.
    """

    status: str
    steps: int
    total_steps: int
    last_eval: dict[str, float] = field(default_factory=dict)
    wall_time: float = 0.0


def _permutation(n: int, seed: int, epoch: int) -> Tensor:
    # one generator per epoch: a resumed run reproduces the same order without saving RNG state
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen)


def run_loop(
    *,
    model: PreTrainedModel,
    ref_model: PreTrainedModel,
    batch: RolloutBatch,
    objective: StageObjective,
    settings: LoopSettings,
    evaluator: Evaluator | None,
    sink: M.MetricSink,
    run_dir: Path,
    resume: bool = True,
    should_stop: StopCheck | None = None,
    advance: Advance | None = None,
    fingerprint: str = "",
    eval_start: bool = True,
) -> LoopResult:
    """Train `model` on the fixed batch for `settings.epochs` epochs (or until stopped).

    `fingerprint` identifies what is being trained (config, base, teachers, batch): a resume
    checkpoint of anything else is refused, never silently continued. resume=False discards
    the run's resume checkpoints first.
    """
    device = next(model.parameters()).device
    n = len(batch)
    per_epoch = math.ceil(n / settings.minibatch_size)
    total = settings.total_steps(n)
    optimizer = adamw(model, lr=settings.lr, weight_decay=settings.weight_decay)
    step, started, evaluated_here = 0, time.time(), False
    if not resume:
        shutil.rmtree(run_dir / RESUME_DIR, ignore_errors=True)
    checkpoint = latest_resume(run_dir)
    if checkpoint is not None:
        if read_resume_meta(checkpoint).get("fingerprint") != fingerprint:
            raise ConfigError(
                "resume",
                f"{run_dir} holds a stopped run of another config, base or batch; "
                "pass --fresh to start over, or use another --out",
            )
        step, tensors, meta = load_resume(checkpoint, model=model, optimizer=optimizer)
        objective.load_state(tensors)
        evaluated_here = bool(meta.get("evaluated"))
    resumed_at = step
    if advance is not None and step:
        advance(step)

    evaluated: dict[int, dict[str, float]] = {}

    def evaluate(at: int) -> dict[str, float]:
        # a budget stop on an epoch's first step would otherwise re-evaluate (and re-log) the
        # step the previous epoch ended on
        if evaluator is None:
            return {}
        if at not in evaluated:
            evaluated[at] = evaluator(model, step=at, ref_model=ref_model, batch=batch)
            scoped = {k: v for k, v in evaluated[at].items() if M.CATALOGUE[k].scope == "eval"}
            sink.log(settings.run, at, scoped)
        return evaluated[at]

    def final_summary() -> dict[str, float]:
        """The eval of the final weights; the batch diagnostics are computed only if no eval
        ran at this step (no evaluator, or a resume that landed on the last step)."""
        if step in evaluated and M.ENTROPY_BATCH in evaluated[step]:
            return evaluated[step]
        from erpd.evaluate import batch_diagnostics

        diag = batch_diagnostics(
            model,
            ref_model,
            batch,
            bf16=settings.bf16,
            batch_size=settings.forward_batch_size,
            max_tokens=settings.micro_batch_tokens,
        )
        return {**last, **diag}

    def finish(status: str, summary: dict[str, float]) -> LoopResult:
        return LoopResult(status, step, total, summary, time.time() - started)

    def eval_due(at: int) -> bool:
        epochs_done = at // per_epoch
        if at % per_epoch or epochs_done == 0:
            return False
        if epochs_done == settings.epochs:
            return True
        if settings.eval_at_epochs is not None:
            return epochs_done in settings.eval_at_epochs
        return epochs_done % settings.eval_every_epochs == 0

    # a fresh run evaluates pi_k at step 0 (unless eval_start is off); a resumed one evaluates
    # its resume step if an eval was due there and the checkpoint was written before it (a
    # periodic save, then a crash)
    due = (checkpoint is None and eval_start) or (
        checkpoint is not None and eval_due(step) and not evaluated_here
    )
    last = evaluate(step) if due else {}
    # no dropout throughout: it would make pi_theta's log-probs noisy and the first ratio differ
    # from 1 (pi_old, pi_k and teachers are all scored without dropout); grads still flow. Eval
    # mode, or, with checkpointing (transformers recomputes layers only in training mode),
    # training mode with every dropout at zero
    if settings.gradient_checkpointing:
        if not model.supports_gradient_checkpointing:
            raise ConfigError(
                "runtime.gradient_checkpointing",
                f"{type(model).__name__} does not support activation checkpointing",
            )
        model.activation_checkpointing_enable({"use_reentrant": False})
        train_without_dropout(model)
    else:
        model.eval()
    reference = ReferenceLogprobs(ref_model, batch, settings)
    for epoch in range(step // per_epoch, settings.epochs):
        order = _permutation(n, settings.seed, epoch)
        first = step - epoch * per_epoch  # > 0 only when resuming mid-epoch
        if first == 0:
            objective.on_epoch_start(epoch, model)
        for k in range(first, per_epoch):
            # one rank's stop (a signal, a cancel flag) stops all, at the same step
            if should_stop is not None and distributed.any_rank(should_stop()):
                done = step in evaluated or (step == resumed_at and evaluated_here)
                _save(run_dir, step, model, optimizer, objective, done, fingerprint)
                return finish("stopped", last)
            index = order[k * settings.minibatch_size : (k + 1) * settings.minibatch_size]
            tick = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            values = _accumulate(model, reference, batch, objective, index, settings, device)
            kl = values[M.KL_EXACT]
            if settings.kl_budget is not None:
                values[M.KL_BUDGET_USED] = kl / settings.kl_budget
            if settings.kl_budget is not None and kl > settings.kl_budget:
                # the weights after `step` updates already spent the budget: keep them, stop
                optimizer.zero_grad(set_to_none=True)
                sink.log(settings.run, step, values)
                last = evaluate(step)
                return finish("kl_budget", final_summary())
            if settings.grad_clip > 0:
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
                values[M.GRAD_NORM] = distributed.scalar(norm)
            optimizer.step()
            tokens = batch.seqs.response_mask[index].sum().item()
            values[M.TOKENS_PER_S] = tokens / max(time.perf_counter() - tick, 1e-9)
            sink.log(settings.run, step, values)
            step += 1
            if advance is not None:
                advance(1)
            if settings.checkpoint_every_steps and step % settings.checkpoint_every_steps == 0:
                done = step in evaluated or (step == resumed_at and evaluated_here)
                _save(run_dir, step, model, optimizer, objective, done, fingerprint)
        if eval_due(step):
            last = evaluate(step)
    # the per-step check sees the weights *before* each update, so the last update is checked
    # here, on the whole batch; the status then says the budget was reached at the end
    summary = final_summary()
    over = settings.kl_budget is not None and summary[M.KL_EXACT_BATCH] > settings.kl_budget
    return finish("kl_budget" if over else "completed", summary)


# step metrics that micro-batches contribute as partial sums (each is normalised by the
# minibatch's counts); the ratio quantiles are recomputed over the whole minibatch instead
_SUMMED = (M.LOSS, M.KL_K1, M.KL_K3)


def _accumulate(
    model: PreTrainedModel,
    reference: ReferenceLogprobs,
    batch: RolloutBatch,
    objective: StageObjective,
    index: Tensor,
    settings: LoopSettings,
    device: torch.device,
) -> dict[str, float]:
    """Forward and backward the minibatch `index` in micro-batches, accumulating gradients.

    Returns the step's metrics for the whole minibatch, measured before the update: exact KL to
    pi_k and entropy (token means), the loss terms, and the importance-ratio statistics.
    """
    mask = batch.seqs.response_mask[index]
    norm = Normaliser.of(mask, batch.rewards[index])
    summed: dict[str, float] = dict.fromkeys(_SUMMED, 0.0)
    values: dict[str, float] = {}
    kl_sum = entropy_sum = 0.0
    log_ratios = [torch.zeros(0)]
    passes = forward_passes(
        batch.seqs,
        index,
        max_rows=settings.micro_batch_size,
        max_tokens=pass_tokens(device, settings.micro_batch_tokens),
    )
    split = distributed.Split(model)
    mine = split.passes(passes)
    for i, ((part, trimmed), real) in enumerate(mine):
        mb = trimmed.to(device)
        with autocast(device, settings.bf16):
            logits = response_logits(model, mb)  # (b, R, V)
            logprobs = token_logprobs(logits, response_targets(mb))  # (b, R)
            loss, part_values = objective.loss(part, logprobs, mb.response_mask, norm)
        distributed.sync_gradients(model, i == len(mine) - 1)
        # a filler pass (this rank has fewer passes than another) runs in step, weighted zero
        (loss if real else loss * 0.0).backward()
        with torch.no_grad():
            m = mb.response_mask
            entropy, kl = entropy_and_kl(logits.detach(), reference(part, mb))
            if real:
                kl_sum += (kl * m).sum().item()
                entropy_sum += (entropy * m).sum().item()
                old = objective.old_logprobs(part)[:, : m.shape[1]].to(device)
                log_ratios.append((logprobs.detach() - old)[m.bool()].float().cpu())
        if real:
            for key, value in part_values.items():
                if key in _SUMMED:
                    summed[key] += value
                else:
                    values[key] = value
        del logits, logprobs, loss, entropy, kl  # free activations before the next pass
    # every rank ran its share of the minibatch: the step's metrics are sums over all ranks
    totals = split.sums([kl_sum, entropy_sum, *summed.values()])
    values.update(zip(summed, totals[2:], strict=True))
    tokens = max(norm.tokens, 1.0)
    values[M.KL_EXACT] = totals[0] / tokens
    values[M.ENTROPY_TOKEN] = totals[1] / tokens
    ratios = split.cat(torch.cat(log_ratios))
    values.update(ratio_stats(ratios, torch.ones_like(ratios), *objective.ratio_bounds))
    return values


def _save(
    run_dir: Path,
    step: int,
    model: PreTrainedModel,
    optimizer: torch.optim.Optimizer,
    objective: StageObjective,
    evaluated: bool,
    fingerprint: str,
) -> None:
    save_resume(
        run_dir,
        step=step,
        model=model,
        optimizer=optimizer,
        tensors=objective.state(),
        meta={"evaluated": evaluated, "fingerprint": fingerprint},
    )


# --- what every stage does around the loop ----------------------------------------------------
@dataclass
class StageResult:
    """A finished (or stopped) stage: where its checkpoint is and what it measured."""

    run: str
    status: str
    run_dir: Path
    checkpoint: Path | None
    sha256: str | None
    summary: dict[str, float]
    steps: int
    total_steps: int
    wall_time: float


def check_memory(
    base: str | Path, batch: RolloutBatch, cfg: Stage1Config | Stage2Config, env: StageEnv
) -> None:
    """Estimate the stage's memory on its device before loading anything; log it, or refuse
    with what to change when it cannot fit (erpd.memory)."""
    from erpd.memory import check_fits

    width = batch.seqs.input_ids.shape[1]
    tokens = pass_tokens(env.device, cfg.micro_batch_tokens)
    if cfg.micro_batch_size is not None:
        tokens = min(tokens, cfg.micro_batch_size * width)
    found = check_fits(
        base,
        device=env.device,
        devices=distributed.size(),
        pass_tokens=max(tokens, width),
        bf16=env.bf16,
        gradient_checkpointing=env.gradient_checkpointing,
    )
    log.info(found.describe())


def load_stage_models(
    base: str | Path, device: torch.device
) -> tuple[PreTrainedModel, PreTrainedModel, PreTrainedTokenizerBase]:
    """The trainable policy and a frozen copy of pi_k (for exact KL), both from `base`."""
    from erpd.models import empty_model, load_model, load_tokenizer

    if distributed.size() == 1:
        model = load_model(base, device)
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)  # no second read from disk
        return model, ref_model, load_tokenizer(base)
    # one read of pi_k (rank 0) serves both the policy and its frozen copy
    source = _read_on_main(base, verify=True)
    model = distributed.shard_from_main(empty_model(base), *source, device)
    ref_model = distributed.shard_from_main(empty_model(base), *source, device)
    return model, ref_model.eval().requires_grad_(False), load_tokenizer(base)


def load_frozen(path: str | Path, device: torch.device, *, verify: bool = True) -> PreTrainedModel:
    """A model that is only scored (pi_k, pi_0, a teacher): sharded like the policy when the
    stage runs on several ranks, since its forwards then run in step with theirs."""
    from erpd.models import empty_model, load_model

    if distributed.size() == 1:
        return load_model(path, device, verify=verify).eval().requires_grad_(False)
    source = _read_on_main(path, verify=verify)
    model = distributed.shard_from_main(empty_model(path), *source, device)
    return model.eval().requires_grad_(False)


def _read_on_main(path: str | Path, *, verify: bool) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(weights, buffers) of the model in `path`, read by rank 0 alone into host memory (empty
    elsewhere): the other ranks build the model on the meta device and receive their shards,
    so host memory holds one copy of the model, not one per rank."""
    from erpd.models import load_model

    if not distributed.is_main():
        return {}, {}
    model = load_model(path, "cpu", verify=verify)
    return dict(model.state_dict()), dict(model.named_buffers())


def train_stage(
    *,
    stage: str,
    models: tuple[PreTrainedModel, PreTrainedModel, PreTrainedTokenizerBase],
    batch: RolloutBatch,
    objective: StageObjective,
    settings: LoopSettings,
    env: StageEnv,
    run_dir: Path,
    resume: bool,
    manifest: dict[str, object],
) -> StageResult:
    """Run the loop with the env's progress, sink and stop flag, then write the checkpoint."""
    model, ref_model, tokenizer = models
    identity = {"stage": stage, "batch": batch.fingerprint(), **manifest}
    fingerprint = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode())
    with env.progress(f"{stage} {settings.run}", settings.total_steps(len(batch))) as advance:
        result = run_loop(
            model=model,
            ref_model=ref_model,
            batch=batch,
            objective=objective,
            settings=settings,
            evaluator=env.evaluator(tokenizer, settings.seed) if env.evaluate else None,
            sink=env.sink,
            run_dir=run_dir,
            resume=resume,
            should_stop=env.should_stop,
            advance=advance,
            fingerprint=fingerprint.hexdigest(),
            eval_start=env.eval_start,
        )
    return finalize(
        stage=stage,
        settings=settings,
        result=result,
        model=model,
        tokenizer=tokenizer,
        run_dir=run_dir,
        manifest=manifest,
    )


def finalize(
    *,
    stage: str,
    settings: LoopSettings,
    result: LoopResult,
    model: PreTrainedModel,
    tokenizer: object,
    run_dir: Path,
    manifest: dict[str, object],
) -> StageResult:
    """Save the final checkpoint (manifest last) and summary; a stopped run saves nothing more."""
    if result.status == "stopped":
        return StageResult(
            settings.run,
            "stopped",
            run_dir,
            None,
            None,
            {},
            result.steps,
            result.total_steps,
            result.wall_time,
        )
    from erpd.checkpoint import save_model_checkpoint

    summary = dict(result.last_eval)  # the final weights' eval, batch diagnostics included
    body = {
        "stage": stage,
        "run": settings.run,
        "status": result.status,
        "step": result.steps,
        "total_steps": result.total_steps,
        "kl_spent": summary.get(M.KL_EXACT_BATCH),
        "eval_acc": summary.get(M.ACC_EVAL),
        "summary": summary,
        **manifest,
    }
    checkpoint = run_dir / "checkpoint"
    sha = save_model_checkpoint(checkpoint, model, tokenizer, body)
    return StageResult(
        settings.run,
        result.status,
        run_dir,
        checkpoint,
        sha,
        summary,
        result.steps,
        result.total_steps,
        result.wall_time,
    )
