"""Keep the server's file system out of what users read.

A run's failure reason, shown to API users, is often an exception's text, and exceptions name
files: the operator's data directory, a registered model's directory, a library's site-packages.
`scrub` rewrites every absolute path: the known roots to their variable names (`$ERPD_HOME`),
any other one to its last component, so "config.json" still tells the user
which file was wrong without telling anyone where the server keeps it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

# an absolute POSIX path of at least two components: /a/b, /a/b.json, '/a b' is two tokens
_PATH = re.compile(r"(?<![\w.$~:/])/(?:[\w.@+-]+/)+[\w.@+-]*")


def scrub(text: str, roots: Mapping[str, Path] | None = None) -> str:
    """`text` with every absolute path replaced: under a root by `$NAME/rest`, else `…/last`."""
    named = sorted((roots or {}).items(), key=lambda item: -len(str(item[1])))
    for name, root in named:
        text = text.replace(str(root).rstrip("/"), f"${name}")

    def shorten(match: re.Match[str]) -> str:
        last = match.group(0).rstrip("/").rsplit("/", 1)[-1]
        return f"…/{last}" if last else "…"

    return _PATH.sub(shorten, text)
