"""The answer checker's own process: ``python -m erpd.tasks.scoring_child``.

It reads one JSON line ``[reference, candidate]`` per answer from stdin and writes one line per
answer, ``1`` or ``0``, in order, after a first line ``ready`` once math-verify is imported. It
holds no state the parent needs, so the parent can kill it at any moment (an answer past its time
limit) and start another. Only this module and the answer rule are imported here: no torch.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys

from erpd.tasks.answers import symbolic_reward

MEMORY_LIMIT_BYTES = 4 * 1024**3
"""Address space the checker may use: an answer that would take more fails (scores 0) here
instead of waking the machine's OOM killer, which might pick the training process."""


def _die_with_parent() -> None:
    """Ask Linux to kill this process when its parent goes (a checker stuck inside C never reads
    the end of its input). Best effort: elsewhere the parent's own clean-up has to do."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() == 1:  # the parent went before prctl took effect
        sys.exit(0)


def _limit_memory() -> None:
    with contextlib.suppress(ImportError, ValueError, OSError):
        import resource  # POSIX only

        _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard == resource.RLIM_INFINITY or hard > MEMORY_LIMIT_BYTES:
            resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, hard))


def main() -> None:
    """Serve answers until stdin closes."""
    _die_with_parent()
    _limit_memory()
    import math_verify  # noqa: F401  # imported before "ready": not charged to the first answer

    out = sys.stdout.buffer
    out.write(b"ready\n")
    out.flush()
    for line in sys.stdin.buffer:
        try:
            answer, candidate = json.loads(line)
            reward = symbolic_reward(str(answer), str(candidate))
        except (ValueError, TypeError, MemoryError, RecursionError):
            reward = 0.0
        out.write(b"1\n" if reward == 1.0 else b"0\n")
        out.flush()


if __name__ == "__main__":
    main()
