"""One stage on every rank of a torchrun group: what a worker runs for a `runtime.gpus > 1` run.

The worker (worker/group.py) writes a `StageSpec` (erpd/spec.py) into a relay directory, starts
`torchrun ... -m erpd.launch <relay>/spec.json` and relays. The ranks and the worker talk only
through files in that directory, so the ranks import nothing of the service:

- `metrics.jsonl`: rank 0's metric points (a JsonlSink); the worker copies them to the store.
- `progress.json`: rank 0's {"step", "total"}; the worker's heartbeat carries it.
- `stop`: created by the worker when the run is cancelled; every rank stops at the same step.
- `result.json`: rank 0's StageResult once the stage ends (completed, kl_budget or stopped).
- `error-<rank>.json`: one line from a rank that raised, and when. The earliest is the cause
  (a peer's failure shows up on the others as a broken connection a moment later). A rank that
  died without one (SIGKILL, the OOM killer) makes the worker requeue the run, which resumes
  from its shards.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

from erpd.files import write_json
from erpd.progress import Advance

SPEC, METRICS, PROGRESS, STOP, RESULT = (
    "spec.json",
    "metrics.jsonl",
    "progress.json",
    "stop",
    "result.json",
)


class FileProgress:
    """erpd's ProgressFactory for rank 0: the current step and total in a small JSON file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @contextlib.contextmanager
    def __call__(self, description: str, total: int) -> Iterator[Advance]:
        done = 0
        write_json(self.path, {"step": done, "total": total}, default=str)

        def advance(n: int) -> None:
            nonlocal done
            done += n
            write_json(self.path, {"step": done, "total": total}, default=str)

        yield advance


def die_with_parent() -> None:
    """Linux: SIGKILL this rank if torchrun's agent dies (itself SIGKILLed with its worker),
    so no orphaned rank trains on while the run's next attempt starts."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        pr_set_pdeathsig = 1
        with contextlib.suppress(OSError, AttributeError):  # a libc without prctl: do without
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def run(spec_path: Path) -> int:
    from erpd import distributed
    from erpd import metrics as M
    from erpd.config import PipelineConfig
    from erpd.spec import StageSpec
    from erpd.stage import StageEnv

    relay = spec_path.parent
    try:
        spec = StageSpec.model_validate_json(spec_path.read_text())
        env = StageEnv.of(PipelineConfig.model_validate(spec.pipeline))
        if distributed.is_main():
            env.sink = M.JsonlSink(relay / METRICS)
            env.progress = FileProgress(relay / PROGRESS)
        env.should_stop = (relay / STOP).exists
        result = spec.run_stage(env)
        env.sink.close()
        if distributed.is_main():
            write_json(relay / RESULT, asdict(result), default=str)
        return 0
    except Exception as exc:  # reported to the worker in one line, with when it happened
        line = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
        at = {"at": time.time(), "error": line}
        write_json(relay / f"error-{distributed.rank()}.json", at, default=str)
        return 1


def main(argv: list[str]) -> int:
    """`erpd.launch torchrun ARGS` (the worker's launcher) or `erpd.launch SPEC` (one rank)."""
    die_with_parent()  # PR_SET_PDEATHSIG here, not in a preexec_fn (unsafe in a threaded worker)
    if argv[:1] == ["torchrun"]:
        from torch.distributed.run import main as torchrun

        torchrun(argv[1:])
        return 0
    from erpd import distributed

    distributed.exit_rank(run(Path(argv[0])))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
