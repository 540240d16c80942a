"""Stage-2 cost against stage 1 at equal epochs, and the whole-batch passes each one makes.

    python benchmarks/stage2_cost.py [--models tiny 34m] [--prompts 8] [--group 8]
        [--epochs 4] [--minibatch 32] [--max-new-tokens 48] [--device cpu]

From one random base and one fixed batch: stage 1 (sapo) trains a teacher for --epochs, then
stage 2 (logratio, no KL budget so it runs every epoch) distils it into the base for the same
epochs and minibatches. Counts the teacher-forced passes over the whole batch each stage makes
(teacher log-probs should be computed once, pi_old once per epoch after the first; pi_k's
log-probs come with the batch) and prints wall time and update time of both, and the ratio
stage 2 / stage 1. Writes JSON (--json).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from common import machine, write_json
from training import SHAPES, StepRecorder, env, fixed_batch, save_random_base, shape_args

import erpd.objective
import erpd.stage1
import erpd.stage2
from erpd.config import Stage1Config, Stage2Config
from erpd.models import load_model

CALLS: Counter[str] = Counter()


def counted(module: Any, label: str) -> None:
    """Count calls of `module.sequence_logprobs` (a whole-batch pass) under `label`."""
    original: Callable[..., Any] = module.sequence_logprobs

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        CALLS[label] += 1
        return original(*args, **kwargs)

    module.sequence_logprobs = wrapper


def measure(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    common = {"epochs": args.epochs, "minibatch_size": args.minibatch, "seed": 0}
    with tempfile.TemporaryDirectory(prefix="erpd-bench-") as tmp:
        base = save_random_base(SHAPES[name], Path(tmp) / "base")
        batch = fixed_batch(
            load_model(base, device),
            base,
            prompts=args.prompts,
            group=args.group,
            max_new_tokens=args.max_new_tokens,
        )
        out: dict[str, Any] = {"model": name}
        for stage in ("stage1", "stage2"):
            CALLS.clear()
            recorder = StepRecorder()
            started = time.perf_counter()
            if stage == "stage1":
                result = erpd.stage1.run_stage1(
                    pi_k=base,
                    batch=batch,
                    cfg=Stage1Config(objective="sapo", lr=1e-4, **common),
                    env=env(device, args.max_new_tokens, recorder),
                    run_dir=Path(tmp) / stage,
                    run=stage,
                )
                assert result.checkpoint is not None
                teacher = result.checkpoint
            else:
                erpd.stage2.run_stage2(
                    pi_k=base,
                    teachers=[teacher],
                    batch=batch,
                    cfg=Stage2Config(signal="logratio", kl_budget=None, lr=1e-5, **common),
                    env=env(device, args.max_new_tokens, recorder),
                    run_dir=Path(tmp) / stage,
                    run=stage,
                )
            out[f"{stage}_s"] = time.perf_counter() - started
            out[f"{stage}_steps"] = len(recorder.rates)
            out[f"{stage}_tok_s"] = sum(recorder.rates) / max(len(recorder.rates), 1)
            out[f"{stage}_passes"] = dict(CALLS)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shape_args(ap, prompts=8, json="runs/bench/stage2_cost.json")
    args = ap.parse_args()
    device = torch.device(args.device)
    counted(erpd.stage2, "teacher")  # teacher (and pi_0) log-probs
    counted(erpd.objective, "pi_old")  # re-anchoring at epoch starts
    rows = [measure(name, args, device) for name in args.models]
    print(
        f"{'model':>6} {'stage1 s':>9} {'stage2 s':>9} {'s2/s1':>6} "
        f"{'s1 tok/s':>9} {'s2 tok/s':>9}  stage-2 whole-batch passes"
    )
    for r in rows:
        print(
            f"{r['model']:>6} {r['stage1_s']:>9.1f} {r['stage2_s']:>9.1f} "
            f"{r['stage2_s'] / r['stage1_s']:>6.2f} {r['stage1_tok_s']:>9.0f} "
            f"{r['stage2_tok_s']:>9.0f}  {r['stage2_passes']}"
        )
    write_json(args.json, {"machine": machine(device), "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
