"""The operations guide's configuration table against the code: every `ERPD_*` variable the
code reads is documented, and no row documents one that no longer exists."""

from __future__ import annotations

import re
from pathlib import Path

from dashboard.settings import DashboardSettings
from server.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
# a whole variable name, not a prefix such as the dashboard settings' "ERPD_DASHBOARD_"
VARIABLE = re.compile(r"ERPD_[A-Z0-9_]*[A-Z0-9](?![A-Z0-9_])")


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
