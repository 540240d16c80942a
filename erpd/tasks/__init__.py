"""Problem sources for post-training: the task contract, built-in tasks and a config factory."""

from __future__ import annotations

from typing import Any

from erpd.errors import ConfigError
from erpd.tasks.arithmetic import ALPHABET, DEFAULT_VALIDATION_SIZE, ArithmeticTask
from erpd.tasks.base import Problem, Task
from erpd.tasks.jsonl import JsonlTask
from erpd.tasks.scoring import DEFAULT_ANSWER_TIMEOUT_S, Scores, score_many

__all__ = [
    "ALPHABET",
    "ArithmeticTask",
    "JsonlTask",
    "Problem",
    "Scores",
    "Task",
    "build_task",
    "score_many",
]

_KINDS = ("arithmetic", "jsonl")


def _section(spec: Any, kind: str) -> Any:
    """Return ``spec.<kind>``, failing with a config error if the section is missing."""
    section = getattr(spec, kind, None)
    if section is None:
        raise ConfigError(f"task.{kind}", f"kind {kind!r} needs a '{kind}' section")
    return section


def build_task(spec: Any) -> Task:
    """Build the task a config describes.

    ``spec`` is duck-typed (anything with ``kind`` and the matching section) so this package does
    not depend on the config module and tests can pass simple namespaces.
    """
    kind = getattr(spec, "kind", None)
    if kind == "arithmetic":
        cfg = _section(spec, kind)
        return ArithmeticTask(
            digits=cfg.digits,
            terms=cfg.terms,
            operators=cfg.operators,
            style=cfg.style,
            eval_size=cfg.eval_size,
            seed=cfg.seed,
            validation_size=getattr(cfg, "validation_size", DEFAULT_VALIDATION_SIZE),
        )
    if kind == "jsonl":
        cfg = _section(spec, kind)
        return JsonlTask(
            train_path=cfg.train_path,
            eval_path=cfg.eval_path,
            eval_size=cfg.eval_size,
            seed=cfg.seed,
            answer_timeout_s=getattr(cfg, "answer_timeout_s", DEFAULT_ANSWER_TIMEOUT_S),
            validation_size=getattr(cfg, "validation_size", None),
        )
    raise ConfigError("task.kind", f"must be one of {_KINDS}, got {kind!r}")
