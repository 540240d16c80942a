"""The JSONL task: row validation, the eval split, sampling and its final-answer reward."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from erpd.config import JsonlConfig, TaskSpec
from erpd.errors import ConfigError, DataError
from erpd.tasks import JsonlTask, Problem, Task, build_task
from erpd.tasks.jsonl import score_answers


def _reward(answer: str, response: str, prompt: str = "") -> float:
    return score_answers([Problem(prompt, answer, answer)], [response]).rewards[0]


def _write_rows(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _numbered(path: Path, count: int) -> Path:
    return _write_rows(path, [{"prompt": f"q{i}", "answer": str(i)} for i in range(count)])


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"prompt": "a" "answer": "1"}', "not valid JSON (Expecting ',' delimiter)"),
        ('{"prompt": "a"}', 'missing "answer"'),
        ('{"answer": "1"}', 'missing "prompt"'),
        ('["a", "1"]', "expected a JSON object, got array"),
        ('"just text"', "expected a JSON object, got string"),
        ('{"prompt": 5, "answer": "1"}', '"prompt" must be a string, got number'),
        ('{"prompt": "a", "answer": null}', '"answer" must be a string or number, got null'),
        ('{"prompt": "a", "answer": true}', '"answer" must be a string or number, got boolean'),
        ('{"prompt": "a", "answer": ""}', 'empty "answer"'),
        ('{"prompt": "  ", "answer": "1"}', 'empty "prompt"'),
    ],
)
def test_malformed_row_names_file_and_line(tmp_path: Path, bad_line: str, message: str) -> None:
    path = tmp_path / "data.jsonl"
    good = '{"prompt": "x", "answer": "2"}'
    path.write_text(f"{good}\n\n{bad_line}\n{good}\n", encoding="utf-8")  # blank line 2 counts
    with pytest.raises(DataError) as info:
        JsonlTask(path, eval_size=1)
    text = str(info.value)
    assert text == f"{path} line 3: {message}"
    assert "\n" not in text


def test_empty_and_missing_files_raise(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(DataError, match="no rows"):
        JsonlTask(empty)
    with pytest.raises(DataError, match="file not found"):
        JsonlTask(tmp_path / "absent.jsonl")


def test_numeric_answers_become_strings(tmp_path: Path) -> None:
    path = _write_rows(
        tmp_path / "nums.jsonl",
        [
            {"prompt": "a", "answer": 42},
            {"prompt": "b", "answer": 0.5},
            {"prompt": "c", "answer": "7"},
        ],
    )
    task = JsonlTask(path, eval_size=1)
    problems = {p.prompt: p for p in task.train_problems(2, seed=0) + task.eval_problems()}
    assert problems["a"] == Problem("a", "42", "42")
    assert problems["b"].answer == "0.5"
    assert problems["c"].target == "7"


def test_hold_out_split_is_disjoint_sized_and_deterministic(tmp_path: Path) -> None:
    path = _numbered(tmp_path / "rows.jsonl", 100)
    task = JsonlTask(path, eval_size=30, seed=5)
    eval_prompts = {p.prompt for p in task.eval_problems()}
    validation = {p.prompt for p in task.validation_problems()}
    train = {p.prompt for p in task.train_problems(63, seed=0)}
    # 70 rows left after the eval split: a tenth of them (7) held out for validation
    assert (len(eval_prompts), len(validation), len(train)) == (30, 7, 63)
    assert not eval_prompts & validation and not train & (eval_prompts | validation)
    assert eval_prompts | validation | train == {f"q{i}" for i in range(100)}
    again = JsonlTask(path, eval_size=30, seed=5)
    assert again.eval_problems() == task.eval_problems()
    assert again.validation_problems() == task.validation_problems()
    other = JsonlTask(path, eval_size=30, seed=6)
    assert other.eval_problems() != task.eval_problems()
    assert other.validation_problems() != task.validation_problems()


@pytest.mark.parametrize("separate_eval_file", [False, True])
def test_train_validation_and_eval_are_pairwise_disjoint(
    tmp_path: Path, separate_eval_file: bool
) -> None:
    path = _numbered(tmp_path / "rows.jsonl", 400)
    eval_path = None
    if separate_eval_file:  # q0-q49 are also in the eval file: dropped from training
        eval_path = _numbered(tmp_path / "eval.jsonl", 50)
    task = JsonlTask(path, eval_path=eval_path, eval_size=100, validation_size=40, seed=2)
    evaluation = {p.prompt for p in task.eval_problems()}
    validation = {p.prompt for p in task.validation_problems()}
    left = task.train_size
    train = {p.prompt for p in task.train_problems(left, seed=0)}
    assert len(validation) == 40 and left == 400 - len(evaluation) - 40
    assert not evaluation & validation
    assert not train & evaluation and not train & validation
    with pytest.raises(DataError, match="outside the validation and eval splits"):
        task.train_problems(left + 1, seed=0)


def test_the_validation_split_is_held_out_after_the_eval_split(tmp_path: Path) -> None:
    # the eval split does not move with validation_size, and too large a validation split is
    # refused in one line that names the field to lower
    path = _numbered(tmp_path / "rows.jsonl", 50)
    small = JsonlTask(path, eval_size=10, validation_size=5)
    assert small.eval_problems() == JsonlTask(path, eval_size=10, validation_size=0).eval_problems()
    with pytest.raises(DataError) as info:
        JsonlTask(path, eval_size=10, validation_size=40)
    message = str(info.value)
    assert "\n" not in message and "40 distinct prompts left after the eval split" in message
    assert "task.jsonl.validation_size" in message
    JsonlTask(path, eval_size=10, validation_size=39)  # one row left to train on


def test_no_validation_rows_refuse_a_decision_naming_the_field(tmp_path: Path) -> None:
    task = JsonlTask(_numbered(tmp_path / "rows.jsonl", 30), eval_size=10, validation_size=0)
    assert task.train_size == 20
    with pytest.raises(ConfigError) as info:
        task.validation_problems()
    assert info.value.field == "task.jsonl.validation_size"
    with pytest.raises(ConfigError, match=r"task\.jsonl\.validation_size"):
        JsonlTask(_numbered(tmp_path / "rows.jsonl", 30), validation_size=-1)
    # with the automatic share a small file keeps every row left for training
    assert JsonlTask(_numbered(tmp_path / "few.jsonl", 12), eval_size=3).train_size == 9


def test_duplicate_prompts_do_not_leak_into_eval(tmp_path: Path) -> None:
    rows = [{"prompt": f"q{i % 10}", "answer": str(i % 10)} for i in range(200)]
    path = _write_rows(tmp_path / "dupes.jsonl", rows)
    task = JsonlTask(path, eval_size=4)
    eval_prompts = {p.prompt for p in task.eval_problems()}
    train_prompts = {p.prompt for p in task.train_problems(6, seed=0)}
    assert len(eval_prompts) == 4
    assert train_prompts.isdisjoint(eval_prompts)
    assert len(train_prompts | eval_prompts) == 10
    with pytest.raises(DataError, match="7"):
        task.train_problems(7, seed=0)


def test_too_few_rows_for_hold_out(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="5 distinct prompts"):
        JsonlTask(_numbered(tmp_path / "few.jsonl", 5), eval_size=5)


def test_separate_eval_file_excludes_its_prompts_from_train(tmp_path: Path) -> None:
    train_path = _numbered(tmp_path / "train.jsonl", 20)
    eval_path = _write_rows(
        tmp_path / "eval.jsonl", [{"prompt": "q3", "answer": "3"}, {"prompt": "new", "answer": "1"}]
    )
    task = JsonlTask(train_path, eval_path=eval_path, eval_size=999, validation_size=0)
    assert [p.prompt for p in task.eval_problems()] == ["q3", "new"]
    train = task.train_problems(19, seed=0)
    assert "q3" not in {p.prompt for p in train}
    with pytest.raises(DataError, match=r"asked for 20 .* only 19"):
        task.train_problems(20, seed=0)


def test_train_sampling_is_distinct_and_seeded(tmp_path: Path) -> None:
    task = JsonlTask(_numbered(tmp_path / "rows.jsonl", 300), eval_size=50)
    first = task.train_problems(100, seed=1)
    assert len({p.prompt for p in first}) == 100
    assert first == task.train_problems(100, seed=1)
    assert first != task.train_problems(100, seed=2)
    assert task.train_problems(0, seed=1) == []


def test_name_budget_and_protocol(tmp_path: Path) -> None:
    path = _numbered(tmp_path / "gsm_small.jsonl", 10)
    task = build_task(
        SimpleNamespace(
            kind="jsonl",
            jsonl=SimpleNamespace(train_path=str(path), eval_path=None, eval_size=2, seed=0),
        )
    )
    assert isinstance(task, JsonlTask)
    assert isinstance(task, Task)
    assert task.name == "jsonl:gsm_small"
    assert task.max_new_tokens == 512


@pytest.mark.parametrize(
    ("answer", "response"),
    [
        ("0.5", "\\boxed{\\frac{1}{2}}"),
        ("42", "The answer is 42"),
        ("42", "I think 41... no, the final answer is $42$."),
        ("\\frac{1}{2}", "0.5"),
        ("-7", "so x = \\boxed{-7}"),
        ("x^2+1", "\\boxed{1+x^2}"),
        ("$\\sqrt{2}$", "\\boxed{\\sqrt{2}}"),
        ("137", "137"),  # the tiny model's bare answer to "81+58-2="
        ("137", " 137\n"),
        ("137", "137.0"),
        ("137", "\\boxed{137}"),
        ("137", "\\boxed{136} is wrong; the answer is \\boxed{137}"),  # the LAST box counts
        ("1000", "Answer: 1,000."),
        ("42", "Natalia sold 42 clips.\n#### 42"),  # GSM8K's own answer marker
        ("2/4", "2/4"),  # a reference's own spelling is accepted even when not in lowest terms
        ("\\boxed{12}", "**12**"),
    ],
)
def test_reward_accepts_equivalent_final_answers(answer: str, response: str) -> None:
    assert _reward(answer, response) == 1.0


@pytest.mark.parametrize(
    ("answer", "response"),
    [
        ("42", "The answer is 43"),
        ("0.5", "\\boxed{\\frac{1}{3}}"),
        ("42", ""),
        ("42", "\\frac{ \\boxed{ $$ }}}"),
        ("42", "\x00\xff garbage ))) ((("),
        ("x^2+1", "\\boxed{x^2-1}"),
        ("42", "x = 42"),  # without a box, the final answer must be a bare number
        ("x^2+1", "x^2+1"),  # a symbolic reference needs a boxed answer
        ("137", "\\boxed{137"),  # an unclosed box is no answer
    ],
)
def test_reward_rejects_wrong_garbage_and_unexpected_forms(answer: str, response: str) -> None:
    assert _reward(answer, response) == 0.0


def test_reward_uses_problem_answer(tmp_path: Path) -> None:
    task = JsonlTask(_numbered(tmp_path / "rows.jsonl", 5), eval_size=1)
    problem = Problem("What is 6*7?", "42", "42")
    assert task.reward(problem, "It is \\boxed{42}.") == 1.0
    assert task.reward(problem, "It is \\boxed{24}.") == 0.0


def test_reward_works_outside_the_main_thread() -> None:
    # math-verify's default SIGALRM timeouts raise off the main thread; ours must not.
    results: list[float] = []
    worker = threading.Thread(target=lambda: results.append(_reward("0.5", "$1/2$")))
    worker.start()
    worker.join()
    assert results == [1.0]


@pytest.mark.parametrize(
    "echo",
    [
        "81+58-2",
        "100+37",
        "137=137",
        "81+58-2=137=137",
        "\\boxed{81+58-2}",
        "\\boxed{100+37}",
        "\\boxed{137=137}",
        "The answer is 81+58-2.",
        "$81+58-2$",
        "\\boxed{274/2}",  # a reducible fraction is an expression, not an answer
        "\\boxed{\\frac{137}{1}}",
    ],
)
def test_an_echo_of_the_prompt_scores_zero(echo: str) -> None:
    # math-verify on the whole response paid 1.0 for these: a reward hack open to any policy
    assert _reward("137", echo, prompt="81+58-2=") == 0.0


def test_a_symbolic_answer_copied_from_the_prompt_scores_zero() -> None:
    prompt = "Expand (x+1)^2 - 2x."
    assert _reward("x^2+1", "\\boxed{(x+1)^2 - 2x}", prompt) == 0.0
    assert _reward("x^2+1", "\\boxed{1 + x^2}", prompt) == 1.0
    # spelled like the reference, an answer that also appears in the prompt still counts
    assert _reward("x^2+1", "\\boxed{x^2+1}", "Is x^2+1 irreducible? Repeat it.") == 1.0


def test_eval_prompts_dropped_from_training_are_counted_in_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    train_path = _numbered(tmp_path / "train.jsonl", 20)
    eval_path = _write_rows(
        tmp_path / "eval.jsonl",
        [
            {"prompt": "q3", "answer": "3"},
            {"prompt": "q7", "answer": "7"},
            {"prompt": "x", "answer": "1"},
        ],
    )
    with caplog.at_level(logging.INFO, logger="erpd.tasks"):
        task = JsonlTask(train_path, eval_path=eval_path, validation_size=0)
    assert task.dropped_for_eval == 2 and task.train_size == 18
    lines = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert lines == [
        f"{train_path}: dropped 2 training rows whose prompt is in the eval file {eval_path}"
    ]


def test_rows_know_their_file_and_line_without_changing_equality(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text('{"prompt": "a", "answer": 1}\n\n{"prompt": "b", "answer": 2}\n')
    task = JsonlTask(path, eval_size=1)
    sources = {p.prompt: p.source for p in task.all_problems()}
    assert sources == {"a": f"{path} line 1", "b": f"{path} line 3"}
    row = next(p for p in task.all_problems() if p.prompt == "b")
    assert row == Problem("b", "2", "2") and hash(row) == hash(Problem("b", "2", "2"))


def test_answer_timeout_is_validated(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"task\.jsonl\.answer_timeout_s"):
        JsonlTask(_numbered(tmp_path / "rows.jsonl", 5), eval_size=1, answer_timeout_s=0)


def test_the_answer_time_limit_comes_from_the_config(tmp_path: Path) -> None:
    path = _numbered(tmp_path / "rows.jsonl", 5)
    spec = TaskSpec(kind="jsonl", jsonl=JsonlConfig(train_path=str(path), eval_size=1))
    built = build_task(spec)
    assert isinstance(built, JsonlTask) and built.answer_timeout_s == 5.0
    spec.jsonl = JsonlConfig(train_path=str(path), eval_size=1, answer_timeout_s=0.5)
    built = build_task(spec)
    assert isinstance(built, JsonlTask) and built.answer_timeout_s == 0.5


def test_the_validation_size_comes_from_the_config(tmp_path: Path) -> None:
    path = _numbered(tmp_path / "rows.jsonl", 50)
    spec = TaskSpec(kind="jsonl", jsonl=JsonlConfig(train_path=str(path), eval_size=10))
    assert len(build_task(spec).validation_problems()) == 4  # a tenth of the 40 left
    spec.jsonl = JsonlConfig(train_path=str(path), eval_size=10, validation_size=12)
    assert len(build_task(spec).validation_problems()) == 12
