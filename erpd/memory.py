"""How much memory a stage needs per device, estimated before anything is loaded.

A stage holds the policy (fp32 master weights), its gradients, AdamW's two moments, a frozen
copy of pi_k, and the activations of one forward pass (bounded by `micro_batch_tokens` /
`micro_batch_size`), whose largest single piece for a real vocabulary is the logits. Stage 2
loads each teacher once before training, while the optimizer state does not exist yet, so its
peak is stage 1's. The figures are estimates (activation sizes follow the usual per-token,
per-layer accounting for a decoder block with fused attention); they are meant to say "this
cannot fit" before a run spends minutes loading, not to budget to the last megabyte.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from erpd.errors import ConfigError

GIB = 1024**3
# bytes of activations kept for backward per token and per layer, in units of hidden_size:
# ~34 x hidden in 16-bit for a decoder block whose attention never materialises the score
# matrix (SDPA/flash); fp32 doubles it
ACTIVATION_FACTOR = 34
# bytes per token per vocabulary entry around the loss: the logits (2 in bf16, 4 in fp32), their
# fp32 copy and log-softmax, and the gradient of the logits
LOGIT_BYTES = {"bf16": 14, "fp32": 16}


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device of each part of a stage, and their sum."""

    params: int
    weights: int
    gradients: int
    optimizer: int
    pi_k: int  # the frozen copy the exact KL is measured against
    activations: int
    devices: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.pi_k + self.activations

    def describe(self) -> str:
        def gib(n: int) -> str:
            return f"{n / GIB:.2f}"

        count = f"{self.params / 1e6:,.1f}M" if self.params >= 1e6 else f"{self.params:,}"

        return (
            f"memory estimate per device ({count} parameters"
            f"{f', sharded over {self.devices}' if self.devices > 1 else ''}): "
            f"~{gib(self.total)} GiB = weights {gib(self.weights)} + gradients "
            f"{gib(self.gradients)} + AdamW {gib(self.optimizer)} + pi_k {gib(self.pi_k)} "
            f"+ activations {gib(self.activations)}"
        )


def count_parameters(config: PretrainedConfig) -> int:
    """Parameters of the model a config describes, without allocating them (meta device)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def estimate(
    config: PretrainedConfig,
    *,
    pass_tokens: int,
    bf16: bool,
    devices: int = 1,
    params: int | None = None,
    gradient_checkpointing: bool = False,
) -> MemoryEstimate:
    """The estimate for one forward pass of `pass_tokens` padded tokens per device; weights,
    gradients, optimizer state and pi_k are divided over `devices` (sharded), activations are
    not (each device runs its own passes)."""
    n = params if params is not None else count_parameters(config)
    hidden = int(config.hidden_size)
    layers = int(config.num_hidden_layers)
    vocab = int(config.vocab_size)
    width = 2 if bf16 else 4
    per_layer = pass_tokens * hidden * ACTIVATION_FACTOR * width // 2
    if gradient_checkpointing:
        # each layer's input is kept; one layer at a time is recomputed in full
        activations = pass_tokens * layers * hidden * width + per_layer
    else:
        activations = layers * per_layer
    activations += pass_tokens * vocab * LOGIT_BYTES["bf16" if bf16 else "fp32"]
    share = max(devices, 1)
    return MemoryEstimate(
        params=n,
        weights=math.ceil(4 * n / share),
        gradients=math.ceil(4 * n / share),
        optimizer=math.ceil(8 * n / share),
        pi_k=math.ceil(4 * n / share),
        activations=activations,
        devices=share,
    )


def available_bytes(device: torch.device) -> int | None:
    """What the device can hold: a GPU's total memory, or the memory Linux reports available
    on the CPU (None where neither is known)."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    meminfo = Path("/proc/meminfo")
    if device.type == "cpu" and meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def check_fits(
    pi_k: str | Path,
    *,
    device: torch.device,
    pass_tokens: int,
    bf16: bool,
    gradient_checkpointing: bool = False,
    available: int | None = None,
    devices: int = 1,
) -> MemoryEstimate:
    """Estimate a stage trained from the model directory `pi_k`; a ConfigError naming what to
    change if it cannot fit the device (`available` bytes, default: what the device reports)."""
    config = AutoConfig.from_pretrained(str(pi_k), local_files_only=True, trust_remote_code=False)
    found = estimate(
        config,
        pass_tokens=pass_tokens,
        bf16=bf16,
        gradient_checkpointing=gradient_checkpointing,
        devices=devices,
    )
    room = available if available is not None else available_bytes(device)
    if room is not None and found.total > room:
        raise ConfigError(
            "runtime",
            f"the stage needs ~{found.total / GIB:.1f} GiB on {device.type} and "
            f"{room / GIB:.1f} GiB is available ({found.describe()}); lower micro_batch_tokens "
            "or micro_batch_size, set runtime.gradient_checkpointing, or use a larger device",
        )
    return found
