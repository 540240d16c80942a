"""Checkpoints are complete or absent, load with plain transformers, and never contain pickles."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from erpd.checkpoint import (
    MANIFEST,
    atomic_dir,
    latest_resume,
    load_resume,
    read_manifest,
    save_model_checkpoint,
    save_resume,
    verify_checkpoint,
)
from erpd.config import TinyModelConfig
from erpd.errors import CheckpointError
from erpd.models import build_char_tokenizer, build_tiny_model

PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}
SHAPE = TinyModelConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under root, by relative path, with its bytes."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tiny(seed: int = 0) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    torch.manual_seed(seed)
    tok = build_char_tokenizer("0123456789+=")
    return build_tiny_model(tok, SHAPE), tok


def assert_no_pickles(root: Path) -> None:
    for f in root.rglob("*"):
        if not f.is_file():
            continue
        assert f.suffix not in PICKLE_SUFFIXES, f
        assert not f.read_bytes().startswith(b"PK\x03\x04"), f"{f} is a torch.save zip"
        if f.suffix == ".safetensors":
            load_file(str(f))  # parses as safetensors


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str, Any, Any]]:
    model, tok = tiny()
    path = tmp_path_factory.mktemp("ckpt") / "model"
    sha = save_model_checkpoint(path, model, tok, {"role": "test", "round": 0})
    yield path, sha, model, tok


# --- atomic_dir -----------------------------------------------------------------------------
def _make_old(path: Path) -> dict[str, bytes]:
    (path / "sub").mkdir(parents=True)
    (path / "a.txt").write_text("old a")
    (path / "sub" / "b.bin").write_bytes(bytes(range(256)))
    (path / MANIFEST).write_text("{}")  # an erpd artefact: the only kind atomic_dir replaces
    return snapshot(path)


def test_atomic_dir_success_replaces_existing(tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    _make_old(path)
    with atomic_dir(path) as tmp:
        assert tmp != path and tmp.parent == tmp_path
        (tmp / "new.txt").write_text("new")
        assert (path / "a.txt").read_text() == "old a"  # untouched until the block succeeds
    assert snapshot(path) == {"new.txt": b"new"}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no .tmp-* / .old-* left


def test_atomic_dir_creates_missing_parents(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "ckpt"
    with atomic_dir(path) as tmp:
        (tmp / "x").write_text("1")
    assert snapshot(path) == {"x": b"1"}


@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_atomic_dir_error_keeps_previous_dir(tmp_path: Path, exc: BaseException) -> None:
    path = tmp_path / "ckpt"
    before = _make_old(path)
    with pytest.raises(type(exc)), atomic_dir(path) as tmp:
        (tmp / "a.txt").write_text("half-written")
        (tmp / "partial.safetensors").write_bytes(b"\0" * 10)
        raise exc
    assert snapshot(path) == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_atomic_dir_error_without_previous_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    with pytest.raises(ValueError), atomic_dir(path) as tmp:
        (tmp / "x").write_text("1")
        raise ValueError("boom")
    assert list(tmp_path.iterdir()) == []


# --- model checkpoints ----------------------------------------------------------------------
def test_model_checkpoint_loads_with_plain_transformers(saved: tuple[Path, str, Any, Any]) -> None:
    path, _, model, tok = saved
    loaded = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True)
    expected = model.state_dict()
    got = loaded.state_dict()
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert torch.equal(got[name].float(), value), name
    tok2 = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    assert tok2.get_vocab() == tok.get_vocab()
    assert tok2("12+34=")["input_ids"] == tok("12+34=")["input_ids"]
    assert tok2.eos_token == tok.eos_token and tok2.pad_token == tok.pad_token


def test_manifest_hashes_every_file_and_is_written_last(
    saved: tuple[Path, str, Any, Any],
) -> None:
    path, sha, _, _ = saved
    manifest = read_manifest(path)
    others = [p for p in path.rglob("*") if p.is_file() and p.name != MANIFEST]
    assert {str(p.relative_to(path)) for p in others} == set(manifest["files"])
    for p in others:
        assert manifest["files"][str(p.relative_to(path))] == sha256(p)
    assert any(name.endswith(".safetensors") for name in manifest["files"])
    assert "config.json" in manifest["files"]
    assert manifest["sha256"] == sha and len(sha) == 64
    assert manifest["role"] == "test" and manifest["round"] == 0
    last = (path / MANIFEST).stat().st_mtime_ns
    assert all(p.stat().st_mtime_ns <= last for p in others)
    assert verify_checkpoint(path, expected_sha256=sha)["sha256"] == sha


def test_model_checkpoint_contains_no_pickle(saved: tuple[Path, str, Any, Any]) -> None:
    assert_no_pickles(saved[0])


def test_save_model_checkpoint_is_deterministic_in_content(tmp_path: Path) -> None:
    model, tok = tiny()
    a = save_model_checkpoint(tmp_path / "a", model, tok, {})
    b = save_model_checkpoint(tmp_path / "b", model, tok, {})
    assert a == b


@pytest.fixture
def copy_of(saved: tuple[Path, str, Any, Any], tmp_path: Path) -> tuple[Path, str]:
    dst = tmp_path / "copy"
    shutil.copytree(saved[0], dst)
    return dst, saved[1]


def test_verify_detects_a_modified_file(copy_of: tuple[Path, str]) -> None:
    path, _ = copy_of
    with (path / "config.json").open("a") as f:
        f.write(" ")
    with pytest.raises(CheckpointError, match=r"config\.json"):
        verify_checkpoint(path)


def test_verify_detects_an_added_or_removed_file(copy_of: tuple[Path, str]) -> None:
    path, _ = copy_of
    (path / "extra.txt").write_text("x")
    with pytest.raises(CheckpointError, match=r"extra\.txt"):
        verify_checkpoint(path)
    (path / "extra.txt").unlink()
    verify_checkpoint(path)
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json"):
        verify_checkpoint(path)


def test_verify_detects_a_wrong_pinned_sha(copy_of: tuple[Path, str]) -> None:
    path, sha = copy_of
    assert verify_checkpoint(path, expected_sha256=sha)["sha256"] == sha
    with pytest.raises(CheckpointError, match="pinned"):
        verify_checkpoint(path, expected_sha256="0" * 64)


def test_verify_missing_or_broken_manifest(copy_of: tuple[Path, str]) -> None:
    path, _ = copy_of
    (path / MANIFEST).write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable"):
        verify_checkpoint(path)
    (path / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match=MANIFEST):
        verify_checkpoint(path)


# --- resume state ---------------------------------------------------------------------------
def _train_steps(model: torch.nn.Module, opt: torch.optim.Optimizer, n: int) -> None:
    ids = torch.tensor([[3, 4, 13, 5, 6, 14, 7, 8], [12, 11, 13, 10, 9, 14, 4, 4]])
    for _ in range(n):
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()


def _clone_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _adamw(model: torch.nn.Module, lr: float = 1e-2) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)


def test_resume_round_trip_model_optimizer_rng_extra(tmp_path: Path) -> None:
    model, _ = tiny(0)
    opt = _adamw(model)
    _train_steps(model, opt, 3)
    weights_at_save = _clone_state(model)
    opt_at_save = {
        i: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
        for i, s in opt.state_dict()["state"].items()
    }
    perm = torch.randperm(10)
    target = save_resume(
        tmp_path, step=3, model=model, optimizer=opt, tensors={"perm": perm}, meta={"epoch": 1}
    )
    assert target == tmp_path / "resume" / "step-00000003"
    expected_draw = torch.rand(4)  # the RNG stream right after the save
    _train_steps(model, opt, 1)
    weights_after_step = _clone_state(model)

    model2, _ = tiny(123)  # different init, different optimizer settings
    opt2 = _adamw(model2, lr=0.5)
    found = latest_resume(tmp_path)
    assert found == target
    step, extra, meta = load_resume(found, model=model2, optimizer=opt2)
    assert step == 3
    assert meta["epoch"] == 1 and meta["step"] == 3
    assert set(extra) == {"perm"} and torch.equal(extra["perm"], perm)
    assert torch.equal(torch.rand(4), expected_draw)
    for k, v in model2.state_dict().items():
        assert torch.equal(v, weights_at_save[k]), k
    restored = opt2.state_dict()
    assert restored["param_groups"][0]["lr"] == 1e-2
    assert restored["param_groups"][0]["weight_decay"] == 0.01
    assert set(restored["state"]) == set(opt_at_save)
    for i, values in opt_at_save.items():
        assert set(restored["state"][i]) == set(values)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(restored["state"][i][key], values[key]), (i, key)
    assert float(restored["state"][0]["step"]) == 3.0
    _train_steps(model2, opt2, 1)
    for k, v in model2.state_dict().items():
        torch.testing.assert_close(v, weights_after_step[k], rtol=0, atol=1e-7, msg=k)


def test_resume_dir_has_manifest_and_no_pickle(tmp_path: Path) -> None:
    model, _ = tiny()
    opt = _adamw(model)
    _train_steps(model, opt, 1)
    path = save_resume(tmp_path, step=1, model=model, optimizer=opt)
    verify_checkpoint(path)
    assert_no_pickles(path)


def test_resume_keep_prunes_older(tmp_path: Path) -> None:
    model, _ = tiny()
    opt = _adamw(model)
    for step in (1, 2, 3):
        save_resume(tmp_path, step=step, model=model, optimizer=opt, keep=2)
    names = sorted(p.name for p in (tmp_path / "resume").iterdir())
    assert names == ["step-00000002", "step-00000003"]
    assert latest_resume(tmp_path) == tmp_path / "resume" / "step-00000003"


def test_latest_resume_ignores_dirs_without_manifest(tmp_path: Path) -> None:
    assert latest_resume(tmp_path) is None
    model, _ = tiny()
    opt = _adamw(model)
    save_resume(tmp_path, step=5, model=model, optimizer=opt)
    incomplete = tmp_path / "resume" / "step-00000009"
    incomplete.mkdir()
    (incomplete / "model.safetensors").write_bytes(b"partial")
    assert latest_resume(tmp_path) == tmp_path / "resume" / "step-00000005"
    (tmp_path / "resume" / "step-00000005" / MANIFEST).unlink()
    assert latest_resume(tmp_path) is None


def test_load_resume_rejects_a_tampered_checkpoint(tmp_path: Path) -> None:
    model, _ = tiny()
    opt = _adamw(model)
    path = save_resume(tmp_path, step=1, model=model, optimizer=opt)
    state = json.loads((path / "state.json").read_text())
    state["step"] = 999
    (path / "state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError):
        load_resume(path, model=model, optimizer=opt)


def test_resume_with_tied_embeddings(tmp_path: Path) -> None:
    config = LlamaConfig(
        vocab_size=15,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=32,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    opt = _adamw(model)
    _train_steps(model, opt, 1)
    expected = _clone_state(model)
    path = save_resume(tmp_path, step=1, model=model, optimizer=opt)
    torch.manual_seed(1)
    model2 = LlamaForCausalLM(config)
    load_resume(path, model=model2, optimizer=_adamw(model2))
    for k, v in model2.state_dict().items():
        assert torch.equal(v, expected[k]), k
    assert model2.lm_head.weight.data_ptr() == model2.model.embed_tokens.weight.data_ptr()


def test_save_resume_refuses_to_keep_nothing(tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match="keep"):
        save_resume(tmp_path, step=1, model=model, optimizer=optimizer, keep=0)
    assert latest_resume(tmp_path) is None


@pytest.mark.parametrize("kind", ["file", "foreign_dir"])
def test_atomic_dir_never_replaces_what_it_did_not_write(kind: str, tmp_path: Path) -> None:
    target = tmp_path / "out"
    if kind == "file":
        target.write_text("precious")
    else:
        target.mkdir()
        (target / "notes.txt").write_text("precious")
    with pytest.raises(CheckpointError, match="refusing"), atomic_dir(target) as tmp:
        (tmp / MANIFEST).write_text("{}")
    kept = target if kind == "file" else target / "notes.txt"
    assert kept.read_text() == "precious"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp dir left behind


def test_a_non_finite_model_is_never_saved_and_a_manifest_has_no_nan(tmp_path: Path) -> None:
    from erpd.checkpoint import finite_json, save_model_checkpoint
    from erpd.errors import CheckpointError
    from erpd.models import build_char_tokenizer, build_tiny_model
    from erpd.tasks import ALPHABET

    tokenizer = build_char_tokenizer(ALPHABET)
    model = build_tiny_model(tokenizer, SHAPE)
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="not finite"):
        save_model_checkpoint(tmp_path / "ckpt", model, tokenizer, {})
    assert not (tmp_path / "ckpt").exists() and not list(tmp_path.iterdir())
    body = {"summary": {"kl": float("nan"), "acc": 0.5}, "steps": [1.0, float("inf")]}
    assert finite_json(body) == {"summary": {"kl": None, "acc": 0.5}, "steps": [1.0, None]}
