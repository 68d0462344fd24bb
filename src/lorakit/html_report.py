"""Self-contained HTML reports (`lorakit compare`, `lorakit inspect`): plots drawn with matplotlib
(the `plots` extra) and embedded as PNG data, so a report is one file that opens offline."""

from __future__ import annotations

import base64
import html
import io
from typing import Any

from .errors import LorakitError


def pyplot(what: str) -> Any:
    """matplotlib's pyplot on a file-only backend, or a one-line error naming the extra."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise LorakitError(f"{what} needs matplotlib: pip install 'lorakit[plots]'") from None
    return plt


def png(figure: Any) -> str:
    """The figure as base64 PNG data (closed afterwards)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def table(head: list[str], rows: list[list[Any]]) -> str:
    cells = "\n".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{''.join(f'<th>{html.escape(h)}</th>' for h in head)}</tr></thead><tbody>\n{cells}\n</tbody></table>"


def page(title: str, intro: str, body_html: str, figures: list[tuple[str, str]]) -> str:
    """The whole document: title, an introduction (text), tables (HTML), figures (caption, PNG data)."""
    shown = "\n".join(f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'
                      f"<figcaption>{html.escape(alt)}</figcaption></figure>" for alt, data in figures)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:first-child,th:first-child{{text-align:left}}
figure{{margin:1.5em 0}}img{{max-width:100%}}</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{html.escape(intro)}</p>
{body_html}
{shown}
</body></html>
"""
