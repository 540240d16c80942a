"""Configs validate their defaults, refuse typos with the field path and bad combinations."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from erpd.config import (
    ArithmeticConfig,
    BaseTrainConfig,
    EvalConfig,
    JsonlConfig,
    ModelSpec,
    PipelineConfig,
    RuntimeConfig,
    SampleConfig,
    Stage1Config,
    Stage2Config,
    TaskSpec,
    TinyModelConfig,
)


def first_error(data: dict[str, Any]) -> dict[str, Any]:
    with pytest.raises(ValidationError) as info:
        PipelineConfig.model_validate(data)
    return dict(info.value.errors()[0])


def test_config_imports_no_torch() -> None:
    code = "import erpd.config, sys; assert 'torch' not in sys.modules, 'torch imported'"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(
    "cls",
    [
        TinyModelConfig,
        ModelSpec,
        ArithmeticConfig,
        TaskSpec,
        EvalConfig,
        BaseTrainConfig,
        SampleConfig,
        Stage1Config,
        Stage2Config,
        RuntimeConfig,
        PipelineConfig,
    ],
)
def test_defaults_validate(cls: type[BaseModel]) -> None:
    cfg = cls()
    assert cls.model_validate(cfg.model_dump()) == cfg


def test_pipeline_defaults_match_method() -> None:
    cfg = PipelineConfig.model_validate({})
    assert [t.objective for t in cfg.teachers] == ["sapo"]
    t = cfg.teachers[0]
    assert (t.epochs, t.anchor, t.eps_low, t.eps_high, t.kl_coef) == (20, "behaviour", 0.2, 0.28, 0)
    assert (t.tau_pos, t.tau_neg, t.mse_beta, t.mse_reference) == (1.0, 1.05, 0.1, "base")
    s = cfg.stage2
    assert (s.signal, s.region, s.top_frac, s.clip_eps, s.gate_c) == (
        "logratio",
        "top_frac",
        0.2,
        0.2,
        0.2,
    )
    assert (s.kl_coef, s.epochs, s.lr, s.teacher_weights) == (0.01, 2, 3e-5, None)
    assert cfg.rounds == 1 and cfg.task.kind == "arithmetic" and cfg.model.path is None


def test_json_round_trip() -> None:
    cfg = PipelineConfig.model_validate(
        {"teachers": [{"objective": "ce"}, {"objective": "mse"}], "stage2": {"signal": "sign"}}
    )
    assert PipelineConfig.model_validate_json(cfg.model_dump_json()) == cfg


@pytest.mark.parametrize(
    ("data", "loc"),
    [
        ({"bogus": 1}, ("bogus",)),
        ({"stage2": {"top_fraction": 0.1}}, ("stage2", "top_fraction")),
        ({"teachers": [{}, {"objectiv": "ce", "name": "b"}]}, ("teachers", 1, "objectiv")),
        ({"model": {"tiny": {"layers": 2}}}, ("model", "tiny", "layers")),
        ({"task": {"arithmetic": {"digit": 3}}}, ("task", "arithmetic", "digit")),
    ],
)
def test_unknown_keys_are_rejected_with_their_path(
    data: dict[str, Any], loc: tuple[str | int, ...]
) -> None:
    err = first_error(data)
    assert err["type"] == "extra_forbidden"
    assert tuple(err["loc"]) == loc


@pytest.mark.parametrize(
    ("data", "loc"),
    [
        ({"teachers": [{"lr": -1e-4}]}, ("teachers", 0, "lr")),
        ({"teachers": [{"lr": 0}]}, ("teachers", 0, "lr")),
        ({"stage2": {"lr": -1}}, ("stage2", "lr")),
        ({"base": {"lr": 0}}, ("base", "lr")),
        ({"stage2": {"top_frac": 0}}, ("stage2", "top_frac")),
        ({"stage2": {"top_frac": 1.01}}, ("stage2", "top_frac")),
        ({"stage2": {"clip_eps": 1.0}}, ("stage2", "clip_eps")),
        ({"stage2": {"kl_budget": 0}}, ("stage2", "kl_budget")),
        ({"stage2": {"signal": "ppo"}}, ("stage2", "signal")),
        ({"stage2": {"teacher_weights": [-1.0]}}, ("stage2", "teacher_weights", 0)),
        ({"teachers": [{"objective": "ppo"}]}, ("teachers", 0, "objective")),
        ({"teachers": [{"name": "Bad Name"}]}, ("teachers", 0, "name")),
        ({"teachers": [{"epochs": 0}]}, ("teachers", 0, "epochs")),
        ({"sample": {"group_size": 1}}, ("sample", "group_size")),
        ({"sample": {"top_p": 1.5}}, ("sample", "top_p")),
        ({"sample": {"top_p": 0.9}}, ("sample", "top_p")),
        ({"sample": {"temperature": 0.7}}, ("sample", "temperature")),
        ({"rounds": 0}, ("rounds",)),
        ({"runtime": {"device": "tpu"}}, ("runtime", "device")),
        ({"task": {"arithmetic": {"operators": "/"}}}, ("task", "arithmetic", "operators")),
    ],
)
def test_invalid_values_name_the_field(data: dict[str, Any], loc: tuple[str | int, ...]) -> None:
    assert tuple(first_error(data)["loc"]) == loc


def test_a_batch_not_sampled_from_pi_k_itself_is_refused_in_one_line() -> None:
    # behaviour log-probs are pi_k's at T = 1, untruncated: any other sampler would make stage
    # 1's first ratios differ from 1 (0.71-1.12 at T = 0.6 / top-p 0.9)
    for field, value in (("temperature", 0.7), ("top_p", 0.9)):
        err = first_error({"sample": {field: value}})
        assert "\n" not in err["msg"] and "temperature 1 without truncation" in err["msg"]
    assert SampleConfig(temperature=1.0, top_p=1.0).temperature == 1.0


def test_top_frac_upper_bound_inclusive() -> None:
    assert Stage2Config(top_frac=1.0).top_frac == 1.0


def test_region_threshold_needs_threshold() -> None:
    err = first_error({"stage2": {"region": "threshold"}})
    assert tuple(err["loc"]) == ("stage2",)
    assert "threshold" in err["msg"]
    assert Stage2Config(region="threshold", threshold=0.5).threshold == 0.5
    with pytest.raises(ValidationError):
        Stage2Config(region="threshold", threshold=0.0)


def test_duplicate_teacher_names_are_rejected() -> None:
    err = first_error({"teachers": [{}, {}]})
    assert "unique" in err["msg"]
    # the label is the name, or else the objective
    err2 = first_error({"teachers": [{"objective": "ce", "name": "sapo"}, {"objective": "sapo"}]})
    assert "unique" in err2["msg"]
    ok = PipelineConfig.model_validate({"teachers": [{}, {"name": "sapo-2"}, {"objective": "ce"}]})
    assert [t.label for t in ok.teachers] == ["sapo", "sapo-2", "ce"]


def test_teacher_weights_must_match_teachers() -> None:
    err = first_error({"stage2": {"teacher_weights": [1.0, 2.0]}})
    assert "teacher_weights" in err["msg"]
    ok = PipelineConfig.model_validate(
        {"teachers": [{}, {"objective": "ce"}], "stage2": {"teacher_weights": [1.0, 2.0]}}
    )
    assert ok.stage2.teacher_weights == [1.0, 2.0]


def test_no_teachers_only_with_advantage_signal() -> None:
    err = first_error({"teachers": []})
    assert "advantage" in err["msg"]
    for signal in ("logratio", "sign", "gated_advantage", "contrast"):
        first_error({"teachers": [], "stage2": {"signal": signal}})
    # without a teacher nothing ranks tokens: the region is random or all, and nothing to shuffle
    for stage2 in ({"region": "top_frac"}, {"region": "all", "permute_delta": True}):
        err = first_error({"teachers": [], "stage2": {"signal": "advantage", **stage2}})
        assert "no teachers" in err["msg"]
    for region in ("random", "all"):
        ok = PipelineConfig.model_validate(
            {"teachers": [], "stage2": {"signal": "advantage", "region": region}}
        )
        assert ok.teachers == []


def test_hidden_size_divisible_by_heads() -> None:
    err = first_error({"model": {"tiny": {"hidden_size": 30, "num_heads": 4}}})
    assert tuple(err["loc"]) == ("model", "tiny")
    assert "divisible" in err["msg"]
    assert TinyModelConfig(hidden_size=32, num_heads=4).hidden_size == 32


def test_jsonl_kind_needs_jsonl_section() -> None:
    err = first_error({"task": {"kind": "jsonl"}})
    assert tuple(err["loc"]) == ("task",)
    assert "jsonl" in err["msg"]
    ok = PipelineConfig.model_validate(
        {"task": {"kind": "jsonl", "jsonl": {"train_path": "train.jsonl"}}}
    )
    assert ok.task.jsonl is not None and ok.task.jsonl.train_path == "train.jsonl"
    with pytest.raises(ValidationError):
        JsonlConfig.model_validate({})  # train_path is required


def test_assignment_is_validated() -> None:
    cfg = PipelineConfig()
    with pytest.raises(ValidationError):
        cfg.stage2.top_frac = 2.0
    with pytest.raises(ValidationError):
        cfg.stage2.bogus = 1  # type: ignore[attr-defined]
    assert cfg.stage2.top_frac == 0.2


def test_numeric_strings_are_coerced() -> None:
    # YAML 1.1 reads "1e-4" as a string; the config must still see a float
    cfg = PipelineConfig.model_validate({"teachers": [{"lr": "1e-4"}]})
    assert cfg.teachers[0].lr == 1e-4
