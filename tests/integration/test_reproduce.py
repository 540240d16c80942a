"""`erpd reproduce` end to end on a minimal size: every experiment trains for real (tiny bases,
small batches, 2 seeds), then the report, plots and results.json are checked for form.

The scientific verdicts are reported by the command, never asserted here: at this size they
mean nothing. What is asserted is that each experiment produced what its section and verdict
need, and that a second invocation reuses every run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from matplotlib import image

from erpd.reproduce import EXPERIMENTS
from erpd.reproduce.experiments import FINAL_METRICS
from erpd.reproduce.verdicts import OUTCOMES
from tests.conftest import random_qwen3_dir

SEEDS = 2
# the quick preset shrunk to a smoke test (~1.5 minutes on 2 cores)
MINIMAL = [
    "sample.num_prompts=16",
    "sample.group_size=4",
    "onpolicy_prompts=8",
    "eval.size=30",
    "base.max_steps=30",
    "base.min_steps=10",
    "base.eval_size=30",
    "teacher.epochs=2",
    "teacher.eval_at_epochs=[1, 2]",
    "teacher.minibatch_size=32",
    "sweep_epochs=[1, 2]",
    "student.minibatch_size=32",
    "student.epochs=1",
    "rounds=2",
    "kl_coefs=[0, 1]",
    'ablations={"region=all": {region: all}}',
    "control_max_epochs=2",
    "curve_max_epochs=3",
    "kl_curve_budgets=[0.002, 0.02]",
    "runtime.device=cpu",
]


def _reproduce(out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    args = [sys.executable, "-m", "erpd.cli", "reproduce", "--out", str(out), "--preset", "quick"]
    args += ["--seeds", str(SEEDS)]
    for assignment in MINIMAL:
        args += ["--set", assignment]
    return subprocess.run(
        [*args, *extra],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "COLUMNS": "200"},
    )


@pytest.fixture(scope="module")
def reproduction(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("reproduce") / "out"
    proc = _reproduce(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


def test_results_json_is_strict_json_with_every_experiment(reproduction: tuple[Path, str]) -> None:
    out, _ = reproduction
    # strict: NaN/Infinity would make this raise (a metric a run lacks must be null)
    body = json.loads((out / "results.json").read_text(), parse_constant=_reject)
    assert set(body["experiments"]) == set(EXPERIMENTS)
    assert body["meta"]["seeds"] == SEEDS and body["config"]["seeds"] == SEEDS
    sweep = body["experiments"]["stage1_sweep"]["arms"]
    assert set(sweep) == {"sapo", "grpo"}
    assert [p["epoch"] for p in sweep["sapo"]["curve"]] == [0, 1, 2]
    strong = body["experiments"]["strong_teacher"]["tasks"]
    assert set(strong) == {"final", "steps"}
    controls = {
        "control-advantage-region",
        "control-advantage-random",
        "control-placebo",
        "control-early-stop",
    }
    expected = {"base", "teacher-sapo", "student-sapo", *controls}
    first = {"teacher-ce", "student-ce", "ablation region=all", "kl_curves"}
    assert expected | first == set(strong["final"])
    # the quick preset trains only the first strong teacher and no ablations on other tasks
    assert expected == set(strong["steps"])
    arms = {k: v for k, v in strong["final"].items() if k != "kl_curves"}
    for arm in arms.values():
        assert len(arm["per_seed"]) == SEEDS
        assert set(FINAL_METRICS) <= set(arm["per_seed"][0])
        acc = arm["acc/eval"]
        assert 0.0 <= acc["min"] <= acc["mean"] <= acc["max"] <= 1.0
    # the stage-2 controls run at the student's config: never more steps than it may take
    student = arms["student-sapo"]["per_seed"]
    for name in controls - {"control-early-stop"}:
        for seed in range(SEEDS):
            control = arms[name]["per_seed"][seed]
            assert control["status"] in ("completed", "kl_budget")
            assert control["steps"] <= max(s["steps"] for s in student) or (
                student[seed]["status"] == "kl_budget"
            )
    # one KL-accuracy curve per arm: a point per budget, one value (or null) per seed
    curves = strong["final"]["kl_curves"]
    assert set(curves) == {"student", *controls}
    for points in curves.values():
        assert [p["budget"] for p in points] == [0.002, 0.02]
        assert all([s["seed"] for s in p["per_seed"]] == [0, 1] for p in points)
    rounds = body["experiments"]["rounds"]["arms"]
    names = {"erpd", "stage1_repeated", "no_teacher", "onpolicy_grpo", "onpolicy_grpo_steps"}
    assert set(rounds) == names
    assert all(len(per_round) == 2 for per_round in rounds.values())
    for per_round in rounds.values():  # cumulative cost grows round by round
        steps = [r["steps_total"]["mean"] for r in per_round]
        assert 0 < steps[0] < steps[1]
    # matched optimizer steps: as many on-policy steps as ERPD took, round by round
    matched = [r["steps_total"]["mean"] for r in rounds["onpolicy_grpo_steps"]]
    assert matched == [r["steps_total"]["mean"] for r in rounds["erpd"]]


def _reject(constant: str) -> None:
    raise ValueError(f"non-standard JSON constant {constant}")


def test_a_verdict_per_claim_with_its_numbers(reproduction: tuple[Path, str]) -> None:
    out, stdout = reproduction
    verdicts = json.loads((out / "results.json").read_text())["verdicts"]
    claims = [v["claim"] for v in verdicts]
    assert claims == [
        "1a sapo",
        "1a grpo",
        "1b",
        "2a final/sapo",
        "2a final/ce",
        "2b final/sapo",
        "2a steps/sapo",
        "2b steps/sapo",
        "3",
        "4",
        "5",
    ]
    for v in verdicts:
        assert v["outcome"] in OUTCOMES and v["outcome_sampled"] in OUTCOMES
        assert isinstance(v["holds"], bool) and isinstance(v["holds_sampled"], bool)
        assert v["rule"] and "[sampled:" in v["evidence"]
    for claim in claims:
        assert claim in stdout  # the verdict table printed at the end


def test_report_links_one_readable_figure_per_experiment(reproduction: tuple[Path, str]) -> None:
    out, _ = reproduction
    report = (out / "report.md").read_text()
    outcomes = ("holds", "does not hold", "inconclusive", "not applicable")
    table = report[report.index("## Verdicts") :].split("\n\n")[1].splitlines()[2:]
    cells = [row.split(" | ")[1:3] for row in table]  # greedy and sampled outcome per claim
    assert len(cells) == 11 and all(c.strip("*") in outcomes for pair in cells for c in pair)
    assert report.index("## How verdicts are decided") < report.index("## Verdicts")
    figures = sorted(out.glob("fig_*.png"))
    expected = {f"fig_{name}.png" for name in EXPERIMENTS}
    body = json.loads((out / "results.json").read_text())
    if "kl_curves" in body["experiments"]["strong_teacher"]["tasks"]["final"]:
        expected.add("fig_kl_curves.png")  # the KL-accuracy curves of the student and controls
    assert {f.name for f in figures} == expected
    for fig in figures:
        assert f"]({fig.name})" in report
        pixels = image.imread(fig)  # a truncated or empty PNG fails to decode
        assert pixels.shape[0] > 100 and pixels.shape[1] > 100
        assert fig.stat().st_size < 300_000  # small enough to commit the quick report


def test_a_second_invocation_reuses_every_run(reproduction: tuple[Path, str]) -> None:
    out, _ = reproduction
    before = json.loads((out / "results.json").read_text())["verdicts"]
    proc = _reproduce(out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "(0 runs trained)" in proc.stdout
    assert json.loads((out / "results.json").read_text())["verdicts"] == before


def test_refuses_a_directory_that_is_not_a_reproduction(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    proc = _reproduce(tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "holds no erpd reproduction" in proc.stderr
    assert (tmp_path / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--preset", "huge"], "--preset"),
        (["--set", "student.clip_eps=2"], "student.clip_eps"),
        (["--set", 'ablations={"bad": {clip_eps: 5}}'], "ablations.bad"),
        (["--set", "strong_objectives=[sapo]"], "two_teachers needs two"),
        (["--dataset", "x.jsonl"], "--dataset needs --model"),
    ],
)
def test_bad_input_is_one_line_naming_the_field(
    tmp_path: Path, extra: list[str], message: str
) -> None:
    proc = _reproduce(tmp_path / "out", *extra)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


def test_a_user_dataset_and_a_local_hf_model(tmp_path: Path) -> None:
    """--model DIR --dataset FILE: the experiments run on JSONL data scored by math-verify,
    with a Qwen3 directory as pi_0 (random weights: only the plumbing is under test)."""
    model = random_qwen3_dir(tmp_path / "qwen3")
    data = tmp_path / "data.jsonl"
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(10, 40) for b in (3, 7)]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    proc = _reproduce(
        tmp_path / "out",
        "--model",
        str(model),
        "--dataset",
        str(data),
        "--set",
        "tasks={dataset: {max_new_tokens: 6}}",  # replaces the built-in tasks
        "--set",
        "tasks.dataset.jsonl.eval_size=20",
        "--set",
        "experiments=[strong_teacher, two_teachers]",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    body = json.loads((tmp_path / "out" / "results.json").read_text())
    assert list(body["experiments"]["strong_teacher"]["tasks"]) == ["dataset"]
    assert [v["claim"] for v in body["verdicts"]] == [
        "2a dataset/sapo",
        "2a dataset/ce",
        "2b dataset/sapo",
        "4",
    ]
    assert body["config"]["model"]["path"] == str(model)
