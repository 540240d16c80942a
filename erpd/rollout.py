"""Sampling with the KV cache, teacher-forced log-probs, and the fixed RolloutBatch of a round.

Sequence layout, shared by every forward pass in erpd: prompts are LEFT-padded to a common length
P, responses RIGHT-padded to R, and position ids come from the attention mask, so padding never
shifts a token's position. Per-token tensors are (B, R): entry t is the log-prob of response token
t. The response mask covers tokens up to and including the first end token.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from erpd import distributed
from erpd.checkpoint import atomic_dir
from erpd.config import SampleConfig
from erpd.errors import CheckpointError, ConfigError
from erpd.losses import group_advantages, token_logprobs
from erpd.models import autocast, frozen, tokenizer_fingerprint
from erpd.tasks import Problem, Task, score_many

ROLLOUT_TENSORS = "rollout.safetensors"
ROLLOUT_META = "rollout.json"
Advance = Callable[[int], None]


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], chat_template: bool = False
) -> list[list[int]]:
    """Token ids of each prompt (optionally wrapped in the tokenizer's chat template)."""
    if chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("model.chat_template is set but the tokenizer has no chat template")
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            for p in prompts
        ]
        return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    return [tokenizer(p)["input_ids"] for p in prompts]


def left_pad(ids: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """(B, P) ids and attention mask, padded on the left."""
    width = max(len(x) for x in ids)
    out = torch.full((len(ids), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        if x:
            out[i, width - len(x) :] = torch.tensor(x, dtype=torch.long)
            attn[i, width - len(x) :] = 1
    return out, attn


def positions(attention_mask: Tensor) -> Tensor:
    """Position ids that skip left padding: 0 at each sequence's first real token."""
    return (attention_mask.cumsum(-1) - 1).clamp_min(0)


def response_mask(responses: Tensor, eos_id: int) -> Tensor:
    """1 on response tokens up to and including the first end token: (B, R) -> (B, R) float."""
    is_eos = (responses == eos_id).long()
    ended_before = is_eos.cumsum(-1) - is_eos  # end tokens strictly before position t
    return (ended_before == 0).float()


def _pick(
    logits: Tensor, temperature: float, top_p: float, greedy: bool, gen: torch.Generator
) -> Tensor:
    """Next token from (b, V) logits: argmax, or a temperature/nucleus sample."""
    if greedy:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # drop a token when the mass before it already reaches top_p (the top token always stays)
        drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


@torch.no_grad()
def _generate_chunk(
    model: PreTrainedModel,
    ids: Tensor,
    attn: Tensor,
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    greedy: bool,
    eos_id: int,
    pad_id: int,
    gen: torch.Generator,
) -> Tensor:
    """Decode up to max_new_tokens with a KV cache; (b, P) -> (b, r) responses, pad after EOS."""
    pos = positions(attn)
    cache = DynamicCache()
    out = model(
        input_ids=ids,
        attention_mask=attn,
        position_ids=pos,
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    next_pos = pos[:, -1:] + 1  # (b, 1)
    finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    tokens: list[Tensor] = []
    for _ in range(max_new_tokens):
        tok = _pick(out.logits[:, -1], temperature, top_p, greedy, gen)
        tok = torch.where(finished, torch.full_like(tok, pad_id), tok)
        tokens.append(tok)
        finished |= tok == eos_id
        if bool(finished.all()) or len(tokens) == max_new_tokens:
            break
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
        out = model(
            input_ids=tok.unsqueeze(1),
            attention_mask=attn,
            position_ids=next_pos,
            cache=cache,
            use_cache=True,
        )
        next_pos = next_pos + 1
    return torch.stack(tokens, dim=1)


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    greedy: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 256,
    seed: int = 0,
    bf16: bool = False,
    advance: Advance | None = None,
) -> list[list[int]]:
    """Responses (token ids, cut after the first end token) for each prompt, in order.

    Sampling draws from its own seeded generator, so it neither depends on nor disturbs the
    global RNG of a training loop.
    """
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    eos, pad = int(tokenizer.eos_token_id), int(tokenizer.pad_token_id)
    results: list[list[int]] = []
    with frozen(model), autocast(device, bf16):
        for start in range(0, len(prompt_ids), batch_size):
            chunk = prompt_ids[start : start + batch_size]
            ids, attn = left_pad(chunk, pad)
            resp = _generate_chunk(
                model,
                ids.to(device),
                attn.to(device),
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                greedy=greedy,
                eos_id=eos,
                pad_id=pad,
                gen=gen,
            ).cpu()
            keep = response_mask(resp, eos).sum(-1).long()
            results.extend(resp[i, : keep[i]].tolist() for i in range(len(chunk)))
            if advance is not None:
                advance(len(chunk))
    return results


def decode_responses(
    tokenizer: PreTrainedTokenizerBase, responses: Sequence[Sequence[int]]
) -> list[str]:
    """Text of each response without special tokens (what the verifier sees)."""
    return tokenizer.batch_decode([list(r) for r in responses], skip_special_tokens=True)


# --- packed sequences -----------------------------------------------------------------------
@dataclass
class Sequences:
    """Prompt + response token ids in the shared layout: (B, P + R) with R response positions."""

    input_ids: Tensor
    attention_mask: Tensor
    response_mask: Tensor  # (B, R) float
    prompt_len: int

    @property
    def num_response_positions(self) -> int:
        return self.input_ids.shape[1] - self.prompt_len

    def rows(self, index: Tensor | slice) -> Sequences:
        return Sequences(
            self.input_ids[index],
            self.attention_mask[index],
            self.response_mask[index],
            self.prompt_len,
        )

    def to(self, device: torch.device | str) -> Sequences:
        return Sequences(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.response_mask.to(device),
            self.prompt_len,
        )

    def trim(self) -> Sequences:
        """Drop the columns that are padding in every row: the prompt's left padding up to the
        longest prompt, the responses' right padding after the longest response.

        Exact: positions come from the attention mask and padding is masked out of attention, so
        every real token sees the same context. Per-token outputs are then (b, w), w <= R, and
        column t is still response token t.
        """
        attn = self.attention_mask
        prompt_cols = attn[:, : self.prompt_len].any(0)
        start = int(prompt_cols.long().argmax()) if bool(prompt_cols.any()) else self.prompt_len
        width = max(1, int(attn[:, self.prompt_len :].sum(1).max()))
        end = self.prompt_len + width
        return Sequences(
            self.input_ids[:, start:end],
            attn[:, start:end],
            self.response_mask[:, :width],
            self.prompt_len - start,
        )


# forward passes: how many padded tokens one pass may hold when a config leaves it open. On a CPU
# a GEMM keeps ~90% of its peak down to a few hundred rows, and short passes cut padding and stay
# in cache: measured on the 34M-parameter benchmark model (benchmarks/stage1_vs_trl.py), 256
# tokens per pass updated ~1.9x faster than one 2,000-token pass. A GPU wants long passes to stay
# busy (the CUDA figure is not yet measured).
AUTO_PASS_TOKENS = {"cpu": 256, "cuda": 32768}


def pass_tokens(device: torch.device, configured: int | None) -> int:
    """The padded-token budget of one forward pass: the configured one, else the device's."""
    return configured or AUTO_PASS_TOKENS.get(device.type, AUTO_PASS_TOKENS["cuda"])


def forward_passes(
    seqs: Sequences,
    index: Tensor | None = None,
    *,
    max_rows: int | None = None,
    max_tokens: int | None = None,
) -> list[tuple[Tensor, Sequences]]:
    """Split rows `index` (default: all) into forward passes with little padding.

    Rows are sorted longest first and packed greedily while a pass holds at most `max_rows`
    rows and `max_tokens` padded tokens (rows x (longest prompt + longest response)); each pass
    is trimmed to its own rows, so a short response is no longer padded to the batch's longest.
    A row longer than `max_tokens` gets a pass of its own. Returns (row indices, sequences) per
    pass; together the passes cover every row exactly once.
    """
    if index is None:
        index = torch.arange(seqs.input_ids.shape[0])
    attn = seqs.attention_mask[index]
    prompt = attn[:, : seqs.prompt_len].sum(1)
    response = attn[:, seqs.prompt_len :].sum(1)
    order = (prompt + response).argsort(descending=True, stable=True)
    passes: list[tuple[Tensor, Sequences]] = []
    current: list[int] = []
    longest_p = longest_r = 0

    def close() -> None:
        rows = index[torch.tensor(current, dtype=torch.long)]
        passes.append((rows, seqs.rows(rows).trim()))

    for i in order.tolist():
        p, r = int(prompt[i]), max(1, int(response[i]))
        width = max(longest_p, p) + max(longest_r, r)
        full = (max_rows is not None and len(current) >= max_rows) or (
            max_tokens is not None and (len(current) + 1) * width > max_tokens
        )
        if current and full:
            close()
            current, longest_p, longest_r = [], 0, 0
        current.append(i)
        longest_p, longest_r = max(longest_p, p), max(longest_r, r)
    if current:
        close()
    return passes


def pack(
    prompt_ids: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    pad_id: int,
    eos_id: int,
) -> Sequences:
    """Left-pad prompts, right-pad responses, mask padding out of attention."""
    prompts, prompt_attn = left_pad(prompt_ids, pad_id)
    width = max(1, max(len(r) for r in responses))
    resp = torch.full((len(responses), width), pad_id, dtype=torch.long)
    resp_attn = torch.zeros((len(responses), width), dtype=torch.long)
    for i, r in enumerate(responses):
        resp[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        resp_attn[i, : len(r)] = 1
    mask = response_mask(resp, eos_id) * resp_attn
    return Sequences(
        torch.cat([prompts, resp], dim=1),
        torch.cat([prompt_attn, resp_attn], dim=1),
        mask,
        prompts.shape[1],
    )


def response_logits(model: PreTrainedModel, seqs: Sequences) -> Tensor:
    """Logits that predict each response token: (B, P + R) -> (B, R, V).

    `logits_to_keep` skips the vocabulary projection over the prompt, which dominates memory
    for real vocabularies (150k for Qwen).
    """
    r = seqs.num_response_positions
    out = model(
        input_ids=seqs.input_ids,
        attention_mask=seqs.attention_mask,
        position_ids=positions(seqs.attention_mask),
        logits_to_keep=r + 1,
    )
    return out.logits[:, :-1]  # (B, R, V)


def response_targets(seqs: Sequences) -> Tensor:
    return seqs.input_ids[:, seqs.prompt_len :]  # (B, R)


@torch.no_grad()
def sequence_logprobs(
    model: PreTrainedModel,
    seqs: Sequences,
    *,
    batch_size: int = 256,
    bf16: bool = False,
    max_tokens: int | None = None,
) -> Tensor:
    """Teacher-forced per-token log-probs of the responses, (B, R), zero outside the mask.

    Passes hold at most `batch_size` rows and `max_tokens` padded tokens (default: the
    device's budget, `pass_tokens`).
    """
    device = next(model.parameters()).device
    out = torch.zeros(seqs.response_mask.shape)
    budget = pass_tokens(device, max_tokens)
    with frozen(model), autocast(device, bf16):
        passes = distributed.RankPasses(
            model, forward_passes(seqs, max_rows=batch_size, max_tokens=budget)
        )
        for rows, part in passes.mine:
            part = part.to(device)
            lp = token_logprobs(response_logits(model, part), response_targets(part))
            out[rows, : lp.shape[1]] = (lp * part.response_mask).float().cpu()
        for _, part in passes.fillers:
            response_logits(model, part.to(device))
    return passes.split.sum_(out)  # each rank scored its own passes


# --- the fixed batch ------------------------------------------------------------------------
@dataclass
class RolloutBatch:
    """N prompts x G responses sampled once from pi_k, scored, with group advantages.

    Rows are ordered group by group (row i belongs to prompt i // G). `pi_k_logprobs` are pi_k's
    log-probs recomputed in one teacher-forced pass (not the sampler's), so the first ratio of
    stage 1 is exactly 1.
    """

    seqs: Sequences
    pi_k_logprobs: Tensor  # (B, R)
    rewards: Tensor  # (B,)
    advantages: Tensor  # (B,)
    group_size: int
    problems: list[Problem]
    responses: list[str]
    meta: dict[str, object] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.rewards.shape[0]

    @property
    def num_response_tokens(self) -> int:
        return int(self.seqs.response_mask.sum().item())

    def save(self, path: str | Path) -> None:
        """Write tensors (safetensors) and metadata (JSON) atomically into directory `path`."""
        tensors = {
            "input_ids": self.seqs.input_ids.contiguous(),
            "attention_mask": self.seqs.attention_mask.contiguous(),
            "response_mask": self.seqs.response_mask.contiguous(),
            # the file's name for pi_k's log-probs since format 1 (batches on disk keep loading)
            "behaviour_logprobs": self.pi_k_logprobs.contiguous(),
            "rewards": self.rewards.contiguous(),
            "advantages": self.advantages.contiguous(),
        }
        meta = {
            "format": 1,
            "prompt_len": self.seqs.prompt_len,
            "group_size": self.group_size,
            "problems": [asdict(p) for p in self.problems],
            "responses": self.responses,
            "meta": self.meta,
        }
        with atomic_dir(path, marker=ROLLOUT_META) as tmp:
            save_file(tensors, str(tmp / ROLLOUT_TENSORS))
            (tmp / ROLLOUT_META).write_text(json.dumps(meta))

    @classmethod
    def load(cls, path: str | Path) -> RolloutBatch:
        root = Path(path)
        if not (root / ROLLOUT_META).is_file() or not (root / ROLLOUT_TENSORS).is_file():
            raise CheckpointError(f"{root}: not a rollout batch (run `erpd sample` first)")
        try:
            t = load_file(str(root / ROLLOUT_TENSORS))
            meta = json.loads((root / ROLLOUT_META).read_text(encoding="utf-8"))
            seqs = Sequences(
                t["input_ids"], t["attention_mask"], t["response_mask"], meta["prompt_len"]
            )
            return cls(
                seqs=seqs,
                pi_k_logprobs=t["behaviour_logprobs"],
                rewards=t["rewards"],
                advantages=t["advantages"],
                group_size=meta["group_size"],
                problems=[Problem(**p) for p in meta["problems"]],
                responses=meta["responses"],
                meta=meta.get("meta", {}),
            )
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
            # ValueError covers JSONDecodeError and UnicodeDecodeError
            raise CheckpointError(f"{root}: corrupt rollout batch ({type(exc).__name__})") from exc

    def fingerprint(self) -> str:
        """sha256 of the token ids and rewards: which fixed batch a run trained on."""
        h = hashlib.sha256(self.seqs.input_ids.numpy().tobytes())
        h.update(self.rewards.numpy().tobytes())
        return h.hexdigest()

    def check_model(self, vocab_size: int, where: str, tokenizer: str | None = None) -> None:
        """Refuse a model whose tokenizer differs from the one that sampled the batch.

        `tokenizer` is `tokenizer_fingerprint(...)` of the model's tokenizer; two tokenizers of
        the same size (Llama-2 and Mistral, say) differ there even when the sizes agree.
        """
        recorded = self.meta.get("vocab_size")
        top = int(self.seqs.input_ids.max().item())
        sampled_with = self.meta.get("tokenizer")
        if tokenizer is not None and sampled_with is not None and sampled_with != tokenizer:
            raise CheckpointError(
                f"{where}: its tokenizer differs from the one that sampled the batch "
                f"(fingerprint {tokenizer[:12]} vs {str(sampled_with)[:12]})"
            )
        if top >= vocab_size or (recorded is not None and recorded != vocab_size):
            raise CheckpointError(
                f"{where}: vocabulary of {vocab_size} tokens does not match the batch's "
                f"({recorded or f'ids up to {top}'}): the batch was sampled with another tokenizer"
            )

    def prompt_problems(self) -> list[Problem]:
        """The N distinct prompts of the batch (one per group)."""
        return self.problems[:: self.group_size]


def sample_rollout(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    cfg: SampleConfig,
    *,
    max_new_tokens: int,
    chat_template: bool = False,
    round_index: int = 0,
    bf16: bool = False,
    advance: Advance | None = None,
    model_dir: str | Path | None = None,
) -> RolloutBatch:
    """Draw N prompts, sample G responses each from pi_k, reward them, compute advantages.

    With `cfg.backend == "vllm"` the responses come from vLLM loading `model_dir` (pi_k's
    directory); only their token ids are kept, and `model` scores them like any others."""
    problems = task.train_problems(cfg.num_prompts, seed=cfg.seed + 1000 * round_index)
    expanded = [p for p in problems for _ in range(cfg.group_size)]
    prompt_ids = encode_prompts(tokenizer, [p.prompt for p in problems], chat_template)
    expanded_ids = [ids for ids in prompt_ids for _ in range(cfg.group_size)]
    seed = cfg.seed + 7919 * round_index
    if cfg.backend == "vllm":
        from erpd.vllm_backend import vllm_generate

        if model_dir is None:
            raise ConfigError("sample.backend", "vllm loads pi_k from its directory; none given")
        responses = vllm_generate(
            model_dir,
            expanded_ids,
            cfg,
            max_new_tokens=max_new_tokens,
            seed=seed,
            eos_id=int(tokenizer.eos_token_id),
        )
        if advance is not None:
            advance(len(responses))
    else:
        responses = generate(
            model,
            tokenizer,
            expanded_ids,
            max_new_tokens=max_new_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            batch_size=cfg.batch_size,
            seed=seed,
            bf16=bf16,
            advance=advance,
        )
    texts = decode_responses(tokenizer, responses)
    scores = score_many(task, expanded, texts)
    rewards = torch.tensor(scores.rewards)
    seqs = pack(expanded_ids, responses, int(tokenizer.pad_token_id), int(tokenizer.eos_token_id))
    pi_k_logprobs = sequence_logprobs(model, seqs, batch_size=cfg.batch_size, bf16=bf16)
    return RolloutBatch(
        seqs=seqs,
        pi_k_logprobs=pi_k_logprobs,
        rewards=rewards.float(),
        advantages=group_advantages(rewards, cfg.group_size),
        group_size=cfg.group_size,
        problems=expanded,
        responses=texts,
        meta={
            "task": task.name,
            "round": round_index,
            "sample": cfg.model_dump(),
            "vocab_size": int(model.config.vocab_size),
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "reward_timeouts": scores.timeouts,
        },
    )


def batch_timeouts(batch: RolloutBatch) -> float:
    """How many of the batch's answers the verifier ran out of time on (scored 0)."""
    count = batch.meta.get("reward_timeouts", 0)
    return float(count) if isinstance(count, int | float) else 0.0
