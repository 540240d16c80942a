"""Behaviour of the synthetic arithmetic task: targets, rewards, splits and the length budget."""

from __future__ import annotations

import itertools
import random
from types import SimpleNamespace

import pytest

from erpd.errors import ConfigError
from erpd.tasks import ALPHABET, ArithmeticTask, Problem, Task, build_task
from erpd.tasks.arithmetic import make_problem, max_target_length, operand_range

# The smallest knobs that pass the space check with room: 90**3 = 729,000 prompts.
SMALL = {"digits": 2, "terms": 3}


def _steps(operands: list[int], ops: str) -> Problem:
    return make_problem(operands, list(ops), "steps")


@pytest.mark.parametrize(
    ("operands", "ops", "target", "answer"),
    [
        ([12, 34, 56], "++", "46+56=102", "102"),
        ([12, 3, 4], "+*", "12+12=24", "24"),
        ([47, 38], "+", "85", "85"),
        ([12, 34, 5], "-+", "-22+5=-17", "-17"),
        ([2, 3, 4, 5], "*+*", "6+4*5=6+20=26", "26"),
        ([10, 20, 3, 4], "-*-", "10-60-4=-50-4=-54", "-54"),
        ([5, 6, 7], "**", "30*7=210", "210"),
    ],
)
def test_steps_targets_reduce_one_operation_per_step(
    operands: list[int], ops: str, target: str, answer: str
) -> None:
    problem = _steps(operands, ops)
    assert problem.prompt == "".join(f"{a}{b}" for a, b in zip(operands, ops + "=", strict=True))
    assert problem.target == target
    assert problem.answer == answer


def test_final_target_is_the_result_with_precedence() -> None:
    assert make_problem([12, 3, 4], ["+", "*"], "final").target == "24"
    assert make_problem([12, 3, 4], ["*", "-"], "final").target == "32"
    assert make_problem([1, 2, 3], ["-", "*"], "final").answer == "-5"


def test_generated_answers_match_python_evaluation() -> None:
    task = ArithmeticTask(digits=2, terms=4, operators="+-*", style="steps", eval_size=200)
    for problem in task.train_problems(300, seed=1) + task.eval_problems():
        assert int(problem.answer) == eval(problem.prompt.rstrip("="))
        assert problem.target.endswith(problem.answer)
        assert set(problem.prompt + problem.target) <= set(ALPHABET)


def test_operand_digit_counts() -> None:
    assert operand_range(1) == (1, 9)
    assert operand_range(2) == (10, 99)
    task = ArithmeticTask(digits=3, terms=2, operators="+", eval_size=50)
    for problem in task.train_problems(500, seed=0):
        left, right = problem.prompt.rstrip("=").split("+")
        assert len(left) == len(right) == 3


def test_reward_final_style() -> None:
    task = ArithmeticTask(**SMALL, style="final")
    problem = make_problem([12, 34, 5], ["-", "+"], "final")
    assert task.reward(problem, "-17") == 1.0
    assert task.reward(problem, "  -17 \n") == 1.0
    assert task.reward(problem, "17") == 0.0
    assert task.reward(problem, "-22+5=-17") == 0.0  # "=" never appears in a final target
    assert task.reward(problem, "-17x") == 0.0
    assert task.reward(problem, "") == 0.0
    assert task.reward(problem, "--17") == 0.0


def test_reward_steps_style_reads_text_after_last_equals() -> None:
    task = ArithmeticTask(**SMALL, style="steps")
    problem = _steps([12, 34, 56], "++")
    assert task.reward(problem, "46+56=102") == 1.0
    assert task.reward(problem, "102") == 1.0
    assert task.reward(problem, "1+1=102") == 1.0  # only the final number is scored
    assert task.reward(problem, "46+56=101") == 0.0
    assert task.reward(problem, "46+56=") == 0.0
    assert task.reward(problem, "46+56=10 2") == 0.0
    assert task.reward(problem, "=*=+*9") == 0.0


def test_train_and_eval_never_overlap() -> None:
    task = ArithmeticTask(**SMALL, eval_size=500)
    eval_prompts = {problem.prompt for problem in task.eval_problems()}
    assert len(eval_prompts) == 500
    train = task.train_problems(5000, seed=3)
    train_prompts = {problem.prompt for problem in train}
    assert len(train_prompts) == 5000
    assert not train_prompts & eval_prompts


@pytest.mark.parametrize("style", ["final", "steps"])
def test_train_validation_and_eval_are_pairwise_disjoint_on_the_calibrated_space(
    style: str,
) -> None:
    # ab+cd= has 8,100 prompts: 2,500 + 200 held out leave 5,400, and a pretraining run draws
    # every one of them many times, so any overlap would show up here
    task = ArithmeticTask(2, 2, "+", style, eval_size=2500, validation_size=200)  # type: ignore[arg-type]
    splits = {
        "eval": {p.prompt for p in task.eval_problems()},
        "validation": {p.prompt for p in task.validation_problems()},
        "train": {p.prompt for s in range(20) for p in task.train_problems(1000, seed=s)},
    }
    assert len(splits["eval"]) == 2500 and len(splits["validation"]) == 200
    assert len(splits["train"]) > 4000  # 20 draws of 1,000 reach most of the 5,400 left
    assert not splits["eval"] & splits["validation"]
    assert not splits["train"] & (splits["eval"] | splits["validation"])
    assert task.train_problems(5400, seed=0)  # exactly what is left can still be drawn
    with pytest.raises(ConfigError, match="5400 exist outside the validation and eval"):
        task.train_problems(5401, seed=0)


def test_the_eval_split_does_not_move_when_a_validation_split_is_added() -> None:
    # drawn first from its own stream, so eval numbers stay comparable across validation sizes
    small = ArithmeticTask(**SMALL, eval_size=300, validation_size=1)
    large = ArithmeticTask(**SMALL, eval_size=300, validation_size=900)
    assert small.eval_problems() == large.eval_problems()
    assert small.validation_problems() == large.validation_problems()[:1]
    assert small.validation_problems() != small.eval_problems()[:1]


def test_eval_rejection_is_effective_on_a_tight_space() -> None:
    # 9**5 = 59,049 prompts and 3,000 of them held out: random draws would collide often.
    task = ArithmeticTask(digits=1, terms=5, operators="+", eval_size=3000)
    eval_prompts = {problem.prompt for problem in task.eval_problems()}
    train_prompts = {problem.prompt for problem in task.train_problems(20000, seed=0)}
    assert len(eval_prompts) == 3000
    assert len(train_prompts) == 20000
    assert not train_prompts & eval_prompts


def test_deterministic_across_instances_and_seed_sensitive() -> None:
    first = ArithmeticTask(**SMALL, operators="+-", style="steps", seed=7)
    second = ArithmeticTask(**SMALL, operators="+-", style="steps", seed=7)
    assert first.eval_problems() == second.eval_problems()
    assert first.train_problems(100, seed=2) == second.train_problems(100, seed=2)
    assert first.train_problems(100, seed=2) != first.train_problems(100, seed=3)
    other = ArithmeticTask(**SMALL, operators="+-", style="steps", seed=8)
    assert other.eval_problems() != first.eval_problems()


def test_smaller_draw_is_prefix_of_larger() -> None:
    task = ArithmeticTask(**SMALL)
    assert task.train_problems(50, seed=0) == task.train_problems(200, seed=0)[:50]


def test_eval_problems_returns_a_copy() -> None:
    task = ArithmeticTask(**SMALL, eval_size=10)
    task.eval_problems().clear()
    assert len(task.eval_problems()) == 10


def test_small_space_raises_and_names_its_size() -> None:
    ArithmeticTask(digits=2, terms=2, operators="+")  # 8,100 problems: the calibrated task fits
    # 2,500 held out for 1-point standard errors: 5,400 are left, over 5 x 1,024 to train on
    ArithmeticTask(digits=2, terms=2, operators="+", eval_size=2500)
    with pytest.raises(ConfigError, match="8100") as info:
        ArithmeticTask(digits=2, terms=2, operators="+", eval_size=2500, validation_size=500)
    assert info.value.field == "task.arithmetic"
    assert "memorized" in str(info.value) and "validation_size 500" in str(info.value)
    with pytest.raises(ConfigError, match="729"):
        ArithmeticTask(digits=1, terms=3, operators="+", eval_size=1)


@pytest.mark.parametrize(
    ("knobs", "field"),
    [
        ({"digits": 0}, "digits"),
        ({"digits": 7}, "digits"),
        ({"terms": 1}, "terms"),
        ({"terms": 7}, "terms"),
        ({"operators": ""}, "operators"),
        ({"operators": "+/"}, "operators"),
        ({"operators": "++"}, "operators"),
        ({"eval_size": 0}, "eval_size"),
        ({"validation_size": 0}, "validation_size"),
        ({"style": "chain"}, "style"),
    ],
)
def test_invalid_knobs_raise_config_error(knobs: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        ArithmeticTask(**{**SMALL, **knobs})  # type: ignore[arg-type]
    assert info.value.field == f"task.arithmetic.{field}"


def test_train_request_larger_than_space_raises() -> None:
    task = ArithmeticTask(digits=1, terms=5, operators="+", eval_size=10, validation_size=10)
    with pytest.raises(ConfigError, match="59029"):  # 9**5 less the 20 held out
        task.train_problems(59030, seed=0)


@pytest.mark.parametrize("style", ["final", "steps"])
@pytest.mark.parametrize(
    ("digits", "terms", "operators"),
    [(2, 3, "+"), (2, 4, "+-"), (1, 6, "+-*"), (3, 3, "*"), (2, 5, "-*"), (4, 4, "+-*")],
)
def test_max_new_tokens_fits_every_sampled_target(
    digits: int, terms: int, operators: str, style: str
) -> None:
    task = ArithmeticTask(digits, terms, operators, style, eval_size=100)  # type: ignore[arg-type]
    problems = task.train_problems(2000, seed=0) + task.eval_problems()
    longest = max(len(problem.target) for problem in problems)
    assert task.max_new_tokens >= longest + 1
    assert task.max_new_tokens <= 2 * longest + 1  # a bound, but not a wildly loose one


@pytest.mark.parametrize("style", ["final", "steps"])
@pytest.mark.parametrize("operators", ["+", "-", "*", "+-", "-*", "+-*"])
def test_length_bound_holds_exhaustively_on_small_knobs(operators: str, style: str) -> None:
    # Every problem with three 1-digit operands: the bound must cover them all.
    longest = 0
    for operands in itertools.product(range(1, 10), repeat=3):
        for ops in itertools.product(operators, repeat=2):
            longest = max(longest, len(make_problem(list(operands), list(ops), style).target))
    bound = max_target_length(1, 3, operators, style)  # type: ignore[arg-type]
    assert longest <= bound <= longest + 1


def test_max_new_tokens_reference_values() -> None:
    assert max_target_length(2, 2, "+", "final") + 1 == 4  # "198" + end token
    assert ArithmeticTask(digits=2, terms=3, style="steps").max_new_tokens == 11  # 198+99=297
    task = ArithmeticTask(digits=2, terms=4, operators="+-", style="steps")
    assert task.max_new_tokens == 23  # -89-99-99=-188-99=-287


def test_problems_are_hashable_and_frozen() -> None:
    problem = _steps([1, 2], "+")
    with pytest.raises(AttributeError):
        problem.answer = "4"  # type: ignore[misc]
    assert {problem: 1}[Problem("1+2=", "3", "3")] == 1


def test_build_task_arithmetic_and_protocol() -> None:
    spec = SimpleNamespace(
        kind="arithmetic",
        arithmetic=SimpleNamespace(
            digits=2, terms=3, operators="+*", style="steps", eval_size=20, seed=4
        ),
    )
    task = build_task(spec)
    assert isinstance(task, ArithmeticTask)
    assert isinstance(task, Task)
    assert task.name == "arithmetic"
    assert task.eval_problems() == ArithmeticTask(2, 3, "+*", "steps", 20, 4).eval_problems()
    assert len(task.validation_problems()) == 200  # a spec without the field: the default
    spec.arithmetic.validation_size = 30
    assert len(build_task(spec).validation_problems()) == 30


def test_build_task_rejects_unknown_kind() -> None:
    with pytest.raises(ConfigError) as info:
        build_task(SimpleNamespace(kind="chess"))
    assert info.value.field == "task.kind"


def test_alphabet_covers_random_prompts_and_targets() -> None:
    rng = random.Random(0)
    for _ in range(500):
        operands = [rng.randint(1, 999_999) for _ in range(4)]
        ops = [rng.choice("+-*") for _ in range(3)]
        problem = make_problem(operands, ops, "steps")
        assert set(problem.prompt + problem.target) <= set(ALPHABET)
