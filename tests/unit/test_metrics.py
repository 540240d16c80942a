"""The metric catalogue is complete and self-describing; sinks write what they are given."""

from __future__ import annotations

import json
import math
import typing
from pathlib import Path

import pytest

from erpd import metrics as M

METHOD_NAMES = [
    "kl/exact",
    "kl/k1",
    "kl/k3",
    "kl/seq_k3",
    "kl/budget_used",
    "entropy/token",
    "logprob/drift_correct",
    "logprob/drift_incorrect",
    "acc/train_batch",
    "acc/eval",
    "acc/eval_sampled",
    "acc/pass@k",
    "reward/mean",
    "ratio/clip_frac",
    "ratio/p01",
    "ratio/p99",
    "loss",
    "stage2/selected_frac",
    "stage2/signal_std",
    "perf/tokens_per_s",
]


class RecordingSink:
    def __init__(self) -> None:
        self.points: list[tuple[str, int, dict[str, float]]] = []
        self.closed = False

    def log(self, run: str, step: int, values: dict[str, float]) -> None:
        self.points.append((run, step, dict(values)))

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_method_metric_names_are_catalogued(name: str) -> None:
    assert name in M.CATALOGUE


@pytest.mark.parametrize("name", sorted(M.CATALOGUE))
def test_every_metric_is_described(name: str) -> None:
    info = M.CATALOGUE[name]
    assert info.name == name
    for field in ("estimator", "aggregation", "description"):
        value = getattr(info, field)
        assert isinstance(value, str) and value.strip(), field
    assert info.direction in typing.get_args(M.Direction)
    assert info.scope in typing.get_args(M.Scope)


def test_constants_spell_the_catalogue() -> None:
    constants = {v for k, v in vars(M).items() if k.isupper() and isinstance(v, str)}
    assert constants >= set(M.CATALOGUE)
    assert M.KL_EXACT == "kl/exact" and M.KL_K3 == "kl/k3" and M.LOSS == "loss"
    assert set(M.STEP_METRICS) | set(M.EVAL_METRICS) <= set(M.CATALOGUE)
    assert not set(M.STEP_METRICS) & set(M.EVAL_METRICS)
    assert M.KL_EXACT in M.STEP_METRICS and M.ACC_EVAL in M.EVAL_METRICS


def test_catalogue_json_is_serialisable() -> None:
    rows = M.catalogue_json()
    assert [r["name"] for r in rows] == list(M.CATALOGUE)
    json.dumps(rows)


def test_jsonl_sink_writes_one_point_per_line(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "metrics.jsonl"
    sink = M.JsonlSink(path)
    sink.log("round-0/teacher-sapo", 3, {M.LOSS: 0.5, M.KL_K3: 1.25})
    sink.log("round-0/student", 4, {M.ACC_EVAL: 0.75})
    sink.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 3
    points = [json.loads(line) for line in lines]
    assert [(p["run"], p["step"], p["name"], p["value"]) for p in points] == [
        ("round-0/teacher-sapo", 3, "loss", 0.5),
        ("round-0/teacher-sapo", 3, "kl/k3", 1.25),
        ("round-0/student", 4, "acc/eval", 0.75),
    ]
    assert all(set(p) == {"run", "step", "name", "value", "wall_time"} for p in points)
    assert points[0]["wall_time"] == points[1]["wall_time"]
    assert M.read_jsonl(path) == points


def test_jsonl_sink_appends(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    for step in (1, 2):
        sink = M.JsonlSink(path)
        sink.log("r", step, {M.LOSS: float(step)})
        sink.close()
    assert [p["step"] for p in M.read_jsonl(path)] == [1, 2]


def test_jsonl_sink_writes_non_finite_as_null(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    sink = M.JsonlSink(path)
    sink.log("r", 0, {M.LOSS: math.nan, M.KL_K3: math.inf, M.KL_K1: -math.inf})
    sink.close()
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    lines = text.splitlines()
    assert len(lines) == 3
    assert all(json.loads(line)["value"] is None for line in lines)


def test_jsonl_sink_rejects_unknown_names(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    sink = M.JsonlSink(path)
    with pytest.raises(KeyError, match="kl/approx"):
        sink.log("r", 0, {M.LOSS: 1.0, "kl/approx": 0.1})
    sink.close()
    assert not path.exists() or path.read_text() == ""  # refused whole, not half written


def test_jsonl_sink_empty_call_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    sink = M.JsonlSink(path)
    sink.log("r", 0, {})
    sink.log("r", 1, {M.LOSS: 1.0})
    sink.close()
    for line in path.read_text().splitlines():
        json.loads(line)


def test_tee_sink_fans_out(tmp_path: Path) -> None:
    a, b = RecordingSink(), RecordingSink()
    path = tmp_path / "m.jsonl"
    tee = M.TeeSink(a, b, M.JsonlSink(path))
    tee.log("run", 7, {M.ACC_EVAL: 0.5})
    tee.close()
    assert a.points == b.points == [("run", 7, {M.ACC_EVAL: 0.5})]
    assert a.closed and b.closed
    assert [(p["name"], p["value"]) for p in M.read_jsonl(path)] == [("acc/eval", 0.5)]


def test_null_sink_accepts_anything() -> None:
    sink = M.NullSink()
    sink.log("r", 0, {M.LOSS: 1.0})
    sink.close()
