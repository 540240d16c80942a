"""Validated configuration for every erpd stage.

This module imports only pydantic (and the standard library) so that the API server can reuse the
models without importing torch. Every field documents its meaning; choices that are our
reconstruction of the paper (docs/method.md) say so. Invalid combinations fail here, not mid-run.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["auto", "fp32", "bf16"]
Stage1ObjectiveName = Literal["sapo", "grpo", "ce", "ce_weighted", "mse"]
Stage2SignalName = Literal["logratio", "sign", "gated_advantage", "contrast", "advantage"]
RegionName = Literal["top_frac", "threshold", "all", "random"]
ControlName = Literal["advantage_region", "advantage_random", "placebo", "early_stop"]
"""The matched controls a student can be compared with (erpd/controls.py, docs/method.md)."""

PositiveFloat = Annotated[float, Field(gt=0)]
UnitInterval = Annotated[float, Field(gt=0, le=1)]


class _Strict(BaseModel):
    """Unknown keys are errors: a typo in a config must never be silently ignored; NaN and
    infinity are never a valid setting (the API parses JSON with Python's json, which accepts
    them)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class TinyModelConfig(_Strict):
    """Shape of the built-in tiny Llama (calibrated in docs/method.md: 1.05M parameters)."""

    hidden_size: int = Field(128, ge=8, le=4096, description="Model width.")
    num_layers: int = Field(4, ge=1, le=64, description="Decoder layers.")
    num_heads: int = Field(
        4, ge=1, le=64, description="Attention heads (hidden_size % heads == 0)."
    )
    intermediate_size: int = Field(512, ge=8, description="MLP width.")
    max_positions: int = Field(128, ge=16, le=4096, description="Longest prompt + response.")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> TinyModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be divisible by num_heads")
        return self


class ModelSpec(_Strict):
    """Where the policy comes from: a local Hugging Face directory, or the built-in tiny model."""

    path: str | None = Field(
        None,
        description="Local directory of a Hugging Face causal LM (config.json, safetensors, "
        "tokenizer). Never a hub id: nothing is downloaded. "
        "None = build and pretrain the tiny model.",
    )
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig, description="Tiny model shape.")
    chat_template: bool = Field(
        False, description="Wrap prompts with the tokenizer's chat template (instruct models)."
    )


class ArithmeticConfig(_Strict):
    """The built-in synthetic arithmetic task (nothing downloaded, seeded)."""

    digits: int = Field(2, ge=1, le=6, description="Digits per operand.")
    terms: int = Field(2, ge=2, le=6, description="Operands per problem.")
    operators: str = Field("+", pattern=r"^[+\-*]{1,3}$", description="Subset of '+-*'.")
    style: Literal["final", "steps"] = Field(
        "final",
        description="'final': just the result (47+38=85); 'steps': intermediate results written "
        "out (12+34+56=46+56=102), where token-level credit matters.",
    )
    eval_size: int = Field(
        500,
        ge=1,
        le=100_000,
        description="Held-out problems (the reported eval split). One standard error of an "
        "accuracy near 0.5 is 1 point at 2,500.",
    )
    validation_size: int = Field(
        200,
        ge=1,
        le=100_000,
        description="Validation problems, drawn from their own seed stream and disjoint from "
        "the train and eval splits: every stopping and calibration decision (base pretraining's "
        "stop check) reads them, never the eval split.",
    )
    seed: int = Field(
        0,
        ge=0,
        lt=2**63,
        description="Seed of the problem generator (eval and validation splits, batches).",
    )


class JsonlConfig(_Strict):
    """A user dataset of {"prompt", "answer"} lines, scored on the final answer (docs/method.md)."""

    train_path: str = Field(description="JSONL file of training prompts.")
    eval_path: str | None = Field(None, description="JSONL eval file; None = hold out eval_size.")
    eval_size: int = Field(
        200, ge=1, le=1_000_000, description="Rows held out when eval_path is None."
    )
    validation_size: int | None = Field(
        None,
        ge=0,
        le=1_000_000,
        description="Rows held out of the train file, after the eval split, for stopping and "
        "calibration decisions (base pretraining's stop check): never trained on, never "
        "reported. None = a tenth of the rows left after the eval split, at most 200; 0 = none "
        "(then the tiny base cannot be pretrained on this file).",
    )
    seed: int = Field(
        0,
        ge=0,
        lt=2**63,
        description="Seed of the train/validation/eval split and of batch sampling.",
    )
    answer_timeout_s: float = Field(
        5.0,
        gt=0,
        le=3600,
        description="Seconds one answer's check may take (math-verify, in a killable process); "
        "past it the answer scores 0 and counts in reward/timeouts.",
    )


class TaskSpec(_Strict):
    """Which task provides prompts, reference answers and the verifier reward."""

    kind: Literal["arithmetic", "jsonl"] = "arithmetic"
    arithmetic: ArithmeticConfig = Field(default_factory=ArithmeticConfig)
    jsonl: JsonlConfig | None = None
    max_new_tokens: int | None = Field(
        None, ge=1, le=32_768, description="Response budget; None = the task's own default."
    )

    @model_validator(mode="after")
    def _jsonl_needs_file(self) -> TaskSpec:
        if self.kind == "jsonl" and self.jsonl is None:
            raise ValueError("kind 'jsonl' needs a 'jsonl' section with train_path")
        return self


class EvalConfig(_Strict):
    """Held-out evaluation: greedy and sampled (T=1) accuracy are both reported (docs/method.md)."""

    size: int | None = Field(
        None,
        ge=1,
        le=1_000_000,
        description="Evaluate on the first N problems of the split (all of them if None). "
        "acc/eval_se and acc/eval_sampled_se report the resulting standard errors.",
    )
    interim_size: int | None = Field(
        None,
        ge=1,
        le=1_000_000,
        description="Evaluate the eval points before the final one on the first N of those "
        "problems (None = as many as the final one): a long run's curve costs less, while the "
        "weights a stage ends with are measured on all of them.",
    )
    split: Literal["eval", "validation"] = Field(
        "eval",
        description="The problems eval points read: the held-out eval split that results "
        "report, or the task's validation split, for calibration sweeps (a setting chosen on "
        "the eval split would be tuned on the numbers it is then judged by).",
    )
    sampled: bool = Field(True, description="Also report acc/eval_sampled (temperature 1).")
    pass_k: int = Field(
        0,
        ge=0,
        le=64,
        description="k: responses sampled per held-out problem at T=1 (0 or 1: one). "
        "acc/eval_sampled is their mean (avg@k); if k > 1, acc/pass@k is also reported. The "
        "sampling seed depends only on the stage's seed, so every eval point and every arm "
        "compared on one seed draws the same random numbers.",
    )
    batch_size: int = Field(
        512, ge=1, description="Sequences per generation or scoring pass (lower for real models)."
    )


class BaseTrainConfig(_Strict):
    """Supervised pretraining of the tiny base to a *partial* accuracy, so RL has room to gain."""

    target_acc: float = Field(
        0.4,
        gt=0,
        le=1,
        description="Stop once greedy accuracy on the task's validation split reaches this.",
    )
    max_steps: int = Field(3000, ge=1, description="Give up (and keep the model) after this.")
    min_steps: int = Field(100, ge=0, description="Never stop before this many steps.")
    eval_every: int = Field(
        10, ge=1, description="Steps between accuracy checks (accuracy jumps fast near the end)."
    )
    eval_size: int = Field(
        200,
        ge=10,
        description="Validation problems used for the stop check: the first N of the task's "
        "validation split (all of them if it has fewer). Never the eval split.",
    )
    lr: PositiveFloat = Field(1e-3, description="Adam learning rate.")
    batch_size: int = Field(64, ge=1, le=65_536, description="Problems per step.")
    seed: int = Field(0, ge=0, lt=2**63, description="Seed of pretraining.")


class SampleConfig(_Strict):
    """The fixed RolloutBatch of one round: N prompts x G responses, sampled once from pi_k."""

    num_prompts: int = Field(128, ge=1, le=1_000_000, description="N prompts (the paper: 1,000).")
    group_size: int = Field(8, ge=2, le=1024, description="G responses per prompt (the paper: 16).")
    temperature: PositiveFloat = Field(
        1.0,
        description="Sampling temperature. Only 1.0: stage 1's ratios and stage 2's trust "
        "region are taken against pi_k's own distribution (T = 1, untruncated), so a batch "
        "sampled from another distribution would be trained on the wrong behaviour policy.",
    )
    top_p: UnitInterval = Field(
        1.0, description="Nucleus sampling mass. Only 1.0 (see temperature)."
    )
    batch_size: int = Field(
        256, ge=1, le=65_536, description="Sequences per generation/log-prob batch."
    )
    seed: int = Field(0, ge=0, lt=2**63, description="Seed of the prompt draw and of sampling.")
    backend: Literal["transformers", "vllm"] = Field(
        "transformers",
        description="What generates the responses: erpd's own KV-cache sampler (any device), or "
        "vLLM on a GPU (the optional `vllm` extra). Either way the batch's log-probs are "
        "recomputed by the trainer's forward pass, so stage 1's first ratio is exactly 1.",
    )
    vllm_memory: float = Field(
        0.5,
        gt=0.0,
        lt=1.0,
        description="Fraction of the GPU vLLM may take (weights + KV cache); the policy stays "
        "loaded beside it for the log-probs.",
    )

    @field_validator("temperature", "top_p")
    @classmethod
    def _behaviour_is_pi_k(cls, value: float) -> float:
        # the batch's behaviour log-probs are recomputed at T = 1 without truncation; a batch
        # drawn at T = 0.6 / top-p 0.9 gave first-step ratios of 0.71-1.12 instead of 1
        if value != 1.0:
            raise ValueError(
                f"{value:g} is not supported, only 1: ERPD trains against the distribution the "
                "batch was sampled from, which is pi_k at temperature 1 without truncation"
            )
        return value


class _StageCommon(_Strict):
    lr: PositiveFloat
    epochs: int = Field(ge=1, le=10_000, description="Passes over the fixed batch.")
    minibatch_size: int = Field(
        256, ge=1, le=1_000_000, description="Responses per optimizer step."
    )
    micro_batch_size: int | None = Field(
        None,
        ge=1,
        description="Responses per forward/backward pass; gradients accumulate up to "
        "minibatch_size, with the same loss (counts come from the whole minibatch). "
        "None = one pass per minibatch. Lower it when a real model runs out of memory.",
    )
    micro_batch_tokens: int | None = Field(
        None,
        ge=16,
        description="Padded tokens per forward pass: rows are sorted by length and packed into "
        "passes of at most this many tokens, each cut to its own longest row, so short "
        "responses are not padded to the batch's longest (same loss). None = the device's "
        "default (256 on CPU, 32,768 on CUDA).",
    )
    grad_clip: float = Field(1.0, ge=0, description="Global grad-norm clip (0 disables).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    eval_every_epochs: int = Field(1, ge=1, description="Evaluate after every k epochs.")
    eval_at_epochs: list[Annotated[int, Field(ge=1)]] | None = Field(
        None,
        description="Evaluate after exactly these epochs instead of every k (e.g. log-spaced "
        "[1, 2, 4, 8, 16] for an aggressiveness sweep); pi_k (epoch 0) and the last epoch are "
        "always evaluated.",
    )
    checkpoint_every_steps: int = Field(
        0,
        ge=0,
        description="Also save a resume point every k optimizer steps (0: by time only).",
    )
    checkpoint_every_s: float = Field(
        120.0,
        ge=0,
        description="Save a resume point once this many seconds have passed since the last "
        "one (or 20x the last save's duration, if longer, so saving stays under 5% of the "
        "time), so a lost worker loses at most about this much work. 0: by steps only. "
        "A stop (cancel, SIGTERM) always saves one.",
    )
    checkpoint_keep: int = Field(
        1, ge=1, le=100, description="Resume points kept on disk (the newest ones)."
    )
    seed: int = Field(0, ge=0, lt=2**63, description="Seed of minibatch order and eval sampling.")
    max_steps: int | None = Field(
        None,
        ge=1,
        description="Stop after this many optimizer steps even if epochs remain (a control "
        "matched in steps to another run). None = run every epoch.",
    )
    eval_at_kl: list[PositiveFloat] | None = Field(
        None,
        description="Also evaluate the first time kl/exact to pi_k exceeds each of these "
        "values, so one run traces a KL-accuracy curve (with kl_budget = the largest, it stops "
        "there). None = evaluate by epoch only.",
    )

    @property
    def forward_batch_size(self) -> int:
        """Rows per forward pass, with or without gradients (the memory bound of a stage)."""
        return self.micro_batch_size or self.minibatch_size

    def steps_per_epoch(self, num_rows: int) -> int:
        return -(-num_rows // self.minibatch_size)

    def total_steps(self, num_rows: int) -> int:
        """Optimizer steps of the whole stage on a fixed batch of `num_rows` responses."""
        return self.epochs * self.steps_per_epoch(num_rows)


class Stage1Config(_StageCommon):
    """Stage 1: many weakly constrained off-policy epochs on the fixed batch -> a teacher."""

    objective: Stage1ObjectiveName = Field(
        "sapo", description="Teacher objective (docs/method.md)."
    )
    eval_every_epochs: int = Field(2, ge=1, description="Evaluate after every k epochs.")
    lr: PositiveFloat = Field(1e-4, description="Calibrated: 1e-4 shows rise-then-collapse.")
    epochs: int = Field(20, ge=1, le=10_000)
    anchor: Literal["behaviour", "epoch"] = Field(
        "behaviour",
        description="pi_old of the ratio: pi_k (behaviour) or re-anchored each epoch (epoch: "
        "unbounded drift, the 'extreme region'). Reconstruction.",
    )
    eps_low: float = Field(0.2, ge=0, lt=1, description="grpo: lower clip.")
    eps_high: float = Field(0.28, ge=0, description="grpo: upper clip.")
    tau_pos: PositiveFloat = Field(1.0, description="sapo: gate temperature for A > 0.")
    tau_neg: PositiveFloat = Field(1.05, description="sapo: gate temperature for A <= 0.")
    mse_beta: PositiveFloat = Field(0.1, description="mse: scale of the sequence log-ratio.")
    mse_reference: Literal["base", "initial"] = Field(
        "base", description="mse: the unlearned reference, pi_k (base) or pi_0 (initial)."
    )
    kl_coef: float = Field(0.0, ge=0, description="k3 penalty to pi_k per token (0 = none).")
    kl_budget: float | None = Field(
        None,
        gt=0,
        description="Early stopping: stop once kl/exact to pi_k exceeds this (checked every "
        "step, like stage 2). None = train all epochs, the over-trained teacher of the paper.",
    )
    name: str | None = Field(
        None,
        pattern=r"^[a-z0-9][a-z0-9_-]{0,39}$",
        description="Teacher name in outputs; default: the objective.",
    )

    @property
    def label(self) -> str:
        return self.name or self.objective


class Stage2Config(_StageCommon):
    """Stage 2: distil the teachers' token-level signal into pi_k under a trust region."""

    signal: Stage2SignalName = Field(
        "logratio",
        description="Signal construction: logratio (strong teachers), sign, gated_advantage "
        "(weak teachers), contrast (delta against pi_0), advantage (the outcome advantage, a "
        "control: on the teachers' region when teachers are given, else region random or all).",
    )
    region: RegionName = Field(
        "top_frac",
        description="Extreme-region token selection: top_frac / threshold rank tokens by the "
        "teachers' standardised |delta|; all keeps every token; random keeps a seeded random "
        "top_frac share (a control: a region of the same size that ignores the teachers).",
    )
    top_frac: UnitInterval = Field(
        0.2, description="Share of tokens kept by |delta| (top_frac) or at random (random)."
    )
    permute_delta: bool = Field(
        False,
        description="Placebo control: shuffle each response's delta across its own tokens "
        "(seeded) before the signal and region are built. It keeps the teacher's scale and "
        "sign per response and destroys which token it points at.",
    )
    threshold: float | None = Field(
        None,
        gt=0,
        description="region threshold: keep tokens whose standardised |delta| (|delta| / std, "
        "weighted over teachers) exceeds this many standard deviations. Reconstruction.",
    )
    teacher_weights: list[PositiveFloat] | None = Field(
        None, description="Weight per teacher (normalised); None = 1/M each."
    )
    clip_eps: float = Field(0.2, gt=0, lt=1, description="PPO clip of the trust region.")
    gate_c: float = Field(0.2, gt=0, lt=1, description="gated_advantage: clip half-width c.")
    kl_coef: float = Field(0.01, ge=0, description="k3 penalty to pi_k per token.")
    kl_budget: float | None = Field(
        0.1,
        gt=0,
        description="Stop when kl/exact to pi_k exceeds this (checked every step). "
        "Calibrated for the tiny task: 0.07-0.1 stops near the best epoch.",
    )
    lr: PositiveFloat = Field(3e-5, description="Calibrated: lower than stage 1.")
    epochs: int = Field(2, ge=1, le=10_000)

    @model_validator(mode="after")
    def _region_needs_threshold(self) -> Stage2Config:
        if self.region == "threshold" and self.threshold is None:
            raise ValueError("region 'threshold' needs 'threshold'")
        return self


StageConfig = Stage1Config | Stage2Config
"""Either stage's config: the shared loop reads only the fields of `_StageCommon`."""


class RuntimeConfig(_Strict):
    """Where and how tensors run."""

    device: Device = Field("auto", description="auto = CUDA when available, else CPU.")
    precision: Precision = Field(
        "auto", description="auto = bf16 autocast on CUDA, fp32 on CPU; bf16 forces autocast."
    )
    seed: int = Field(0, ge=0, lt=2**63, description="Global seed (model init, pretraining).")
    threads: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="torch intra-op threads of this process. None = the CPU cores this process "
        "may run on (its affinity), never more: oversubscribed threads made a training step 7x "
        "slower on a loaded 2-core machine. Lower it when other processes share the cores.",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute each decoder layer's activations in backward instead of keeping "
        "them: less memory per pass (see the memory estimate a stage logs), ~1/3 more compute, "
        "the same update.",
    )
    gpus: int = Field(
        1,
        ge=1,
        le=64,
        description="Processes a stage runs on, one per GPU. Above 1 the worker that owns the "
        "GPUs (`erpd-hub worker --gpus 0,1,2,3 --group`) launches the stage under torchrun with "
        "FSDP2: weights, gradients, AdamW state and pi_k sharded, minibatch passes split. On a "
        "CPU the processes talk over gloo.",
    )


class PipelineConfig(_Strict):
    """A whole ERPD run: rounds of sample -> stage 1 (teachers) -> stage 2 -> next base."""

    model: ModelSpec = Field(default_factory=ModelSpec)
    task: TaskSpec = Field(default_factory=TaskSpec)
    base: BaseTrainConfig = Field(default_factory=BaseTrainConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    teachers: list[Stage1Config] = Field(
        default_factory=lambda: [Stage1Config()],
        description="One stage-1 run per entry; their signals are combined in stage 2.",
    )
    stage2: Stage2Config = Field(default_factory=Stage2Config)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    rounds: int = Field(1, ge=1, le=100, description="ERPD rounds; pi_{k+1} seeds round k+1.")
    controls: list[ControlName] = Field(
        default_factory=list,
        description="Matched controls trained beside the student on the same batch and budget "
        "(docs/method.md, 'Matched controls'): advantage_region (the outcome advantage on the "
        "student's tokens), advantage_random (on a random region of the same size), placebo "
        "(each response's delta shuffled across its tokens), early_stop (the first teacher's "
        "objective at stage 2's learning rate, stopped at the student's KL).",
    )

    @model_validator(mode="after")
    def _teachers_consistent(self) -> PipelineConfig:
        labels = [t.label for t in self.teachers]
        if len(set(labels)) != len(labels):
            raise ValueError(f"teacher names must be unique, got {labels}; set 'name'")
        if not self.teachers and self.stage2.signal != "advantage":
            raise ValueError("no teachers: only stage2.signal 'advantage' works without one")
        if not self.teachers and self.stage2.region not in ("random", "all"):
            raise ValueError(
                f"no teachers: stage2.region {self.stage2.region!r} ranks tokens by a teacher's "
                "delta; use 'random' or 'all'"
            )
        if not self.teachers and self.stage2.permute_delta:
            raise ValueError("no teachers: stage2.permute_delta shuffles a teacher's delta")
        if len(set(self.controls)) != len(self.controls):
            raise ValueError(f"controls must be distinct, got {self.controls}")
        if self.controls and not self.teachers:
            raise ValueError("controls compare a student with its teachers' signal: add a teacher")
        weights = self.stage2.teacher_weights
        if weights is not None and len(weights) != len(self.teachers):
            raise ValueError(
                f"stage2.teacher_weights has {len(weights)} entries for {len(self.teachers)} "
                "teachers"
            )
        return self
