"""Scoring many answers at once, with a time limit per answer that a stuck check cannot escape.

math-verify can run for ever on some inputs (an 82-character response kept it busy past 45 s,
holding the GIL so that no other thread of the process ran). The checks that need it therefore run
in a separate, long-lived process (`erpd.tasks.scoring_child`), fed a whole batch at once; the
parent waits on a queue with a deadline per answer, which releases the GIL, so heartbeats and
progress keep going. An answer past its limit, or one during which the checker died (a crash, the
OOM killer), scores 0 and is counted; the checker is killed and restarted for the answers left.

The checker is a plain subprocess started with ``python -m``, not a multiprocessing child: it
neither forks a process that runs torch threads nor re-imports the caller's ``__main__`` (which
would load torch into it), and it works from daemonic processes too.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import queue
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Protocol, runtime_checkable

from erpd.tasks.base import Problem, Task

DEFAULT_ANSWER_TIMEOUT_S = 5.0
"""Seconds one answer's check may take (``task.jsonl.answer_timeout_s``) before it scores 0."""
STARTUP_TIMEOUT_S = 120.0
"""Seconds the checker process may take to start (python, sympy and math-verify imports)."""

_ROOT = str(Path(__file__).resolve().parents[2])


@dataclass(frozen=True)
class Scores:
    """Rewards of a batch of answers, in order, and how many of them could not be checked."""

    rewards: list[float]
    timeouts: int = 0
    """Answers scored 0 because their check ran past the limit or its process died."""


@runtime_checkable
class BatchScorer(Protocol):
    """A task that scores a batch at once (and can report answers that timed out)."""

    def score_batch(self, problems: Sequence[Problem], responses: Sequence[str]) -> Scores: ...


def score_many(task: Task, problems: Sequence[Problem], responses: Sequence[str]) -> Scores:
    """Score ``responses[i]`` against ``problems[i]`` with the task's reward, in one round trip
    where the task supports it; ``timeouts`` tells how many scored 0 for lack of time."""
    if len(problems) != len(responses):
        raise ValueError(f"{len(problems)} problems but {len(responses)} responses")
    if isinstance(task, BatchScorer):
        return task.score_batch(problems, responses)
    return Scores([task.reward(p, r) for p, r in zip(problems, responses, strict=True)])


@dataclass
class _Child:
    """One checker process and the queue its reader thread fills with result lines (None: EOF)."""

    proc: subprocess.Popen[bytes]
    results: queue.Queue[bytes | None] = field(default_factory=queue.Queue)
    owner: int = field(default_factory=os.getpid)
    """The process that started it: a forked copy of the owner must leave it alone."""

    def read_all(self) -> None:
        stdout = self.proc.stdout
        assert stdout is not None
        for line in stdout:
            self.results.put(line)
        self.results.put(None)


class AnswerChecker:
    """Runs `erpd.tasks.answers.symbolic_reward` in a killable process, answer by answer.

    Thread-safe (one batch at a time); the process starts on first use and is reused.
    """

    def __init__(self, startup_timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        self.startup_timeout_s = startup_timeout_s
        self._child: _Child | None = None
        self._lock = threading.Lock()
        self.restarts = 0
        """Checker processes killed or found dead and replaced (for tests and diagnostics)."""

    @property
    def pid(self) -> int | None:
        """The checker process's id while one is running."""
        child = self._child
        return child.proc.pid if child is not None and child.proc.poll() is None else None

    def check(self, items: Sequence[tuple[str, str]], limit_s: float) -> Scores:
        """Score each ``(reference, candidate)`` pair; at most ``limit_s`` seconds per pair."""
        rewards = [0.0] * len(items)
        timeouts = 0
        with self._lock:
            start = 0
            while start < len(items):
                child = self._running()
                start = self._serve(child, items, start, rewards, limit_s)
                if start < len(items):  # that pair ran out of time or killed the checker
                    self._stop()
                    self.restarts += 1
                    timeouts += 1
                    start += 1
        return Scores(rewards, timeouts)

    def close(self) -> None:
        """Stop the checker process (a later `check` starts another)."""
        with self._lock:
            self._stop()

    def _serve(
        self,
        child: _Child,
        items: Sequence[tuple[str, str]],
        start: int,
        rewards: list[float],
        limit_s: float,
    ) -> int:
        """Send ``items[start:]``, collect results; return the index of the first unfinished."""
        lines = [json.dumps(item).encode() + b"\n" for item in items[start:]]
        stdin = child.proc.stdin
        assert stdin is not None
        writer = threading.Thread(target=_write_lines, args=(stdin, lines), daemon=True)
        writer.start()
        for index in range(start, len(items)):
            try:
                line = child.results.get(timeout=limit_s)
            except queue.Empty:
                return index
            if line is None:
                return index
            rewards[index] = 1.0 if line.strip() == b"1" else 0.0
        writer.join()
        return len(items)

    def _running(self) -> _Child:
        """The live checker, started (and waited for) if there is none."""
        if self._child is not None and self._child.owner != os.getpid():
            self._child = None  # a forked copy: its parent's checker is not ours to use
        if self._child is not None and self._child.proc.poll() is None:
            return self._child
        if self._child is not None:  # it died between batches
            self._stop()
            self.restarts += 1
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, env.get("PYTHONPATH")) if p)
        proc = subprocess.Popen(
            [sys.executable, "-m", "erpd.tasks.scoring_child"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        child = _Child(proc)
        threading.Thread(target=child.read_all, daemon=True).start()
        self._child = child
        try:
            ready = child.results.get(timeout=self.startup_timeout_s)
        except queue.Empty:
            ready = None
        if ready != b"ready\n":
            self._stop()
            raise RuntimeError(
                f"the answer checker process did not start within {self.startup_timeout_s:g} s "
                f"(exit code {proc.poll()}); run `{sys.executable} -m erpd.tasks.scoring_child` "
                "to see why"
            )
        return child

    def _stop(self) -> None:
        child, self._child = self._child, None
        if child is None or child.owner != os.getpid():
            return
        child.proc.kill()
        child.proc.wait()
        for stream in (child.proc.stdin, child.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


def _write_lines(stdin: IO[bytes], lines: list[bytes]) -> None:
    """Feed the checker; it stops reading when it is stuck or killed, which ends this thread."""
    try:
        for line in lines:
            stdin.write(line)
        stdin.flush()
    except (OSError, ValueError):  # BrokenPipeError, or the pipe closed after a kill
        pass


_shared: tuple[int, AnswerChecker] | None = None
_shared_lock = threading.Lock()


def shared_checker() -> AnswerChecker:
    """The process's one checker (one checker process however many tasks are built); a forked
    child gets its own rather than writing into its parent's pipes."""
    global _shared
    with _shared_lock:
        if _shared is None or _shared[0] != os.getpid():
            _shared = (os.getpid(), AnswerChecker())
            atexit.register(_shared[1].close)
        return _shared[1]
