"""Checks of a task's rows against the model, at load time, so bad data fails before training.

A 1 MB prompt, or a response budget larger than the model's positions, used to be accepted at load
and fail after training at the first eval (an attempt to allocate a terabyte); a character the
model's tokenizer does not know used to become the unknown token, silently. `check_task` refuses
both with the file and line of the first bad row, or the config field to change.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

from erpd.errors import ConfigError, DataError
from erpd.rollout import encode_prompts
from erpd.tasks.base import Problem, Task

BUDGET_FIELD = "task.max_new_tokens"
_POSITION_ATTRIBUTES = ("max_position_embeddings", "n_positions", "max_sequence_length", "n_ctx")
_SHOWN_CHARACTERS = 5
_SMALL_VOCABULARY = 128


def max_positions_of(config: Any) -> int | None:
    """The longest sequence (prompt + response) a model config allows, if it says."""
    for name in _POSITION_ATTRIBUTES:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def task_problems(task: Task) -> list[Problem]:
    """The rows worth checking: every row of a file-backed task, else the eval split (generated
    tasks draw training problems from the same distribution)."""
    every = getattr(task, "all_problems", None)
    return list(every()) if callable(every) else task.eval_problems()


def check_task(
    task: Task,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_positions: int | None,
    max_new_tokens: int,
    chat_template: bool = False,
    budget_field: str = BUDGET_FIELD,
) -> None:
    """`check_problems` on the task's rows (`task_problems`)."""
    check_problems(
        task_problems(task),
        tokenizer,
        max_positions=max_positions,
        max_new_tokens=max_new_tokens,
        chat_template=chat_template,
        budget_field=budget_field,
    )


def check_problems(
    problems: Iterable[Problem],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_positions: int | None,
    max_new_tokens: int,
    chat_template: bool = False,
    budget_field: str = BUDGET_FIELD,
) -> None:
    """Refuse rows the model cannot take; the first bad row, in order, is the one reported.

    Raises `ConfigError` (on ``budget_field``) if the response budget alone does not fit
    ``max_positions``, and `DataError` naming the row (``Problem.source``, e.g. ``train.jsonl
    line 3``) if its prompt, encoded as the trainer encodes it, plus the budget does not fit; if
    its prompt or answer holds characters the tokenizer turns into its unknown token; or if its
    answer plus the end token is longer than the budget. ``max_positions=None`` (a model that
    states no limit) skips the length checks.
    """
    rows = list(problems)
    prompts = _encode(tokenizer, [p.prompt for p in rows], chat_template, rows, "prompt")
    texts = (
        _encode(tokenizer, [p.prompt for p in rows], None, rows, "prompt")
        if chat_template
        else prompts
    )
    targets = _encode(tokenizer, [p.target for p in rows], None, rows, "answer")
    if max_positions is not None and max_new_tokens >= max_positions:
        room = max_positions - max((len(ids) for ids in prompts), default=1)
        hint = f"to at most {room} (the longest prompt takes the rest)" if room > 0 else "lower"
        raise ConfigError(
            budget_field,
            f"the response budget of {max_new_tokens} tokens leaves no room for a prompt in the "
            f"model's {max_positions} positions; set it {hint}",
        )
    unknown = _UnknownCharacters(tokenizer)
    for row, prompt_ids, text_ids, target_ids in zip(rows, prompts, texts, targets, strict=True):
        unknown.check(row, "prompt", row.prompt, text_ids)
        unknown.check(row, "answer", row.target, target_ids)
        if max_positions is not None and len(prompt_ids) + max_new_tokens > max_positions:
            raise _row_error(
                row,
                f'"prompt" is {len(prompt_ids)} tokens; with the response budget of '
                f"{max_new_tokens} ({budget_field}) that is {len(prompt_ids) + max_new_tokens}, "
                f"more than the model's {max_positions} positions",
            )
        if len(target_ids) + 1 > max_new_tokens:
            raise _row_error(
                row,
                f'"answer" takes {len(target_ids) + 1} tokens with the end token, more than the '
                f"response budget of {max_new_tokens} ({budget_field})",
            )


def _where(row: Problem) -> str:
    if row.source is not None:
        return row.source
    shown = row.prompt if len(row.prompt) <= 40 else row.prompt[:40] + "..."
    return f"the problem {shown!r}"


def _row_error(row: Problem, message: str) -> DataError:
    return DataError(f"{_where(row)}: {message}")


def _encode(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    chat_template: bool | None,
    rows: Sequence[Problem],
    field: str,
) -> list[list[int]]:
    """Token ids as the trainer makes them (prompts through `encode_prompts`, answers plain)."""
    try:
        if chat_template is None:
            return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        return encode_prompts(tokenizer, texts, chat_template)
    except Exception as exc:  # a tokenizer without an unknown token raises on what it lacks
        for row, text in zip(rows, texts, strict=True):
            try:
                tokenizer(text, add_special_tokens=False)
            except Exception:
                raise _row_error(row, f'"{field}" cannot be tokenized ({exc})') from None
        raise


class _UnknownCharacters:
    """Finds the pieces of a text a tokenizer maps to its unknown token."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        unk = tokenizer.unk_token_id
        # GPT-2-style tokenizers name their end token as "unknown" too, yet never produce it for
        # text: byte-level BPE spells every character
        spelled = isinstance(unk, int) and unk not in (
            tokenizer.eos_token_id,
            tokenizer.bos_token_id,
        )
        self.unk = unk if spelled else None

    def check(self, row: Problem, field: str, text: str, ids: Sequence[int]) -> None:
        if self.unk is None or self.unk not in ids:
            return
        bad = self._unknown_pieces(text)
        if not bad:
            raise _row_error(row, f'"{field}" has text the tokenizer turns into its unknown token')
        shown = ", ".join(repr(piece) for piece in bad[:_SHOWN_CHARACTERS])
        if len(bad) > _SHOWN_CHARACTERS:
            shown += f" and {len(bad) - _SHOWN_CHARACTERS} more"
        what = "characters" if all(len(piece) == 1 for piece in bad) else "text"
        raise _row_error(
            row, f'"{field}" has {what} the tokenizer does not know: {shown}{self._alphabet()}'
        )

    def _unknown_pieces(self, text: str) -> list[str]:
        """The distinct spans that became the unknown token, in order of appearance."""
        if self.tokenizer.is_fast:
            encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            spans = zip(encoded["input_ids"], encoded["offset_mapping"], strict=True)
            pieces = [text[start:end] for token, (start, end) in spans if token == self.unk]
        else:  # no offsets: look characters up one by one
            pieces = [char for char in text if self.unk in self._ids(char)]
        return list(dict.fromkeys(piece for piece in pieces if piece))

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _alphabet(self) -> str:
        """For a character vocabulary (the tiny model's), the characters it does know."""
        special = set(self.tokenizer.all_special_tokens)
        tokens = [token for token in self.tokenizer.get_vocab() if token not in special]
        if not tokens or len(tokens) > _SMALL_VOCABULARY or any(len(t) != 1 for t in tokens):
            return ""
        return f" (it knows {''.join(sorted(tokens))!r})"
