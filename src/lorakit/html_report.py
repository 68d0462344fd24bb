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


LINE_STYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def line_style(index: int, points: int) -> dict[str, Any]:
    """The `plot` keywords of the index-th line of a plot: a dash pattern and a marker of its own, the
    markers of different lines at different steps, so that a line drawn over another stays visible."""
    every = max(1, points // 8)
    return {
        "linestyle": LINE_STYLES[index % len(LINE_STYLES)],
        "marker": MARKERS[index % len(MARKERS)],
        "markevery": (index * every // 3 % every, every),
        "markersize": 5,
    }


# where a label may go around its point (offset in points, alignment), nearest first
_AROUND = [
    (6, 4, "left", "bottom"),
    (6, -4, "left", "top"),
    (-6, 4, "right", "bottom"),
    (-6, -4, "right", "top"),
    (8, 0, "left", "center"),
    (-8, 0, "right", "center"),
    (0, 8, "center", "bottom"),
    (0, -8, "center", "top"),
]


def place_labels(ax: Any, xs: list[float], ys: list[float], labels: list[str], fontsize: float = 9) -> None:
    """Label each point (xs[i], ys[i]) with labels[i] where the label overprints no other label or point
    and stays inside the axes: the nearest free place around the point, farther out (with a leader line)
    when the near ones are taken. Labels are placed left to right along x."""
    figure = ax.figure
    renderer = figure.canvas.get_renderer()
    ax.margins(x=0.15, y=0.2)
    ax.autoscale_view()
    frame = ax.get_window_extent(renderer)
    at = ax.transData.transform(list(zip(xs, ys)))
    taken: list[Any] = []

    def clash(box: Any, own: int) -> float:
        score = 0.0
        for other in taken:
            score += max(0.0, min(box.x1, other.x1) - max(box.x0, other.x0)) * max(
                0.0, min(box.y1, other.y1) - max(box.y0, other.y0)
            )
        for j, (x, y) in enumerate(at):
            if j != own and box.x0 - 4 < x < box.x1 + 4 and box.y0 - 4 < y < box.y1 + 4:
                score += 100.0
        outside = (
            max(0.0, frame.x0 - box.x0)
            + max(0.0, box.x1 - frame.x1)
            + max(0.0, frame.y0 - box.y0)
            + max(0.0, box.y1 - frame.y1)
        )
        return score + 1000.0 * outside

    for i in sorted(range(len(labels)), key=lambda k: (at[k][0], at[k][1])):
        best = None
        for distance in (1, 2, 3.5, 5):
            for dx, dy, ha, va in _AROUND:
                arrow = {"arrowstyle": "-", "color": "0.5", "linewidth": 0.6} if distance > 1 else None
                text = ax.annotate(
                    labels[i],
                    (xs[i], ys[i]),
                    textcoords="offset points",
                    xytext=(dx * distance, dy * distance),
                    ha=ha,
                    va=va,
                    fontsize=fontsize,
                    arrowprops=arrow,
                )
                box = text.get_window_extent(renderer)
                score = clash(box, i)
                if best is None or score < best[0]:
                    if best is not None:
                        best[1].remove()
                    best = (score, text, box)
                else:
                    text.remove()
                if score == 0:
                    break
            if best[0] == 0:
                break
        taken.append(best[2])


def parameter_axis(ax: Any, counts: list[float]) -> None:
    """The x axis of parameter counts: log scale where they span ten times or more, ticks at 1, 2 and 5
    of each power of ten and labelled 30k, 1M (the minor ticks unlabelled: theirs overprinted)."""
    from matplotlib.ticker import EngFormatter, LogLocator, NullFormatter

    positive = [c for c in counts if c > 0]
    if positive and max(positive) >= 10 * min(positive):
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))


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
    """The whole document: title, an introduction (text), the figures (caption, PNG data), then the
    tables (HTML): the pictures are what a reader looks at first, the tables hold every number."""
    shown = "\n".join(
        f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{html.escape(alt)}</figcaption></figure>"
        for alt, data in figures
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:first-child,th:first-child{{text-align:left}}
figure{{margin:1.5em 0}}img{{max-width:100%}}</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{html.escape(intro)}</p>
{shown}
{body_html}
</body></html>
"""
