"""Small generic helpers for self-contained HTML reports: escaping, figures, tables, pages.

Every string that reaches the page through these helpers is HTML-escaped; strings put into
Plotly figures should be escaped with :func:`esc` too (Plotly decodes entities when it renders
text, so an escaped token shows literally and a raw ``<tag>`` never reaches its SVG).
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import plotly.graph_objects as go

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto;
       max-width: 1200px; color: #222; line-height: 1.4; padding: 0 16px; }
h1 { font-size: 1.5em; margin-bottom: 4px; } h2 { margin-top: 32px; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.9em; margin: 8px 0 16px; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
dl.meta { display: grid; grid-template-columns: max-content 1fr; gap: 2px 12px; font-size: 0.9em; }
dl.meta dt { font-weight: 600; } dl.meta dd { margin: 0; font-family: monospace; }
.note { background: #f7f9fc; border-left: 4px solid #8aa4d6; padding: 8px 12px; font-size: 0.92em; }
"""


def esc(value: Any) -> str:
    """``str(value)`` HTML-escaped (quotes included)."""
    return html.escape(str(value), quote=True)


def figure_div(fig: go.Figure, include_plotlyjs: bool) -> str:
    """A figure as an HTML ``<div>``; pass ``include_plotlyjs=True`` for the page's first figure
    only, which inlines the plotly.js bundle (no network needed to read the page)."""
    return fig.to_html(full_html=False, include_plotlyjs=include_plotlyjs,
                       config={"displaylogo": False, "responsive": True})


def figure_divs(figs: Iterable[go.Figure]) -> list[str]:
    """Figures as ``<div>``s, the plotly.js bundle inlined in the first one only."""
    return [figure_div(fig, include_plotlyjs=i == 0) for i, fig in enumerate(figs)]


@dataclass(frozen=True)
class Link:
    """A table cell showing ``text`` as a link to ``href`` (both escaped)."""

    text: str
    href: str


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """An escaped HTML table; float cells are right-aligned with 3 decimals (NaN shows as —),
    :class:`Link` cells are links."""
    def cell(v: Any) -> str:
        if isinstance(v, Link):
            return f'<td><a href="{esc(v.href)}">{esc(v.text)}</a></td>'
        if isinstance(v, float):
            return f'<td class="num">{"—" if v != v else f"{v:.3f}"}</td>'
        return f"<td>{esc(v)}</td>"

    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join(f"<tr>{''.join(cell(v) for v in row)}</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def meta_list(items: Iterable[tuple[str, Any]]) -> str:
    """An escaped definition list of (key, value) pairs."""
    return '<dl class="meta">' + "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in items) + "</dl>"


def write_page(path: str | Path, title: str, body: Iterable[str]) -> Path:
    """Write a complete UTF-8 HTML page: escaped ``title``, ``body`` parts as given (already HTML)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            '<link rel="icon" href="data:,">'  # no favicon request: the page needs nothing from a server
            f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")
    path.write_text(page, encoding="utf-8")
    return path
