"""The one supervisor of `up`, `demo`, `worker` and `dashboard` (server/stack.py), on plain
`python -c` children: who gets a signal, how a death is found, how the rest is stopped."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator

import pytest

from server.stack import Supervisor

SLEEP = [sys.executable, "-c", "import time; time.sleep(60)"]
EXIT_3 = [sys.executable, "-c", "raise SystemExit(3)"]


@pytest.fixture
def attached() -> Iterator[Supervisor]:
    sup = Supervisor(dict(os.environ), detached=False)
    yield sup
    for child in sup.children.values():
        if child.poll() is None:
            child.kill()
            child.wait()


def test_attached_children_share_this_process_group(attached: Supervisor) -> None:
    attached.spawn("a", SLEEP)
    assert os.getpgid(attached.children["a"].pid) == os.getpgid(0)
    attached.stop()  # SIGTERM, awaited however long it takes
    assert attached.wait() == {"a": -signal.SIGTERM}


def test_detached_children_lead_their_own_group() -> None:
    sup = Supervisor(dict(os.environ))
    sup.spawn("a", SLEEP)
    try:
        assert os.getpgid(sup.children["a"].pid) == sup.children["a"].pid
    finally:
        sup.stop()
    assert sup.children["a"].returncode == -signal.SIGTERM


def test_a_child_that_dies_is_named_and_a_taken_name_gets_a_number(attached: Supervisor) -> None:
    attached.spawn("worker", SLEEP)
    attached.spawn("worker", EXIT_3)
    assert list(attached.children) == ["worker", "worker#2"]
    assert attached.watch() == "worker#2"
    assert not attached.signalled
    attached.stop()
    assert attached.wait() == {"worker": -signal.SIGTERM, "worker#2": 3}


def test_a_signal_reaches_attached_children_and_ends_the_watch(attached: Supervisor) -> None:
    attached.spawn("a", SLEEP)
    attached.spawn("b", SLEEP)
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        attached.handle_signals()
        signal.raise_signal(signal.SIGINT)
        assert attached.watch() is None and attached.signalled
        assert attached.wait() == {"a": -signal.SIGINT, "b": -signal.SIGINT}
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
