"""What a running stage reports to the store: metric points (batched), heartbeats with progress,
and the cancel flag it learns from them; a worker's shutdown stops the stage the same way.

The loop calls `log` every optimizer step; points are flushed when `max_points` are waiting or
`max_delay_s` has passed. A background thread heartbeats every `heartbeat_s` even while a long
eval runs, so the reaper never mistakes a busy worker for a dead one. Every write carries the
claimed attempt: if the reaper gave the run to someone else, the next write raises
StaleAttemptError and the stage is stopped.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator

from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from erpd.progress import Advance
from server.services import Point, StaleAttemptError, heartbeat, record_metrics

log = logging.getLogger("erpd.worker")


def retrying(action: Callable[[], object], *, attempts: int = 8, first_wait_s: float = 0.5) -> None:
    """Retry a store write through a database outage (connection errors only): 8 tries over
    about a minute (0.5 s, 1 s, 2 s ... 32 s apart)."""
    for attempt in range(attempts):
        try:
            action()
            return
        except OperationalError:
            if attempt + 1 == attempts:
                raise
            wait = first_wait_s * 2**attempt
            log.warning("store unreachable; retrying in %.1f s", wait)
            time.sleep(wait)


class DbSink:
    """A MetricSink (erpd/metrics.py) writing into the run store for one claimed attempt."""

    def __init__(
        self,
        factory: sessionmaker[Session],
        run_id: uuid.UUID,
        attempt: int,
        *,
        heartbeat_s: float = 5.0,
        max_points: int = 2_000,
        max_delay_s: float = 2.0,
        shutdown: threading.Event | None = None,
    ) -> None:
        self.factory, self.run_id, self.attempt = factory, run_id, attempt
        self.max_points, self.max_delay_s = max_points, max_delay_s
        self.pending: list[Point] = []
        self.last_flush = time.monotonic()
        self.cancel = threading.Event()
        self.lost = threading.Event()  # the store gave this run to another attempt
        self.shutdown = shutdown or threading.Event()  # the worker was told to stop (SIGTERM)
        self.step: int | None = None
        self.total: int | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._beat = threading.Thread(
            target=self._beat_loop, args=(heartbeat_s,), daemon=True, name="erpd-heartbeat"
        )
        self.points_written = 0

    # --- MetricSink ---------------------------------------------------------------------------
    def log(self, run: str, step: int, values: dict[str, float]) -> None:
        now = time.time()
        with self._lock:
            self.pending += [Point(step, name, value, now) for name, value in values.items()]
            due = (
                len(self.pending) >= self.max_points
                or time.monotonic() - self.last_flush >= self.max_delay_s
            )
        if due:
            self.flush()

    def close(self) -> None:
        self.flush()

    # --- writes -------------------------------------------------------------------------------
    def flush(self) -> None:
        with self._lock:
            points, self.pending = self.pending, []
            self.last_flush = time.monotonic()
        if not points:
            return

        def write() -> None:
            with self.factory.begin() as session:
                record_metrics(session, run_id=self.run_id, points=points, attempt=self.attempt)

        try:
            retrying(write)
        except StaleAttemptError:
            self.lost.set()
            raise
        self.points_written += len(points)

    def beat(self) -> None:
        def write() -> None:
            with self.factory.begin() as session:
                if heartbeat(
                    session,
                    run_id=self.run_id,
                    attempt=self.attempt,
                    step=self.step,
                    total=self.total,
                ):
                    self.cancel.set()

        try:
            retrying(write)
        except StaleAttemptError:
            self.lost.set()

    def _beat_loop(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            try:
                self.beat()
            except Exception:  # never kill the thread: the next beat tries again
                log.exception("heartbeat failed")

    def start(self) -> None:
        self.beat()
        self._beat.start()

    def stop(self) -> None:
        """Stop heartbeating (waits for a beat in flight); safe to call more than once."""
        self._stop.set()
        if self._beat.is_alive():
            self._beat.join(timeout=30)

    # --- what the erpd loop asks ----------------------------------------------------------------
    def should_stop(self) -> bool:
        return self.cancel.is_set() or self.lost.is_set() or self.shutdown.is_set()

    @contextlib.contextmanager
    def progress(self, description: str, total: int) -> Iterator[Advance]:
        """erpd's ProgressFactory: the heartbeat carries step / total of the current phase."""
        self.step, self.total = 0, total

        def advance(n: int) -> None:
            self.step = (self.step or 0) + n

        yield advance
