"""What the default JSONL reward accepts as a final answer, and how it compares it to the reference.

A policy trained on a verifier learns whatever the verifier pays for. math-verify on a whole
response pays for an echo of the prompt (``"81+58-2"`` is worth as much as ``"137"``), so the reward
first extracts one *final answer* in the expected form and only compares that:

1. The content of the LAST ``\\boxed{...}`` (or ``\\fbox{...}``) in the response, if there is one.
2. Otherwise, the response's last non-empty line, or the part of it after its last ``answer is``,
   ``answer:`` (any case) or ``####``; ``$...$``, ``\\(...\\)``, ``**`` and a trailing period are
   stripped.

When the reference is a number (an integer, a decimal, or a fraction ``a/b`` / ``\\frac{a}{b}``, an
optional sign, ``,`` between groups of three digits, an optional trailing ``%``), the final answer
must itself be such a literal, with a fraction in lowest terms (its denominator above 1), and equal
in value: ``137``, ``137.0``, ``\\boxed{137}`` and ``The answer is 137.`` score 1; ``81+58-2``,
``100+37``, ``137=137``, ``\\boxed{274/2}`` score 0. These checks are plain string work, bounded
and run in the calling process.

Any other reference (``x^2+1``, ``\\sqrt{2}``, an interval) needs a boxed answer, compared by
math-verify for mathematical equivalence; a boxed expression copied from the prompt scores 0
unless it is spelled exactly like the reference. math-verify can run for ever on some inputs, so
callers run `symbolic_reward` in a killable process (`erpd.tasks.scoring`).
"""

from __future__ import annotations

import logging
import math
import re
from fractions import Fraction

_log = logging.getLogger(__name__)


class _DropTimeoutDisabledWarning(logging.Filter):
    """Hide math-verify's "timeout is disabled" warning: its SIGALRM timeouts stop neither work
    inside C nor work off the main thread, so the killable checker process bounds it instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropTimeoutDisabledWarning())

_BOX_OPENERS = ("\\boxed", "\\fbox")
_ANSWER_PHRASE = re.compile(r"answer\s*(?:is\s*:?|:)|####", re.IGNORECASE)
_GROUPED = r"\d{1,3}(?:(?:,|\{,\}|\\,)\d{3})+"
_DECIMAL = re.compile(rf"(?P<int>{_GROUPED}|\d+)?(?:\.(?P<frac>\d+))?")
_SLASH = re.compile(r"(?P<num>\d+)\s*/\s*(?P<den>\d+)")
_LATEX_FRAC = re.compile(r"\\[dt]?frac\s*\{\s*(?P<num>\d+)\s*\}\s*\{\s*(?P<den>\d+)\s*\}")
_SIGNS = {"-": -1, "+": 1, "\u2212": -1}
_LONGEST_NUMBER = 200
"""Characters; a longer "number" is not an answer anyone means (and int() refuses 4,300 digits)."""


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` with balanced braces, else None.

    One backward search for the opener and one forward brace scan: linear in the text.
    """
    start = max(text.rfind(opener) for opener in _BOX_OPENERS)
    while start >= 0:
        opener = next(o for o in _BOX_OPENERS if text.startswith(o, start))
        brace = start + len(opener)
        while brace < len(text) and text[brace].isspace():
            brace += 1
        content = _balanced(text, brace)
        if content is not None:
            return content.strip()
        start = max(text.rfind(o, 0, start) for o in _BOX_OPENERS)
    return None


def _balanced(text: str, brace: int) -> str | None:
    """The text inside the ``{...}`` that opens at ``brace``, or None if it never closes."""
    if brace >= len(text) or text[brace] != "{":
        return None
    depth = 0
    for index in range(brace, len(text)):
        char = text[index]
        if char == "{" and text[index - 1] != "\\":
            depth += 1
        elif char == "}" and text[index - 1] != "\\":
            depth -= 1
            if depth == 0:
                return text[brace + 1 : index]
    return None


def _undecorate(text: str) -> str:
    """Strip what surrounds a final answer in prose: spaces, a period, ``$``, ``\\(\\)``, ``**``."""
    text = text.strip()
    previous = None
    while text != previous:
        previous = text
        text = text.removesuffix(".").strip()
        for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"), ("**", "**")):
            if text.startswith(left) and text.endswith(right) and len(text) >= len(left + right):
                text = text[len(left) : len(text) - len(right)].strip()
    return text


def final_answer(response: str) -> tuple[str, bool] | None:
    """The response's final answer and whether it was boxed, by the rule in the module docstring."""
    boxed = last_boxed(response)
    if boxed is not None:
        return boxed, True
    lines = [line for line in response.splitlines() if line.strip()]
    if not lines:
        return None
    last = lines[-1]
    phrases = list(_ANSWER_PHRASE.finditer(last))
    if phrases:
        last = last[phrases[-1].end() :]
    return _undecorate(last), False


def number_value(text: str, *, canonical: bool) -> Fraction | None:
    """The value of a number literal (see the module docstring), or None if ``text`` is not one.

    ``canonical`` asks for a fraction in lowest terms with a denominator above 1, as an answer
    must be: ``274/2`` spells 137 as an expression, which is how an echo of ``274/2=`` looks.
    """
    body = text.strip()
    if not body or len(body) > _LONGEST_NUMBER:
        return None
    sign = 1
    if body[0] in _SIGNS:
        sign, body = _SIGNS[body[0]], body[1:].strip()
    body = body.removeprefix("\\$").removesuffix("\\%").removesuffix("%").strip()
    for pattern in (_SLASH, _LATEX_FRAC):
        match = pattern.fullmatch(body)
        if match:
            num, den = int(match["num"]), int(match["den"])
            if den == 0 or (canonical and (den == 1 or math.gcd(num, den) != 1)):
                return None
            return sign * Fraction(num, den)
    match = _DECIMAL.fullmatch(body)
    if match is None or (match["int"] is None and match["frac"] is None):
        return None
    digits = re.sub(r"\D", "", match["int"] or "0")
    return sign * Fraction(f"{digits}.{match['frac'] or '0'}")


def reference_value(answer: str) -> Fraction | None:
    """The reference answer's value if it is a number (``$...$`` or one ``\\boxed{}`` allowed)."""
    text = _undecorate(answer)
    boxed = last_boxed(text)
    if boxed is not None and text.startswith(_BOX_OPENERS) and text.endswith("}"):
        text = boxed
    return number_value(text, canonical=False)


def _squeezed(text: str) -> str:
    return re.sub(r"\s+", "", text)


def copies_prompt(candidate: str, answer: str, prompt: str) -> bool:
    """True if a symbolic candidate is a piece of the prompt and not spelled like the reference."""
    squeezed = _squeezed(candidate)
    return bool(squeezed) and squeezed != _squeezed(answer) and squeezed in _squeezed(prompt)


def quick_verdict(answer: str, prompt: str, response: str) -> tuple[float | None, str | None]:
    """Score without math-verify where the rule allows: ``(reward, None)``.

    Returns ``(None, candidate)`` when the reference is symbolic and the boxed ``candidate`` must be
    compared by math-verify (`symbolic_reward`), in a process that can be killed.
    """
    found = final_answer(response)
    if found is None:
        return 0.0, None
    candidate, boxed = found
    gold = reference_value(answer)
    if gold is not None:
        value = number_value(candidate, canonical=True)
        if value is None and _squeezed(candidate) == _squeezed(answer):
            value = gold  # the reference's own spelling, e.g. a dataset that writes 2/4
        return (1.0 if value == gold else 0.0), None
    if not boxed or not candidate or copies_prompt(candidate, answer, prompt):
        return 0.0, None
    return None, candidate


_GOLD_CACHE: dict[str, tuple[object, ...]] = {}
_GOLD_CACHE_SIZE = 4096


def _parse_gold(answer: str) -> tuple[object, ...]:
    """Parse a reference answer once per process; bare answers are read as LaTeX ``$...$``."""
    from math_verify import parse

    cached = _GOLD_CACHE.get(answer)
    if cached is not None:
        return cached
    wrapped = answer if "$" in answer or "\\boxed" in answer else f"${answer}$"
    parsed = parse(wrapped, parsing_timeout=None)
    if not parsed and wrapped != answer:
        parsed = parse(answer, parsing_timeout=None)
    if len(_GOLD_CACHE) >= _GOLD_CACHE_SIZE:
        _GOLD_CACHE.clear()
    _GOLD_CACHE[answer] = tuple(parsed)
    return _GOLD_CACHE[answer]


def symbolic_reward(answer: str, candidate: str) -> float:
    """1.0 if math-verify finds the boxed ``candidate`` equivalent to ``answer``, else 0.0.

    Unbounded in time (math-verify's own SIGALRM timeouts work on the main thread only, and miss
    work inside C): run it where the process can be killed. Any failure inside math-verify counts
    as a wrong answer, so a garbage completion never crashes training.
    """
    from math_verify import parse, verify

    try:
        gold = _parse_gold(answer)
        if not gold:
            return 0.0
        predicted = parse(f"\\boxed{{{candidate}}}", parsing_timeout=None)
        if not predicted:
            return 0.0
        return 1.0 if verify(list(gold), predicted, timeout_seconds=None) else 0.0
    except Exception:
        _log.debug("math-verify failed on %r", candidate, exc_info=True)
        return 0.0
