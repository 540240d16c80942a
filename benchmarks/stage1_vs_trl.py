"""Stage-1 update throughput: erpd vs TRL's GRPOTrainer vs a bare PyTorch loop, with MFU.

    python benchmarks/stage1_vs_trl.py [--models tiny 34m] [--prompts 16] [--group 8]
        [--epochs 4] [--minibatch 32] [--max-new-tokens 48] [--device cpu]

For each model shape, from the same random base on disk and the same prompts:
- erpd: sample the fixed batch (N prompts x G responses), then `run_stage1` (sapo) for
  --epochs epochs of --minibatch rows. Update time is the sum of the steps' own timings
  (`perf/tokens_per_s`); end to end is sampling + the stage (load, steps, final diagnostics,
  checkpoint).
- TRL: `GRPOTrainer` with loss_type="sapo", num_iterations=--epochs and one generation batch
  of N x G rows split into minibatches, so it takes the same number of optimizer steps on
  the same number of rows. beta > 0, so it also computes reference log-probs (TRL does that
  once per generation batch). `_generate_and_score_completions` is timed on its own: the
  update phase is train() minus that.
- erpd-bf16: the same stage with bf16 autocast (fp32 master weights and log-probs), on the
  same fixed batch, so its kl/exact and entropy after training show whether accuracy holds.
- bare: a plain policy-gradient loop over erpd's fixed batch (forward, backward, AdamW) - the
  floor. "bare+ref" adds a no-grad reference forward per step, the work erpd's exact KL needs
  when pi_k's distribution is not cached.

tokens/s counts response tokens (the ones a loss is taken over). MFU is 6 x matmul params x
real tokens (prompt + response, no padding) per step, over the fp32 GEMM peak measured in the
same run (benchmarks/gemm_peak.py). Prints a table and writes JSON (--json).
"""

from __future__ import annotations

import argparse
import copy
import logging
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from common import machine, write_json
from gemm_peak import peak_flops
from training import (
    SHAPES,
    StepRecorder,
    bare_loop,
    batch_tokens,
    env,
    fixed_batch,
    matmul_params,
    parity_reward,
    save_random_base,
    shape_args,
    task,
)

from erpd import metrics as M
from erpd.config import Stage1Config
from erpd.models import load_model
from erpd.rollout import RolloutBatch
from erpd.stage1 import run_stage1


def erpd_run(
    base: Path,
    out: Path,
    args: argparse.Namespace,
    device: torch.device,
    *,
    bf16: bool = False,
    batch: RolloutBatch | None = None,
) -> dict:
    """Sample the fixed batch (timed; `batch` given: train on that one instead, so fp32 and
    bf16 train on the same data) and train stage 1 on it."""
    started = time.perf_counter()
    model = load_model(base, device)
    sampled_batch = fixed_batch(
        model,
        base,
        prompts=args.prompts,
        group=args.group,
        max_new_tokens=args.max_new_tokens,
        bf16=bf16,
    )
    batch = batch or sampled_batch
    sampled = time.perf_counter()
    del model
    recorder = StepRecorder()
    cfg = Stage1Config(
        objective="sapo", epochs=args.epochs, minibatch_size=args.minibatch, lr=1e-4, seed=0
    )
    result = run_stage1(
        pi_k=base,
        batch=batch,
        cfg=cfg,
        env=env(device, args.max_new_tokens, recorder, bf16=bf16),
        run_dir=out,
        run="bench",
        resume=False,
    )
    ended = time.perf_counter()
    response, real = batch_tokens(batch)
    # each step logs response tokens / its own seconds; summing seconds gives the update phase
    per_step = [
        batch.seqs.response_mask[idx].sum().item() / rate
        for idx, rate in zip(_minibatches(len(batch), args), recorder.rates, strict=True)
    ]
    return {
        "steps": result.steps,
        "response_tokens": response * args.epochs,
        "real_tokens": real * args.epochs,
        "update_s": sum(per_step),
        "sample_s": sampled - started,
        "end_to_end_s": ended - started,
        "kl_exact": result.summary[M.KL_EXACT_BATCH],
        "entropy": result.summary[M.ENTROPY_BATCH],
        "batch": batch,
    }


def _minibatches(n: int, args: argparse.Namespace) -> list[torch.Tensor]:
    from erpd.schedule import epoch_order

    return [
        index
        for epoch in range(args.epochs)
        for index in epoch_order(n, 0, epoch).split(args.minibatch)
    ]


def trl_run(base: Path, out: Path, args: argparse.Namespace, device: torch.device) -> dict:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    problems = task().train_problems(args.prompts, seed=0)

    def reward(prompts: list[str], completions: list[str], **_: Any) -> list[float | None]:
        return [parity_reward(c) for c in completions]

    rows = args.prompts * args.group
    per_generation = rows // args.minibatch
    config = GRPOConfig(
        output_dir=str(out),
        per_device_train_batch_size=args.minibatch,
        gradient_accumulation_steps=1,
        steps_per_generation=per_generation,
        num_generations=args.group,
        num_iterations=args.epochs,
        max_steps=args.epochs * per_generation,
        max_completion_length=args.max_new_tokens,
        loss_type="sapo",
        beta=0.01,
        learning_rate=1e-4,
        temperature=1.0,
        use_cpu=device.type == "cpu",
        bf16=False,
        report_to=[],
        logging_steps=10**6,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    dataset = Dataset.from_list([{"prompt": p.prompt} for p in problems])
    started = time.perf_counter()
    trainer = GRPOTrainer(model=str(base), reward_funcs=reward, args=config, train_dataset=dataset)
    generation = {"s": 0.0, "tokens": 0, "real": 0}
    original = trainer._generate_and_score_completions

    def timed(inputs: Any) -> Any:
        tick = time.perf_counter()
        batch = original(inputs)
        generation["s"] += time.perf_counter() - tick
        generation["tokens"] += int(batch["completion_mask"].sum())
        generation["real"] += int(batch["prompt_mask"].sum() + batch["completion_mask"].sum())
        return batch

    trainer._generate_and_score_completions = timed  # type: ignore[method-assign]
    built = time.perf_counter()
    trainer.train()
    ended = time.perf_counter()
    return {
        "steps": trainer.state.global_step,
        "response_tokens": generation["tokens"] * args.epochs,
        "real_tokens": generation["real"] * args.epochs,
        "update_s": ended - built - generation["s"],
        "sample_s": generation["s"],
        "end_to_end_s": ended - started,
    }


def measure(
    name: str, args: argparse.Namespace, device: torch.device, peaks: tuple[float, float]
) -> list[dict]:
    shape = SHAPES[name]
    with tempfile.TemporaryDirectory(prefix="erpd-bench-") as tmp:
        base = save_random_base(shape, Path(tmp) / "base")
        params = matmul_params(load_model(base))
        erpd = erpd_run(base, Path(tmp) / "erpd", args, device)
        batch = erpd.pop("batch")
        bf16 = erpd_run(base, Path(tmp) / "bf16", args, device, bf16=True, batch=batch)
        bf16.pop("batch")
        trl = trl_run(base, Path(tmp) / "trl", args, device)
        model = load_model(base, device)
        pi_k = copy.deepcopy(model).eval().requires_grad_(False)
        bare = {
            "update_s": bare_loop(model, None, batch, epochs=args.epochs, minibatch=args.minibatch),
            "response_tokens": erpd["response_tokens"],
            "real_tokens": erpd["real_tokens"],
        }
        model = load_model(base, device)
        bare_ref = dict(bare)
        bare_ref["update_s"] = bare_loop(
            model, pi_k, batch, epochs=args.epochs, minibatch=args.minibatch
        )
    rows = []
    runs = (
        ("erpd", erpd),
        ("erpd-bf16", bf16),
        ("trl", trl),
        ("bare", bare),
        ("bare+ref", bare_ref),
    )
    for label, r in runs:
        row = {
            "model": name,
            "params_m": params / 1e6,
            "impl": label,
            "update_tok_s": r["response_tokens"] / r["update_s"],
            # bf16 against the bf16 GEMM peak, everything else against fp32's
            "mfu": 6 * params * r["real_tokens"] / r["update_s"] / peaks[label == "erpd-bf16"],
            **{k: v for k, v in r.items() if k != "batch"},
        }
        if "end_to_end_s" in r:
            row["end_to_end_tok_s"] = r["response_tokens"] / r["end_to_end_s"]
        rows.append(row)
    return rows


def pick(rows: list[dict], model: str, impl: str) -> dict:
    return next(r for r in rows if r["model"] == model and r["impl"] == impl)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shape_args(ap, prompts=16, json="runs/bench/stage1_vs_trl.json")
    args = ap.parse_args()
    if (args.prompts * args.group) % args.minibatch:
        ap.error("--minibatch must divide --prompts x --group (TRL splits one generation batch)")
    device = torch.device(args.device)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    peaks = (peak_flops("fp32", device), peak_flops("bf16", device))
    print(
        f"GEMM peak: fp32 {peaks[0] / 1e9:.1f}, bf16 {peaks[1] / 1e9:.1f} GFLOP/s "
        f"on {machine(device)}"
    )
    rows = [row for name in args.models for row in measure(name, args, device, peaks)]
    header = (
        f"{'model':>6} {'impl':>9} {'steps':>5} {'update tok/s':>12} {'MFU':>6} "
        f"{'e2e tok/s':>9} {'vs TRL':>7}"
    )
    print(header)
    for row in rows:
        trl = pick(rows, row["model"], "trl")
        e2e = f"{row['end_to_end_tok_s']:>9.0f}" if "end_to_end_tok_s" in row else f"{'-':>9}"
        print(
            f"{row['model']:>6} {row['impl']:>9} {row.get('steps', '-'):>5} "
            f"{row['update_tok_s']:>12.0f} {row['mfu']:>6.1%} {e2e} "
            f"{row['update_tok_s'] / trl['update_tok_s']:>6.2f}x"
        )
    for name in args.models:
        e, b, t = (pick(rows, name, impl) for impl in ("erpd", "erpd-bf16", "trl"))
        print(
            f"{name}: erpd/TRL update {e['update_tok_s'] / t['update_tok_s']:.2f}x "
            f"(bf16 {b['update_tok_s'] / t['update_tok_s']:.2f}x), end to end "
            f"{e['end_to_end_tok_s'] / t['end_to_end_tok_s']:.2f}x "
            f"(bf16 {b['end_to_end_tok_s'] / t['end_to_end_tok_s']:.2f}x); bf16 vs fp32 after "
            f"training on the same batch: kl/exact {b['kl_exact']:.4g} vs {e['kl_exact']:.4g}, "
            f"entropy {b['entropy']:.4g} vs {e['entropy']:.4g}"
        )
    write_json(
        args.json,
        {
            "machine": machine(device),
            "peak_gflops": {"fp32": peaks[0] / 1e9, "bf16": peaks[1] / 1e9},
            "args": vars(args),
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
