"""Frozen models on several ranks: keep a teacher (or pi_k) sharded, or score the batch once?

    python -m torch.distributed.run --standalone --nproc-per-node 2 \\
        benchmarks/frozen_models.py [--model 34m] [--prompts 16] [--group 8] [--minibatch 32]

(or plain `python benchmarks/frozen_models.py` for one process). On one random base and one
fixed batch, with the policy and a frozen model sharded as a stage shards them, it measures per
rank: one training step of the policy (forward + backward over a minibatch's passes + AdamW),
one forward of the frozen model over the same minibatch (what keeping it loaded adds to every
step), one scoring pass of the frozen model over the whole batch (what precomputing costs, once),
and the memory each option holds. A stage-2 teacher needs only its per-token log-probs, so the
batch-once option is exact for it; pi_k's exact KL needs its whole distribution, which per token
is vocabulary x 4 bytes. Prints the ratios; writes JSON with --json (rank 0).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any

import torch
from common import machine, write_json
from training import SHAPES, fixed_batch, save_random_base

from erpd import distributed
from erpd.losses import token_logprobs
from erpd.models import adamw, load_model
from erpd.rollout import (
    RolloutBatch,
    forward_passes,
    pass_tokens,
    response_logits,
    response_targets,
    sequence_logprobs,
)
from erpd.stage import load_frozen, load_stage_models


def timed(fn: Any, repeats: int) -> float:
    """Median seconds of `fn()` over `repeats` runs after one warm-up (ranks in step)."""
    fn()
    times = []
    for _ in range(repeats):
        distributed.barrier()
        tick = time.perf_counter()
        fn()
        distributed.barrier()
        times.append(time.perf_counter() - tick)
    return median(times)


def local_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters this rank holds (its shards)."""
    total = 0
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel() * local.element_size()
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=sorted(SHAPES), default="34m")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--minibatch", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    device = distributed.join(torch.device("cpu"))
    with tempfile.TemporaryDirectory(prefix="erpd-bench-") as tmp:
        root = Path(distributed.from_main(tmp))
        if distributed.is_main():
            base = save_random_base(SHAPES[args.model], root / "base")
            fixed_batch(
                load_model(base, device),
                base,
                prompts=args.prompts,
                group=args.group,
                max_new_tokens=args.max_new_tokens,
            ).save(root / "batch")
        distributed.barrier()
        out = measure(root / "base", RolloutBatch.load(root / "batch"), args, device)
        distributed.barrier()
    if distributed.is_main():
        report(out, args)
    distributed.exit_rank(0)


def measure(
    base: Path, batch: RolloutBatch, args: argparse.Namespace, device: torch.device
) -> dict[str, Any]:
    policy, _, _ = load_stage_models(base, device)
    frozen = load_frozen(base, device)
    optimizer = adamw(policy, lr=1e-6, weight_decay=0.0)
    index = torch.arange(min(args.minibatch, len(batch)))
    minibatch = batch.seqs.rows(index)
    budget = pass_tokens(device, None)

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        passes = distributed.RankPasses(
            policy, forward_passes(batch.seqs, index, max_tokens=budget)
        )
        for weight, group in ((1.0, passes.mine), (0.0, passes.fillers)):
            for _, part in group:
                lp = token_logprobs(response_logits(policy, part), response_targets(part))
                tokens = max(float(minibatch.response_mask.sum()), 1)
                passes.backward(weight * (lp * part.response_mask).sum() / tokens)
        optimizer.step()

    vocab = int(policy.get_output_embeddings().weight.shape[0])
    tokens = int(batch.seqs.response_mask.sum())
    return {
        "machine": machine(device),
        "model": args.model,
        "ranks": distributed.size(),
        "batch_rows": len(batch),
        "response_tokens": tokens,
        "steps_per_epoch": -(-len(batch) // args.minibatch),
        "train_step_s": timed(train_step, args.repeats),
        "frozen_forward_per_step_s": timed(
            lambda: sequence_logprobs(frozen, minibatch, max_tokens=budget), args.repeats
        ),
        "score_batch_once_s": timed(
            lambda: sequence_logprobs(frozen, batch.seqs, max_tokens=budget), args.repeats
        ),
        "frozen_bytes_per_rank": local_bytes(frozen),
        "per_token_logprobs_bytes": batch.seqs.response_mask.numel() * 4,
        "full_vocab_table_bytes": tokens * vocab * 4,
    }


def report(out: dict[str, Any], args: argparse.Namespace) -> None:
    step, fwd, once = (
        out["train_step_s"],
        out["frozen_forward_per_step_s"],
        out["score_batch_once_s"],
    )
    per_epoch = out["steps_per_epoch"] * fwd
    mib = 1 << 20
    rows = [
        ("training step (fwd + bwd + AdamW)", f"{step * 1e3:8.1f} ms"),
        ("kept: + forward per step", f"{fwd * 1e3:8.1f} ms = {fwd / step:.2f} x a step"),
        (f"kept: per epoch ({out['steps_per_epoch']} steps)", f"{per_epoch * 1e3:8.1f} ms"),
        ("kept: memory per rank", f"{out['frozen_bytes_per_rank'] / mib:8.1f} MiB"),
        ("once: whole batch", f"{once * 1e3:8.1f} ms = {once / per_epoch:.2f} x an epoch kept"),
        ("once: per-token log-probs", f"{out['per_token_logprobs_bytes'] / mib:8.2f} MiB"),
        ("full-vocabulary table", f"{out['full_vocab_table_bytes'] / mib:8.1f} MiB"),
    ]
    print(f"{out['machine']}; {out['model']} on {out['ranks']} rank(s), {out['batch_rows']} rows")
    for label, value in rows:
        print(f"  {label:<36} {value}")
    if args.json:
        write_json(args.json, out)


if __name__ == "__main__":
    main()
