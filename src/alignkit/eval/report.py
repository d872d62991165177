"""Reports people look at: an HTML page (tables, example answers, embedded PNGs) next to the JSON numbers."""

from __future__ import annotations

import base64
import html
import os
from pathlib import Path


def write_html_report(path: str | Path, title: str, tables: dict[str, list[list[str]]], images: list[str | Path] = (),
                      examples: list[dict[str, str]] = (), blocks: dict[str, str] | None = None) -> Path:
    """tables: caption -> rows (first row is the header). examples: dicts of column -> text. blocks: caption ->
    HTML already rendered and escaped by its maker (e.g. eval/token_shift's coloured answers)."""
    parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;"
             "margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;text-align:left;vertical-align:top;"
             "white-space:pre-wrap}"
             "th{background:#f3f3f3}img{max-width:100%}</style>", f"<h1>{html.escape(title)}</h1>"]
    for caption, rows in tables.items():
        parts.append(f"<h2>{html.escape(caption)}</h2><table>")
        for i, row in enumerate(rows):
            cell = "th" if i == 0 else "td"
            parts.append("<tr>" + "".join(f"<{cell}>{html.escape(str(c))}</{cell}>" for c in row) + "</tr>")
        parts.append("</table>")
    for image in images:
        data = base64.b64encode(Path(image).read_bytes()).decode()
        parts.append(f"<p><img alt='{html.escape(Path(image).name)}' src='data:image/png;base64,{data}'></p>")
    if examples:
        columns = list(examples[0])
        parts.append("<h2>Examples</h2><table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in columns) + "</tr>")
        for example in examples:
            parts.append("<tr>" + "".join(f"<td>{html.escape(str(example[c]))}</td>" for c in columns) + "</tr>")
        parts.append("</table>")
    for caption, block in (blocks or {}).items():
        parts.append(f"<h2>{html.escape(caption)}</h2>{block}")
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(parts), encoding="utf-8")
    os.replace(tmp, path)
    return path


def rich_table(title: str, rows: list[list[str]]):
    """rows (the first is the header) as a rich Table, for the terminal next to the HTML report."""
    from rich.table import Table

    table = Table(title=title)
    for column in rows[0]:
        table.add_column(column)
    for row in rows[1:]:
        table.add_row(*row)
    return table
