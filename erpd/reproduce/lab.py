"""The reproduction's workbench: bases, fixed batches and stage runs, each computed once.

Every run lives in a directory named after a hash of what determines it (config, base
checkpoint, batch, teachers), so experiments that need the same run share it, and a reproduction
stopped with Ctrl-C continues where it stopped: finished runs are reused, a stopped stage resumes
from its resume checkpoint.

    OUT/runs/TASK/base-HASH/                the tiny base of the task (pretrained once)
    OUT/runs/TASK/seed-S/batch-HASH/        a fixed RolloutBatch
    OUT/runs/TASK/seed-S/stageN-KIND-HASH/  a stage run (checkpoint/, metrics.jsonl)
    OUT/runs/TASK/seed-S/measure-HASH.json  a policy evaluated without training
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from erpd import metrics as M
from erpd.checkpoint import read_manifest
from erpd.config import PipelineConfig, Stage1Config, Stage2Config
from erpd.errors import CheckpointError, StopRequestedError
from erpd.files import write_json
from erpd.progress import ProgressFactory, no_progress
from erpd.reproduce.config import ReproduceConfig
from erpd.rollout import RolloutBatch
from erpd.spec import fixed_batch, tiny_base
from erpd.stage import StageEnv, StageResult
from erpd.stage1 import run_stage1
from erpd.stage2 import run_stage2

Log = Callable[[str], None]


@dataclass
class Outcome:
    """One policy as measured at the end of its run, plus its eval curve over epochs."""

    label: str
    status: str  # completed | kl_budget | measured
    steps: int
    final: dict[str, float]
    curve: list[dict[str, float]] = field(default_factory=list)  # {"step", "epoch", metric...}
    checkpoint: str | None = None
    sha256: str | None = None
    kl_crossings: dict[float, int] = field(default_factory=dict)  # eval_at_kl mark -> step

    def get(self, name: str) -> float:
        value = self.final.get(name)
        return math.nan if value is None else float(value)


def digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:12]


def identity(policy: Path) -> str:
    """What a policy directory *is*: its checkpoint sha256, or its path for a plain HF dir."""
    try:
        return str(read_manifest(policy)["sha256"])
    except CheckpointError:
        return str(policy.resolve())


class Lab:
    """Runs stages for the experiments, caching each under a content hash."""

    def __init__(
        self,
        cfg: ReproduceConfig,
        out: Path,
        *,
        progress: ProgressFactory = no_progress,
        should_stop: Callable[[], bool] | None = None,
        log: Log = lambda line: None,
    ) -> None:
        self.cfg, self.out, self.log = cfg, out, log
        self.runs = out / "runs"
        self.progress, self.should_stop = progress, should_stop
        self.trained = 0  # stage runs actually trained (not reused) in this invocation
        self._envs: dict[str, StageEnv] = {}
        self._bases: dict[str, Path] = {}
        self._batches: dict[Path, RolloutBatch] = {}

    @property
    def seeds(self) -> range:
        return range(self.cfg.seeds)

    # --- configs ----------------------------------------------------------------------------
    def pipeline_config(self, task: str) -> PipelineConfig:
        c = self.cfg
        return PipelineConfig(
            model=c.model,
            task=c.tasks[task],
            base=c.base,
            sample=c.sample,
            eval=c.eval,
            runtime=c.runtime,
            teachers=[c.teacher],
        )

    def teacher_config(self, objective: str, **changes: Any) -> Stage1Config:
        return self.cfg.teacher.model_copy(update={"objective": objective, **changes})

    def sweep_config(self, objective: str, **changes: Any) -> Stage1Config:
        """One long run whose eval points are the sweep's epochs."""
        epochs = self.cfg.sweep_epochs
        return self.teacher_config(
            objective, epochs=max(epochs), eval_at_epochs=list(epochs), **changes
        )

    def env(self, task: str) -> StageEnv:
        if task not in self._envs:
            env = StageEnv.of(self.pipeline_config(task), progress=self.progress)
            env.should_stop = self.should_stop
            self._envs[task] = env
        return self._envs[task]

    def _run_env(
        self, task: str, run_dir: Path, *, evaluate: bool = True, eval_start: bool = True
    ) -> StageEnv:
        # one metrics file per run, so a reused run still has its curve
        sink = M.JsonlSink(run_dir / "metrics.jsonl")
        env = self.env(task)
        return dataclasses.replace(env, sink=sink, evaluate=evaluate, eval_start=eval_start)

    # --- policies and batches ---------------------------------------------------------------
    def pi_0(self, task: str) -> Path:
        """pi_0 of a task: the given model directory, or the tiny base pretrained on the task."""
        if self.cfg.model.path is not None:
            return Path(self.cfg.model.path)
        if task not in self._bases:
            c = self.cfg
            spec = {
                "task": c.tasks[task],
                "base": c.base,
                "shape": c.model.tiny,
                "seed": c.runtime.seed,
            }
            run_dir = self.runs / task / f"base-{digest({k: _dump(v) for k, v in spec.items()})}"
            done = StageResult.finished(run_dir)
            if done is not None and done.checkpoint is not None:
                self._bases[task] = done.checkpoint
            else:
                self.log(f"{task}: pretraining the tiny base")
                env = self._run_env(task, run_dir)
                try:
                    self._bases[task] = tiny_base(
                        c.model.tiny, c.base, env, run_dir, c.runtime.seed
                    )
                finally:
                    env.sink.close()
        return self._bases[task]

    def batch(
        self,
        task: str,
        seed: int,
        policy: Path,
        *,
        round_index: int = 0,
        num_prompts: int | None = None,
    ) -> RolloutBatch:
        """The fixed batch of `seed` sampled from `policy` (round_index draws other prompts)."""
        changes: dict[str, Any] = {"seed": self.cfg.sample.seed + seed}
        if num_prompts is not None:
            changes["num_prompts"] = num_prompts
        sample = self.cfg.sample.model_copy(update=changes)
        key = digest({"policy": identity(policy), "sample": _dump(sample), "round": round_index})
        path = self.runs / task / f"seed-{seed}" / f"batch-{key}"
        if path not in self._batches:
            cfg = self.pipeline_config(task).model_copy(update={"sample": sample})
            self._batches[path] = fixed_batch(policy, path, cfg, self.env(task), round_index)
        return self._batches[path]

    # --- runs -------------------------------------------------------------------------------
    def stage1(
        self,
        task: str,
        seed: int,
        cfg: Stage1Config,
        *,
        pi_k: Path,
        batch: RolloutBatch,
        label: str,
        evaluate: bool = True,
        eval_start: bool = True,
    ) -> Outcome:
        """A stage-1 run. evaluate=False: no held-out evals (the caller measures the result);
        eval_start=False: no eval of pi_k at step 0 (curves then start at the first epoch)."""
        cfg = cfg.model_copy(update={"seed": seed})
        evals = {"evaluate": evaluate, "eval_start": eval_start}

        def train(env: StageEnv, run_dir: Path) -> StageResult:
            return run_stage1(
                pi_k=pi_k,
                batch=batch,
                cfg=cfg,
                env=env,
                run_dir=run_dir,
                run=label,
                pi_0=self.pi_0(task),
            )

        key = {"cfg": _dump(cfg), "base": identity(pi_k), "batch": batch.fingerprint(), **evals}
        stem = f"stage1-{cfg.objective}"
        res = self._cached(task, seed, stem, key, label, train, **evals)
        return self._outcome(label, res, batch, cfg.minibatch_size)

    def stage2(
        self,
        task: str,
        seed: int,
        cfg: Stage2Config,
        *,
        pi_k: Path,
        batch: RolloutBatch,
        teachers: Sequence[Outcome],
        label: str,
    ) -> Outcome:
        cfg = cfg.model_copy(update={"seed": seed})
        pinned = [t.sha256 for t in teachers]

        def train(env: StageEnv, run_dir: Path) -> StageResult:
            return run_stage2(
                pi_k=pi_k,
                teachers=[t.checkpoint for t in teachers if t.checkpoint],
                pinned=pinned,
                batch=batch,
                cfg=cfg,
                env=env,
                run_dir=run_dir,
                run=label,
                pi_0=self.pi_0(task),
            )

        key: dict[str, Any] = {
            "cfg": _dump(cfg),
            "base": identity(pi_k),
            "batch": batch.fingerprint(),
        }
        stem = f"stage2-{cfg.signal}"
        # pi_k is measured once per batch (`measure`), not again by every student
        key["teachers"] = pinned
        res = self._cached(task, seed, stem, key, label, train, eval_start=False)
        return self._outcome(label, res, batch, cfg.minibatch_size)

    def _cached(
        self,
        task: str,
        seed: int,
        stem: str,
        key: dict[str, Any],
        label: str,
        train: Callable[[StageEnv, Path], StageResult],
        **evals: bool,
    ) -> StageResult:
        """The finished run of this key, or train it now (resuming a stopped one)."""
        # named by what the run is, never by which experiment asked first: a run two
        # experiments need (the sapo sweep is also the teacher and kl_coef=0) trains once
        run_dir = self.runs / task / f"seed-{seed}" / f"{stem}-{digest({'stem': stem, **key})}"
        res = StageResult.finished(run_dir)
        if res is None:
            self.log(f"{task} seed {seed}: {label}")
            env = self._run_env(task, run_dir, **evals)
            try:
                res = train(env, run_dir)
            finally:
                env.sink.close()
            self._done(res)
        return res

    def measure(
        self, task: str, seed: int, policy: Path, *, pi_k: Path, batch: RolloutBatch, label: str
    ) -> Outcome:
        """Evaluate a policy without training: held-out accuracy, and KL/entropy/drift against
        pi_k on `batch` (evaluated with the eval seed of the seed's stage runs)."""
        key = digest(
            {"policy": identity(policy), "ref": identity(pi_k), "batch": batch.fingerprint()}
        )
        path = self.runs / task / f"seed-{seed}" / f"measure-{key}.json"
        if path.is_file():
            final = json.loads(path.read_text())
        else:
            from erpd.models import load_model, load_policy

            env = self.env(task)
            model, tokenizer = load_policy(policy, env.device)
            frozen_pi_k = model if pi_k == policy else load_model(pi_k, env.device)
            final = env.evaluator(tokenizer, seed)(model, step=0, pi_k=frozen_pi_k, batch=batch)
            write_json(path, final, indent=2)
        return Outcome(label, "measured", 0, final, checkpoint=str(policy), sha256=identity(policy))

    def _done(self, res: StageResult) -> None:
        if res.stopped:
            raise StopRequestedError(
                f"stopped in {res.run} at step {res.steps}; run the same command again to resume"
            )
        self.trained += 1
        s = res.summary
        acc = f"acc {s[M.ACC_EVAL]:.3f} " if M.ACC_EVAL in s else ""
        self.log(
            f"  -> {res.status} after {res.steps} steps: {acc}"
            f"KL {s.get(M.KL_EXACT_BATCH, math.nan):.3f} ({res.wall_time:.0f} s)"
        )

    @staticmethod
    def _outcome(label: str, res: StageResult, batch: RolloutBatch, minibatch: int) -> Outcome:
        per_epoch = math.ceil(len(batch) / minibatch)
        curve: dict[int, dict[str, float]] = {}
        metrics = res.run_dir / "metrics.jsonl"
        if metrics.is_file():
            for p in M.read_jsonl(metrics):
                name, value = str(p["name"]), p["value"]
                if M.CATALOGUE[name].scope == "eval" and isinstance(value, int | float):
                    step = int(p["step"])  # type: ignore[call-overload]
                    curve.setdefault(step, {"step": step, "epoch": step / per_epoch})[name] = value
        return Outcome(
            label,
            res.status,
            res.steps,
            dict(res.summary),
            [curve[s] for s in sorted(curve)],
            str(res.checkpoint) if res.checkpoint else None,
            res.sha256,
            dict(res.kl_crossings),
        )


def _dump(value: Any) -> Any:
    return value.model_dump(mode="json") if hasattr(value, "model_dump") else value
