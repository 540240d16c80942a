"""Problems from user JSONL files, scored by the final-answer rule of `erpd.tasks.answers`.

Each non-blank line is a JSON object ``{"prompt": str, "answer": str | number}``. Files are read
and validated eagerly so a bad row fails the run at start-up with its line number, not hours in.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from erpd.errors import ConfigError, DataError
from erpd.tasks.answers import quick_verdict
from erpd.tasks.base import Problem
from erpd.tasks.scoring import DEFAULT_ANSWER_TIMEOUT_S, Scores, shared_checker

DEFAULT_MAX_NEW_TOKENS = 512
"""Generation budget for free-form answers; user configs override it where they set one."""
AUTO_VALIDATION_SHARE = 10
"""With no validation_size given, one row in this many of those left after the eval split is
held out for validation..."""
AUTO_VALIDATION_MAX = 200
"""...and at most this many (the stop check of base pretraining reads 200 by default)."""

_log = logging.getLogger(__name__)


_JSON_TYPES = {
    dict: "object",
    list: "array",
    str: "string",
    int: "number",
    float: "number",
    bool: "boolean",
    type(None): "null",
}


def _json_type(value: Any) -> str:
    """Name a decoded value's type the way the JSON file spells it (``array``, not ``list``)."""
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _row_error(path: Path, line_number: int, message: str) -> DataError:
    """Build the one-line error the CLI prints for a bad row."""
    return DataError(f"{path} line {line_number}: {message}")


def _answer_text(path: Path, line_number: int, value: Any) -> str:
    """Accept a string answer, or a finite number converted with ``str``."""
    if isinstance(value, str):
        text = value.strip()
    elif isinstance(value, int | float) and not isinstance(value, bool):
        if isinstance(value, float) and not math.isfinite(value):
            raise _row_error(path, line_number, f'"answer" must be finite, got {value}')
        text = str(value)
    else:
        kind = _json_type(value)
        raise _row_error(path, line_number, f'"answer" must be a string or number, got {kind}')
    if not text:
        raise _row_error(path, line_number, 'empty "answer"')
    return text


def _parse_row(path: Path, line_number: int, line: str) -> Problem:
    """Turn one JSONL line into a Problem, or raise a DataError that names the line."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise _row_error(path, line_number, f"not valid JSON ({exc.msg})") from None
    except (ValueError, RecursionError) as exc:  # a 5,000-digit number, nesting 100k deep
        raise _row_error(path, line_number, f"not usable JSON ({type(exc).__name__})") from None
    if not isinstance(row, dict):
        kind = _json_type(row)
        raise _row_error(path, line_number, f"expected a JSON object, got {kind}")
    for key in ("prompt", "answer"):
        if key not in row:
            raise _row_error(path, line_number, f'missing "{key}"')
    prompt = row["prompt"]
    if not isinstance(prompt, str):
        kind = _json_type(prompt)
        raise _row_error(path, line_number, f'"prompt" must be a string, got {kind}')
    if not prompt.strip():
        raise _row_error(path, line_number, 'empty "prompt"')
    answer = _answer_text(path, line_number, row["answer"])
    return Problem(prompt=prompt, answer=answer, target=answer, source=f"{path} line {line_number}")


def _read_text(path: Path) -> str:
    """Read a UTF-8 file, turning OS and decoding failures into DataError."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None


def iter_problems(path: Path) -> Iterator[Problem]:
    """Each row of a JSONL file as it is parsed, skipping blank lines; an empty file is an error.

    For a caller that only checks a file: rows it does not keep are freed at once, so a large
    file never fills the heap with objects that make the garbage collector stop the process.
    """
    empty = True
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if line.strip():
            empty = False
            yield _parse_row(path, number, line)
    if empty:
        raise DataError(f"{path}: no rows (the file is empty)")


def load_problems(path: Path) -> list[Problem]:
    """Load every row of a JSONL file, skipping blank lines; an empty file is an error."""
    return list(iter_problems(path))


def _dedupe_by_prompt(problems: list[Problem]) -> list[Problem]:
    """Keep the first row of each prompt, so a repeated prompt cannot sit in both splits."""
    seen: set[str] = set()
    unique: list[Problem] = []
    for problem in problems:
        if problem.prompt not in seen:
            seen.add(problem.prompt)
            unique.append(problem)
    return unique


def _hold_out(
    problems: list[Problem], eval_size: int, seed: int, path: Path
) -> tuple[list[Problem], list[Problem]]:
    """Split off a seeded random eval set; both splits keep file order for easy inspection."""
    if len(problems) < eval_size + 1:
        raise DataError(
            f"{path}: {len(problems)} distinct prompts, but holding out eval_size={eval_size} "
            "needs at least one more for training; lower eval_size or pass an eval file"
        )
    return _seeded_split(problems, eval_size, f"jsonl-{seed}-split")


def _seeded_split(
    problems: list[Problem], size: int, salt: str
) -> tuple[list[Problem], list[Problem]]:
    """(kept, held): `size` rows drawn by a generator seeded with `salt`; both keep file order."""
    held = set(random.Random(salt).sample(range(len(problems)), size))
    kept = [problem for index, problem in enumerate(problems) if index not in held]
    return kept, [problem for index, problem in enumerate(problems) if index in held]


def _hold_out_validation(
    train: list[Problem], size: int | None, seed: int, path: Path
) -> tuple[list[Problem], list[Problem]]:
    """Split a seeded random validation set off the rows left after the eval split; both parts
    keep file order. `size` None holds out a tenth of them, at most 200."""
    if size is None:
        size = min(AUTO_VALIDATION_MAX, len(train) // AUTO_VALIDATION_SHARE)
    if len(train) < size + 1:
        raise DataError(
            f"{path}: {len(train)} distinct prompts left after the eval split, but holding out "
            f"validation_size={size} needs at least one more for training; lower "
            "task.jsonl.validation_size (0 when no tiny base is pretrained on this file)"
        )
    return _seeded_split(train, size, f"jsonl-{seed}-validation")


def _quick(problem: Problem, response: str) -> tuple[float | None, str | None]:
    """`quick_verdict`, with any surprise counted as a wrong answer rather than a crash."""
    try:
        return quick_verdict(problem.answer, problem.prompt, response)
    except Exception:  # string work on model output: never let it stop training
        _log.debug("answer extraction failed on %r", response, exc_info=True)
        return 0.0, None


def score_answers(
    problems: Sequence[Problem],
    responses: Sequence[str],
    timeout_s: float = DEFAULT_ANSWER_TIMEOUT_S,
) -> Scores:
    """Score responses by the final-answer rule: numbers in this process, symbolic answers in the
    checker process with ``timeout_s`` each (`erpd.tasks.scoring`); never raises for a response."""
    rewards = [0.0] * len(problems)
    pending: list[int] = []
    items: list[tuple[str, str]] = []
    for index, (problem, response) in enumerate(zip(problems, responses, strict=True)):
        verdict, candidate = _quick(problem, response)
        if verdict is not None:
            rewards[index] = verdict
        elif candidate is not None:
            pending.append(index)
            items.append((problem.answer, candidate))
    if not items:
        return Scores(rewards)
    checked = shared_checker().check(items, timeout_s)
    for index, reward in zip(pending, checked.rewards, strict=True):
        rewards[index] = reward
    return Scores(rewards, checked.timeouts)


class JsonlTask:
    """Prompts and answers from JSONL files; eval is a separate file or a seeded hold-out, and
    validation a seeded hold-out of the train file's rows left after the eval split."""

    def __init__(
        self,
        train_path: str | Path,
        eval_path: str | Path | None = None,
        eval_size: int = 200,
        seed: int = 0,
        answer_timeout_s: float = DEFAULT_ANSWER_TIMEOUT_S,
        validation_size: int | None = None,
    ) -> None:
        if isinstance(eval_size, bool) or not isinstance(eval_size, int) or eval_size < 1:
            raise ConfigError(
                "task.jsonl.eval_size", f"must be a positive integer, got {eval_size!r}"
            )
        if validation_size is not None and (
            isinstance(validation_size, bool)
            or not isinstance(validation_size, int)
            or validation_size < 0
        ):
            raise ConfigError(
                "task.jsonl.validation_size",
                f"must be a non-negative integer or None, got {validation_size!r}",
            )
        timeout_ok = isinstance(answer_timeout_s, int | float) and answer_timeout_s > 0
        if isinstance(answer_timeout_s, bool) or not timeout_ok:
            raise ConfigError(
                "task.jsonl.answer_timeout_s",
                f"must be a positive number, got {answer_timeout_s!r}",
            )
        self.answer_timeout_s = float(answer_timeout_s)
        self.dropped_for_eval = 0
        """Training rows left out because their prompt is in the eval file."""
        train_file = Path(train_path)
        self.name = f"jsonl:{train_file.stem}"
        self.max_new_tokens = DEFAULT_MAX_NEW_TOKENS
        self.seed = seed
        self.train_path = train_file
        self.eval_path = Path(eval_path) if eval_path is not None else None
        rows = _dedupe_by_prompt(load_problems(train_file))
        if self.eval_path is None:
            train, self._eval = _hold_out(rows, eval_size, seed, train_file)
        else:
            self._eval = _dedupe_by_prompt(load_problems(self.eval_path))
            train = self._without_eval_prompts(rows, train_file)
        self._train, self._validation = _hold_out_validation(
            train, validation_size, seed, train_file
        )

    def __repr__(self) -> str:
        return (
            f"JsonlTask(train_path={str(self.train_path)!r}, "
            f"eval_path={str(self.eval_path) if self.eval_path else None!r}, seed={self.seed}, "
            f"train_rows={len(self._train)}, validation_rows={len(self._validation)}, "
            f"eval_rows={len(self._eval)})"
        )

    @property
    def train_size(self) -> int:
        """Number of distinct training prompts available to ``train_problems``."""
        return len(self._train)

    def eval_problems(self) -> list[Problem]:
        """Return the held-out rows (deduplicated by prompt, in file order)."""
        return list(self._eval)

    def validation_problems(self) -> list[Problem]:
        """Return the validation rows (in file order); refused when there are none, since a
        decision taken on no problems would be no decision."""
        if not self._validation:
            raise ConfigError(
                "task.jsonl.validation_size",
                f"{self.train_path} has no validation rows (validation_size=0, or too few rows "
                "for the automatic share): a stopping or calibration decision needs some; set it",
            )
        return list(self._validation)

    def all_problems(self) -> list[Problem]:
        """Every distinct row, training, validation then eval (what the load-time checks read)."""
        return [*self._train, *self._validation, *self._eval]

    def train_problems(self, n: int, seed: int) -> list[Problem]:
        """Sample ``n`` distinct training rows without replacement, seeded by (task seed, seed)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative integer, got {n!r}")
        if n > len(self._train):
            raise DataError(
                f"{self.train_path}: asked for {n} training problems but only "
                f"{len(self._train)} distinct prompts are available outside the validation and "
                "eval splits"
            )
        return random.Random(f"jsonl-{self.seed}-train-{seed}").sample(self._train, n)

    def reward(self, problem: Problem, response: str) -> float:
        """1.0 if the response's final answer matches the reference (`erpd.tasks.answers`)."""
        return self.score_batch([problem], [response]).rewards[0]

    def score_batch(self, problems: Sequence[Problem], responses: Sequence[str]) -> Scores:
        """`score_answers` with this task's ``answer_timeout_s``."""
        return score_answers(problems, responses, self.answer_timeout_s)

    def _without_eval_prompts(self, rows: list[Problem], train_file: Path) -> list[Problem]:
        """Drop training rows whose prompt is in the eval file, so eval stays held out."""
        eval_prompts = {problem.prompt for problem in self._eval}
        train = [problem for problem in rows if problem.prompt not in eval_prompts]
        if not train:
            raise DataError(f"{train_file}: every prompt also appears in {self.eval_path}")
        self.dropped_for_eval = len(rows) - len(train)
        if self.dropped_for_eval:
            _log.warning(
                "%s: dropped %d training rows whose prompt is in the eval file %s",
                train_file,
                self.dropped_for_eval,
                self.eval_path,
            )
        return train
