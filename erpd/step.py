"""One optimizer step's gradient accumulation over a minibatch, and the step's metrics.

A minibatch is packed into forward passes (`forward_passes`: rows sorted by length, each pass
trimmed to its longest row); every pass divides by the whole minibatch's counts (`Normaliser`),
so the accumulated gradient is the minibatch's. The step's metrics describe the weights *before*
the update: exact KL to pi_k and entropy (token means over the minibatch), the loss terms, and
the importance-ratio statistics, computed once from all the minibatch's tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import PreTrainedModel

from erpd import distributed
from erpd import metrics as M
from erpd.config import StageConfig
from erpd.losses import Normaliser, entropy_and_kl, ratio_stats, token_logprobs
from erpd.models import autocast, frozen
from erpd.objective import Objective
from erpd.rollout import (
    RolloutBatch,
    Sequences,
    forward_passes,
    pass_tokens,
    response_logits,
    response_targets,
)

PI_K_CACHE_BYTES = 1 << 30
"""pi_k's full-vocabulary log-probs on the fixed batch are kept when they fit in this much
memory (response tokens x vocabulary x 4 bytes): the exact KL of every step then needs no
forward pass of pi_k. That holds for small vocabularies (the built-in tiny model's 17 tokens:
~0.5 MB for a 128 x 48 batch); a 150k-token vocabulary fits only ~1,800 tokens, so real models
run pi_k on every pass instead."""

# step metrics that passes contribute as partial sums (each is normalised by the minibatch's
# counts); the ratio statistics are computed over the whole minibatch instead
_SUMMED = (M.LOSS, M.KL_K1, M.KL_K3)


class PiKLogSoftmax:
    """pi_k's log-softmax over the vocabulary at the response positions of the fixed batch.

    Computed once and kept (packed: masked positions only) when it fits `budget` bytes;
    otherwise every call runs pi_k on the pass. Either way it is what the exact KL compares with.
    """

    def __init__(
        self,
        pi_k: PreTrainedModel,
        batch: RolloutBatch,
        *,
        bf16: bool,
        forward_batch_size: int,
        micro_batch_tokens: int | None,
        budget: int = PI_K_CACHE_BYTES,
    ) -> None:
        self.model, self.bf16 = pi_k, bf16
        self.device = next(pi_k.parameters()).device
        mask = batch.seqs.response_mask.bool()
        vocab = int(pi_k.get_output_embeddings().weight.shape[0])
        count = int(mask.sum())
        self.table: Tensor | None = None
        if count * vocab * 4 > budget:
            return
        self.slot = torch.full(mask.shape, -1, dtype=torch.long)
        self.slot[mask] = torch.arange(count)
        table = torch.zeros(count, vocab, device=self.device)  # (tokens, V)
        passes = distributed.RankPasses(
            pi_k,
            forward_passes(
                batch.seqs,
                max_rows=forward_batch_size,
                max_tokens=pass_tokens(self.device, micro_batch_tokens),
            ),
        )
        for rows, part in passes.mine:
            part = part.to(self.device)
            logprobs = self._forward(part)
            keep = part.response_mask.bool()
            slots = self.slot[rows, : keep.shape[1]].to(self.device)
            table[slots[keep]] = logprobs[keep]
        for _, part in passes.fillers:
            self._forward(part.to(self.device))
        self.table = passes.split.sum_(table)  # each rank filled its own passes' rows

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


class _Totals:
    """What the passes of one minibatch add up to, before the ranks' sums."""

    def __init__(self) -> None:
        self.kl = self.entropy = 0.0  # sums over response tokens
        self.summed: dict[str, float] = dict.fromkeys(_SUMMED, 0.0)
        self.values: dict[str, float] = {}  # per-minibatch values a loss reports (signal stats)
        self.log_ratios = [torch.zeros(0)]  # log pi_theta - log pi_old of every response token

    def add_loss_values(self, values: dict[str, float]) -> None:
        for key, value in values.items():
            if key in _SUMMED:
                self.summed[key] += value
            else:
                self.values[key] = value

    def metrics(
        self, split: distributed.Split, norm: Normaliser, bounds: tuple[float, float]
    ) -> dict[str, float]:
        # every rank ran its share of the minibatch: the step's metrics are sums over all ranks
        totals = split.sums([self.kl, self.entropy, *self.summed.values()])
        values = dict(self.values)
        values.update(zip(self.summed, totals[2:], strict=True))
        tokens = max(norm.tokens, 1.0)
        values[M.KL_EXACT] = totals[0] / tokens
        values[M.ENTROPY_TOKEN] = totals[1] / tokens
        ratios = split.cat(torch.cat(self.log_ratios))
        values.update(ratio_stats(ratios, torch.ones_like(ratios), *bounds))
        return values


class MinibatchStep:
    """Forward and backward a minibatch in passes, accumulating gradients; `__call__` returns
    the step's metrics. The optimizer step itself is the loop's."""

    def __init__(
        self,
        policy: PreTrainedModel,
        pi_k: PreTrainedModel,
        batch: RolloutBatch,
        objective: Objective,
        cfg: StageConfig,
        *,
        bf16: bool,
    ) -> None:
        self.policy, self.batch, self.objective, self.cfg, self.bf16 = (
            policy,
            batch,
            objective,
            cfg,
            bf16,
        )
        self.device = next(policy.parameters()).device
        self.pi_k = PiKLogSoftmax(
            pi_k,
            batch,
            bf16=bf16,
            forward_batch_size=cfg.forward_batch_size,
            micro_batch_tokens=cfg.micro_batch_tokens,
        )

    def __call__(self, index: Tensor) -> dict[str, float]:
        mask = self.batch.seqs.response_mask[index]
        norm = Normaliser.of(mask, self.batch.rewards[index])
        passes = distributed.RankPasses(
            self.policy,
            forward_passes(
                self.batch.seqs,
                index,
                max_rows=self.cfg.micro_batch_size,
                max_tokens=pass_tokens(self.device, self.cfg.micro_batch_tokens),
            ),
        )
        totals = _Totals()
        for rows, trimmed in passes.mine:
            part = trimmed.to(self.device)
            logits, logprobs, loss, values = self._forward(rows, part, norm)
            passes.backward(loss)
            self._measure(totals, rows, part, logits, logprobs)
            totals.add_loss_values(values)
            del logits, logprobs, loss  # free activations before the next pass
        for rows, trimmed in passes.fillers:
            self._filler(passes, rows, trimmed.to(self.device), norm)
        return totals.metrics(passes.split, norm, self.objective.ratio_bounds)

    def _forward(
        self, rows: Tensor, part: Sequences, norm: Normaliser
    ) -> tuple[Tensor, Tensor, Tensor, dict[str, float]]:
        with autocast(self.device, self.bf16):
            logits = response_logits(self.policy, part)  # (b, w, V)
            logprobs = token_logprobs(logits, response_targets(part))  # (b, w)
            loss, values = self.objective.loss(rows, logprobs, part.response_mask, norm)
        return logits, logprobs, loss, values

    @torch.no_grad()
    def _measure(
        self, totals: _Totals, rows: Tensor, part: Sequences, logits: Tensor, logprobs: Tensor
    ) -> None:
        m = part.response_mask
        entropy, kl = entropy_and_kl(logits.detach(), self.pi_k(rows, part))
        totals.kl += (kl * m).sum().item()
        totals.entropy += (entropy * m).sum().item()
        pi_old = self.objective.pi_old_logprobs(rows)[:, : m.shape[1]].to(self.device)
        totals.log_ratios.append((logprobs.detach() - pi_old)[m.bool()].float().cpu())

    def _filler(
        self, passes: distributed.RankPasses, rows: Tensor, part: Sequences, norm: Normaliser
    ) -> None:
        """A pass weighted zero, run only so this rank's collectives match the others'."""
        _, _, loss, _ = self._forward(rows, part, norm)
        passes.backward(loss * 0.0)
        with torch.no_grad():
            self.pi_k(rows, part)  # pi_k's forward, when not cached, is sharded too
