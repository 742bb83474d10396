"""Writes a benchmark's table into its own section of bench/RESULTS.md (regenerated, never hand-edited)."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def record(key: str, text: str, path: Path = RESULTS) -> None:
    """Replace the section ``key`` (between BEGIN/END markers) of RESULTS.md with ``text``, or append it."""
    begin, end = f"<!-- BEGIN {key} -->", f"<!-- END {key} -->"
    body = path.read_text() if path.exists() else "# Benchmark results\n"
    block = f"{begin}\n{text.rstrip()}\n{end}"
    if begin in body:
        head, rest = body.split(begin, 1)
        body = head + block + rest.split(end, 1)[1]
    else:
        body = body.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(body)
