"""Write the validation report: ``report.md``, ``report.html`` and ``report.json``.

The report is a list of blocks (headings, paragraphs, tables, images) rendered twice: as
Markdown (readable as plain text and on any Git forge) and as a standalone HTML page for a
browser. Written by hand rather than with a template engine: the blocks are few, and every
value is escaped here.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from training.validate.stats import clean


@dataclass
class Table:
    """A table block: header and rows of cells (already formatted)."""

    header: Sequence[str]
    rows: list[Sequence[str]] = field(default_factory=list)


@dataclass
class Image:
    """An image block (a PNG beside the report)."""

    path: str
    alt: str


Block = tuple[str, Any]
"""("h1" | "h2" | "p" | "table" | "image", content)."""


def pct(value: float | None) -> str:
    """Format a rate as a percentage with one decimal (``-`` for none)."""
    if value is None or math.isnan(value):
        return "-"
    return f"{100.0 * value:.1f} %"


def num(value: float | None, digits: int = 3) -> str:
    """Format a number with ``digits`` decimals (``-`` for none)."""
    if value is None or math.isnan(value):
        return "-"
    return f"{value:.{digits}f}"


def interval(low: float | None, high: float | None, *, as_pct: bool = True) -> str:
    """``low-high`` formatted like the value it bounds."""
    fmt = pct if as_pct else num
    return f"{fmt(low)} - {fmt(high)}"


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def to_markdown(title: str, blocks: Sequence[Block]) -> str:
    """Render the blocks as Markdown."""
    lines = [f"# {title}", ""]
    for kind, content in blocks:
        if kind == "h2":
            lines += [f"## {content}", ""]
        elif kind == "p":
            lines += [str(content), ""]
        elif kind == "table":
            lines.append("| " + " | ".join(_md_cell(h) for h in content.header) + " |")
            lines.append("|" + "---|" * len(content.header))
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in content.rows]
            lines.append("")
        elif kind == "image":
            lines += [f"![{content.alt}]({content.path})", ""]
    return "\n".join(lines)


_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 70em; margin: 2em auto; padding: 0 1em;
       color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.6em; text-align: left; }
th { background: #eee; }
img { max-width: 100%; border: 1px solid #ddd; margin: 0.5em 0; }
p.note { color: #555; }
"""


def to_html(title: str, blocks: Sequence[Block]) -> str:
    """Render the blocks as a standalone HTML page (images by relative path)."""
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
    ]
    for kind, content in blocks:
        if kind == "h2":
            parts.append(f"<h2>{esc(str(content))}</h2>")
        elif kind == "p":
            parts.append(f"<p>{esc(str(content))}</p>")
        elif kind == "table":
            head = "".join(f"<th>{esc(str(h))}</th>" for h in content.header)
            body = "".join(
                "<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in row) + "</tr>"
                for row in content.rows
            )
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif kind == "image":
            parts.append(f'<img src="{esc(content.path)}" alt="{esc(content.alt)}">')
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(folder: Path, title: str, blocks: Sequence[Block], data: dict[str, Any]
                 ) -> list[Path]:
    """Write ``report.md``, ``report.html`` and ``report.json`` into ``folder``.

    Returns
    -------
    list of Path
        The written files.
    """
    paths = [folder / "report.md", folder / "report.html", folder / "report.json"]
    paths[0].write_text(to_markdown(title, blocks), encoding="utf-8")
    paths[1].write_text(to_html(title, blocks), encoding="utf-8")
    paths[2].write_text(json.dumps(clean(data), indent=2) + "\n", encoding="utf-8")
    return paths
