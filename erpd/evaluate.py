"""Held-out accuracy (greedy and sampled) and diagnostics of a policy on the fixed batch.

KL and log-prob drift are measured against pi_k, the round's base; outside a stage (`erpd eval
--reference`) any model can stand in for it. Sampled accuracy is avg@k with seeds that depend
only on the evaluator's seed (the stage's), so the same weights measured at two eval points, or
two arms compared on one seed, see the same random numbers (common random numbers).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from erpd import distributed
from erpd import metrics as M
from erpd.config import EvalConfig
from erpd.losses import exact_kl, kl_estimators, masked_mean, token_entropy, token_logprobs
from erpd.models import autocast, frozen
from erpd.rollout import (
    RolloutBatch,
    Sequences,
    decode_responses,
    encode_prompts,
    forward_passes,
    generate,
    pack,
    pass_tokens,
    response_logits,
    response_targets,
)
from erpd.tasks import Problem, Task, score_many


@torch.no_grad()
def policy_vs_pi_k(
    model: PreTrainedModel,
    pi_k: PreTrainedModel | None,
    seqs: Sequences,
    *,
    batch_size: int = 256,
    bf16: bool = False,
    max_tokens: int | None = None,
) -> dict[str, torch.Tensor]:
    """Per-response sums of log-prob, entropy and exact KL against pi_k.

    Returns tensors over the B responses: `logp` (sequence log-prob under model), `pi_k_logp`,
    `entropy_sum`, `kl_sum` (full-vocabulary KL summed over tokens), `k3_sum` (k3 on the
    sampled tokens, summed) and `tokens` (count).
    Computed in chunks so a real vocabulary never materialises (B, R, V) for the whole batch.
    """
    device = next(model.parameters()).device
    names = ["logp", "entropy_sum"]
    if pi_k is not None:
        names += ["pi_k_logp", "kl_sum", "k3_sum"]
    out = {name: torch.zeros(seqs.response_mask.shape[0]) for name in names}  # (B,) each
    passes = distributed.RankPasses(
        model,
        forward_passes(seqs, max_rows=batch_size, max_tokens=pass_tokens(device, max_tokens)),
    )
    with frozen(model), autocast(device, bf16):
        for rows, trimmed in passes.mine:
            part = trimmed.to(device)
            for name, per_token in _scores(model, pi_k, part).items():
                out[name][rows] = (per_token * part.response_mask).sum(-1).float().cpu()
        for _, trimmed in passes.fillers:  # only keeps the ranks' sharded forwards in step
            _scores(model, pi_k, trimmed.to(device))
    for values in out.values():
        passes.split.sum_(values)  # each rank filled the rows of its own passes
    out["tokens"] = seqs.response_mask.sum(-1)
    return out


def _scores(
    model: PreTrainedModel, pi_k: PreTrainedModel | None, part: Sequences
) -> dict[str, torch.Tensor]:
    """Per-token log-prob and entropy of `model` on one pass, and its KL to pi_k: (b, w) each."""
    logits = response_logits(model, part)  # (b, w, V)
    targets = response_targets(part)
    logp = token_logprobs(logits, targets)  # (b, w)
    found = {"logp": logp, "entropy_sum": token_entropy(logits)}
    if pi_k is not None:
        with frozen(pi_k):
            pi_k_logits = response_logits(pi_k, part)
        pi_k_logp = token_logprobs(pi_k_logits, targets)
        found["pi_k_logp"] = pi_k_logp
        found["kl_sum"] = exact_kl(logits, pi_k_logits)
        found["k3_sum"] = kl_estimators(logp.float(), pi_k_logp.float())["k3"]
    return found


def batch_diagnostics(
    model: PreTrainedModel,
    pi_k: PreTrainedModel | None,
    batch: RolloutBatch,
    *,
    bf16: bool = False,
    batch_size: int = 256,
    max_tokens: int | None = None,
) -> dict[str, float]:
    """Exact KL to pi_k, token entropy and log-prob drift of correct/incorrect responses."""
    stats = policy_vs_pi_k(
        model, pi_k, batch.seqs, batch_size=batch_size, bf16=bf16, max_tokens=max_tokens
    )
    tokens = stats["tokens"].sum().clamp_min(1.0)
    out = {M.ENTROPY_BATCH: (stats["entropy_sum"].sum() / tokens).item()}
    if pi_k is not None:
        out[M.KL_EXACT_BATCH] = (stats["kl_sum"].sum() / tokens).item()
        out[M.KL_K3_BATCH] = (stats["k3_sum"].sum() / tokens).item()
        drift = stats["logp"] - stats["pi_k_logp"]  # (B,)
        correct = batch.rewards > 0
        out[M.DRIFT_CORRECT] = drift[correct].mean().item() if correct.any() else 0.0
        out[M.DRIFT_INCORRECT] = drift[~correct].mean().item() if (~correct).any() else 0.0
    return out


def sampling_seed(seed: int, chunk: int) -> int:
    """The generator seed of chunk `chunk` of an eval point's sampled responses.

    A function of the evaluator's seed and the chunk's position only, never of the eval step:
    one checkpoint measured twice draws the same responses. Each chunk has its own stream, so a
    chunk's draws do not shift with how long the previous chunks' responses were (which differs
    between two policies), and the stream is apart from the fixed batch's (`sample.seed`)."""
    digest = hashlib.sha256(f"erpd-eval-sampled-{seed}-{chunk}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


@dataclass
class Evaluator:
    """Everything measured at an eval point, from one place, for every stage.

    `eval.split` picks the problems: the reported eval split (default), or the task's
    validation split for calibration sweeps, which must never decide on the eval split."""

    task: Task
    tokenizer: PreTrainedTokenizerBase
    cfg: EvalConfig
    max_new_tokens: int
    chat_template: bool = False
    bf16: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        split = self.cfg.split
        problems = (
            self.task.validation_problems() if split == "validation" else self.task.eval_problems()
        )
        self.problems = problems[: self.cfg.size] if self.cfg.size else problems
        self.prompt_ids = encode_prompts(
            self.tokenizer, [p.prompt for p in self.problems], self.chat_template
        )
        self.timeouts = 0
        """Answers scored 0 for lack of time since the last eval point began (reward/timeouts)."""

    @property
    def interim_is_whole(self) -> bool:
        """Whether an interim point reads every problem a final one does."""
        return not self.cfg.interim_size or self.cfg.interim_size >= len(self.problems)

    def _rewards(self, problems: Sequence[Problem], texts: Sequence[str]) -> list[float]:
        scores = score_many(self.task, problems, texts)
        self.timeouts += scores.timeouts
        return scores.rewards

    def _accuracy(self, problems: Sequence[Problem], texts: Sequence[str]) -> float:
        return sum(self._rewards(problems, texts)) / len(problems) if problems else 0.0

    def _gen_sampled(self, model: PreTrainedModel, ids: list[list[int]]) -> list[list[int]]:
        """T = 1 responses to `ids`, chunk by chunk, each chunk from its own `sampling_seed`."""
        size = self.cfg.batch_size
        responses: list[list[int]] = []
        for chunk, start in enumerate(range(0, len(ids), size)):
            seed = sampling_seed(self.seed, chunk)
            responses += self._gen(model, ids[start : start + size], False, seed)
        return responses

    def _gen(
        self, model: PreTrainedModel, ids: list[list[int]], greedy: bool, seed: int
    ) -> list[list[int]]:
        return generate(
            model,
            self.tokenizer,
            ids,
            max_new_tokens=self.max_new_tokens,
            greedy=greedy,
            batch_size=self.cfg.batch_size,
            seed=seed,
            bf16=self.bf16,
        )

    def accuracy(
        self, model: PreTrainedModel, problems: Sequence[Problem], greedy: bool = True
    ) -> float:
        ids = encode_prompts(self.tokenizer, [p.prompt for p in problems], self.chat_template)
        texts = decode_responses(self.tokenizer, self._gen(model, ids, greedy, self.seed))
        return self._accuracy(problems, texts)

    def __call__(
        self,
        model: PreTrainedModel,
        *,
        step: int,
        pi_k: PreTrainedModel | None = None,
        batch: RolloutBatch | None = None,
        final: bool = True,
    ) -> dict[str, float]:
        """Every eval metric of `model` at eval point `step`. The step only labels the point:
        the same weights give the same values at any step. `final=False`: an interim point,
        on the first `eval.interim_size` problems (the same prompts and sampling draws)."""
        self.timeouts = 0
        n = len(self.problems) if final else (self.cfg.interim_size or len(self.problems))
        problems, prompt_ids = self.problems[:n], self.prompt_ids[:n]
        greedy = decode_responses(self.tokenizer, self._gen(model, prompt_ids, True, 0))
        rewards = self._rewards(problems, greedy)
        out = {M.ACC_EVAL: sum(rewards) / len(rewards) if rewards else 0.0}
        if len(rewards) > 1:  # a standard error needs two problems
            out[M.ACC_EVAL_SE] = M.standard_error(rewards)
        if self.cfg.sampled:  # seeded by the evaluator's seed alone: the step changes nothing
            out.update(self._sampled(model, pi_k, problems, prompt_ids))
        if batch is not None:
            prompts = batch.prompt_problems()
            out[M.ACC_TRAIN_BATCH] = self.accuracy(model, prompts, greedy=True)
            out[M.REWARD_MEAN] = batch.rewards.mean().item()
            out.update(
                batch_diagnostics(
                    model, pi_k, batch, bf16=self.bf16, batch_size=self.cfg.batch_size
                )
            )
        out[M.REWARD_TIMEOUTS] = float(self.timeouts)
        return out

    def _sampled(
        self,
        model: PreTrainedModel,
        pi_k: PreTrainedModel | None,
        held_out: Sequence[Problem],
        prompt_ids: list[list[int]],
    ) -> dict[str, float]:
        """avg@k and pass@k on the held-out prompts; entropy and sequence KL on the first
        sample of each prompt (one draw per prompt estimates them without bias, and the
        forward passes of pi_theta and pi_k over all k were two thirds of an avg@8 eval)."""
        k = max(1, self.cfg.pass_k)
        ids = [x for x in prompt_ids for _ in range(k)]
        responses = self._gen_sampled(model, ids)
        texts = decode_responses(self.tokenizer, responses)
        problems = [p for p in held_out for _ in range(k)]
        rewards = torch.tensor(self._rewards(problems, texts)).view(-1, k)  # (problems, k)
        per_problem = rewards.mean(dim=1)  # avg@k of each problem
        out = {M.ACC_EVAL_SAMPLED: per_problem.mean().item()}
        if len(per_problem) > 1:
            out[M.ACC_EVAL_SAMPLED_SE] = M.standard_error(per_problem.tolist())
        if k > 1:
            out[M.ACC_PASS_K] = rewards.amax(dim=1).mean().item()
        seqs = pack(
            ids[::k],
            responses[::k],
            int(self.tokenizer.pad_token_id),
            int(self.tokenizer.eos_token_id),
        )
        stats = policy_vs_pi_k(model, pi_k, seqs, bf16=self.bf16, batch_size=self.cfg.batch_size)
        out[M.ENTROPY_SAMPLED] = (
            stats["entropy_sum"].sum() / stats["tokens"].sum().clamp_min(1)
        ).item()
        if pi_k is not None:
            seq_k3 = kl_estimators(stats["logp"], stats["pi_k_logp"])["k3"]
            out[M.KL_SEQ_K3] = masked_mean(seq_k3, torch.ones_like(seq_k3)).item()
        return out
