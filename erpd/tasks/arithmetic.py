"""Synthetic integer arithmetic: a task small models can learn, with an exact reward.

Prompts look like ``"12+3*4="``. The ``final`` style supervises only the result; the ``steps``
style writes out one reduction per step (``"12+12=24"``), which lets a small model do long
computations one easy operation at a time. Everything is generated from string seeds, so the same
knobs give the same problems in every Python process.
"""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Callable, Sequence
from typing import Literal, TypeVar

from erpd.errors import ConfigError
from erpd.tasks.base import Problem

Style = Literal["final", "steps"]

OPERATORS = "+-*"
"""Every operator a prompt may use."""
ALPHABET = "0123456789" + OPERATORS + "="
"""Every character an arithmetic prompt or target can contain (for a character tokenizer)."""

_FIELD = "task.arithmetic"
_DIGITS_RANGE = (1, 6)
_TERMS_RANGE = (2, 6)
_STYLES: tuple[Style, ...] = ("final", "steps")
_SPACE_FACTOR = 5
"""What is left for training after the held-out splits must be this many times larger than
the training problems we expect to draw."""
_TRAIN_RESERVE = 1024
"""Training problems budgeted for in the space check (a typical dataset size)."""
DEFAULT_VALIDATION_SIZE = 200
"""Validation problems when a caller does not say (the config's default)."""
_INTEGER = re.compile(r"-?[0-9]+")

_T = TypeVar("_T")
Interval = tuple[int, int]


def operand_range(digits: int) -> tuple[int, int]:
    """Return the inclusive range of operands with exactly ``digits`` digits (1..9 for one)."""
    low = 1 if digits == 1 else 10 ** (digits - 1)
    return low, 10**digits - 1


def problem_space_size(digits: int, terms: int, operators: str) -> int:
    """Count the distinct prompts the knobs can produce (operand choices times operator choices)."""
    low, high = operand_range(digits)
    return (high - low + 1) ** terms * len(operators) ** (terms - 1)


def _apply(op: str, left: int, right: int) -> int:
    """Evaluate one binary operation."""
    if op == "+":
        return left + right
    if op == "-":
        return left - right
    return left * right


def _apply_interval(op: str, left: Interval, right: Interval) -> Interval:
    """Exact range of ``left op right`` for independent operands drawn from the two ranges."""
    if op == "+":
        return left[0] + right[0], left[1] + right[1]
    if op == "-":
        return left[0] - right[1], left[1] - right[0]
    corners = [a * b for a in left for b in right]
    return min(corners), max(corners)


def _reduce_once(
    items: Sequence[_T], ops: Sequence[str], combine: Callable[[str, _T, _T], _T]
) -> tuple[list[_T], list[str]]:
    """Perform one reduction: the leftmost ``*`` if any, else the leftmost ``+``/``-``.

    This order is both correct precedence and the order the ``steps`` style writes out. It is
    generic so the same code drives concrete values and the interval bound on target length.
    """
    index = ops.index("*") if "*" in ops else 0
    merged = combine(ops[index], items[index], items[index + 1])
    new_items = [*items[:index], merged, *items[index + 2 :]]
    new_ops = [*ops[:index], *ops[index + 1 :]]
    return new_items, new_ops


def _render(numbers: Sequence[int], ops: Sequence[str]) -> str:
    """Write an expression without spaces; a negative number keeps its leading ``-``.

    Only ``+``/``-`` reductions can go negative and they always happen at the front once every
    ``*`` is gone, so a negative number is always the first one and never follows an operator.
    """
    parts = [str(numbers[0])]
    for op, number in zip(ops, numbers[1:], strict=True):
        parts.append(op + str(number))
    return "".join(parts)


def _reduction_chain(operands: Sequence[int], ops: Sequence[str]) -> list[str]:
    """Return the expression after each reduction; the last entry is the result."""
    numbers, remaining = list(operands), list(ops)
    chain: list[str] = []
    while remaining:
        numbers, remaining = _reduce_once(numbers, remaining, _apply)
        chain.append(_render(numbers, remaining))
    return chain


def make_problem(operands: Sequence[int], ops: Sequence[str], style: Style) -> Problem:
    """Build the problem for ``operands`` joined by ``ops`` (one fewer than operands)."""
    if len(ops) != len(operands) - 1 or not ops:
        raise ValueError("need at least two operands and exactly one operator between each pair")
    chain = _reduction_chain(operands, ops)
    answer = chain[-1]
    target = "=".join(chain) if style == "steps" else answer
    return Problem(prompt=_render(operands, ops) + "=", answer=answer, target=target)


def _interval_chars(interval: Interval) -> int:
    """Longest decimal rendering of any integer in the range (attained at an endpoint)."""
    return max(len(str(interval[0])), len(str(interval[1])))


def _target_bound_for_ops(digits: int, ops: Sequence[str], style: Style) -> int:
    """Upper bound on the target length for one operator sequence.

    Each number of an intermediate expression covers a disjoint group of operands, so interval
    arithmetic gives its exact range and each step's bound is attained; summing steps may
    over-count slightly because different steps can peak on different operands.
    """
    items: list[Interval] = [operand_range(digits)] * (len(ops) + 1)
    remaining = list(ops)
    step_lengths: list[int] = []
    while remaining:
        items, remaining = _reduce_once(items, remaining, _apply_interval)
        step_lengths.append(sum(_interval_chars(item) for item in items) + len(remaining))
    if style == "final":
        return step_lengths[-1]
    return sum(step_lengths) + len(step_lengths) - 1


def max_target_length(digits: int, terms: int, operators: str, style: Style) -> int:
    """Upper bound on ``len(target)`` over every problem the knobs can produce.

    Exhaustive over operator sequences (at most 3**5) and analytic over operands, so it is cheap
    and guaranteed, unlike measuring a sample.
    """
    sequences = itertools.product(operators, repeat=terms - 1)
    return max(_target_bound_for_ops(digits, ops, style) for ops in sequences)


def _check_int(name: str, value: int, low: int | None = None, high: int | None = None) -> None:
    """Reject non-integers (including bools) and values outside ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{_FIELD}.{name}", f"must be an integer, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        span = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ConfigError(f"{_FIELD}.{name}", f"must be {span}, got {value}")


def _check_operators(operators: str) -> None:
    """Require a non-empty string of distinct characters from ``+-*``."""
    field = f"{_FIELD}.operators"
    if not isinstance(operators, str) or not operators:
        raise ConfigError(field, f"must be a non-empty string of characters from {OPERATORS!r}")
    unknown = sorted(set(operators) - set(OPERATORS))
    if unknown:
        raise ConfigError(field, f"unknown operator(s) {''.join(unknown)!r}; use {OPERATORS!r}")
    if len(set(operators)) != len(operators):
        raise ConfigError(field, f"repeats an operator in {operators!r}; list each once")


def _check_space(
    digits: int, terms: int, operators: str, eval_size: int, validation_size: int
) -> None:
    """Refuse problem spaces so small that a model could memorize its training problems instead
    of computing: the held-out splits are set aside, and what is left must still be
    `_SPACE_FACTOR` times a typical training set. Held-out problems are never trained on, so
    they need only be distinct; a large eval split (2,500 problems for 1-point standard errors)
    fits the 8,100 problems of the calibrated `ab+cd=` task."""
    space = problem_space_size(digits, terms, operators)
    held = eval_size + validation_size
    needed = held + _SPACE_FACTOR * _TRAIN_RESERVE
    if space < needed:
        raise ConfigError(
            _FIELD,
            f"the space of {space} problems (digits={digits}, terms={terms}, "
            f"operators={operators!r}) is too small: need at least {needed} (eval_size "
            f"{eval_size} + validation_size {validation_size} held out, and {_SPACE_FACTOR} x "
            f"{_TRAIN_RESERVE} left to train on) because a tiny problem space is memorized; "
            "raise digits or terms, add operators, or hold out fewer problems",
        )


class ArithmeticTask:
    """Integer expressions over ``digits``-digit operands with normal operator precedence."""

    name = "arithmetic"

    def __init__(
        self,
        digits: int = 2,
        terms: int = 2,
        operators: str = "+",
        style: Style = "final",
        eval_size: int = 500,
        seed: int = 0,
        validation_size: int = DEFAULT_VALIDATION_SIZE,
    ) -> None:
        _check_int("digits", digits, *_DIGITS_RANGE)
        _check_int("terms", terms, *_TERMS_RANGE)
        _check_operators(operators)
        if style not in _STYLES:
            raise ConfigError(f"{_FIELD}.style", f"must be one of {_STYLES}, got {style!r}")
        _check_int("eval_size", eval_size, 1, None)
        _check_int("validation_size", validation_size, 1, None)
        _check_int("seed", seed)
        _check_space(digits, terms, operators, eval_size, validation_size)
        self.digits = digits
        self.terms = terms
        self.operators = operators
        self.style: Style = style
        self.eval_size = eval_size
        self.validation_size = validation_size
        self.seed = seed
        self.space_size = problem_space_size(digits, terms, operators)
        # +1 for the end token the model must emit after the target.
        self.max_new_tokens = max_target_length(digits, terms, operators, style) + 1
        # the eval split is drawn first, as before there was a validation split, so its
        # problems (and every eval number measured on them) stay the same
        self._eval = self._draw(random.Random(f"arithmetic-{seed}-eval"), eval_size, frozenset())
        eval_prompts = frozenset(problem.prompt for problem in self._eval)
        rng = random.Random(f"arithmetic-{seed}-validation")
        self._validation = self._draw(rng, validation_size, eval_prompts)
        self._held_prompts = eval_prompts | {problem.prompt for problem in self._validation}

    def __repr__(self) -> str:
        return (
            f"ArithmeticTask(digits={self.digits}, terms={self.terms}, "
            f"operators={self.operators!r}, style={self.style!r}, "
            f"eval_size={self.eval_size}, seed={self.seed}, "
            f"validation_size={self.validation_size})"
        )

    def eval_problems(self) -> list[Problem]:
        """Return the held-out split, drawn once at construction from the task seed."""
        return list(self._eval)

    def validation_problems(self) -> list[Problem]:
        """Return the validation split: its own seed stream, no prompt of the eval split."""
        return list(self._validation)

    def train_problems(self, n: int, seed: int) -> list[Problem]:
        """Return ``n`` distinct problems outside the validation and eval splits.

        Draws are sequential from one seeded stream, so a smaller ``n`` yields a prefix of a
        larger one for the same seed.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative integer, got {n!r}")
        available = self.space_size - len(self._held_prompts)
        if n > available:
            raise ConfigError(
                _FIELD,
                f"asked for {n} training problems but only {available} exist outside the "
                "validation and eval splits; raise digits or terms, or add operators",
            )
        rng = random.Random(f"arithmetic-{self.seed}-train-{seed}")
        return self._draw(rng, n, self._held_prompts)

    def reward(self, problem: Problem, response: str) -> float:
        """Return 1.0 if the final number in ``response`` equals the answer, else 0.0.

        The answer is the text after the last ``=``. In the ``final`` style the target never
        contains ``=``, so a response that does is malformed and scores 0.
        """
        text = response.strip()
        if self.style == "final" and "=" in text:
            return 0.0
        candidate = text.rsplit("=", 1)[-1].strip()
        if not _INTEGER.fullmatch(candidate):
            return 0.0
        return 1.0 if int(candidate) == int(problem.answer) else 0.0

    def _sample(self, rng: random.Random) -> Problem:
        """Draw one problem: operands uniform over the digit range, operators uniform."""
        low, high = operand_range(self.digits)
        operands = [rng.randint(low, high) for _ in range(self.terms)]
        ops = [rng.choice(self.operators) for _ in range(self.terms - 1)]
        return make_problem(operands, ops, self.style)

    def _draw(self, rng: random.Random, count: int, exclude: frozenset[str]) -> list[Problem]:
        """Rejection-sample ``count`` problems with distinct prompts not in ``exclude``."""
        seen: set[str] = set()
        problems: list[Problem] = []
        while len(problems) < count:
            problem = self._sample(rng)
            if problem.prompt in seen or problem.prompt in exclude:
                continue
            seen.add(problem.prompt)
            problems.append(problem)
        return problems
