"""One stage on every rank of a torchrun group: what a worker runs for a `runtime.gpus > 1` run.

The worker (worker/group.py) writes a `LaunchSpec` into a relay directory, starts
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
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict

from erpd.progress import Advance

if TYPE_CHECKING:
    from erpd.rollout import RolloutBatch
    from erpd.trainer import StageEnv, StageResult

SPEC, METRICS, PROGRESS, STOP, RESULT = (
    "spec.json",
    "metrics.jsonl",
    "progress.json",
    "stop",
    "result.json",
)


class LaunchSpec(BaseModel):
    """Everything a rank needs, as paths the worker resolved from ids (never from a request)."""

    model_config = ConfigDict(extra="forbid")

    stage: Literal["stage1", "stage2"]
    pipeline: dict[str, object]  # PipelineConfig: task, eval, runtime and model sections
    config: dict[str, object]  # Stage1Config or Stage2Config
    base: str
    initial: str | None
    batch: str
    run_dir: str
    run: str
    teachers: list[str] = []
    pinned: list[str | None] = []


def write_json(path: Path, body: object) -> None:
    """Replace `path` in one rename: the worker never reads half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(body, default=str))
    os.replace(tmp, path)


class FileProgress:
    """erpd's ProgressFactory for rank 0: the current step and total in a small JSON file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @contextlib.contextmanager
    def __call__(self, description: str, total: int) -> Iterator[Advance]:
        done = 0
        write_json(self.path, {"step": done, "total": total})

        def advance(n: int) -> None:
            nonlocal done
            done += n
            write_json(self.path, {"step": done, "total": total})

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


def run_spec(spec: LaunchSpec, env: StageEnv, batch: RolloutBatch) -> StageResult:
    """The stage `spec` describes, in this process: one rank of a group, or a worker's only
    process for a one-GPU run (both read the same spec, so both run the same stage)."""
    from erpd.config import Stage1Config, Stage2Config
    from erpd.stage1 import run_stage1
    from erpd.stage2 import run_stage2

    if spec.stage == "stage1":
        return run_stage1(
            base=spec.base,
            batch=batch,
            cfg=Stage1Config.model_validate(spec.config),
            env=env,
            run_dir=spec.run_dir,
            run=spec.run,
            initial=spec.initial,
        )
    return run_stage2(
        base=spec.base,
        teachers=spec.teachers,
        pinned=spec.pinned,
        batch=batch,
        cfg=Stage2Config.model_validate(spec.config),
        env=env,
        run_dir=spec.run_dir,
        run=spec.run,
        initial=spec.initial,
    )


def run(spec_path: Path) -> int:
    from erpd import distributed
    from erpd import metrics as M
    from erpd.config import PipelineConfig
    from erpd.pipeline import make_env
    from erpd.progress import no_progress
    from erpd.rollout import RolloutBatch

    relay = spec_path.parent
    try:
        spec = LaunchSpec.model_validate_json(spec_path.read_text())
        env = make_env(PipelineConfig.model_validate(spec.pipeline), M.NullSink(), no_progress)
        if distributed.is_main():
            env.sink = M.JsonlSink(relay / METRICS)
            env.progress = FileProgress(relay / PROGRESS)
        env.should_stop = (relay / STOP).exists
        result = run_spec(spec, env, RolloutBatch.load(spec.batch))
        env.sink.close()
        if distributed.is_main():
            write_json(relay / RESULT, asdict(result))
        return 0
    except Exception as exc:  # reported to the worker in one line, with when it happened
        line = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
        write_json(relay / f"error-{distributed.rank()}.json", {"at": time.time(), "error": line})
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
