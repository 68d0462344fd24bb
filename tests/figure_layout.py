"""What a reader of a plot trips on, measured in matplotlib before the figure is saved: texts that
overprint each other or a data point, annotations that run out of their axes, and lines drawn
exactly over one another in the same style (the lower one looks missing).

    problems = layout_problems(figure)   # [] for a readable figure
"""

from __future__ import annotations

import itertools

import numpy as np


def _texts(figure):
    """(text, its box in pixels) of every text the figure draws: titles, axis and tick labels (of the
    ticks within the view), annotations, legend entries."""
    renderer = figure.canvas.get_renderer()
    texts = list(figure.texts)
    for ax in figure.axes:
        texts += [ax.title, ax._left_title, ax._right_title, ax.xaxis.label, ax.yaxis.label, *ax.texts]
        for axis in (ax.xaxis, ax.yaxis):
            for tick in axis._update_ticks():  # the ticks drawn (those within the view)
                texts += [
                    label
                    for label, on in (
                        (tick.label1, tick.label1.get_visible()),
                        (tick.label2, tick.label2.get_visible()),
                    )
                    if on
                ]
        legend = ax.get_legend()
        if legend is not None:
            texts += [legend.get_title(), *legend.get_texts()]
    found = []
    for text in texts:
        if text.get_visible() and text.get_text().strip():
            box = text.get_window_extent(renderer)
            if box.width > 0 and box.height > 0:
                found.append((text, box))
    return found


def _overlap(a, b, slack: float = 1.0) -> bool:
    return (min(a.x1, b.x1) - max(a.x0, b.x0) > slack) and (min(a.y1, b.y1) - max(a.y0, b.y0) > slack)


def layout_problems(figure) -> list[str]:
    """Every overlap, clipped annotation and hidden line of `figure`, in words."""
    from matplotlib.text import Annotation

    figure.canvas.draw()  # the layout as it will be saved
    renderer = figure.canvas.get_renderer()
    problems = []
    texts = _texts(figure)
    for (a, box_a), (b, box_b) in itertools.combinations(texts, 2):
        if _overlap(box_a, box_b):
            problems.append(f"{a.get_text()!r} overprints {b.get_text()!r}")
    frames = [(ax, ax.get_window_extent(renderer)) for ax in figure.axes]
    for text, box in texts:
        for ax, frame in frames:  # a tick label or title of one plot running into the next
            if text.axes is not None and ax is not text.axes and _overlap(box, frame):
                problems.append(f"{text.get_text()!r} runs into another plot ({ax.get_title() or 'untitled'})")
    for ax in figure.axes:
        points = []
        for collection in ax.collections:
            offsets = collection.get_offsets()
            if len(offsets):
                points += [tuple(p) for p in collection.get_offset_transform().transform(offsets)]
        for text in ax.texts:
            if not isinstance(text, Annotation) or not text.get_visible():
                continue
            box = text.get_window_extent(renderer)
            frame = ax.get_window_extent(renderer)
            if box.x0 < frame.x0 - 1 or box.x1 > frame.x1 + 1 or box.y0 < frame.y0 - 1 or box.y1 > frame.y1 + 1:
                problems.append(f"annotation {text.get_text()!r} runs out of its axes")
            for x, y in points:
                if box.x0 - 3 < x < box.x1 + 3 and box.y0 - 3 < y < box.y1 + 3:
                    problems.append(f"annotation {text.get_text()!r} covers a data point")
        lines = [line for line in ax.get_lines() if line.get_visible() and len(line.get_xdata()) > 1]
        for a, b in itertools.combinations(lines, 2):
            xa, ya = np.asarray(a.get_xdata(), float), np.asarray(a.get_ydata(), float)
            xb, yb = np.asarray(b.get_xdata(), float), np.asarray(b.get_ydata(), float)
            if xa.shape != xb.shape or not np.allclose(xa, xb):
                continue
            scale = max(np.ptp(np.concatenate([ya, yb])), 1e-12)
            if np.max(np.abs(ya - yb)) < 0.01 * scale and (a.get_linestyle(), a.get_marker()) == (
                b.get_linestyle(),
                b.get_marker(),
            ):
                problems.append(f"line {a.get_label()!r} hides line {b.get_label()!r} (same data, same style)")
    return problems
