"""Policies: load a causal LM + tokenizer from a local directory, or build the tiny base model.

Nothing here downloads: every `from_pretrained` runs with `local_files_only=True` and
`trust_remote_code=False`, so a directory can only select architectures transformers itself ships.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)
from transformers.utils import logging as hf_logging

from erpd.checkpoint import MANIFEST, verify_checkpoint
from erpd.config import Precision, TinyModelConfig
from erpd.errors import CheckpointError, ConfigError

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"

# per-shard load/save bars from transformers would interleave with erpd's own progress bars
hf_logging.disable_progress_bar()


# --- device and precision -------------------------------------------------------------------
def resolve_device(device: str) -> torch.device:
    """'auto' -> CUDA when available, else CPU; asking for CUDA without one is a config error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("runtime.device", "'cuda' requested but no CUDA device is available")
    return torch.device(device)


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def set_threads(threads: int | None, *, ranks: int = 1) -> int:
    """Set torch's intra-op threads deliberately: runtime.threads, or this process's share of
    the usable cores when `ranks` processes of one stage share the machine; returns the count
    now in force."""
    count = threads or max(1, usable_cores() // max(1, ranks))
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    return count


def use_bf16(device: torch.device, precision: Precision) -> bool:
    """bf16 autocast: on by default on CUDA, opt-in on CPU (AMX makes it pay on recent Xeons)."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


@contextlib.contextmanager
def autocast(device: torch.device, bf16: bool) -> Iterator[None]:
    """Mixed precision for forward passes; weights and optimizer state stay fp32."""
    if bf16:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            yield
    else:
        yield


def adamw(model: torch.nn.Module, *, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with the fused kernel where torch has one (CPU and CUDA): on the 34M-parameter
    benchmark model its step took 14 ms instead of 76 ms for the per-tensor loop on the CPU."""
    device = next(model.parameters()).device
    fused = device.type in ("cpu", "cuda")
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, fused=fused)


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA); erpd uses no other random source for tensors."""
    torch.manual_seed(seed)


# --- tiny model -----------------------------------------------------------------------------
def build_char_tokenizer(alphabet: str) -> PreTrainedTokenizerFast:
    """A character-level tokenizer saved in HF format, so AutoTokenizer loads it like any other."""
    vocab = {PAD: 0, EOS: 1, UNK: 2}
    for ch in dict.fromkeys(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK
    )


def build_tiny_model(tokenizer: PreTrainedTokenizerBase, cfg: TinyModelConfig) -> LlamaForCausalLM:
    """A randomly initialised small Llama (untied embeddings, as calibrated in docs/method.md)."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_positions,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    return LlamaForCausalLM(config)


# --- loading --------------------------------------------------------------------------------
def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    try:
        tok = AutoTokenizer.from_pretrained(
            str(path), local_files_only=True, trust_remote_code=False
        )
    except Exception as exc:  # a missing or corrupt tokenizer file, in any of its forms
        raise CheckpointError(f"{path}: cannot load tokenizer ({type(exc).__name__})") from exc
    if tok.eos_token_id is None:
        raise CheckpointError(f"{path}: tokenizer has no end-of-sequence token")
    if tok.pad_token_id is None:
        # padding positions are always masked out, so reusing the end token is safe
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    path: str | Path, device: torch.device | str = "cpu", *, verify: bool = True
) -> PreTrainedModel:
    """Load a causal LM in fp32 (master weights; bf16 comes from autocast).

    An erpd checkpoint (one with a manifest) is first checked against its sha256s, so a file
    changed after training is refused rather than trained on under the old lineage.
    """
    root = Path(path)
    if not (root / "config.json").is_file():
        raise CheckpointError(f"{root}: not a model directory (no config.json)")
    if verify and (root / MANIFEST).is_file():
        verify_checkpoint(root)
    try:
        config = AutoConfig.from_pretrained(
            str(root), local_files_only=True, trust_remote_code=False
        )
        model = AutoModelForCausalLM.from_pretrained(
            str(root),
            config=config,
            local_files_only=True,
            trust_remote_code=False,
            dtype=torch.float32,
        )
    except MemoryError:
        raise
    except Exception as exc:  # transformers/safetensors raise many types for a broken directory
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{root}: cannot load model: {first}") from exc
    return to_device(model, device)


def empty_model(path: str | Path) -> PreTrainedModel:
    """The model `path` describes, on the meta device: shapes without memory (a rank that will
    receive its shards from rank 0)."""
    config = AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    with torch.device("meta"):
        model: PreTrainedModel = AutoModelForCausalLM.from_config(
            config, trust_remote_code=False, dtype=torch.float32
        )
    return model


def to_device(model: PreTrainedModel, device: torch.device | str) -> PreTrainedModel:
    """Move in place (transformers types its `.to` wrapper as taking a model, not a device)."""
    torch.nn.Module.to(model, device)
    return model


def load_policy(
    path: str | Path, device: torch.device | str = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model + tokenizer from one local directory."""
    return load_model(path, device), load_tokenizer(path)


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 of the vocabulary and special tokens: equal iff token ids mean the same text."""
    body = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "eos": tokenizer.eos_token_id,
        "pad": tokenizer.pad_token_id,
    }
    return hashlib.sha256(json.dumps(body).encode()).hexdigest()


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def model_card(path: str | Path) -> dict[str, object]:
    """Architecture facts of a model directory, for manifests and logs."""
    config = json.loads((Path(path) / "config.json").read_text())
    return {
        "model_type": config.get("model_type"),
        "architectures": config.get("architectures"),
        "vocab_size": config.get("vocab_size"),
    }


def train_without_dropout(model: torch.nn.Module) -> None:
    """Training mode (what gradient checkpointing needs in transformers) with every dropout at
    zero, so that log-probs stay exactly those of eval mode, as erpd's ratios assume."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0  # type: ignore[assignment]
    model.train()


def prepare_to_train(policy: PreTrainedModel, *, gradient_checkpointing: bool) -> None:
    """No dropout while training: it would make pi_theta's log-probs noisy and the first ratio
    differ from 1 (pi_old, pi_k and teachers are all scored without dropout); gradients still
    flow. Eval mode, or, with checkpointing (transformers recomputes layers only in training
    mode), training mode with every dropout at zero."""
    if not gradient_checkpointing:
        policy.eval()
        return
    if not policy.supports_gradient_checkpointing:
        raise ConfigError(
            "runtime.gradient_checkpointing",
            f"{type(policy).__name__} does not support activation checkpointing",
        )
    policy.activation_checkpointing_enable({"use_reentrant": False})
    train_without_dropout(policy)


@contextlib.contextmanager
def frozen(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Eval mode without gradients for the duration, restoring train mode after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)
