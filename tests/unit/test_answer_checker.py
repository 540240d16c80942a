"""The answer checker: a check that never ends, or a checker process that dies, costs one answer
(scored 0 and counted) and never the batch, the stage or the caller's other threads."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from erpd import metrics as M
from erpd.config import EvalConfig, TinyModelConfig
from erpd.evaluate import Evaluator
from erpd.models import build_tiny_model
from erpd.tasks import ArithmeticTask, Problem, Scores, score_many
from erpd.tasks.jsonl import JsonlTask, score_answers
from erpd.tasks.scoring import AnswerChecker, shared_checker

# Known to keep math-verify busy for ever (its own timeouts do not stop it): 82 characters.
HANG = "\\boxed{\\dfrac{5^{\\left(5^{\\left(5^{\\left(5^5\\right)}\\right)} - 4\\right)} - 5}{16}}"
RIGHT = ("x^2+1", "1+x^2")
WRONG = ("x^2+1", "x^2-1")


@pytest.fixture
def checker() -> Iterator[AnswerChecker]:
    own = AnswerChecker()
    yield own
    own.close()


def _ticks_while(work: Callable[[], Scores]) -> tuple[Scores, int, float]:
    """Run ``work`` while another thread ticks every 10 ms, as the worker's heartbeat does."""
    done = threading.Event()
    ticks = 0

    def heartbeat() -> None:
        nonlocal ticks
        while not done.wait(0.01):
            ticks += 1

    beat = threading.Thread(target=heartbeat)
    beat.start()
    started = time.monotonic()
    try:
        scores = work()
    finally:
        elapsed = time.monotonic() - started
        done.set()
        beat.join()
    return scores, ticks, elapsed


def _stat(pid: int) -> list[str]:
    """/proc/PID/stat's fields after the command name (state first)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _state(pid: int) -> str:
    return _stat(pid)[0]


def _running(pid: int) -> bool:
    try:
        return _state(pid) != "Z"
    except FileNotFoundError:  # gone and reaped
        return False


def _cpu_seconds(pid: int) -> float:
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_an_answer_past_its_limit_scores_zero_is_counted_and_the_rest_are_scored(
    checker: AnswerChecker,
) -> None:
    checker.check([RIGHT], limit_s=30.0)  # started: the limit below measures answers only
    first = checker.pid
    items = [RIGHT, (RIGHT[0], HANG), WRONG, RIGHT]
    scores, ticks, elapsed = _ticks_while(lambda: checker.check(items, limit_s=1.0))
    assert scores == Scores([1.0, 0.0, 0.0, 1.0], timeouts=1)
    assert checker.restarts == 1 and checker.pid not in (None, first)
    assert elapsed < 20.0
    # the caller waited without holding the GIL: its heartbeat thread kept beating
    assert ticks >= 0.25 * elapsed / 0.01, (ticks, elapsed)


def test_the_jsonl_reward_reports_the_issue_s_hanging_response_as_a_timeout(
    tmp_path: Path,
) -> None:
    train, held_out = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text('{"prompt": "Write x cubed.", "answer": "x^3"}\n')
    held_out.write_text('{"prompt": "Write x squared plus one.", "answer": "x^2+1"}\n')
    task = JsonlTask(train, eval_path=held_out, answer_timeout_s=1.0)
    problem = task.eval_problems()[0]
    scores = score_many(task, [problem] * 3, ["\\boxed{1+x^2}", HANG, "\\boxed{x^2+1}"])
    assert scores == Scores([1.0, 0.0, 1.0], timeouts=1)
    # against a numeric reference the same response is not a number: 0 at once, no checker
    started = time.monotonic()
    numeric = score_answers([Problem("5^5=", "3125", "3125")], [HANG], timeout_s=1.0)
    assert numeric == Scores([0.0]) and time.monotonic() - started < 0.5


def test_a_checker_killed_mid_answer_costs_that_answer_only(checker: AnswerChecker) -> None:
    checker.check([RIGHT], limit_s=30.0)
    pid = checker.pid
    assert pid is not None
    idle_cpu = _cpu_seconds(pid)
    result: list[Scores] = []
    job = threading.Thread(
        target=lambda: result.append(checker.check([(RIGHT[0], HANG), RIGHT], limit_s=60.0))
    )
    started = time.monotonic()
    job.start()
    deadline = started + 30.0
    while _cpu_seconds(pid) < idle_cpu + 0.3:  # it is crunching the hanging answer
        assert time.monotonic() < deadline, "the checker never started on the answer"
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)  # what the OOM killer or a segfault does
    job.join(timeout=30.0)
    assert result == [Scores([0.0, 1.0], timeouts=1)]
    assert time.monotonic() - started < 30.0  # noticed at once, not at the 60 s limit
    assert checker.restarts == 1 and checker.pid not in (None, pid)


def test_a_checker_that_died_between_batches_is_replaced_without_cost(
    checker: AnswerChecker,
) -> None:
    checker.check([RIGHT], limit_s=30.0)
    pid = checker.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30.0
    while _state(pid) != "Z":  # dead, not yet reaped: the checker finds out on its next use
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert checker.check([RIGHT, WRONG], limit_s=30.0) == Scores([1.0, 0.0])
    assert checker.pid not in (None, pid)


def test_a_checker_that_cannot_start_is_an_error_not_a_batch_of_zeros() -> None:
    checker = AnswerChecker(startup_timeout_s=0.001)
    with pytest.raises(RuntimeError, match="answer checker process did not start"):
        checker.check([RIGHT], limit_s=1.0)
    assert checker.pid is None


def test_tasks_without_a_batch_scorer_score_answer_by_answer() -> None:
    task = ArithmeticTask(eval_size=10)
    problems = task.eval_problems()[:2]
    scores = score_many(task, problems, [problems[0].answer, "x"])
    assert scores == Scores([1.0, 0.0], timeouts=0)
    with pytest.raises(ValueError, match="2 problems but 1 responses"):
        score_many(task, problems, ["1"])


def test_a_forked_copy_gets_its_own_checker_and_leaves_its_parent_s_alone() -> None:
    parent = shared_checker()
    parent.check([RIGHT], limit_s=30.0)
    pid = parent.pid
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the forked copy, which reports by exit code
        code = 1
        try:
            own = shared_checker()
            if own is not parent and own.check([WRONG], limit_s=30.0) == Scores([0.0]):
                code = 0 if own.pid not in (None, pid) else 3
            own.close()
            parent.close()  # what the copy's inherited atexit hook does on a normal exit
        finally:
            os._exit(code)
    deadline = time.monotonic() + 60.0
    while (status := os.waitpid(child, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
            pytest.fail("the forked copy never finished")
        time.sleep(0.02)
    assert os.waitstatus_to_exitcode(status[1]) == 0
    assert parent.pid == pid and parent.check([RIGHT, WRONG], limit_s=30.0) == Scores([1.0, 0.0])


def _policy_that_always_answers(text: str) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A tiny Llama whose greedy answer is ``text`` (token 0, all logits zero) then nothing."""
    vocab = {text: 0, "<pad>": 1, "<eos>": 2, "<unk>": 3}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    shape = TinyModelConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)
    model = build_tiny_model(tokenizer, shape)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every token equally likely: greedy takes id 0
    return model, tokenizer


def test_an_eval_point_reports_answers_that_timed_out(tmp_path: Path) -> None:
    train, held_out = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text('{"prompt": "Write x cubed.", "answer": "x^3"}\n')
    held_out.write_text('{"prompt": "Write x squared plus one.", "answer": "x^2+1"}\n')
    task = JsonlTask(train, eval_path=held_out, answer_timeout_s=1.0)
    model, tokenizer = _policy_that_always_answers(HANG)
    evaluate = Evaluator(task, tokenizer, EvalConfig(sampled=False), max_new_tokens=1)
    assert evaluate(model, step=0) == {M.ACC_EVAL: 0.0, M.REWARD_TIMEOUTS: 1.0}
    right, right_tokenizer = _policy_that_always_answers("\\boxed{1+x^2}")
    evaluate = Evaluator(task, right_tokenizer, EvalConfig(sampled=False), max_new_tokens=1)
    assert evaluate(right, step=0) == {M.ACC_EVAL: 1.0, M.REWARD_TIMEOUTS: 0.0}


def test_a_checker_stuck_on_an_answer_dies_with_its_parent() -> None:
    script = (
        "import sys\n"
        "from erpd.tasks.scoring import AnswerChecker\n"
        "checker = AnswerChecker()\n"
        "checker.check([('x', 'x')], limit_s=30.0)\n"
        "print(checker.pid, flush=True)\n"
        f"checker.check([('x^2+1', {HANG!r})], limit_s=600.0)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    pid = int(parent.stdout.readline())
    idle_cpu = _cpu_seconds(pid)
    deadline = time.monotonic() + 30.0
    while _cpu_seconds(pid) < idle_cpu + 0.3:  # it is crunching the hanging answer
        assert time.monotonic() < deadline, "the checker never started on the answer"
        time.sleep(0.02)
    parent.kill()  # SIGKILL: no clean-up code of the parent runs
    parent.wait()
    deadline = time.monotonic() + 30.0
    while _running(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            pytest.fail("the orphaned checker kept running")
        time.sleep(0.02)
