"""Provenance of a reproduction: the commit, the tree's state, the machine, and the refusal to
write into the repository's docs/ from code nobody can name (throwaway git repos in tmp_path)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from erpd.errors import ConfigError
from erpd.reproduce import ReproduceConfig, preset, run_reproduce
from erpd.reproduce.provenance import (
    check_publishable,
    describe_machine,
    git_state,
    in_docs,
    machine,
    provenance,
)


def git(repo: Path, *args: str) -> str:
    proc = subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
        capture_output=True,
        text=True,
        check=True,
    )
    return proc.stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A repository with docs/ and one file, nothing committed yet."""
    root = tmp_path / "repo"
    (root / "docs").mkdir(parents=True)
    (root / "docs" / "method.md").write_text("# method\n")
    (root / "code.py").write_text("x = 1\n")
    git(root, "init", "-q")
    return root


def commit_all(repo: Path) -> str:
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "c")
    return git(repo, "rev-parse", "HEAD")


def test_no_commit_is_refused_for_docs(repo: Path) -> None:
    out = repo / "docs" / "reproduction"
    with pytest.raises(ConfigError, match="no known git commit") as err:
        check_publishable(out, repo)
    assert str(err.value).startswith("--out: ") and "\n" not in str(err.value)
    assert git_state(repo).commit is None


def test_a_directory_outside_git_is_refused_for_its_docs(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    with pytest.raises(ConfigError, match="no known git commit"):
        check_publishable(tmp_path / "docs" / "r", tmp_path)
    assert git_state(tmp_path).commit is None and git_state(tmp_path).dirty is None


def test_a_clean_tree_is_accepted_and_its_full_commit_recorded(repo: Path) -> None:
    head = commit_all(repo)
    out = repo / "docs" / "reproduction"
    check_publishable(out, repo)  # clean: no error
    state = git_state(repo, ignore=out)
    assert state.commit == head and re.fullmatch(r"[0-9a-f]{40}", head)
    assert state.dirty is False and state.changes == []
    # what the reproduction itself writes, and rewrites, under OUT does not make it dirty
    out.mkdir()
    (out / "reproduce.json").write_text("{}")
    (out / "results.json").write_text("{}")
    check_publishable(out, repo)
    commit_all(repo)
    (out / "results.json").write_text('{"new": 1}')  # a committed result being regenerated
    check_publishable(out, repo)


@pytest.mark.parametrize("change", ["modified", "untracked", "staged", "deleted"])
def test_a_dirty_tree_is_refused_for_docs(repo: Path, change: str) -> None:
    commit_all(repo)
    if change == "modified":
        (repo / "code.py").write_text("x = 2\n")
    elif change == "untracked":
        (repo / "notes.py").write_text("")
    elif change == "staged":
        (repo / "new.py").write_text("")
        git(repo, "add", "new.py")
    else:
        (repo / "code.py").unlink()
    out = repo / "docs" / "reproduction"
    with pytest.raises(ConfigError, match="uncommitted changes") as err:
        check_publishable(out, repo)
    assert "\n" not in str(err.value)
    assert git_state(repo, ignore=out).dirty is True
    # outside docs/ the same tree may write, and its state is recorded
    check_publishable(repo / "runs" / "reproduce", repo)
    assert provenance(repo, repo / "runs", "cpu")["dirty"] is True


def test_other_docs_files_are_not_under_the_output_dir(repo: Path) -> None:
    commit_all(repo)
    (repo / "docs" / "method.md").write_text("# edited\n")
    with pytest.raises(ConfigError, match=r"docs/method\.md"):
        check_publishable(repo / "docs" / "reproduction", repo)


def test_runs_from_another_commit_are_refused_for_docs(repo: Path) -> None:
    first = commit_all(repo)
    (repo / "code.py").write_text("x = 3\n")
    second = commit_all(repo)
    out = repo / "docs" / "reproduction"
    check_publishable(out, repo, [{"commit": second}])
    with pytest.raises(ConfigError, match=f"another commit \\({first}"):
        check_publishable(out, repo, [{"commit": first}, {"commit": second}])
    with pytest.raises(ConfigError, match="another commit"):
        check_publishable(out, repo, [{"wall_time_s": 1.0}])  # written before commits were


def test_in_docs(repo: Path) -> None:
    assert in_docs(repo / "docs", repo) and in_docs(repo / "docs" / "a" / "b", repo)
    assert not in_docs(repo / "docsx", repo) and not in_docs(repo / "runs", repo)


def test_run_reproduce_refuses_docs_before_writing_anything(repo: Path) -> None:
    """Through the command's entry point: one ConfigError, and OUT is never created."""
    cfg = ReproduceConfig.model_validate(preset("quick") | {"runtime": {"device": "cpu"}})
    out = repo / "docs" / "reproduction"
    with pytest.raises(ConfigError, match="no known git commit"):
        run_reproduce(cfg, out, repo=repo)
    assert not out.exists()
    commit_all(repo)
    (repo / "code.py").write_text("dirty\n")
    with pytest.raises(ConfigError, match="uncommitted changes"):
        run_reproduce(cfg, out, repo=repo)
    assert not out.exists()


def test_machine_names_what_the_numbers_depend_on() -> None:
    import torch

    info = machine("cpu")
    assert info["cores"] >= 1 and info["torch"] == torch.__version__
    assert info["torch_threads"] == torch.get_num_threads()
    assert info["cpu_bf16"] in (True, False, None) and info["cpu"]
    line = describe_machine(info)
    assert f"torch {torch.__version__}" in line and "threads" in line and "bf16" in line
    assert describe_machine("an old string") == "an old string"
