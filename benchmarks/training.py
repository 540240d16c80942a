"""What the training benchmarks share: model shapes, a random base on disk, a fixed batch, a sink
that records step metrics, FLOP counting and the bare PyTorch reference loop.

Nothing is downloaded: the base is a randomly initialised Llama with erpd's character tokenizer
(a random model samples end tokens at random, so responses have realistic, uneven lengths).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedModel

from erpd import metrics as M
from erpd.config import ArithmeticConfig, EvalConfig, SampleConfig, TaskSpec, TinyModelConfig
from erpd.losses import group_advantages, token_logprobs
from erpd.models import autocast, build_char_tokenizer, build_tiny_model, load_tokenizer
from erpd.rollout import RolloutBatch, response_logits, response_targets, sample_rollout
from erpd.stage import StageEnv
from erpd.tasks import ALPHABET, Task, build_task

SHAPES = {
    # erpd's built-in tiny model (~1M parameters)
    "tiny": TinyModelConfig(),
    # ~34M parameters: hidden 512, 8 layers, MLP 2048
    "34m": TinyModelConfig(
        hidden_size=512, num_layers=8, num_heads=8, intermediate_size=2048, max_positions=256
    ),
}

# prompts like "123+456+789=": long enough that the prompt is a real share of each sequence
TASK = TaskSpec(arithmetic=ArithmeticConfig(digits=3, terms=3, operators="+-", eval_size=64))


def shape_args(
    ap: argparse.ArgumentParser, *, prompts: int, json: str, epochs: int | None = 4
) -> None:
    """The options every training benchmark takes: which shapes, how big a fixed batch, how
    many epochs of which minibatch, where, and where the JSON goes."""
    ap.add_argument("--models", nargs="+", choices=sorted(SHAPES), default=["tiny", "34m"])
    ap.add_argument("--prompts", type=int, default=prompts)
    ap.add_argument("--group", type=int, default=8)
    if epochs is not None:
        ap.add_argument("--epochs", type=int, default=epochs)
        ap.add_argument("--minibatch", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=json)


def task() -> Task:
    return build_task(TASK)


def save_random_base(shape: TinyModelConfig, out: Path, seed: int = 0) -> Path:
    """A randomly initialised model + tokenizer as a Hugging Face directory (what TRL loads)."""
    tokenizer = build_char_tokenizer(ALPHABET)
    torch.manual_seed(seed)
    model = build_tiny_model(tokenizer, shape)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


def matmul_params(model: torch.nn.Module) -> int:
    """Parameters that take part in matmuls: all but the input embedding (a table lookup)."""
    embedding = model.get_input_embeddings()  # type: ignore[operator]
    skip = {id(p) for p in embedding.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def fixed_batch(
    model: PreTrainedModel,
    base: Path,
    *,
    prompts: int,
    group: int,
    max_new_tokens: int,
    seed: int = 0,
    bf16: bool = False,
) -> RolloutBatch:
    cfg = SampleConfig(num_prompts=prompts, group_size=group, seed=seed)
    batch = sample_rollout(
        model,
        load_tokenizer(base),
        task(),
        cfg,
        max_new_tokens=max_new_tokens,
        bf16=bf16,
    )
    # a random model solves nothing: every advantage would be 0 and no weight would move
    batch.rewards = torch.tensor([parity_reward(r) for r in batch.responses])
    batch.advantages = group_advantages(batch.rewards, group)
    return batch


def parity_reward(response: str) -> float:
    """The benchmarks' stand-in reward (erpd and TRL alike): 1 for an even-length response.
    It gives most groups non-zero advantages, so training moves the weights; what an update
    costs does not depend on the reward."""
    return float(len(response) % 2 == 0)


def env(
    device: torch.device, max_new_tokens: int, sink: M.MetricSink, bf16: bool = False
) -> StageEnv:
    """A stage environment without held-out evals: the benchmark times the updates."""
    return StageEnv(
        task=task(),
        eval=EvalConfig(size=16, sampled=False),
        device=device,
        max_new_tokens=max_new_tokens,
        bf16=bf16,
        sink=sink,
        evaluate=False,
        eval_start=False,
    )


@dataclass
class StepRecorder:
    """A metric sink that keeps each training step's throughput (`perf/tokens_per_s`)."""

    rates: list[float] = field(default_factory=list)

    def log(self, run: str, step: int, values: dict[str, float]) -> None:
        if M.TOKENS_PER_S in values:
            self.rates.append(values[M.TOKENS_PER_S])

    def close(self) -> None:
        pass


def batch_tokens(batch: RolloutBatch) -> tuple[int, int]:
    """(response tokens, all real tokens) of the fixed batch: what an epoch trains on, and what
    an epoch's forward passes process (prompt + response, padding excluded)."""
    response = int(batch.seqs.response_mask.sum().item())
    prompt = int(batch.seqs.attention_mask[:, : batch.seqs.prompt_len].sum().item())
    return response, prompt + response


def bare_loop(
    model: PreTrainedModel,
    pi_k: PreTrainedModel | None,
    batch: RolloutBatch,
    *,
    epochs: int,
    minibatch: int,
    lr: float = 1e-4,
    bf16: bool = False,
) -> float:
    """The floor: a plain policy-gradient loop over the same minibatches, with the same work per
    step (policy forward + backward, a no-grad pi_k forward when `pi_k` is given, an
    AdamW step) and nothing else. Returns the seconds it took."""
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.eval()  # no dropout, as in erpd
    started = time.perf_counter()
    for epoch in range(epochs):
        order = torch.randperm(len(batch), generator=torch.Generator().manual_seed(epoch))
        for index in order.split(minibatch):
            mb = batch.seqs.rows(index).to(device)
            adv = batch.advantages[index].to(device)
            with autocast(device, bf16):
                lp = token_logprobs(response_logits(model, mb), response_targets(mb))
                mask = mb.response_mask
                loss = -(lp * adv[:, None] * mask).sum() / mask.sum().clamp_min(1)
                if pi_k is not None:
                    with torch.no_grad():
                        response_logits(pi_k, mb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started
