"""What a stage plugs into the shared loop: its loss on a minibatch, and pi_old.

The loop (erpd/loop.py) knows nothing about the method; stage 1 and stage 2 each hand it an
`Objective`. Both keep pi_old the same way (`AnchoredObjective`): it starts as pi_k, the fixed
batch's own log-probs, so the first importance ratio is exactly 1, and a stage that re-anchors
recomputes it from the current weights at the start of every epoch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import Tensor
from transformers import PreTrainedModel

from erpd.config import StageConfig
from erpd.losses import Normaliser
from erpd.rollout import RolloutBatch, sequence_logprobs


class Objective(Protocol):
    """What a stage contributes to the shared loop."""

    ratio_bounds: tuple[float, float]
    """(low, high): ratio/clip_frac counts tokens outside [1 - low, 1 + high]."""

    def on_epoch_start(self, epoch: int, policy: PreTrainedModel) -> None:
        """Re-anchor pi_old if the stage does so (called before the epoch's first step)."""

    def loss(
        self, index: Tensor, logprobs: Tensor, mask: Tensor, norm: Normaliser
    ) -> tuple[Tensor, dict[str, float]]:
        """Loss of rows `index` given pi_theta's log-probs (b, w), normalised by `norm`."""

    def pi_old_logprobs(self, index: Tensor) -> Tensor:
        """pi_old's log-probs of rows `index` (the denominator of the importance ratio)."""

    def state(self) -> dict[str, Tensor]:
        """Tensors a resume point must carry (e.g. the epoch's pi_old log-probs)."""

    def load_state(self, tensors: dict[str, Tensor]) -> None: ...


class AnchoredObjective:
    """pi_old bookkeeping both stages share: its log-probs, re-anchoring, resume state."""

    # the resume point's tensor name; kept from the first format so old points still load
    STATE_KEY = "anchor"

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
        self.pi_old = batch.pi_k_logprobs  # (B, R)

    def on_epoch_start(self, epoch: int, policy: PreTrainedModel) -> None:
        if self.reanchor and epoch > 0:
            self.pi_old = sequence_logprobs(
                policy,
                self.batch.seqs,
                bf16=self.bf16,
                batch_size=self.forward_batch_size,
                max_tokens=self.pass_tokens,
            )

    def pi_old_logprobs(self, index: Tensor) -> Tensor:
        return self.pi_old[index]

    @staticmethod
    def rows(values: Tensor, index: Tensor, like: Tensor) -> Tensor:
        """values[index] cut to the width of `like` (a trimmed pass) and on its device."""
        return values[index, : like.shape[1]].to(like.device)

    def state(self) -> dict[str, Tensor]:
        return {self.STATE_KEY: self.pi_old}

    def load_state(self, tensors: dict[str, Tensor]) -> None:
        if self.STATE_KEY in tensors:
            self.pi_old = tensors[self.STATE_KEY]


@dataclass
class LoopParts:
    """What one stage's loop trains, and on what."""

    policy: PreTrainedModel  # pi_theta, starting as pi_k
    pi_k: PreTrainedModel  # frozen: the KL of every step is measured against it
    batch: RolloutBatch
    objective: Objective
    cfg: StageConfig
    run: str  # the name its metric points are logged under
