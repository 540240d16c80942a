"""README command one and the newcomer's walk-through, run on a fresh copy of the repository.

The copy holds what `git clone` would (tracked files, and new ones git does not ignore). Its
`.venv` is a link to this test run's virtual environment: `make` finds it installed (the copy's
pyproject.toml is dated before the venv's install marker), so nothing is reinstalled, and
PYTHONPATH puts the copy's own code first. Ports come from ERPD_PORT and ERPD_DASHBOARD_PORT, which
the README's commands honour.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from tests.integration.conftest import free_port
from tests.integration.test_worker import WorkerLog

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(sys.executable).parents[1]
MARK = re.compile(r"^<!-- walkthrough(?:: (?P<mode>background))? -->$")
pytestmark = pytest.mark.skipif(
    shutil.which("make") is None or not (VENV / ".installed").exists(),
    reason="needs make and the project's .venv (make .venv/.installed-dev)",
)


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("fresh") / "erpd-hub"
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout
    for name in filter(None, listed.decode().split("\0")):
        source = ROOT / name
        if source.is_file():  # a tracked file deleted in the working tree is not copied
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    (dest / ".venv").symlink_to(VENV)
    installed = (VENV / ".installed").stat().st_mtime
    os.utime(dest / "pyproject.toml", (installed - 60, installed - 60))
    return dest


def clone_env(clone: Path) -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("ERPD_", "MAKE"))}
    return keep | {
        "PYTHONPATH": str(clone),
        "ERPD_PORT": str(free_port()),
        "ERPD_DASHBOARD_PORT": str(free_port()),
    }


def start_in(
    clone: Path, argv: list[str], env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """A command in the clone, leading a process group of its own (as a terminal would run
    it), its output and errors merged on one pipe."""
    return subprocess.Popen(
        argv,
        cwd=clone,
        env=env or clone_env(clone),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def group_is_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def readme_blocks(clone: Path) -> tuple[str, list[str]]:
    """The README's code blocks marked for the walk-through: the one that keeps running (the
    stack), and the ones run after it, in order."""
    lines = (clone / "README.md").read_text().splitlines()
    background, foreground = None, []
    for i, line in enumerate(lines):
        mark = MARK.match(line.strip())
        if mark is None:
            continue
        assert lines[i + 1].startswith("```bash"), f"README line {i + 2}: a bash block must follow"
        end = lines.index("```", i + 2)
        block = "\n".join(lines[i + 2 : end])
        if mark["mode"] == "background":
            background = block
        else:
            foreground.append(block)
    assert background is not None and foreground, "the README lost its walk-through marks"
    return background, foreground


def stop_group(process: subprocess.Popen[str]) -> None:
    """Ctrl-C to the whole group, then SIGKILL if it has not ended within two minutes."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGINT)
    try:
        process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def left_behind(clone: Path) -> list[str]:
    """Processes still running with the clone's data dir in their environment."""
    marker = f"ERPD_HOME={clone / '.erpd'}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                if marker in (proc / "environ").read_bytes().split(b"\0"):
                    found.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode())
    return found


@pytest.mark.timeout(1200)
def test_make_demo_in_ci_mode_runs_the_pipeline_and_downloads_a_student(clone: Path) -> None:
    make = start_in(clone, ["make", "demo", "DEMO_ARGS=--no-wait"])
    try:
        output, _ = make.communicate(timeout=1000)
    finally:
        if make.poll() is None:
            stop_group(make)
    assert make.returncode == 0, output[-4000:]
    assert "pip install" not in output  # the venv was found installed
    for line in ("[sample] succeeded", "[teacher sapo] succeeded", "[student] succeeded"):
        assert line in output, output[-4000:]
    assert re.search(r"^base +0\.\d+", output, re.M) and "of that teacher's KL" in output
    [student] = (clone / "runs" / "demo").iterdir()
    assert AutoModelForCausalLM.from_pretrained(student).num_parameters() > 0
    assert (clone / ".erpd" / "erpd.db").is_file()  # the default data dir, in the clone
    assert (clone / ".erpd" / "logs" / "worker.log").is_file()
    assert group_is_gone(make.pid)
    assert left_behind(clone) == []  # API, worker (and its Celery), reaper, dashboard


@pytest.mark.timeout(1200)
def test_the_readme_walk_through_works_verbatim(clone: Path) -> None:
    background, foreground = readme_blocks(clone)
    env = clone_env(clone)
    stack = start_in(clone, ["bash", "-euo", "pipefail", "-c", background], env)
    log = WorkerLog(stack, stdout=True)
    try:
        log.wait_for("The stack keeps running", timeout=600)
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", "\n".join(foreground)],
            cwd=clone,
            env=env,
            capture_output=True,
            text=True,
            timeout=400,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "status succeeded" in done.stdout  # `logs --follow` saw the student end
        [student] = (clone / "runs" / "models").iterdir()
        assert AutoModelForCausalLM.from_pretrained(student).num_parameters() > 0
    finally:
        stop_group(stack)  # Ctrl-C in the terminal
    log.wait_for("erpd-hub: stopped", timeout=30)
    # make itself dies of the SIGINT once its command has exited (as in a terminal)
    assert stack.returncode in (0, -signal.SIGINT), stack.returncode
    assert not any("Traceback" in line for line in log.lines)
    for child in (clone / ".erpd" / "logs").iterdir():  # API, worker, reaper, dashboard
        assert "Traceback" not in child.read_text(), child.name
    assert group_is_gone(stack.pid) and left_behind(clone) == []
