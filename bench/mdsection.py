"""docs/benchmarks.md is shared: each runner owns one ``## <section>`` and rewrites only that.

``write_section(path, section, body)`` replaces (or appends) the section; the other sections, and any
hand-written notes of this section below ``NOTES_MARK``, stay as they are.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys

NOTES_MARK = "<!-- notes below are written by hand and kept when the runner rewrites the table -->"
HEADER = "# kvfs benchmarks\n\nEach section is written by its own runner; see its command line.\n"


def write_section(path: str, section: str, body: str) -> None:
    """``body`` starts with the ``## <section>`` heading line."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        text = HEADER
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.strip() == f"## {section}"), None)
    if start is None:
        new = text.rstrip("\n") + "\n\n" + body
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        mark = next((i for i in range(start, end) if lines[i].strip() == NOTES_MARK), None)
        if mark is not None:
            body = body.rstrip("\n") + "\n\n" + "".join(lines[mark:end]).rstrip("\n") + "\n"
        new = "".join(lines[:start]) + body + ("\n" + "".join(lines[end:]) if end < len(lines) else "")
    with open(path, "w") as f:
        f.write(new)


def command_line(script: str, argv: list[str] | None) -> str:
    """How to rerun a runner: ``python bench/<script> <its arguments>`` (``argv`` None: this process's)."""
    args = sys.argv[1:] if argv is None else argv
    return " ".join(["python", f"bench/{script}", *(shlex.quote(a) for a in args)])


def run_facts() -> str:
    """Date, host and CPU count, for a section's command line."""
    return f"{datetime.date.today()}, {platform.node()}, {os.cpu_count()} CPUs"
