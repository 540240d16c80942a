"""The stage machinery the matched controls run on, with real training on the tiny model:
a step cap (`max_steps`), evals where the KL first crosses each `eval_at_kl` mark (a KL-accuracy
curve from one run), both across a stop and a resume, and the early-stopped stage-1 control
(stage 1 at stage 2's learning rate, stopped on a KL budget).

One module-scoped pipeline gives a small base, a fixed batch and a one-step teacher; each run
here is a few steps on it with a small eval, so the module stays around a minute on 2 cores.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from erpd import metrics as M
from erpd.checkpoint import read_manifest
from erpd.config import Stage1Config, Stage2Config
from erpd.pipeline import run_pipeline
from erpd.progress import no_progress
from erpd.rollout import RolloutBatch
from erpd.stage import StageEnv, StageResult
from erpd.stage1 import run_stage1
from erpd.stage2 import run_stage2
from tests.conftest import ListSink, tiny_pipeline_config


@dataclass
class Setup:
    base: Path
    teacher: Path
    batch: RolloutBatch
    sink: ListSink
    env: StageEnv

    def stage2(self, cfg: Stage2Config, run_dir: Path, *, fresh: bool = False) -> StageResult:
        return run_stage2(
            pi_k=self.base,
            teachers=[self.teacher],
            batch=self.batch,
            cfg=cfg,
            env=self.env,
            run_dir=run_dir,
            run="s",
            resume=not fresh,
        )


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small base, a 128-response batch and a teacher after one stage-1 step."""
    out = tmp_path_factory.mktemp("controls")
    cfg = tiny_pipeline_config(
        base={"target_acc": 0.25, "min_steps": 60, "eval_size": 50},
        sample={"num_prompts": 16, "group_size": 8},
        teachers=[{"epochs": 1, "minibatch_size": 128, "eval_every_epochs": 1}],
        stage2={"epochs": 1, "minibatch_size": 128},
        eval={"size": 20, "pass_k": 0},
    )
    assert run_pipeline(cfg, out).status == "completed"
    return out


@pytest.fixture
def setup(made: Path) -> Setup:
    return make_setup(made)


def make_setup(made: Path) -> Setup:
    sink = ListSink()
    cfg = tiny_pipeline_config(eval={"size": 20, "pass_k": 0})
    env = StageEnv.of(cfg, sink, progress=no_progress)
    env.eval_start = False  # pi_k's eval at step 0 says nothing here
    return Setup(
        base=made / "base" / "checkpoint",
        teacher=made / "round-0" / "teacher-sapo" / "checkpoint",
        batch=RolloutBatch.load(made / "round-0" / "batch"),
        sink=sink,
        env=env,
    )


def stop_at_call(n: int) -> Callable[[], bool]:
    """A stop flag raised on its n-th check: the loop checks once before each step, so the
    stage stops with n - 1 steps done."""
    calls = {"n": 0}

    def stop() -> bool:
        calls["n"] += 1
        return calls["n"] == n

    return stop


def weights(result: StageResult) -> dict[str, torch.Tensor]:
    assert result.checkpoint is not None
    return AutoModelForCausalLM.from_pretrained(result.checkpoint).state_dict()


def assert_same_weights(a: StageResult, b: StageResult) -> None:
    wa, wb = weights(a), weights(b)
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=1e-6, msg=name)


# --- max_steps --------------------------------------------------------------------------------
def test_max_steps_ends_mid_epoch_like_a_normal_end_and_resumes_to_it(
    setup: Setup, tmp_path: Path
) -> None:
    # 4 steps per epoch: the cap lands inside the first epoch
    cfg = Stage2Config(epochs=2, minibatch_size=32, max_steps=3, kl_budget=None)
    full = setup.stage2(cfg, tmp_path / "full")
    assert full.status == "completed" and full.steps == full.total_steps == 3
    assert setup.sink.steps(M.LOSS) == [0, 1, 2]
    assert setup.sink.steps(M.ACC_EVAL) == [3]  # the final eval of the weights after step 3
    manifest = read_manifest(full.checkpoint)  # type: ignore[arg-type]
    assert manifest["step"] == 3 and manifest["status"] == "completed"
    assert full.summary[M.KL_EXACT_BATCH] > 0.0 and M.ACC_EVAL in full.summary

    setup.sink.points.clear()
    setup.env.should_stop = stop_at_call(3)
    first = setup.stage2(cfg, tmp_path / "resumed")
    assert first.status == "stopped" and first.steps == 2
    setup.env.should_stop = None
    second = setup.stage2(cfg, tmp_path / "resumed")
    assert second.status == "completed" and second.steps == second.total_steps == 3
    assert setup.sink.steps(M.LOSS) == [0, 1, 2] and setup.sink.steps(M.ACC_EVAL) == [3]
    assert_same_weights(full, second)


# --- eval_at_kl -------------------------------------------------------------------------------
@dataclass
class Curve:
    marks: list[float]
    crossed_at: list[int]  # the step each mark is first exceeded at, from the reference run
    cfg: Stage2Config
    result: StageResult
    evals: dict[int, dict[str, float]]  # eval points by step
    kl: list[tuple[int, float]]


def eval_points(sink: ListSink) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    for _, step, name, value in sink.points:
        if M.CATALOGUE[name].scope == "eval":
            out.setdefault(step, {})[name] = value
    return out


@pytest.fixture(scope="module")
def curve(made: Path, tmp_path_factory: pytest.TempPathFactory) -> Curve:
    """A reference run's KL by step picks two marks (crossed at different steps); then the
    run with eval_at_kl = the marks and kl_budget = the larger one, uninterrupted."""
    setup_ = make_setup(made)
    root = tmp_path_factory.mktemp("curve")
    # one minibatch per epoch: the KL each step is checked on is the whole batch's
    common = {"epochs": 8, "minibatch_size": 128, "lr": 1e-4, "eval_every_epochs": 100}
    reference = setup_.stage2(Stage2Config(**common, max_steps=4, kl_budget=None), root / "ref")
    assert reference.status == "completed" and reference.steps == 4
    kl = dict(setup_.sink.series(M.KL_EXACT))
    assert sorted(kl) == [0, 1, 2, 3]
    # marks just under the KL after 1 and 3 steps; where each is first exceeded is read off
    marks = [0.999 * kl[1], 0.999 * kl[3]]
    crossed_at = [min(s for s, v in kl.items() if v > m) for m in marks]
    assert crossed_at[0] < crossed_at[1], f"the KL did not grow between steps 1 and 3: {kl}"
    setup_.sink.points.clear()
    cfg = Stage2Config(**common, eval_at_kl=marks, kl_budget=marks[1])
    result = setup_.stage2(cfg, root / "run")
    ran_kl = setup_.sink.series(M.KL_EXACT)
    # evaluating at a crossing does not change the training: the same KL step by step
    assert ran_kl == [(s, kl[s]) for s in range(crossed_at[1] + 1)]
    return Curve(marks, crossed_at, cfg, result, eval_points(setup_.sink), ran_kl)


def test_eval_at_kl_evaluates_each_crossing_and_stops_on_the_budget(curve: Curve) -> None:
    res = curve.result
    assert res.status == "kl_budget" and res.steps == curve.crossed_at[1]
    assert sorted(curve.evals) == curve.crossed_at  # no eval at step 0 nor by epoch here
    for mark, step in zip(curve.marks, curve.crossed_at, strict=True):
        assert dict(curve.kl)[step] > mark  # the step's own KL, the one the budget reads
        assert curve.evals[step][M.KL_EXACT_BATCH] >= mark * (1 - 1e-5)  # the eval's, same batch
        assert M.ACC_EVAL in curve.evals[step]
        # and the step before had not crossed it
        assert all(v <= mark for s, v in curve.kl if s < step)
    assert res.kl_crossings == dict(zip(curve.marks, curve.crossed_at, strict=True))
    manifest = read_manifest(res.checkpoint)  # type: ignore[arg-type]
    assert manifest["kl_crossings"] == [
        [m, s] for m, s in zip(curve.marks, curve.crossed_at, strict=True)
    ]


@pytest.mark.parametrize("where", ["before the first crossing's step", "after its eval"])
def test_eval_at_kl_across_a_stop_and_resume(
    where: str, curve: Curve, setup: Setup, tmp_path: Path
) -> None:
    """Stopped just before the step that crosses the first mark (its eval must still happen),
    or right after that eval (it must not happen again): the same evals, the same weights."""
    first_crossing = curve.crossed_at[0]
    stop = first_crossing + 1 if where.startswith("before") else first_crossing + 2
    setup.env.should_stop = stop_at_call(stop)
    stopped = setup.stage2(curve.cfg, tmp_path)
    assert stopped.status == "stopped" and stopped.steps == stop - 1
    setup.env.should_stop = None
    resumed = setup.stage2(curve.cfg, tmp_path)
    assert resumed.status == "kl_budget" and resumed.steps == curve.result.steps
    assert resumed.kl_crossings == curve.result.kl_crossings
    evals = setup.sink.steps(M.ACC_EVAL)
    assert evals == curve.crossed_at, "an eval was skipped or logged twice"
    assert_same_weights(curve.result, resumed)


# --- the early-stopped stage-1 control --------------------------------------------------------
def test_early_stopped_stage1_at_stage2s_lr_stops_on_the_budget(
    curve: Curve, setup: Setup, tmp_path: Path
) -> None:
    """Stage 1 (the teacher's objective) at stage 2's learning rate and minibatch, stopped once
    it spends the student's KL, with evals where it crosses half of it and all of it."""
    budget = curve.marks[0]  # the KL of a student stopped after its first step or so
    marks = [budget / 2, budget]
    cfg = Stage1Config(
        lr=curve.cfg.lr,
        minibatch_size=curve.cfg.minibatch_size,
        epochs=50,
        eval_every_epochs=50,
        kl_budget=budget,
        eval_at_kl=marks,
    )
    res = run_stage1(
        pi_k=setup.base, batch=setup.batch, cfg=cfg, env=setup.env, run_dir=tmp_path, run="t"
    )
    assert res.status == "kl_budget"
    kl = setup.sink.series(M.KL_EXACT)
    steps = [min(s for s, v in kl if v > m) for m in marks]
    assert steps[-1] == res.steps  # stopped at the first step over the budget
    assert sorted(set(steps)) == setup.sink.steps(M.ACC_EVAL)
    assert res.kl_crossings == dict(zip(marks, steps, strict=True))
    assert res.summary[M.KL_EXACT_BATCH] > budget


# --- eval.interim_size ------------------------------------------------------------------------
INTERIM_EVAL = {"size": 40, "interim_size": 10, "pass_k": 2}
ACCURACIES = (M.ACC_EVAL, M.ACC_EVAL_SE, M.ACC_EVAL_SAMPLED, M.ACC_EVAL_SAMPLED_SE)


def interim_setup(made: Path) -> Setup:
    """The module's setup, evaluating 40 problems at final points and 10 at interim ones."""
    setup = make_setup(made)
    cfg = tiny_pipeline_config(eval=INTERIM_EVAL)
    setup.env = StageEnv.of(cfg, setup.sink, progress=no_progress)
    return setup


def accuracies(values: dict[str, float]) -> dict[str, float]:
    return {k: values[k] for k in ACCURACIES}


def measured(policy: Path, size: int, seed: int) -> dict[str, float]:
    """`policy`'s accuracies on the first `size` problems, as a stage's evaluator measures
    them (the step only labels a point)."""
    from erpd.models import load_policy

    cfg = tiny_pipeline_config(eval={**INTERIM_EVAL, "size": size, "interim_size": None})
    env = StageEnv.of(cfg, ListSink(), progress=no_progress)
    model, tokenizer = load_policy(policy, env.device)
    return accuracies(env.evaluator(tokenizer, seed)(model, step=0))


def test_interim_eval_points_read_interim_size_problems_and_the_final_one_all(
    made: Path, tmp_path: Path
) -> None:
    setup = interim_setup(made)
    setup.env.eval_start = True  # pi_k at step 0: an interim point
    stage = Stage2Config(epochs=2, minibatch_size=128, eval_every_epochs=1, kl_budget=None)
    result = setup.stage2(stage, tmp_path / "run")
    evals = eval_points(setup.sink)
    assert sorted(evals) == [0, 1, 2]  # one step per epoch
    assert result.checkpoint is not None and result.summary[M.ACC_EVAL] == evals[2][M.ACC_EVAL]
    for step, policy, size, other in ((0, setup.base, 10, 40), (2, result.checkpoint, 40, 10)):
        want, not_want = measured(policy, size, stage.seed), measured(policy, other, stage.seed)
        assert accuracies(evals[step]) == want
        assert want != not_want  # the check can tell them apart


def test_an_interim_point_that_turns_out_last_is_measured_whole_and_logged_once(
    made: Path, tmp_path: Path
) -> None:
    """The end-of-epoch point after step 1 is interim (2 epochs planned); the budget then stops
    the stage on those same weights, whose final eval must read every problem without logging
    step 1 a second time."""
    setup = interim_setup(made)
    stage = Stage2Config(epochs=2, minibatch_size=128, eval_every_epochs=1, kl_budget=1e-6)
    result = setup.stage2(stage, tmp_path / "run")
    assert result.status == "kl_budget" and result.steps == 1 and result.checkpoint is not None
    keys = [(s, n) for _, s, n, _ in setup.sink.points]
    assert len(keys) == len(set(keys)), "a point was logged twice"
    assert accuracies(result.summary) == measured(result.checkpoint, 40, stage.seed)
    assert accuracies(eval_points(setup.sink)[1]) == measured(result.checkpoint, 10, stage.seed)
