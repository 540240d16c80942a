"""The docs against the tree: the configuration table names every `ERPD_*` variable the code
reads, every link and file reference in the docs points at something in the repository, and
nothing cites background notes that live outside it."""

from __future__ import annotations

import re
import subprocess
from functools import cache
from pathlib import Path

from dashboard.settings import DashboardSettings
from server.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
# a whole variable name, not a prefix such as the dashboard settings' "ERPD_DASHBOARD_"
VARIABLE = re.compile(r"ERPD_[A-Z0-9_]*[A-Z0-9](?![A-Z0-9_])")

LINK = re.compile(r"!?\[[^\]]*\]\(([^()\s]+)\)")  # [text](target) and ![alt](target)
FENCE = re.compile(r"^(```|~~~).*?^\1\s*$", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`[^`\n]+`")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)
# a path inside the repository named in backticks, e.g. `erpd/metrics.py` or `tests/gpu/`
TOP_DIRS = "benchmarks|configs|dashboard|docs|erpd|erpd_hub|migrations|scripts|server|tests|worker"
PATH_SPAN = re.compile(rf"`((?:{TOP_DIRS})/[\w./-]*)`")
# a docs page named anywhere in a tracked file, with its anchor if one follows
DOCS_REFERENCE = re.compile(r"(?<![\w/.])docs/[\w/.-]*?\.md(?:#[\w-]+)?")

# Background notes kept outside the repository while it was built; the repository must stand on
# its own. Spelled in pieces so that this file does not match itself.
OUTSIDE = (
    "METHOD" + ".md",
    "DESIGN" + ".md",
    "STYLE" + ".md",
    "../" + "shared",
    "/work/" + "shared",
)
TEXT_SUFFIXES = {".py", ".md", ".yml", ".yaml", ".toml", ".ini", ".cfg", ".sh"}
TEXT_NAMES = {"Makefile", "Dockerfile", ".env.example"}


def read_by_code() -> set[str]:
    names = {f"ERPD_{field.upper()}" for field in Settings.model_fields}
    names |= {f"ERPD_DASHBOARD_{field.upper()}" for field in DashboardSettings.model_fields}
    for package in ("erpd", "erpd_hub", "server", "worker", "dashboard"):
        for path in (ROOT / package).rglob("*.py"):
            names |= set(VARIABLE.findall(path.read_text()))
    for name in ("docker-compose.yml", ".env.example", "Dockerfile"):
        names |= set(VARIABLE.findall((ROOT / name).read_text()))
    return names


def configuration_section() -> str:
    text = (ROOT / "docs" / "operations.md").read_text()
    start = text.index("\n## Configuration\n")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def test_the_configuration_table_names_every_setting_and_only_those() -> None:
    rows = [line for line in configuration_section().splitlines() if line.startswith("| `ERPD_")]
    documented = {name for row in rows for name in VARIABLE.findall(row.split("|")[1])}
    assert read_by_code() - documented == set()
    assert documented - read_by_code() == set()


# --- links and references ----------------------------------------------------------------------
def markdown_files() -> list[Path]:
    found = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    found += sorted(p for p in ROOT.glob("*/README.md") if p.parent.name in TOP_DIRS.split("|"))
    return found


def prose(text: str) -> str:
    """The text outside fenced code blocks (a `# comment` in a bash block is not a heading)."""
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped except - and _, spaces to -."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


@cache
def anchors(path: Path) -> frozenset[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading in HEADING.findall(prose(path.read_text())):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")  # GitHub numbers repeated headings
    return frozenset(out)


def broken(source: Path, target: str) -> str | None:
    """Why `target`, as written in `source`, does not resolve; None when it does."""
    path_part, _, anchor = target.partition("#")
    resolved = (source.parent / path_part).resolve() if path_part else source
    if not resolved.is_relative_to(ROOT):
        return "points outside the repository"
    if not resolved.exists():
        return "no such file"
    if anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
        return f"no heading for #{anchor} in {resolved.relative_to(ROOT)}"
    return None


def test_every_markdown_link_points_inside_the_repository() -> None:
    problems = []
    for source in markdown_files():
        for target in LINK.findall(prose(source.read_text())):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            why = broken(source, target)
            if why:
                problems.append(f"{source.relative_to(ROOT)}: ({target}) {why}")
    assert not problems, "\n".join(problems)


def test_every_path_named_in_the_docs_exists() -> None:
    problems = []
    for source in markdown_files():
        text = prose(source.read_text())
        for span in CODE_SPAN.findall(text):
            for path in PATH_SPAN.findall(span):
                if not (ROOT / path).exists():
                    problems.append(f"{source.relative_to(ROOT)}: `{path}` does not exist")
    assert not problems, "\n".join(problems)


@cache
def tracked_text_files() -> tuple[Path, ...]:
    try:
        listed = subprocess.run(
            ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.splitlines()
        paths = [ROOT / name for name in listed]
    except (OSError, subprocess.CalledProcessError):  # a copy without git: walk the tree
        skip = {".git", ".venv", ".erpd", "runs", "node_modules", ".mypy_cache", ".ruff_cache"}
        paths = [p for p in ROOT.rglob("*") if not skip.intersection(p.relative_to(ROOT).parts)]
    return tuple(
        p
        for p in paths
        if p.is_file()
        and (p.suffix in TEXT_SUFFIXES or p.name in TEXT_NAMES or p.parts[-2] == ".ci")
    )


def test_docs_pages_named_in_code_and_docs_exist() -> None:
    problems = []
    for path in tracked_text_files():
        for lineno, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for reference in DOCS_REFERENCE.findall(line):
                why = broken(ROOT / "README.md", reference)  # relative to the repository root
                if why:
                    problems.append(f"{path.relative_to(ROOT)}:{lineno}: {reference} {why}")
    assert not problems, "\n".join(problems)


def test_nothing_cites_notes_outside_the_repository() -> None:
    citations = []
    for path in tracked_text_files():
        for lineno, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            citations += [f"{path.relative_to(ROOT)}:{lineno}: {s}" for s in OUTSIDE if s in line]
    assert not citations, "\n".join(citations)


# --- the README's reproduction table ----------------------------------------------------------
def test_the_readme_reproduction_table_is_the_committed_results() -> None:
    from erpd.reproduce.summary import load, render

    results = load(ROOT / "docs" / "reproduction")
    assert results, "no committed reproduction results under docs/reproduction/<preset>/"
    readme = (ROOT / "README.md").read_text()
    # regenerate with: python -m erpd.reproduce.summary
    assert render(readme, results) == readme
    for preset, body in results.items():
        assert body["meta"]["preset"] == preset
        assert body["meta"]["commit"] and not body["meta"]["dirty"], preset
