"""Responses from vLLM (`sample.backend: vllm`): the optional fast sampler on a GPU machine.

Only the sampled token ids are taken from vLLM. Its log-probs come from another kernel and
numerics than the trainer's, so the batch's pi_k log-probs are recomputed by the
trainer's own forward pass, as for every backend: stage 1's first ratio is exactly 1.

vLLM is never needed by the tests or on a CPU; `pip install 'erpd-hub[vllm]'` adds it to a GPU
image. This module has not been run in CI (no GPU there); the contract it must meet is the
same list of responses `erpd.rollout.generate` returns.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from pathlib import Path

import torch

from erpd.config import SampleConfig
from erpd.errors import ConfigError


def vllm_generate(
    model_dir: str | Path,
    prompt_ids: Sequence[Sequence[int]],
    cfg: SampleConfig,
    *,
    max_new_tokens: int,
    seed: int,
    eos_id: int,
) -> list[list[int]]:
    """One response (token ids, ending with the end token if one was sampled) per prompt."""
    if not torch.cuda.is_available():
        raise ConfigError("sample.backend", "vllm needs a CUDA GPU; use 'transformers' here")
    try:
        from vllm import LLM, SamplingParams
    except ImportError as exc:
        raise ConfigError(
            "sample.backend", "vllm is not installed (pip install 'erpd-hub[vllm]')"
        ) from exc
    llm = LLM(
        model=str(model_dir),
        tokenizer=str(model_dir),
        trust_remote_code=False,
        seed=seed,
        gpu_memory_utilization=cfg.vllm_memory,
    )
    params = SamplingParams(
        n=1,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        max_tokens=max_new_tokens,
        seed=seed,
        stop_token_ids=[eos_id],
        detokenize=False,
    )
    try:
        outputs = llm.generate([{"prompt_token_ids": list(ids)} for ids in prompt_ids], params)
    finally:
        del llm  # its weights and KV cache leave the GPU before training starts
        gc.collect()
        torch.cuda.empty_cache()
    responses = []
    for out in outputs:
        tokens = list(out.outputs[0].token_ids)
        if eos_id in tokens:
            tokens = tokens[: tokens.index(eos_id) + 1]
        elif out.outputs[0].finish_reason == "stop":  # stopped on the end token, not shown
            tokens.append(eos_id)
        responses.append(tokens)
    return responses
