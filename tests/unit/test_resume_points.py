"""Resume points are on by default, by time, bounded in disk use; the server's paths never
reach a user."""

from __future__ import annotations

from pathlib import Path

import pytest

from erpd import resume as R
from erpd.config import Stage1Config, Stage2Config
from server.redact import scrub


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(R.time, "monotonic", fake)
    return fake


def test_a_stage_saves_resume_points_by_default_and_keeps_one() -> None:
    for cfg in (Stage1Config(), Stage2Config()):
        assert cfg.checkpoint_every_s == 120 and cfg.checkpoint_keep == 1
        assert cfg.checkpoint_every_steps == 0


def test_a_point_is_due_by_time_and_waits_for_twenty_saves_worth(
    clock: Clock, tmp_path: Path
) -> None:
    points = R.ResumePoints(tmp_path, "f", every_s=120)
    assert not points.due(1)
    clock.now += 119
    assert not points.due(7)
    clock.now += 1
    assert points.due(8)
    # a save that took 10 s pushes the next point to 200 s, so saving stays under 5%
    points.saved_at, points.last_save_s = clock.now, 10.0
    clock.now += 150
    assert not points.due(9)
    clock.now += 50
    assert points.due(10)


def test_steps_and_time_combine_and_zero_turns_each_off(clock: Clock, tmp_path: Path) -> None:
    both = R.ResumePoints(tmp_path, "f", every_steps=4, every_s=120)
    assert both.due(4) and not both.due(5)
    assert not R.ResumePoints(tmp_path, "f", every_steps=0, every_s=0).due(4)
    clock.now += 10_000
    assert not R.ResumePoints(tmp_path, "f", every_steps=4, every_s=0).due(5)


def test_the_resume_cadence_is_not_part_of_what_is_trained() -> None:
    class Batch:
        def fingerprint(self) -> str:
            return "b"

    def fingerprint(**changes: float) -> str:
        config = Stage1Config().model_copy(update=changes).model_dump()
        return R.stage_fingerprint("stage1", Batch(), {"config": config})  # type: ignore[arg-type]

    assert fingerprint(checkpoint_every_s=5, checkpoint_keep=3) == fingerprint()
    assert fingerprint(lr=0.5) != fingerprint()


def test_every_server_path_is_scrubbed_from_a_reason() -> None:
    home = Path("/srv/erpd-data")
    reason = (
        "CheckpointError: /srv/erpd-data/artifacts/runs/ab/checkpoint/config.json changed; "
        "OSError: [Errno 2] No such file: '/opt/models/qwen3-8b/tokenizer.json' "
        "(from /usr/lib/python3.11/site-packages/transformers/x.py)"
    )
    clean = scrub(reason, {"ERPD_HOME": home})
    assert "/srv" not in clean and "/opt" not in clean and "/usr" not in clean, clean
    assert "$ERPD_HOME/artifacts/runs/ab/checkpoint/config.json" in clean
    assert "'…/tokenizer.json'" in clean  # still says which file
    assert scrub("ratio 3/4, http://host/a/b, a/b/c") == "ratio 3/4, http://host/a/b, a/b/c"
