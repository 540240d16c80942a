"""CLI config handling: --set overrides, precedence, and one-line errors (exit 2) for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from erpd.cli import UsageError, apply_override, load_config

ERPD = Path(sys.executable).with_name("erpd")


def override(*assignments: str, data: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {} if data is None else data
    for a in assignments:
        apply_override(out, a)
    return out


# --- apply_override -------------------------------------------------------------------------
def test_override_nested_keys() -> None:
    assert override("stage2.top_frac=0.5", "stage2.region=all", "rounds=3") == {
        "stage2": {"top_frac": 0.5, "region": "all"},
        "rounds": 3,
    }
    assert override("model.tiny.hidden_size=64") == {"model": {"tiny": {"hidden_size": 64}}}


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        ("3", 3),
        ("0.5", 0.5),
        ("-2", -2),
        ("1.0e-4", 1e-4),
        ("true", True),
        ("false", False),
        ("null", None),
        ("[1, 2.5]", [1, 2.5]),
        ("{a: 1}", {"a": 1}),
        ("ce", "ce"),
        ("'3'", "3"),
        ("/a=b", "/a=b"),  # only the first '=' separates key and value
    ],
)
def test_override_values_are_yaml(raw: str, value: object) -> None:
    assert override(f"x.y={raw}") == {"x": {"y": value}}


def test_override_list_index_creates_entries() -> None:
    data = override("teachers.1.objective=ce")
    assert data == {"teachers": [{}, {"objective": "ce"}]}
    cfg = load_config(None, ["teachers.1.objective=ce"])
    assert [t.objective for t in cfg.teachers] == ["sapo", "ce"]


def test_override_list_index_merges_into_existing_entry() -> None:
    data = {"teachers": [{"objective": "ce", "lr": 0.1}]}
    override("teachers.0.lr=0.2", "teachers.0.kl_coef=1", data=data)
    assert data == {"teachers": [{"objective": "ce", "lr": 0.2, "kl_coef": 1}]}


def test_override_keeps_sibling_keys() -> None:
    data = {"stage2": {"signal": "sign", "epochs": 4}}
    override("stage2.epochs=5", data=data)
    assert data == {"stage2": {"signal": "sign", "epochs": 5}}


def test_override_whole_list() -> None:
    assert override("stage2.teacher_weights=[1, 3]") == {"stage2": {"teacher_weights": [1, 3]}}


@pytest.mark.parametrize("bad", ["rounds", "=3", "teachers.x.lr=1", "a=[1"])
def test_override_rejects_malformed_assignments(bad: str) -> None:
    data: dict[str, Any] = {"teachers": [{}]}
    with pytest.raises(UsageError):
        apply_override(data, bad)


def test_override_through_a_scalar_is_an_error() -> None:
    with pytest.raises(UsageError, match="section"):
        apply_override({"teachers": ["sapo"]}, "teachers.0.lr=1")


# --- load_config precedence -----------------------------------------------------------------
def test_load_config_precedence(tmp_path: Path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text("rounds: 2\nruntime:\n  device: cpu\n  seed: 7\nstage2:\n  top_frac: 0.3\n")
    assert load_config(path, None).rounds == 2  # file
    cfg = load_config(path, ["rounds=3", "stage2.top_frac=0.4"])
    assert (cfg.rounds, cfg.stage2.top_frac, cfg.runtime.seed) == (3, 0.4, 7)  # --set > file
    cfg = load_config(path, ["rounds=3"], rounds=5, **{"runtime.device": None})
    assert cfg.rounds == 5  # fixed flag > --set
    assert cfg.runtime.device == "cpu"  # a None flag changes nothing
    assert load_config(path, None, **{"runtime.device": "auto"}).runtime.device == "auto"


def test_load_config_json_file_and_numeric_strings(tmp_path: Path) -> None:
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"teachers": [{"objective": "ce"}, {"objective": "mse"}]}))
    # PyYAML reads 1e-4 as a string; validation still turns it into a float
    cfg = load_config(path, ["teachers.1.lr=1e-4", "stage2.kl_budget=1e-3"])
    assert [t.objective for t in cfg.teachers] == ["ce", "mse"]
    assert cfg.teachers[1].lr == 1e-4 and cfg.stage2.kl_budget == 1e-3


def test_load_config_empty_file_is_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(path, None) == load_config(None, None)


def test_load_config_fixed_path_keeps_text(tmp_path: Path) -> None:
    model = str(tmp_path / "my model: 'x' \"y\" modèle")
    assert load_config(None, None, **{"model.path": model}).model.path == model


def test_load_config_fixed_path_non_bmp(tmp_path: Path) -> None:
    model = str(tmp_path / "model-\U0001f600")
    assert load_config(None, None, **{"model.path": model}).model.path == model


@pytest.mark.parametrize(
    ("text", "match"),
    [("- a\n- b\n", "mapping"), ("a: [1\n", "not valid YAML"), ("", None)],
)
def test_read_config_file_errors(tmp_path: Path, text: str, match: str | None) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    if match is None:
        load_config(path, None)
        return
    with pytest.raises(UsageError, match=match):
        load_config(path, None)


def test_load_config_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no such file"):
        load_config(tmp_path / "nope.yaml", None)


# --- end to end: one line on stderr, exit 2, before any training ----------------------------
CASES: dict[str, tuple[list[str], str]] = {
    "bad_value": (["pipeline", "--set", "stage2.top_frac=2"], "stage2.top_frac"),
    "unknown_field": (["pipeline", "--set", "stage2.bogus=1"], "stage2.bogus"),
    "missing_config": (["pipeline", "--config", "{tmp}/missing.yaml"], "--config"),
    "list_config": (["pipeline", "--config", "{tmp}/list.yaml"], "--config"),
    "stage1_missing": (
        ["stage1", "--model", "{tmp}/no-model", "--batch", "{tmp}/no-batch"],
        "--model: no such directory",
    ),
}


@pytest.fixture(scope="module")
def cli_runs(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, tuple[subprocess.CompletedProcess[str], Path]]:
    """Start every case at once (each pays the torch import), then collect them."""
    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "list.yaml").write_text("- rounds: 2\n")
    env = {k: v for k, v in os.environ.items() if k != "ERPD_DEBUG"}
    env["COLUMNS"] = "200"
    procs = {}
    for name, (args, _) in CASES.items():
        out = tmp / f"out-{name}"
        argv = [str(ERPD), *(a.format(tmp=tmp) for a in args), "--out", str(out)]
        procs[name] = (
            subprocess.Popen(
                argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
            ),
            argv,
            out,
        )
    results = {}
    for name, (proc, argv, out) in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        results[name] = (subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr), out)
    return results


@pytest.mark.parametrize("case", sorted(CASES))
def test_cli_input_errors_are_one_line(
    case: str, cli_runs: dict[str, tuple[subprocess.CompletedProcess[str], Path]]
) -> None:
    proc, out = cli_runs[case]
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:")
    assert CASES[case][1] in lines[0]
    assert not out.exists()  # failed in validation, before writing anything


def test_a_list_index_past_the_end_is_a_usage_error() -> None:
    data: dict[str, Any] = {}
    apply_override(data, "teachers.0.lr=1")  # appending the first entry is fine
    with pytest.raises(UsageError, match="past the end"):
        apply_override(data, "teachers.100000000.lr=1")


def test_under_torchrun_only_the_stage_commands_run(tmp_path: Path) -> None:
    """`erpd pipeline` on N ranks would write the same files N times: refused in one line."""
    env = {**os.environ, "WORLD_SIZE": "2", "COLUMNS": "200"}
    argv = [str(ERPD), "pipeline", "--out", str(tmp_path / "out")]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: under torchrun only `erpd stage1` and `erpd stage2` run (one process each)"
    ]
    assert not (tmp_path / "out").exists()
