"""The demo-sized pipeline with two rounds and two combined teachers (`make test-all`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from erpd.config import PipelineConfig
from erpd.pipeline import run_pipeline

pytestmark = pytest.mark.slow


def test_two_rounds_with_a_strong_and_a_weak_teacher(tmp_path: Path) -> None:
    cfg = PipelineConfig.model_validate(
        {
            "teachers": [{"objective": "sapo"}, {"objective": "mse", "epochs": 10}],
            "rounds": 2,
            "runtime": {"device": "cpu"},
        }
    )
    res = run_pipeline(cfg, tmp_path)
    assert res.status == "completed"
    roles = [(r.round, r.role, r.name.split("/")[-1]) for r in res.rows]
    assert roles == [
        (k, role, name)
        for k in (0, 1)
        for role, name in (
            ("base", "base"),
            ("teacher", "teacher-sapo"),
            ("teacher", "teacher-mse"),
            ("student", "student"),
        )
    ]
    for k in (0, 1):
        rows = {r.name.split("/")[-1]: r for r in res.rows if r.round == k}
        student, sapo = rows["student"], rows["teacher-sapo"]
        # the trust region and budget keep the student far closer to pi_k than the teacher
        assert student.kl_exact is not None and sapo.kl_exact is not None
        assert student.kl_exact < sapo.kl_exact
    assert res.student == tmp_path / "round-1" / "student" / "checkpoint"
