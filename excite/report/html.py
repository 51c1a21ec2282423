"""Self-contained HTML reports: one file with inline CSS and images embedded as base64 PNG data URIs.

The page needs no network, no JavaScript and no other file, so it can be mailed, archived or opened offline.
Its Content-Security-Policy allows nothing but inline styles and ``data:`` images, so a report that tried to
fetch anything would show it at once as a broken element rather than silently depend on it.

Build a page step by step::

    HtmlReport("SE-ResNet vs ResNet").add_heading("Runs").add_table(["run", "accuracy"], rows) \\
        .add_image(png_bytes, "validation curves").add_paragraph("SE adds 1.2 points.").write("report.html")

or from a list of :class:`Section` with :func:`report_html`. Every text is escaped with :func:`html.escape`.
"""
from __future__ import annotations

import base64
import html
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from excite import __version__
from excite.io import atomic_write_text

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# A cell that reads as a number (1.23 M, 93.3%, 12 s, -0.5): its column is right-aligned when all its cells do.
_NUMBER = re.compile(r"^[-+]?\d")

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; color: #1b1b1b;
       margin: 2rem auto; max-width: 1200px; padding: 0 1rem; line-height: 1.45; }
h1 { font-size: 1.7rem; margin-bottom: 0.3rem; }
h2 { font-size: 1.3rem; margin-top: 2rem; border-bottom: 1px solid #ddd; padding-bottom: 0.2rem; }
h3 { font-size: 1.05rem; margin-top: 1.2rem; }
table { border-collapse: collapse; margin: 0.8rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.3rem 0.6rem; text-align: left; vertical-align: top; }
th { background: #f0f3f7; }
tr:nth-child(even) td { background: #fafafa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.scroll { overflow-x: auto; }
.warning { border: 2px solid #c0392b; background: #fdecea; color: #7b1d12; padding: 0.6rem 0.9rem;
           margin: 0.8rem 0; border-radius: 4px; }
figure { margin: 0.8rem 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.85rem; color: #555; }
.grid { display: flex; flex-wrap: wrap; gap: 1rem; }
.grid figure { flex: 0 1 360px; margin: 0; }
footer { margin-top: 2.5rem; font-size: 0.8rem; color: #777; }
"""


def _text(value: Any) -> str:
    return html.escape("" if value is None else str(value))


class HtmlReport:
    """A page built by appending blocks; each ``add_*`` method returns the report, so calls chain.

    Text is escaped, never interpreted as HTML. :meth:`to_html` renders the page, :meth:`write` saves it.
    """

    def __init__(self, title: str):
        self.title = title
        self._blocks: list[str] = []

    def add_heading(self, text: str, level: int = 2) -> "HtmlReport":
        """A heading; level 2 for sections (the title is the page's only level 1), 3 below them."""
        if not 1 <= level <= 6:
            raise ValueError(f"a heading level is 1 to 6, got {level}")
        self._blocks.append(f"<h{level}>{_text(text)}</h{level}>")
        return self

    def add_paragraph(self, text: str) -> "HtmlReport":
        self._blocks.append(f"<p>{_text(text)}</p>")
        return self

    def add_warning(self, text: str) -> "HtmlReport":
        """A paragraph in a red box, for what a reader must not miss."""
        self._blocks.append(f'<div class="warning" role="alert"><strong>Warning:</strong> {_text(text)}</div>')
        return self

    def add_list(self, items: Sequence[str]) -> "HtmlReport":
        """A bulleted list (nothing when ``items`` is empty)."""
        if items:
            self._blocks.append("<ul>" + "".join(f"<li>{_text(item)}</li>" for item in items) + "</ul>")
        return self

    def add_table(self, columns: Sequence[str], rows: Sequence[Sequence[Any] | Mapping[str, Any]]) -> "HtmlReport":
        """A table of ``rows``, each a sequence in the order of ``columns`` or a mapping keyed by them (a missing
        key is an empty cell). Columns whose cells all read as numbers are right-aligned."""
        cells = [[row.get(c) for c in columns] if isinstance(row, Mapping) else list(row) for row in rows]
        for row in cells:
            if len(row) != len(columns):
                raise ValueError(f"a table row has {len(row)} cells for {len(columns)} columns: {row}")
        texts = [["" if cell is None else str(cell) for cell in row] for row in cells]
        numeric = [bool(texts) and all(not row[i] or _NUMBER.match(row[i]) for row in texts)
                   for i in range(len(columns))]
        head = "".join(f"<th>{_text(c)}</th>" for c in columns)
        body = "".join("<tr>" + "".join(f'<td class="num">{_text(t)}</td>' if numeric[i] else f"<td>{_text(t)}</td>"
                                        for i, t in enumerate(row)) + "</tr>" for row in texts)
        self._blocks.append(f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
                            "</div>")
        return self

    def add_image(self, png: bytes, alt: str, caption: str | None = None) -> "HtmlReport":
        """A PNG image embedded in the page, with ``alt`` text and an optional caption below it."""
        self._blocks.append(_figure(png, alt, caption))
        return self

    def add_images(self, images: Sequence[tuple[bytes, str]]) -> "HtmlReport":
        """PNG images side by side (wrapping to the page's width), each ``(png, caption)``; the caption is also
        the alt text."""
        if images:
            self._blocks.append('<div class="grid">' + "".join(_figure(png, text, text) for png, text in images)
                                + "</div>")
        return self

    def to_html(self) -> str:
        """The whole page as one string."""
        made = f"Made by excite {__version__} on {time.strftime('%Y-%m-%d %H:%M')}."
        return "\n".join([
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            # Nothing may load from elsewhere: the page is one file.
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
            "style-src 'unsafe-inline'\">",
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{_text(self.title)}</title>",
            f"<style>{_CSS}</style>",
            "</head>",
            "<body>",
            f"<h1>{_text(self.title)}</h1>",
            *self._blocks,
            f"<footer>{_text(made)}</footer>",
            "</body>",
            "</html>",
            "",
        ])

    def write(self, path: str | os.PathLike) -> Path:
        """Write the page to ``path`` (atomically) and return the path."""
        atomic_write_text(path, self.to_html())
        return Path(path)


def _figure(png: bytes, alt: str, caption: str | None) -> str:
    if not bytes(png[:8]) == PNG_SIGNATURE:
        raise ValueError(f"image {alt!r} is not a PNG (it starts {bytes(png[:8])!r})")
    src = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    text = f"<figcaption>{_text(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="{src}" alt="{_text(alt)}">{text}</figure>'


@dataclass
class Section:
    """One titled part of a report, rendered in this order: warnings, paragraphs, notes (as a bulleted list),
    the table (``columns`` and ``rows``, as for :meth:`HtmlReport.add_table`), then the images, each
    ``(png, caption)`` (several side by side when ``grid``)."""

    title: str
    paragraphs: Sequence[str] = ()
    warnings: Sequence[str] = ()
    notes: Sequence[str] = ()
    columns: Sequence[str] = ()
    rows: Sequence[Sequence[Any] | Mapping[str, Any]] = ()
    images: Sequence[tuple[bytes, str]] = ()
    grid: bool = False


def report_html(title: str, sections: Sequence[Section], warnings: Sequence[str] = (),
                path: str | os.PathLike | None = None) -> str:
    """The page of ``sections`` under ``title``, with ``warnings`` in red boxes at the top; written to ``path``
    when given. Returns the HTML."""
    report = HtmlReport(title)
    for warning in warnings:
        report.add_warning(warning)
    for section in sections:
        report.add_heading(section.title)
        for warning in section.warnings:
            report.add_warning(warning)
        for paragraph in section.paragraphs:
            report.add_paragraph(paragraph)
        report.add_list(section.notes)
        if section.columns:
            report.add_table(section.columns, section.rows)
        if section.grid:
            report.add_images(section.images)
        else:
            for png, caption in section.images:
                report.add_image(png, caption, caption)
    if path is not None:
        report.write(path)
    return report.to_html()
