"""Load-time checks of a task's rows against the model: too long for its positions, characters
its tokenizer does not know, an answer longer than the response budget. Each is refused before
training with the file and line, or the config field, to fix."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from erpd.errors import ConfigError, DataError
from erpd.models import build_char_tokenizer
from erpd.tasks import ALPHABET, ArithmeticTask, JsonlTask, Problem
from erpd.tasks.checks import check_problems, check_task, max_positions_of

TINY_POSITIONS = 128  # the tiny model's default max_positions


@pytest.fixture(scope="module")
def tiny() -> PreTrainedTokenizerFast:
    return build_char_tokenizer(ALPHABET)


def _sums(path: Path, extra: list[dict[str, object]] | None = None) -> JsonlTask:
    rows: list[dict[str, object]] = [
        {"prompt": f"{a}+17=", "answer": a + 17} for a in range(10, 30)
    ]
    rows += extra or []
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return JsonlTask(path, eval_path=None, eval_size=2)


def test_rows_that_fit_pass(tiny: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    check_task(_sums(tmp_path / "ok.jsonl"), tiny, max_positions=TINY_POSITIONS, max_new_tokens=5)


def test_a_megabyte_prompt_is_refused_at_load_with_its_line(
    tiny: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    path = tmp_path / "big.jsonl"
    task = _sums(path, [{"prompt": "1+" * 500_000 + "1=", "answer": 500_001}])
    started = time.monotonic()
    with pytest.raises(DataError) as info:
        check_task(task, tiny, max_positions=TINY_POSITIONS, max_new_tokens=8)
    assert str(info.value) == (
        f'{path} line 21: "prompt" is 1000002 tokens; with the response budget of 8 '
        "(task.max_new_tokens) that is 1000010, more than the model's 128 positions"
    )
    assert time.monotonic() - started < 10.0


def test_a_prompt_that_leaves_too_little_room_for_the_budget_is_refused(
    tiny: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    path = tmp_path / "long.jsonl"
    task = _sums(path, [{"prompt": "1" * 120 + "=", "answer": 1}])
    check_task(task, tiny, max_positions=TINY_POSITIONS, max_new_tokens=7)  # 121 + 7 fits
    with pytest.raises(DataError, match=r"line 21: \"prompt\" is 121 tokens; .* that is 129"):
        check_task(task, tiny, max_positions=TINY_POSITIONS, max_new_tokens=8)


def test_the_jsonl_default_budget_does_not_fit_the_tiny_model_and_names_the_field(
    tiny: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    task = _sums(tmp_path / "ok.jsonl")
    assert task.max_new_tokens == 512
    with pytest.raises(ConfigError) as info:
        check_task(task, tiny, max_positions=TINY_POSITIONS, max_new_tokens=task.max_new_tokens)
    assert info.value.field == "task.max_new_tokens"
    assert str(info.value) == (
        "task.max_new_tokens: the response budget of 512 tokens leaves no room for a prompt in "
        "the model's 128 positions; set it to at most 122 (the longest prompt takes the rest)"
    )


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (
            {"prompt": "What is 2+2?", "answer": 4},
            "\"prompt\" has characters the tokenizer does not know: 'W', 'h', 'a', 't', ' ' "
            "and 3 more (it knows '*+-0123456789=')",
        ),
        (
            {"prompt": "2+2=", "answer": "four"},
            "\"answer\" has characters the tokenizer does not know: 'f', 'o', 'u', 'r' "
            "(it knows '*+-0123456789=')",
        ),
        ({"prompt": "7/2=", "answer": "3.5"}, "'/'"),
    ],
)
def test_characters_outside_the_vocabulary_are_refused_with_the_line(
    tiny: PreTrainedTokenizerFast, tmp_path: Path, row: dict[str, object], message: str
) -> None:
    path = tmp_path / "text.jsonl"
    task = _sums(path, [row])
    with pytest.raises(DataError) as info:
        check_task(task, tiny, max_positions=TINY_POSITIONS, max_new_tokens=5)
    assert str(info.value).startswith(f"{path} line 21: ")
    assert message in str(info.value)


def test_an_answer_longer_than_the_budget_is_refused(
    tiny: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    path = tmp_path / "answers.jsonl"
    task = _sums(path, [{"prompt": "99999*99999=", "answer": 9999800001}])
    with pytest.raises(DataError) as info:
        check_task(task, tiny, max_positions=TINY_POSITIONS, max_new_tokens=5)
    assert str(info.value) == (
        f'{path} line 21: "answer" takes 11 tokens with the end token, more than the response '
        "budget of 5 (task.max_new_tokens)"
    )


def test_the_chat_template_counts_towards_the_prompt(tiny: PreTrainedTokenizerFast) -> None:
    wrapped = build_char_tokenizer(ALPHABET)
    wrapped.chat_template = "{% for m in messages %}0000{{ m['content'] }}{% endfor %}"
    rows = [Problem("1" * 110 + "=", "1", "1", source="chat.jsonl line 1")]
    check_problems(rows, wrapped, max_positions=TINY_POSITIONS, max_new_tokens=16)
    with pytest.raises(DataError, match=r"chat\.jsonl line 1: \"prompt\" is 115 tokens"):
        check_problems(
            rows, wrapped, max_positions=TINY_POSITIONS, max_new_tokens=16, chat_template=True
        )


def _byte_level_bpe() -> PreTrainedTokenizerFast:
    """A GPT-2-style tokenizer: byte-level BPE whose "unknown" token is its end token."""
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
    )
    raw.train_from_iterator(["what is two plus two", "12+34=46"], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=raw, eos_token="<|endoftext|>", unk_token="<|endoftext|>"
    )


def _word_piece() -> PreTrainedTokenizerFast:
    """A BERT-style tokenizer with a real unknown token."""
    vocab = {"[UNK]": 0, "[SEP]": 1, "two": 2, "plus": 3, "is": 4, "what": 5}
    raw = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", eos_token="[SEP]")


def test_byte_level_tokenizers_spell_every_character() -> None:
    rows = [Problem("Qu'est-ce que 2+2 ? 💡 ∑", "quatre ✓", "quatre ✓", source="fr.jsonl line 1")]
    check_problems(rows, _byte_level_bpe(), max_positions=1024, max_new_tokens=64)


def test_tokenizers_with_an_unknown_token_are_checked_too() -> None:
    rows = [
        Problem("what is two plus two", "two", "two", source="w.jsonl line 1"),
        Problem("what is two plus zwei", "two", "two", source="w.jsonl line 2"),
    ]
    with pytest.raises(DataError) as info:
        check_problems(rows, _word_piece(), max_positions=None, max_new_tokens=4)
    assert (
        str(info.value) == "w.jsonl line 2: \"prompt\" has text the tokenizer does not know: 'zwei'"
    )


def test_generated_problems_are_named_by_their_prompt(tiny: PreTrainedTokenizerFast) -> None:
    task = ArithmeticTask(digits=2, terms=2, eval_size=20)
    check_task(task, tiny, max_positions=TINY_POSITIONS, max_new_tokens=task.max_new_tokens)
    first = task.eval_problems()[0].prompt
    with pytest.raises(DataError, match=rf"^the problem '{re.escape(first)}': \"prompt\" is 6 "):
        check_task(task, tiny, max_positions=10, max_new_tokens=task.max_new_tokens + 2)


def test_max_positions_come_from_the_model_config() -> None:
    assert max_positions_of(SimpleNamespace(max_position_embeddings=128)) == 128
    assert max_positions_of(SimpleNamespace(n_positions=1024)) == 1024
    assert max_positions_of(SimpleNamespace(hidden_size=64)) is None
