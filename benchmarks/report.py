"""The one CSV and markdown writer of the benchmarks. ``write_result`` writes a result's CSV files and its markdown
report together, the report opening with the environment record (command line, date, machine, versions, git
commit: see ``environment``) and a line naming its CSV files, so that every results file says how it was made;
``markdown_table`` and ``fmt`` lay out the tables, and ``write_markdown`` appends the hand-written findings
(``OUT/NAME_findings.md``) to a report.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from environment import environment_lines


def write_csv(path: Path, rows: list[dict], fields: Sequence[str] | None = None) -> None:
    """Rows as CSV; the columns are ``fields`` or the union of the rows' keys in first-seen order."""
    if fields is None:
        fields = list(dict.fromkeys(key for row in rows for key in row))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(fields), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def fmt(value: Any, digits: int = 4) -> str:
    """A table cell: floats with ``digits`` significant digits, None as empty."""
    if value is None:
        return ""
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return str(value)
        return f"{value:.{digits}g}"
    return str(value)


def markdown_table(rows: Iterable[dict], columns: Sequence[tuple[str, str]], digits: int = 4) -> list[str]:
    """A markdown table of ``rows``; ``columns`` are ``(key, header)`` pairs. Cells go through :func:`fmt` (a
    string is written as it is, so a script that formats its own numbers passes them as strings)."""
    lines = ["| " + " | ".join(header for _, header in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(key), digits) for key, _ in columns) + " |")
    return lines


def write_markdown(out: Path, name: str, lines: list[str], smoke: bool) -> None:
    """``OUT/NAME.md`` from ``lines``, plus the hand-written ``OUT/NAME_findings.md`` (what the numbers show) as
    its last section when it exists (not in smoke runs, whose numbers it does not describe)."""
    findings = out / f"{name}_findings.md"
    if findings.exists() and not smoke:
        lines = [*lines, "## What this shows", "", findings.read_text().strip(), ""]
    (out / f"{name}.md").write_text("\n".join(lines))


def write_result(
    out: Path,
    name: str,
    title: str,
    env: dict[str, Any],
    body: Sequence[str],
    csvs: Mapping[str, list[dict]],
    columns: Mapping[str, Sequence[str]] | None = None,
    header: Sequence[str] = (),
    smoke: bool = False,
) -> None:
    """Write a result: ``OUT/<file>`` for every ``file -> rows`` of ``csvs`` (columns: ``columns[file]``, else
    the rows' keys) and ``OUT/NAME.md``, which is ``# TITLE``, the environment record ``env`` as a list (command
    first), the list items ``header`` (more about the run: its duration, load, wall time), ``- CSV: ...`` naming
    the CSV files, then ``body`` and the findings (:func:`write_markdown`)."""
    out.mkdir(parents=True, exist_ok=True)
    for file, rows in csvs.items():
        write_csv(out / file, rows, (columns or {}).get(file))
    record = [*environment_lines(env), *header]
    if csvs:
        record.append("- CSV: " + ", ".join(f"`{file}`" for file in csvs) + " (in this folder)")
    write_markdown(out, name, [f"# {title}", "", *record, "", *body], smoke)
