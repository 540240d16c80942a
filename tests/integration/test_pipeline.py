"""A real tiny ERPD pipeline, end to end, then stage runs on its outputs.

One module-scoped pipeline run (the CLI, in a subprocess, as a user runs it) produces a base,
a fixed batch, a teacher and a student; the other tests reuse them so the whole file stays
around a minute and a half on 2 CPU cores.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from erpd import metrics as M
from erpd.checkpoint import latest_resume, read_manifest, verify_checkpoint
from erpd.config import Stage1Config, Stage2Config
from erpd.errors import ConfigError, DivergedError
from erpd.progress import no_progress
from erpd.rollout import RolloutBatch
from erpd.stage import StageEnv
from erpd.stage1 import run_stage1
from erpd.stage2 import run_stage2
from tests.conftest import ListSink, tiny_pipeline_config


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run `erpd pipeline` with the tiny config; returns its output directory."""
    root = tmp_path_factory.mktemp("pipeline")
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_pipeline_config().model_dump(mode="json")))
    out = root / "out"
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.run(
        [sys.executable, "-m", "erpd.cli", "pipeline", "--out", str(out), "--config", str(config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "student checkpoint" in proc.stdout
    return out


@pytest.fixture(scope="module")
def batch(demo: Path) -> RolloutBatch:
    return RolloutBatch.load(demo / "round-0" / "batch")


Env = tuple[StageEnv, ListSink]


@pytest.fixture
def quick_env(env: Env) -> Env:
    """env with a small eval (no pass@k), for tests about training rather than accuracy."""
    env[0].eval = env[0].eval.model_copy(update={"size": 50, "pass_k": 0})
    return env


@pytest.fixture
def env() -> Env:
    sink = ListSink()
    return StageEnv.of(tiny_pipeline_config(), sink, progress=no_progress), sink


def _points(demo: Path) -> list[dict[str, object]]:
    return M.read_jsonl(demo / "metrics.jsonl")


def test_pipeline_outputs_load_in_transformers(demo: Path) -> None:
    for rel in ("base", "round-0/teacher-sapo", "round-0/student"):
        path = demo / rel / "checkpoint"
        manifest = verify_checkpoint(path)
        model = AutoModelForCausalLM.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        assert model.config.model_type == "llama"
        assert tokenizer.eos_token_id is not None
        assert not list(path.glob("*.bin")) and not list(path.glob("*.pt"))
        assert manifest["sha256"] and manifest["files"]
    student = read_manifest(demo / "round-0" / "student" / "checkpoint")
    teacher = read_manifest(demo / "round-0" / "teacher-sapo" / "checkpoint")
    assert student["teachers"][0]["sha256"] == teacher["sha256"]  # lineage pinned by digest


def test_training_changed_parameters(demo: Path) -> None:
    def weights(rel: str) -> dict[str, torch.Tensor]:
        model = AutoModelForCausalLM.from_pretrained(demo / rel / "checkpoint")
        return {k: v.clone() for k, v in model.state_dict().items()}

    base, teacher, student = (
        weights(r) for r in ("base", "round-0/teacher-sapo", "round-0/student")
    )
    for name in base:
        assert not torch.equal(base[name], teacher[name]), f"teacher did not train {name}"
    assert any(not torch.equal(base[n], student[n]) for n in base)


def test_every_metric_is_logged_finite_for_both_stages(demo: Path) -> None:
    points = _points(demo)
    by_run: dict[str, set[str]] = {}
    for p in points:
        by_run.setdefault(str(p["run"]), set()).add(str(p["name"]))
        if str(p["name"]).startswith(("kl/", "entropy/")):
            assert p["value"] is not None and math.isfinite(float(p["value"])), p
    common = {
        M.KL_EXACT,
        M.KL_EXACT_BATCH,
        M.KL_K1,
        M.KL_K3,
        M.KL_SEQ_K3,
        M.KL_K3_BATCH,
        M.ENTROPY_TOKEN,
        M.ENTROPY_BATCH,
        M.ENTROPY_SAMPLED,
        M.DRIFT_CORRECT,
        M.DRIFT_INCORRECT,
        M.ACC_TRAIN_BATCH,
        M.ACC_EVAL,
        M.ACC_EVAL_SAMPLED,
        M.ACC_PASS_K,
        M.REWARD_MEAN,
        M.RATIO_CLIP_FRAC,
        M.RATIO_P01,
        M.RATIO_P99,
        M.LOSS,
        M.TOKENS_PER_S,
    }
    assert common <= by_run["round-0/teacher-sapo"], common - by_run["round-0/teacher-sapo"]
    stage2 = common | {M.SELECTED_FRAC, M.SIGNAL_STD, M.KL_BUDGET_USED}
    assert stage2 <= by_run["round-0/student"], stage2 - by_run["round-0/student"]
    keys = [(p["run"], p["step"], p["name"]) for p in points]
    assert len(keys) == len(set(keys)), "a (run, step, name) point was written twice"


def test_stage1_raises_accuracy_on_its_fixed_batch(demo: Path) -> None:
    series = sorted(
        (int(p["step"]), float(p["value"]))  # type: ignore[arg-type]
        for p in _points(demo)
        if p["run"] == "round-0/teacher-sapo" and p["name"] == M.ACC_TRAIN_BATCH
    )
    assert series[0][0] == 0
    assert series[-1][1] > series[0][1], series


def test_summary_has_base_teacher_student(demo: Path) -> None:
    summary = json.loads((demo / "summary.json").read_text())
    roles = [r["role"] for r in summary["rows"]]
    assert roles == ["base", "teacher", "student"]
    for row in summary["rows"]:
        assert 0.0 <= row["acc_eval"] <= 1.0 and row["kl_exact"] >= 0.0 and row["entropy"] > 0.0
    assert Path(summary["student"]).is_dir()


def test_first_stage1_ratio_is_exactly_one(
    demo: Path, batch: RolloutBatch, env: Env, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    stage_env, sink = env
    stop_after = iter([False, True])  # one optimizer step, then a cooperative stop
    stage_env.should_stop = lambda: next(stop_after)
    cfg = Stage1Config(epochs=2, minibatch_size=128, eval_every_epochs=2)
    caplog.set_level("INFO", logger="erpd")
    res = run_stage1(
        pi_k=demo / "base" / "checkpoint",
        batch=batch,
        cfg=cfg,
        env=stage_env,
        run_dir=tmp_path / "t",
        run="t",
    )
    assert res.status == "stopped" and res.steps == 1
    (step0, p01), (_, p99) = sink.series(M.RATIO_P01)[0], sink.series(M.RATIO_P99)[0]
    assert step0 == 0
    assert abs(p01 - 1.0) < 1e-5 and abs(p99 - 1.0) < 1e-5
    assert sink.series(M.RATIO_CLIP_FRAC)[0][1] == 0.0
    assert abs(sink.series(M.KL_EXACT)[0][1]) < 1e-6
    # the stage said what it would need before it loaded its models
    assert any(m.startswith("memory estimate per device (1.1M parameters") for m in caplog.messages)


def test_stopped_stage1_resumes_from_its_step(
    demo: Path,
    batch: RolloutBatch,
    env: Env,
    tmp_path: Path,
) -> None:
    stage_env, sink = env
    base = demo / "base" / "checkpoint"
    cfg = Stage1Config(epochs=3, minibatch_size=192, eval_every_epochs=3, checkpoint_every_steps=2)
    full = run_stage1(
        pi_k=base, batch=batch, cfg=cfg, env=stage_env, run_dir=tmp_path / "a", run="a"
    )
    calls = {"n": 0}

    def stop_at_five() -> bool:
        calls["n"] += 1
        return calls["n"] > 5  # stop mid-epoch 1 (3 steps per epoch)

    stage_env.should_stop = stop_at_five
    first = run_stage1(
        pi_k=base, batch=batch, cfg=cfg, env=stage_env, run_dir=tmp_path / "b", run="b"
    )
    assert first.status == "stopped" and first.steps == 5 and first.checkpoint is None
    resume_dir = latest_resume(tmp_path / "b")
    assert resume_dir is not None and resume_dir.name == "step-00000005"
    stage_env.should_stop = None
    sink.points.clear()
    second = run_stage1(
        pi_k=base, batch=batch, cfg=cfg, env=stage_env, run_dir=tmp_path / "b", run="b"
    )
    assert second.status == "completed" and second.steps == full.steps == 9
    assert min(s for s, _ in sink.series(M.LOSS)) == 5  # continued, did not restart at 0
    a = AutoModelForCausalLM.from_pretrained(full.checkpoint).state_dict()
    b = AutoModelForCausalLM.from_pretrained(second.checkpoint).state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)


def test_stage2_kl_budget_stops_training(
    demo: Path, batch: RolloutBatch, env: Env, tmp_path: Path
) -> None:
    stage_env, sink = env
    cfg = Stage2Config(epochs=4, minibatch_size=128, kl_budget=2e-3, lr=1e-4)
    res = run_stage2(
        pi_k=demo / "base" / "checkpoint",
        teachers=[demo / "round-0" / "teacher-sapo" / "checkpoint"],
        batch=batch,
        cfg=cfg,
        env=stage_env,
        run_dir=tmp_path / "s",
        run="s",
    )
    assert res.status == "kl_budget"
    assert 0 < res.steps < res.total_steps
    kl = sink.series(M.KL_EXACT)
    assert kl[-1][1] > cfg.kl_budget and all(v <= cfg.kl_budget for _, v in kl[:-1])
    assert read_manifest(res.checkpoint)["status"] == "kl_budget"  # type: ignore[arg-type]


def test_stage1_evaluates_at_chosen_epochs_and_early_stops_at_a_kl_budget(
    demo: Path, batch: RolloutBatch, quick_env: Env, tmp_path: Path
) -> None:
    stage_env, sink = quick_env
    stage_env.eval_start = False  # pi_k measured elsewhere
    base = demo / "base" / "checkpoint"
    cfg = Stage1Config(epochs=3, minibatch_size=128, eval_at_epochs=[2])
    full = run_stage1(
        pi_k=base, batch=batch, cfg=cfg, env=stage_env, run_dir=tmp_path / "a", run="a"
    )
    per_epoch = math.ceil(len(batch) / cfg.minibatch_size)
    # epoch 2 as asked, and the last; neither pi_k (step 0) nor epoch 1
    assert [s for s, _ in sink.series(M.ACC_EVAL)] == [2 * per_epoch, 3 * per_epoch]
    assert full.status == "completed"

    sink.points.clear()
    budget = full.summary[M.KL_EXACT_BATCH] / 3
    early = run_stage1(
        pi_k=base,
        batch=batch,
        cfg=cfg.model_copy(update={"kl_budget": budget}),
        env=stage_env,
        run_dir=tmp_path / "b",
        run="b",
    )
    assert early.status == "kl_budget" and 0 < early.steps < full.steps
    kl = sink.series(M.KL_EXACT)
    assert kl[-1][1] > budget and all(v <= budget for _, v in kl[:-1])
    assert sink.series(M.KL_BUDGET_USED)[-1][1] > 1.0


def _erpd(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    cmd = [sys.executable, "-m", "erpd.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU machine's refusal")
def test_the_vllm_backend_on_a_cpu_is_refused_in_one_line_naming_the_field(
    demo: Path, tmp_path: Path
) -> None:
    out = tmp_path / "batch"
    base = str(demo / "base" / "checkpoint")
    proc = _erpd("sample", "--model", base, "--out", str(out), "--set", "sample.backend=vllm")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].endswith("sample.backend: vllm needs a CUDA GPU; use 'transformers' here")
    assert "Traceback" not in proc.stderr and not (out / "rollout.json").exists()


def test_stage_commands_on_a_jsonl_dataset(demo: Path, tmp_path: Path) -> None:
    """sample -> stage1 -> stage2 -> eval as separate commands, on user JSONL data (math-verify)."""
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(10, 40) for b in (17, 58)]
    data = tmp_path / "sums.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    task = [
        "--set",
        "task.kind=jsonl",
        "--set",
        f"task.jsonl.train_path={data}",
        "--set",
        "task.jsonl.eval_size=20",
        "--set",
        "task.max_new_tokens=5",
        "--set",
        "eval.size=20",
    ]
    base = str(demo / "base" / "checkpoint")
    batch = tmp_path / "batch"
    proc = _erpd(
        "sample",
        "--model",
        base,
        "--out",
        str(batch),
        *task,
        "--set",
        "sample.num_prompts=16",
        "--set",
        "sample.group_size=4",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    fixed = RolloutBatch.load(batch)
    assert len(fixed) == 64 and fixed.meta["task"] == "jsonl:sums"
    assert 0.0 < fixed.rewards.mean().item() < 1.0  # math-verify scored the tiny model's sums
    proc = _erpd(
        "stage1",
        "--model",
        base,
        "--batch",
        str(batch),
        "--out",
        str(tmp_path / "r"),
        *task,
        "--set",
        "teachers=[{objective: ce, epochs: 2, minibatch_size: 32}]",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    teacher = tmp_path / "r" / "teacher-ce" / "checkpoint"
    verify_checkpoint(teacher)
    proc = _erpd(
        "stage2",
        "--model",
        base,
        "--batch",
        str(batch),
        "--teacher",
        str(teacher),
        "--out",
        str(tmp_path / "s"),
        *task,
        "--set",
        "stage2.minibatch_size=32",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = verify_checkpoint(tmp_path / "s" / "checkpoint")
    assert manifest["teachers"][0]["sha256"] == read_manifest(teacher)["sha256"]
    # the same stage without the dataset's config would evaluate on the built-in task: refused
    proc = _erpd(
        "stage2", "--model", base, "--batch", str(batch), "--teacher", str(teacher),
        "--out", str(tmp_path / "s2"),
    )  # fmt: skip
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "sampled on task 'jsonl:sums'" in proc.stderr and "'arithmetic'" in proc.stderr
    assert not (tmp_path / "s2" / "checkpoint").exists()
    proc = _erpd(
        "eval",
        "--model",
        str(tmp_path / "s" / "checkpoint"),
        "--json",
        *task,
        "--batch",
        str(batch),
        "--reference",
        base,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    values = json.loads(proc.stdout)
    assert 0.0 <= values[M.ACC_EVAL] <= 1.0 and values[M.KL_EXACT_BATCH] >= 0.0


@pytest.mark.parametrize(
    "teacher",
    [
        {"objective": "grpo", "anchor": "epoch"},
        {"objective": "ce_weighted"},
        {"objective": "mse", "mse_reference": "initial"},
        {"objective": "sapo", "kl_coef": 0.1},
    ],
)
def test_every_stage1_objective_trains(
    teacher: dict[str, object], demo: Path, batch: RolloutBatch, quick_env: Env, tmp_path: Path
) -> None:
    stage_env, sink = quick_env
    base = demo / "base" / "checkpoint"
    cfg = Stage1Config(**teacher, epochs=2, minibatch_size=256, eval_every_epochs=2)  # type: ignore[arg-type]
    res = run_stage1(
        pi_k=base, batch=batch, cfg=cfg, env=stage_env, run_dir=tmp_path, run="t", pi_0=base
    )
    assert res.status == "completed" and res.steps == 4
    assert res.summary[M.KL_EXACT_BATCH] > 0.0
    assert all(math.isfinite(v) for _, v in sink.series(M.LOSS))


@pytest.mark.parametrize(
    "signal",
    [
        {"signal": "sign"},
        {"signal": "gated_advantage", "region": "all"},
        {"signal": "contrast", "region": "threshold", "threshold": 1.0},
        {"signal": "advantage", "region": "all"},  # without a teacher: no region to rank by
    ],
)
def test_every_stage2_signal_trains(
    signal: dict[str, object], demo: Path, batch: RolloutBatch, quick_env: Env, tmp_path: Path
) -> None:
    stage_env, sink = quick_env
    base = demo / "base" / "checkpoint"
    teacher = demo / "round-0" / "teacher-sapo" / "checkpoint"
    cfg = Stage2Config(**signal, epochs=1, minibatch_size=256, kl_budget=None)  # type: ignore[arg-type]
    teachers = [] if cfg.signal == "advantage" else [teacher, teacher]
    res = run_stage2(
        pi_k=base,
        teachers=teachers,
        batch=batch,
        cfg=cfg,
        env=stage_env,
        run_dir=tmp_path,
        run="s",
        pi_0=base,
    )
    assert res.status == "completed" and res.steps == res.total_steps > 0
    selected = sink.series(M.SELECTED_FRAC)[0][1]
    if cfg.region == "all" or cfg.signal == "advantage":
        assert selected == 1.0
    elif cfg.region == "top_frac":
        assert selected == pytest.approx(cfg.top_frac, abs=0.05)
    else:
        assert 0.0 < selected < 1.0
    assert res.summary[M.KL_EXACT_BATCH] > 0.0


@pytest.mark.parametrize("epochs", [1, 2])
def test_budget_is_checked_after_the_last_update_without_duplicate_points(
    epochs: int, demo: Path, batch: RolloutBatch, quick_env: Env, tmp_path: Path
) -> None:
    """One step per epoch: epochs=1 is only caught by the final check, epochs=2 stops on the
    first step of epoch 2, the step the end-of-epoch eval already logged."""
    stage_env, sink = quick_env
    cfg = Stage2Config(epochs=epochs, minibatch_size=len(batch), kl_budget=1e-6, lr=1e-4)
    res = run_stage2(
        pi_k=demo / "base" / "checkpoint",
        teachers=[demo / "round-0" / "teacher-sapo" / "checkpoint"],
        batch=batch,
        cfg=cfg,
        env=stage_env,
        run_dir=tmp_path,
        run="s",
    )
    assert res.status == "kl_budget" and res.steps == 1
    assert res.summary[M.KL_EXACT_BATCH] > cfg.kl_budget  # type: ignore[operator]
    keys = [(s, n) for _, s, n, _ in sink.points]
    assert len(keys) == len(set(keys)), "a point was logged twice"


def test_pipeline_refuses_an_output_dir_of_another_config(demo: Path) -> None:
    proc = _erpd("pipeline", "--out", str(demo), "--set", "rounds=2")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "another config" in lines[0], proc.stderr
    assert not (demo / "round-1").exists()


@pytest.mark.parametrize("stop_at_call", [1, 3])  # before any update / at an epoch boundary
def test_stop_and_resume_never_logs_a_point_twice(
    stop_at_call: int, demo: Path, batch: RolloutBatch, quick_env: Env, tmp_path: Path
) -> None:
    stage_env, sink = quick_env
    calls = {"n": 0}

    def stop() -> bool:
        calls["n"] += 1
        return calls["n"] == stop_at_call

    stage_env.should_stop = stop
    cfg = Stage1Config(epochs=2, minibatch_size=256, eval_every_epochs=1)  # 2 steps per epoch
    kwargs = {"pi_k": demo / "base" / "checkpoint", "batch": batch, "cfg": cfg, "env": stage_env}
    first = run_stage1(**kwargs, run_dir=tmp_path, run="t")  # type: ignore[arg-type]
    assert first.status == "stopped" and first.steps == stop_at_call - 1
    second = run_stage1(**kwargs, run_dir=tmp_path, run="t")  # type: ignore[arg-type]
    assert second.status == "completed" and second.steps == 4
    keys = [(s, n) for _, s, n, _ in sink.points]
    assert len(keys) == len(set(keys)), "a point was logged twice"
    assert {s for s, n in keys if n == M.ACC_EVAL} == {0, 2, 4}


def test_micro_batches_train_like_whole_minibatches(
    demo: Path, batch: RolloutBatch, env: Env, tmp_path: Path
) -> None:
    """micro_batch_size only changes memory: same weights and step metrics (float tolerance)."""
    stage_env, sink = env
    stage_env.eval = stage_env.eval.model_copy(update={"size": 20, "pass_k": 0, "sampled": False})
    base = demo / "base" / "checkpoint"
    results, series = [], []
    for micro in (None, 100):
        cfg = Stage1Config(epochs=2, minibatch_size=256, micro_batch_size=micro, kl_coef=0.1)
        sink.points.clear()
        res = run_stage1(
            pi_k=base,
            batch=batch,
            cfg=cfg,
            env=stage_env,
            run_dir=tmp_path / str(micro),
            run="t",
        )
        results.append(AutoModelForCausalLM.from_pretrained(res.checkpoint).state_dict())
        series.append({n: sink.series(n) for n in (M.LOSS, M.KL_EXACT, M.RATIO_P99)})
    for name, value in results[0].items():
        torch.testing.assert_close(value, results[1][name], rtol=1e-4, atol=1e-5, msg=name)
    for name in series[0]:
        for (s0, v0), (s1, v1) in zip(series[0][name], series[1][name], strict=True):
            assert s0 == s1 and v0 == pytest.approx(v1, rel=1e-4, abs=1e-6), name


def test_gradient_checkpointing_trains_like_keeping_activations(
    demo: Path, batch: RolloutBatch, env: Env, tmp_path: Path
) -> None:
    """runtime.gradient_checkpointing only changes memory: same weights and step metrics."""
    stage_env, sink = env
    stage_env.eval = stage_env.eval.model_copy(update={"size": 20, "pass_k": 0, "sampled": False})
    results, series, kept = [], [], []
    for recompute in (False, True):
        stage_env.gradient_checkpointing = recompute
        sink.points.clear()
        saved = [0]

        def keep(tensor: torch.Tensor, saved: list[int] = saved) -> torch.Tensor:
            saved[0] += 1  # a tensor autograd keeps for backward
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            res = run_stage1(
                pi_k=demo / "base" / "checkpoint",
                batch=batch,
                cfg=Stage1Config(epochs=1, minibatch_size=128, kl_coef=0.1),
                env=stage_env,
                run_dir=tmp_path / str(recompute),
                run="t",
            )
        kept.append(saved[0])
        results.append(AutoModelForCausalLM.from_pretrained(res.checkpoint).state_dict())
        series.append({n: sink.series(n) for n in (M.LOSS, M.KL_EXACT, M.ENTROPY_TOKEN)})
    # the layers' activations really were dropped (and recomputed in backward)
    assert kept[1] < kept[0] / 2, kept
    for name, value in results[0].items():
        torch.testing.assert_close(value, results[1][name], rtol=1e-4, atol=1e-5, msg=name)
    for name in series[0]:
        for (s0, v0), (s1, v1) in zip(series[0][name], series[1][name], strict=True):
            assert s0 == s1 and v0 == pytest.approx(v1, rel=1e-4, abs=1e-6), name


def test_resume_refuses_a_stopped_run_of_another_config(
    demo: Path, batch: RolloutBatch, env: Env, tmp_path: Path
) -> None:
    stage_env, _ = env
    stage_env.eval = stage_env.eval.model_copy(update={"size": 20, "pass_k": 0, "sampled": False})
    calls = {"n": 0}

    def stop_at_second_step() -> bool:
        calls["n"] += 1
        return calls["n"] == 2

    stage_env.should_stop = stop_at_second_step
    base = demo / "base" / "checkpoint"
    first = run_stage1(
        pi_k=base,
        batch=batch,
        cfg=Stage1Config(epochs=2),
        env=stage_env,
        run_dir=tmp_path,
        run="t",
    )
    assert first.status == "stopped" and first.steps == 1
    changed = Stage1Config(epochs=2, lr=1e-2)
    with pytest.raises(ConfigError, match="--fresh"):
        run_stage1(pi_k=base, batch=batch, cfg=changed, env=stage_env, run_dir=tmp_path, run="t")
    fresh = run_stage1(
        pi_k=base,
        batch=batch,
        cfg=changed,
        env=stage_env,
        run_dir=tmp_path,
        run="t",
        resume=False,
    )
    assert fresh.status == "completed" and fresh.steps == fresh.total_steps


def test_rows_the_model_cannot_take_are_refused_at_load_with_their_line(
    demo: Path, tmp_path: Path
) -> None:
    """Before any sampling: a prompt longer than the model's 128 positions (with the response
    budget), and the JSONL default budget of 512 tokens, which alone fills them."""
    data = tmp_path / "rows.jsonl"
    rows = [{"prompt": "12+34=", "answer": "46"}, {"prompt": "1+" * 80 + "1=", "answer": "81"}]
    data.write_text("\n".join(json.dumps(r) for r in rows * 20) + "\n")
    base = str(demo / "base" / "checkpoint")
    jsonl = ["--set", "task.kind=jsonl", "--set", f"task.jsonl.train_path={data}"]
    jsonl += ["--set", "task.jsonl.eval_size=1"]
    for extra, expected in (
        (["--set", "task.max_new_tokens=5"], 'rows.jsonl line 2: "prompt" is 162 tokens'),
        ([], "task.max_new_tokens: the response budget of 512 tokens"),
    ):
        proc = _erpd("sample", "--model", base, "--out", str(tmp_path / "b"), *jsonl, *extra)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert len(proc.stderr.strip().splitlines()) == 1 and expected in proc.stderr, proc.stderr
        assert not (tmp_path / "b").exists()


def test_a_diverging_stage_stops_at_the_step_and_saves_nothing_non_finite(
    demo: Path, batch: RolloutBatch, quick_env: Env, tmp_path: Path
) -> None:
    stage_env, sink = quick_env
    cfg = Stage1Config(epochs=4, minibatch_size=128, lr=1e30, grad_clip=0.0)
    with pytest.raises(DivergedError, match=r"diverged at step \d+: the (loss|gradient norm)"):
        run_stage1(
            pi_k=demo / "base" / "checkpoint",
            batch=batch,
            cfg=cfg,
            env=stage_env,
            run_dir=tmp_path,
            run="t",
        )
    assert not (tmp_path / "checkpoint").exists()
    losses = [v for _, _, n, v in sink.points if n == M.LOSS]
    assert losses and all(math.isfinite(v) for v in losses)  # the bad step logged nothing
