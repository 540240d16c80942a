"""What made a results file: the code's git commit and state, the machine, the erpd version.

A reproduction written into the repository's docs/ is what gets committed and cited, so it is
refused (one line, exit 2) unless the code is at a known commit with a clean tree: otherwise
nobody can tell which code produced the numbers. Outside docs/ anything goes, and the state is
recorded either way.

"Clean" is `git status --porcelain` with untracked files listed one by one, ignoring every path
under the output directory itself: a reproduction writes there (reproduce.json, results.json,
report.md, the figures), and an earlier invocation that is being resumed has already rewritten
the committed copies. Files ignored by .gitignore (runs/, .venv/) never show.
"""

from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import erpd
from erpd.errors import ConfigError

GIT_TIMEOUT_S = 30


@dataclass
class GitState:
    root: str | None  # the work tree's top directory; None outside git
    commit: str | None  # the full hash of HEAD; None outside git or before a first commit
    dirty: bool | None  # uncommitted changes outside the output dir; None when unknown
    changes: list[str] = field(default_factory=list)  # the first few changed paths

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def source_root() -> Path:
    """The directory holding the erpd package (a git checkout when developing erpd)."""
    return Path(erpd.__file__).resolve().parent.parent


def _git(cwd: Path, *args: str) -> str | None:
    try:
        proc = subprocess.run(
            ["git", "-C", str(cwd), *args],
            capture_output=True,
            text=True,
            timeout=GIT_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


def _under(path: str, folder: str) -> bool:
    return folder == "" or path == folder or path.startswith(folder.rstrip("/") + "/")


def git_state(repo: Path, ignore: Path | None = None) -> GitState:
    """HEAD and whether the tree has changes, leaving out paths under `ignore`."""
    top = _git(repo, "rev-parse", "--show-toplevel")
    if top is None:
        return GitState(None, None, None)
    root = Path(top.strip()).resolve()
    head = _git(root, "rev-parse", "--verify", "--quiet", "HEAD^{commit}")
    commit = head.strip() if head else None
    status = _git(root, "status", "--porcelain=v1", "-z", "--untracked-files=all")
    if status is None:
        return GitState(str(root), commit, None)
    skip = None
    if ignore is not None:
        try:
            skip = ignore.resolve().relative_to(root).as_posix()
        except ValueError:
            skip = None  # the output dir is outside this work tree
    skip = None if skip == "." else skip
    changes: list[str] = []
    entries = iter(status.split("\0"))
    for entry in entries:
        if len(entry) < 4:
            continue
        code, path = entry[:2], entry[3:]
        paths = [path]
        if "R" in code or "C" in code:
            paths.append(next(entries, ""))  # a rename names its source next
        if skip is not None and all(_under(p, skip) for p in paths if p):
            continue
        changes.append(path)
    return GitState(str(root), commit, bool(changes), changes[:10])


def in_docs(out: Path, repo: Path) -> bool:
    """Whether out is inside the repository's docs/ (the committed location)."""
    top = _git(repo, "rev-parse", "--show-toplevel")
    root = Path(top.strip()).resolve() if top else repo.resolve()
    try:
        out.resolve().relative_to(root / "docs")
    except ValueError:
        return False
    return True


def check_publishable(out: Path, repo: Path, earlier: list[dict[str, Any]] | None = None) -> None:
    """Refuse, in one line, to write a reproduction into docs/ from code nobody can name.

    `earlier` are OUT's previous invocations: their runs are reused, so they must come from
    the same commit too.
    """
    if not in_docs(out, repo):
        return
    state = git_state(repo, ignore=out)
    where = f"{out} is in the repository's docs/, where results are committed"
    if state.commit is None:
        reason = "the code has no known git commit (not a git checkout, or no commit yet)"
        raise ConfigError("--out", f"{where}: refused, {reason}; commit first or write elsewhere")
    if state.dirty is not False:
        example = ", ".join(state.changes[:3]) or "git status failed"
        reason = f"the tree has uncommitted changes ({example})"
        raise ConfigError("--out", f"{where}: refused, {reason}; commit them or write elsewhere")
    others = sorted(
        {str(e.get("commit")) for e in earlier or [] if e.get("commit") != state.commit}
    )
    if others:
        reason = (
            f"it holds runs made at another commit ({', '.join(others)}; this is {state.commit})"
        )
        raise ConfigError("--out", f"{where}: refused, {reason}; start from an empty directory")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> set[str] | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def machine(device: str) -> dict[str, Any]:
    """The machine the numbers come from: CPU, cores, torch and its threads, bf16 support."""
    import torch

    flags = _cpu_flags()
    affinity = getattr(os, "sched_getaffinity", None)
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(affinity(0)) if affinity else os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        # native bf16 arithmetic on the CPU (AVX512-BF16 or AMX); None where flags are unknown
        "cpu_bf16": None if flags is None else bool(flags & {"avx512_bf16", "amx_bf16"}),
        "device": device,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_bf16"] = torch.cuda.is_bf16_supported()
    return info


def describe_machine(info: dict[str, Any] | str) -> str:
    """One line for the report (results written before provenance kept a string)."""
    if isinstance(info, str):
        return info
    bf16 = {True: "native bf16", False: "no native bf16", None: "bf16 unknown"}[
        info.get("cpu_bf16")
    ]
    line = (
        f"{info['cpu']} ({info['cores']} cores, {info.get('cores_usable', '?')} usable, "
        f"{bf16}), torch {info['torch']} with {info['torch_threads']} threads, device "
        f"{info['device']}"
    )
    if "gpu" in info:
        line += f" ({info['gpu']}, bf16 {'yes' if info.get('gpu_bf16') else 'no'})"
    return line


def provenance(repo: Path, out: Path, device: str) -> dict[str, Any]:
    """What results.json records about the code and the machine."""
    state = git_state(repo, ignore=out)
    return {
        "commit": state.commit,
        "dirty": state.dirty,
        "changes": state.changes,
        "erpd_version": erpd.__version__,
        "machine": machine(device),
    }
