"""A stage on several GPUs: the worker launches it under torchrun and relays (erpd/launch.py).

The worker stays the one process that talks to the store. While the ranks train, it copies
rank 0's metric points into the DbSink, puts rank 0's step into the heartbeat, and turns a
cancel into the `stop` file that every rank checks at each step. When every rank raised, the
run fails with the earliest error (the cause). When a rank died without a word (SIGKILL, the
OOM killer; torchrun then stops the others), the run is released to be requeued and resumed
from its sharded resume point, as after a lost single-GPU worker.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from erpd.errors import ConfigError
from erpd.launch import METRICS, PROGRESS, RESULT, SPEC, STOP
from erpd.spec import StageSpec
from erpd.stage import StageResult
from worker.sinks import DbSink

log = logging.getLogger("erpd.worker")
POLL_S = 0.5
RELAY = "launch"


class StageError(RuntimeError):
    """A rank raised: the run fails with this line."""


class RanksLostError(RuntimeError):
    """A rank died without reporting: the attempt is lost, the run is not at fault."""


class Relay:
    """The files the ranks write, read incrementally."""

    def __init__(self, directory: Path, run: str, sink: DbSink) -> None:
        self.dir, self.run, self.sink = directory, run, sink
        self.offset = 0

    def pump(self) -> None:
        """Copy new complete metric lines to the sink and the step into the heartbeat."""
        metrics = self.dir / METRICS
        if metrics.is_file():
            with metrics.open("rb") as f:
                f.seek(self.offset)
                chunk = f.read()
            complete = chunk[: chunk.rfind(b"\n") + 1]  # a line being written waits
            self.offset += len(complete)
            by_step: dict[int, dict[str, float]] = {}
            for line in complete.decode().splitlines():
                point = json.loads(line)
                value = point["value"]
                by_step.setdefault(point["step"], {})[point["name"]] = (
                    float("nan") if value is None else value
                )
            for step, values in by_step.items():
                self.sink.log(self.run, step, values)
        try:
            progress = json.loads((self.dir / PROGRESS).read_text())
        except (OSError, ValueError):
            return
        self.sink.step, self.sink.total = progress["step"], progress["total"]

    def errors(self) -> list[dict[str, Any]]:
        """The ranks' reported errors, earliest (the cause) first."""
        found = [json.loads(p.read_text()) for p in self.dir.glob("error-*.json")]
        return sorted(found, key=lambda e: float(e["at"]))


def check_gpus(gpus: int, owned: int) -> None:
    if gpus > owned:
        raise ConfigError(
            "runtime.gpus",
            f"the run asks for {gpus} GPUs and this worker owns {owned}; start a worker with "
            "--gpus listing as many and --group",
        )


def run_sharded(spec: StageSpec, *, gpus: int, sink: DbSink) -> StageResult:
    """Run the stage on `gpus` ranks; its result (`stopped` when a cancel stopped it)."""
    directory = Path(spec.run_dir) / RELAY
    shutil.rmtree(directory, ignore_errors=True)  # an earlier attempt's files are not this one's
    directory.mkdir(parents=True)
    (directory / SPEC).write_text(spec.model_dump_json())
    relay = Relay(directory, spec.run, sink)
    command = [
        sys.executable,
        "-m",
        "erpd.launch",
        "torchrun",
        "--standalone",
        f"--nproc-per-node={gpus}",
        "-m",
        "erpd.launch",
        str(directory / SPEC),
    ]
    log.info("run %s: launching %d ranks", spec.run, gpus)
    # appended across attempts: what a lost attempt printed is still there to read
    with (Path(spec.run_dir) / "torchrun.log").open("a") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        try:
            while proc.poll() is None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=POLL_S)
                relay.pump()
                if sink.should_stop() and not (directory / STOP).exists():
                    (directory / STOP).touch()  # every rank stops at the same step and saves
        finally:
            if proc.poll() is None:  # the worker itself is going down: take the ranks with it
                proc.send_signal(signal.SIGTERM)
                proc.wait()
    relay.pump()
    sink.flush()
    if proc.returncode == 0 and (directory / RESULT).is_file():
        body = json.loads((directory / RESULT).read_text())
        checkpoint = body["checkpoint"]
        return StageResult(
            **{
                **body,
                "run_dir": Path(body["run_dir"]),
                "checkpoint": checkpoint and Path(checkpoint),
            }
        )
    errors = relay.errors()
    if len(errors) == gpus:  # every rank raised: the stage failed, not the machine
        raise StageError(errors[0]["error"])
    raise RanksLostError(
        f"{gpus - len(errors)} of {gpus} ranks died without a word (torchrun exit "
        f"{proc.returncode})"
    )
