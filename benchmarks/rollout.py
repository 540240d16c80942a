"""Rollout generation: erpd.rollout.generate vs transformers' own batched KV-cache generate.

    python benchmarks/rollout.py [--models tiny 34m] [--prompts 32] [--group 8]
        [--batch-sizes 16 64 256] [--max-new-tokens 48] [--repeats 2] [--device cpu]

Same random base, same prompts (N prompts x G copies, as a fixed batch is sampled), same batch
size, temperature 1: erpd's sampler (its own decode loop over a DynamicCache, seeded generator)
against `model.generate(do_sample=True, use_cache=True)`. A random model ends responses at
random, so both count the tokens they actually produced (up to and including the end token)
per second; the better of --repeats runs is kept, the two interleaved. Prints tokens/s per
batch size and the ratio erpd / transformers; writes JSON (--json).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from common import machine, write_json
from training import SHAPES, save_random_base, shape_args, task
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from erpd.models import load_model, load_tokenizer
from erpd.rollout import encode_prompts, generate, left_pad


def erpd_generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    ids: list[list[int]],
    batch_size: int,
    max_new_tokens: int,
) -> tuple[float, int]:
    started = time.perf_counter()
    out = generate(
        model, tokenizer, ids, max_new_tokens=max_new_tokens, batch_size=batch_size, seed=0
    )
    return time.perf_counter() - started, sum(len(r) for r in out)


@torch.no_grad()
def hf_generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    ids: list[list[int]],
    batch_size: int,
    max_new_tokens: int,
) -> tuple[float, int]:
    eos, pad = int(tokenizer.eos_token_id), int(tokenizer.pad_token_id)
    device = next(model.parameters()).device
    tokens = 0
    torch.manual_seed(0)
    started = time.perf_counter()
    for start in range(0, len(ids), batch_size):
        prompt, attn = left_pad(ids[start : start + batch_size], pad)
        out = model.generate(  # type: ignore[operator]
            input_ids=prompt.to(device),
            attention_mask=attn.to(device),
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=max_new_tokens,
            use_cache=True,
            eos_token_id=eos,
            pad_token_id=pad,
        )[:, prompt.shape[1] :].cpu()
        ended = (out == eos).long()
        # tokens up to and including the first end token (what erpd keeps)
        tokens += int(((ended.cumsum(-1) - ended) == 0).sum())
    return time.perf_counter() - started, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shape_args(ap, prompts=32, json="runs/bench/rollout.json", epochs=None)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    device = torch.device(args.device)
    rows = []
    print(f"{'model':>6} {'batch':>5} {'erpd tok/s':>10} {'hf tok/s':>9} {'erpd/hf':>8}")
    for name in args.models:
        with tempfile.TemporaryDirectory(prefix="erpd-bench-") as tmp:
            base = save_random_base(SHAPES[name], Path(tmp) / "base")
            model, tokenizer = load_model(base, device).eval(), load_tokenizer(base)
            problems = task().train_problems(args.prompts, seed=0)
            prompt_ids = encode_prompts(tokenizer, [p.prompt for p in problems])
            ids = [x for x in prompt_ids for _ in range(args.group)]
            for size in args.batch_sizes:
                best = {"erpd": 0.0, "hf": 0.0}
                for _ in range(args.repeats):
                    for label, fn in (("erpd", erpd_generate), ("hf", hf_generate)):
                        seconds, tokens = fn(model, tokenizer, ids, size, args.max_new_tokens)
                        best[label] = max(best[label], tokens / seconds)
                ratio = best["erpd"] / best["hf"]
                rows.append(
                    {
                        "model": name,
                        "batch_size": size,
                        "erpd_tok_s": best["erpd"],
                        "hf_tok_s": best["hf"],
                        "ratio": ratio,
                    }
                )
                print(
                    f"{name:>6} {size:>5} {best['erpd']:>10.0f} {best['hf']:>9.0f} {ratio:>7.2f}x"
                )
    write_json(args.json, {"machine": machine(device), "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
