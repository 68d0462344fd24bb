"""The HTML report of `lorakit explain`: one self-contained file (no request leaves it, no plotting
library needed), one section per input.

Each section has the token strip (completion tokens coloured by the adapter's effect on their
log-probability, prompt tokens by how strongly the adapter acts on them), the output table, the
layers x module kinds grids of the attribution and of ||ΔW x|| / ||W0 x||, and the strongest rank
components with their drive per token. Clicking a token shows its own grids: where the adapter acts
at that position, and for a completion token the attribution of its change (the panels are all in
the page; a few lines of script only switch which one shows, so the page also reads without it).
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

from .. import files
from ..analysis import short_labels
from .core import Explanation, ModuleActivity
from .summary import mean, signed, token_activity

STYLE = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:1.5em auto;padding:0 1em;color:#222;line-height:1.4}
h1{font-size:1.5em}h2{font-size:1.25em;border-top:2px solid #ddd;padding-top:.8em;margin-top:1.8em}h3{font-size:1.05em;margin:1.2em 0 .4em}
.verdict{padding:.5em .8em;border-radius:4px;background:#eef4ff}.verdict.inert{background:#fff1e6;border:1px solid #f0a060}
.strip{display:flex;flex-wrap:wrap;gap:3px;margin:.5em 0}
.tok{font:13px ui-monospace,monospace;white-space:pre;padding:2px 4px;border:1px solid #bbb;border-radius:3px;cursor:pointer;background:#fff}
.tok.out{border-color:#555;font-weight:600}.tok.selected{outline:2px solid #000;outline-offset:1px}
.legend{font-size:12px;color:#555}
table{border-collapse:collapse;font-size:12px;margin:.3em 0}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right;white-space:nowrap}
th{background:#f4f4f4}td.name,th.name{text-align:left}td.wrap{white-space:normal;min-width:14em}
.grid{font-size:11px}.grid td{min-width:2.2em;padding:1px 3px}.grid th{padding:1px 3px}caption{font-size:12px;max-width:32em;margin:0 auto}
.scroll{overflow-x:auto;max-width:100%}
.panel{display:none;border-left:3px solid #999;padding-left:.8em}.panel.shown{display:block}
.grids{display:flex;flex-wrap:wrap;gap:1.5em;align-items:flex-start}
.drive{display:inline-flex;gap:1px;vertical-align:middle}.drive span{display:inline-block;width:9px;height:12px}
"""

SCRIPT = """
document.querySelectorAll('section.prompt').forEach(function (section) {
  section.querySelectorAll('.tok').forEach(function (chip) {
    chip.addEventListener('click', function () {
      section.querySelectorAll('.tok').forEach(function (c) { c.classList.toggle('selected', c === chip); });
      section.querySelectorAll('.panel').forEach(function (p) { p.classList.toggle('shown', p.dataset.pos === chip.dataset.pos); });
    });
  });
});
"""


def shown_token(token: str) -> str:
    """A token as a chip shows it: spaces kept (non-breaking), line breaks and tabs as symbols."""
    return token.replace("\n", "↵").replace("\t", "⇥").replace(" ", "\u00a0") or "\u00a0"


def mix(low: tuple[int, int, int], high: tuple[int, int, int], t: float) -> str:
    t = min(max(t, 0.0), 1.0) if math.isfinite(t) else 1.0
    return "#" + "".join(f"{round(a + (b - a) * t):02x}" for a, b in zip(low, high))


WHITE, BLUE, RED, PURPLE = (255, 255, 255), (40, 100, 200), (200, 50, 40), (110, 60, 160)


def diverging(value: float, scale: float) -> str:
    """White at 0, blue for a positive value (the adapter raises it), red for a negative one."""
    if not scale or not math.isfinite(value):
        return "#ffffff"
    return mix(WHITE, BLUE if value > 0 else RED, abs(value) / scale)


def sequential(value: float, scale: float) -> str:
    """White at 0 to purple at `scale` (on a square-root scale: small sizes stay visible); infinite: purple."""
    if value == math.inf:
        return mix(WHITE, PURPLE, 1.0)
    if not scale or not math.isfinite(value) or value <= 0:
        return "#ffffff"
    return mix(WHITE, PURPLE, (value / scale) ** 0.5)


def ink(background: str) -> str:
    r, g, b = (int(background[i : i + 2], 16) for i in (1, 3, 5))
    return "#000" if 0.299 * r + 0.587 * g + 0.114 * b > 140 else "#fff"


def unit_of(values) -> float:
    """The power of ten that shows the largest |value| as a two-digit integer (10-99)."""
    largest = max((abs(v) for v in values if math.isfinite(v)), default=0.0)
    return 10.0 ** (math.floor(math.log10(largest)) - 1) if largest > 0 else 1.0


def in_units(value: float, unit: float, sign: bool) -> str:
    if math.isinf(value):
        return "inf"
    shown = round(value / unit)
    return f"{shown:+d}" if sign and shown else str(shown)


def unit_label(unit: float) -> str:
    return f" (in units of {unit:g})" if unit != 1.0 else ""


def grid(modules: list[ModuleActivity], value, colour, caption: str, sign: bool = False) -> str:
    """A layers x module kinds table of `value(module)` (nan: an empty cell), each cell coloured by
    `colour(value)` and showing the value in the table's unit (the exact value on hover); modules
    outside numbered blocks are listed below it."""
    values = {m.module: value(m) for m in modules}
    unit = unit_of(values.values())
    in_blocks = [m for m in modules if m.layer is not None]
    kinds = list(dict.fromkeys(m.kind for m in in_blocks))
    labels = short_labels(kinds)
    layers = sorted({m.layer for m in in_blocks})
    cells = {(m.layer, m.kind): m for m in in_blocks}

    def cell(m: ModuleActivity | None) -> str:
        v = values[m.module] if m is not None else math.nan
        if math.isnan(v):
            return "<td></td>"
        background = colour(v)
        return (
            f'<td style="background:{background};color:{ink(background)}" title="{html.escape(m.module)}: {v:.4g}">'
            f"{in_units(v, unit, sign)}</td>"
        )

    rows = "".join(
        f"<tr><th>{layer}</th>" + "".join(cell(cells.get((layer, kind))) for kind in kinds) + "</tr>"
        for layer in layers
    )
    head = "<tr><th>layer</th>" + "".join(f"<th>{html.escape(labels[k])}</th>" for k in kinds) + "</tr>"
    caption = html.escape(caption + unit_label(unit))
    table = f'<table class="grid"><caption>{caption}</caption>{head}{rows}</table>' if kinds else ""
    others = [m for m in modules if m.layer is None]
    if others:
        table += (
            '<table class="grid">'
            + "".join(f'<tr><td class="name">{html.escape(m.module)}</td>{cell(m)}</tr>' for m in others)
            + "</table>"
        )
    return f"<div>{table}</div>"


def layer_profile(found: Explanation) -> str:
    """Each output's attribution summed per layer (rows: outputs, columns: layers)."""
    layers = sorted({m.layer for m in found.modules if m.layer is not None})
    if not layers or found.inert:
        return ""
    sums = [
        [sum(a for m, a in zip(found.modules, o.attribution) if m.layer == layer) for layer in layers]
        for o in found.outputs
    ]
    unit = unit_of(v for row in sums for v in row)
    scale = max((abs(v) for row in sums for v in row), default=0.0)
    rows = []
    for o, row in zip(found.outputs, sums):
        cells = []
        for layer, v in zip(layers, row):
            background = diverging(v, scale)
            cells.append(
                f'<td style="background:{background};color:{ink(background)}" title="layer {layer}: {v:+.4g}">'
                f"{in_units(v, unit, True)}</td>"
            )
        rows.append(f'<tr><th class="name"><code>{html.escape(shown_token(o.token))}</code></th>{"".join(cells)}</tr>')
    head = '<tr><th class="name">output</th>' + "".join(f"<th>{layer}</th>" for layer in layers) + "</tr>"
    return (
        f'<div class="scroll"><table class="grid"><caption>attribution per output and layer{html.escape(unit_label(unit))}'
        f"</caption>{head}{''.join(rows)}</table></div>"
    )


def output_table(found: Explanation) -> str:
    if found.measure == "score":
        (step,) = found.outputs
        return (
            f"<table><tr><th>score</th><th>base</th><th>adapted</th><th>change</th></tr><tr><td></td><td>{step.base_value:.4g}</td>"
            f"<td>{step.adapted_value:.4g}</td><td>{signed(step.effect)}</td></tr></table>"
        )
    what = "token" if found.task == "causal-lm" else "class"
    scale = max((abs(o.effect) for o in found.outputs), default=0.0)
    rows = []
    for o in found.outputs:

        def tops(pairs):
            return ", ".join(f"<code>{html.escape(shown_token(t))}</code>&nbsp;{p:.2g}" for t, p in pairs[:3])

        background = diverging(o.effect, scale)
        rows.append(
            f'<tr><td class="name"><code>{html.escape(shown_token(o.token))}</code></td><td>{math.exp(o.base_value):.3f}</td>'
            f'<td>{math.exp(o.adapted_value):.3f}</td><td style="background:{background};color:{ink(background)}">'
            f'{signed(o.effect)}</td><td class="name wrap">{tops(o.base_top)}</td><td class="name wrap">{tops(o.adapted_top)}</td></tr>'
        )
    return (
        f'<div class="scroll"><table><tr><th class="name">{what}</th><th>base p</th><th>adapted p</th><th>Δ log p</th>'
        f'<th class="name">base\'s top</th><th class="name">adapted\'s top</th></tr>{"".join(rows)}</table></div>'
    )


def components_table(found: Explanation, count: int = 6) -> str:
    """The strongest components of the modules that matter most, with each token's drive as a strip."""
    ranked = sorted(found.modules, key=lambda m: -abs(m.attribution) if not found.inert else -m.mean_size)[:count]
    rows = []
    for m in ranked:
        top = max((d for c in m.components[:3] for d in c.drive if math.isfinite(d)), default=0.0)
        for c in m.components[:3]:
            strip = (
                "".join(
                    f'<span style="background:{sequential(d, top)}" title="{html.escape(found.tokens[i])}: {d:.3g}"></span>'
                    for i, d in enumerate(c.drive)
                )
                if m.per_token
                else f"{c.drive[0]:.3g} (one vector for the whole input)"
            )
            peak = max(range(len(c.drive)), key=lambda i: c.drive[i]) if c.drive and m.per_token else None
            rows.append(
                f'<tr><td class="name">{html.escape(m.module)}</td><td class="name">{html.escape(c.label)}</td>'
                f'<td class="name">{html.escape(c.part)}</td><td>{c.strength:.3g}</td>'
                f'<td class="name"><code>{html.escape(shown_token(found.tokens[peak])) if peak is not None else ""}</code></td>'
                f'<td class="name"><span class="drive">{strip}</span></td></tr>'
            )
    if not rows:
        return "<p>No module has low-rank components.</p>"
    return (
        '<div class="scroll"><table><tr><th class="name">module</th><th class="name">component</th><th class="name">part</th>'
        '<th>strength</th><th class="name">driven most by</th><th class="name">drive per token</th></tr>'
        + "".join(rows)
        + "</table></div>"
    )


def panel(found: Explanation, position: int, shown: bool) -> str:
    """The grids of one token: where the adapter acts at the position that predicts it (a completion
    token) or at its own position (a prompt token), and a completion token's attribution."""
    output = position - found.prompt_length if found.task == "causal-lm" else -1
    at = position - 1 if output >= 0 else position
    sizes = [m.size_at(at) for m in found.modules if math.isfinite(m.size_at(at))]
    size_scale = max(sizes, default=0.0)
    body = [f"<h3>Token {html.escape(repr(found.tokens[position]))} (position {position})</h3>"]
    grids = []
    if output >= 0:
        o = found.outputs[output]
        attributions = {m.module: o.attribution[i] for i, m in enumerate(found.modules)}
        scale = max((abs(v) for v in attributions.values()), default=0.0)
        body.append(
            f"<p>log p: base {o.base_value:.3f}, adapted {o.adapted_value:.3f}, change {signed(o.effect)}; "
            f"the modules' parts add up to it within {o.completeness_error:.2g}.</p>"
        )
        grids.append(
            grid(
                found.modules,
                lambda m: attributions[m.module],
                lambda v: diverging(v, scale),
                "attribution of this token's Δ log p",
                sign=True,
            )
        )
        where = f"at the position that predicts it ({found.tokens[at]!r})"
    else:
        where = "at this token"
    grids.append(
        grid(
            found.modules, lambda m: m.size_at(at), lambda v: sequential(v, size_scale), f"||ΔW x|| / ||W0 x|| {where}"
        )
    )
    for part in parts_of(found):
        grids.append(
            grid(
                found.modules,
                lambda m, part=part: m.parts[part][at] if part in m.parts and m.per_token else math.nan,
                lambda v: sequential(v, size_scale),
                f"its part {part!r}",
            )
        )
    body.append(f'<div class="grids">{"".join(grids)}</div>')
    return f'<div class="panel{" shown" if shown else ""}" data-pos="{position}">{"".join(body)}</div>'


def depth_table(found: Explanation) -> str:
    """The exact check by depth: each output's change with the update only in a third of the layers,
    and without it."""
    if not found.depth or found.inert:
        return ""
    names = [shown_token(o.token) for o in found.outputs]
    head = (
        '<tr><th class="name">layers</th><th class="name">update</th><th>total</th>'
        + "".join(f"<th><code>{html.escape(n)}</code></th>" for n in names)
        + "</tr>"
    )
    rows = []
    for d in found.depth:
        for label, values in (("only in these", d.only), ("everywhere but these", d.without)):
            rows.append(
                f'<tr><td class="name">{d.name}</td><td class="name">{label}</td><td>{signed(sum(values))}</td>'
                + "".join(f"<td>{signed(v)}</td>" for v in values)
                + "</tr>"
            )
    full = (
        '<tr><td class="name">all</td><td class="name">everywhere</td>'
        f"<td>{signed(found.total_effect)}</td>"
        + "".join(f"<td>{signed(o.effect)}</td>" for o in found.outputs)
        + "</tr>"
    )
    return (
        "<h3>Exact check by depth</h3><p>Each output's change (adapted - base) with the adapter's update kept only in a "
        "third of the layers, or everywhere but there: no integration, one batched forward pass.</p>"
        f'<div class="scroll"><table>{head}{full}{"".join(rows)}</table></div>'
    )


def parts_of(found: Explanation) -> list[str]:
    """The names of the change's parts, where there are several (DoRA, Delta-LoRA's moved base)."""
    parts = list(dict.fromkeys(p for m in found.modules for p in m.parts))
    return parts if len(parts) > 1 else []


def section(found: Explanation, index: int, title: str) -> str:
    activity = token_activity(found)
    activity_scale = max((a for a in activity if math.isfinite(a)), default=0.0)
    effects = (
        {found.prompt_length + i: o.effect for i, o in enumerate(found.outputs)} if found.task == "causal-lm" else {}
    )
    effect_scale = max((abs(e) for e in effects.values()), default=0.0)
    if effects:
        selected = max(effects, key=lambda p: abs(effects[p]))
    else:
        selected = max(range(len(activity)), key=lambda i: activity[i] if math.isfinite(activity[i]) else math.inf)
    chips = []
    for position, token in enumerate(found.tokens):
        if position in effects:
            background, tip = diverging(effects[position], effect_scale), f"Δ log p {effects[position]:+.3f}"
        else:
            background, tip = (
                sequential(activity[position], activity_scale),
                f"mean ||ΔW x|| / ||W0 x|| {activity[position]:.3g}",
            )
        chips.append(
            f'<span class="tok{" out" if position in effects else ""}{" selected" if position == selected else ""}" '
            f'data-pos="{position}" style="background:{background};color:{ink(background)}" title="{html.escape(tip)}">'
            f"{html.escape(shown_token(token))}</span>"
        )
    if found.inert:
        verdict = (
            '<p class="verdict inert"><b>The adapter is inert on this input:</b> no adapted module changes its output '
            "(||ΔW x|| = 0 at every token and module: B = 0, or an update that collapsed), so the adapted model "
            "is the base model.</p>"
        )
    else:
        check = (
            f"the modules' parts add up to it within {found.completeness_error:.2g} (tolerance {found.tolerance:.2g}, "
            f"{found.ig_steps} integration steps)"
            if found.within_tolerance
            else f"warning: the modules' parts miss it by {found.completeness_error:.2g} (tolerance {found.tolerance:.2g}) "
            f"after {found.ig_steps} steps"
        )
        verdict = (
            f'<p class="verdict">Total change of the {"completion" if found.task == "causal-lm" else "output"}\'s '
            f"{'score' if found.measure == 'score' else 'log-probability'}: <b>{signed(found.total_effect)}</b>; {check}.</p>"
        )
    lines = [
        f'<section class="prompt" id="input-{index}"><h2>{html.escape(title)}</h2>',
        f"<p>Prompt: <code>{html.escape(repr(found.prompt))}</code></p>",
    ]
    if found.task == "causal-lm":
        source = "generated by the adapted model" if found.completion_source == "generated" else "given"
        lines.append(
            f"<p>Completion ({source}): <code>{html.escape(repr(found.completion))}</code>"
            + (
                f"; the base model generates instead <code>{html.escape(repr(found.base_completion))}</code>"
                if found.base_completion is not None
                else ""
            )
            + "</p>"
        )
    lines.append(verdict)
    lines.append(f'<div class="strip">{"".join(chips)}</div>')
    lines.append(
        '<p class="legend">Completion tokens (bold border): blue = the adapter raises their log-probability, red = it '
        "lowers it. Prompt tokens: purple = how strongly the adapter acts there (mean ||ΔW x|| / ||W0 x|| over the "
        "modules). Click a token for its grids.</p>"
    )
    lines += [panel(found, position, position == selected) for position in range(len(found.tokens))]
    lines.append("<h3>Output change</h3>" + output_table(found))
    attribution_scale = max((abs(m.attribution) for m in found.modules), default=0.0)
    mean_scale = max((m.mean_size for m in found.modules), default=0.0)
    lines.append("<h3>Where the adapter acts and which modules matter, over the whole input</h3>")
    lines.append(
        '<div class="grids">'
        + grid(
            found.modules,
            lambda m: m.attribution,
            lambda v: diverging(v, attribution_scale),
            "attribution of the total change (integrated gradients)",
            sign=True,
        )
        + grid(
            found.modules,
            lambda m: m.mean_size,
            lambda v: sequential(v, mean_scale),
            "mean ||ΔW x|| / ||W0 x|| over the tokens",
        )
        + "".join(
            grid(
                found.modules,
                lambda m, part=part: mean(m.parts.get(part, [])),
                lambda v: sequential(v, mean_scale),
                f"its part {part!r}",
            )
            for part in parts_of(found)
        )
        + "</div>"
    )
    lines.append(layer_profile(found))
    lines.append(depth_table(found))
    lines.append("<h3>Which directions fire</h3>" + components_table(found))
    lines.append("</section>")
    return "\n".join(lines)


def render(explanations: list[Explanation], title: str) -> str:
    """The whole report for one or several inputs."""
    sections = [
        section(found, i, f"Input {i + 1}" if len(explanations) > 1 else "Input")
        for i, found in enumerate(explanations)
    ]
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head><body>\n<h1>{html.escape(title)}</h1>\n"
        + "\n".join(sections)
        + f"\n<script>{SCRIPT}</script>\n</body></html>\n"
    )


def write_text_atomically(path: Path, text: str) -> None:
    """Write through a temporary file beside `path` (synced, then renamed over it): a crash or a full
    disk never leaves a half-written file, nor harms one that was there (`lorakit.files`)."""
    files.atomic_write_text(Path(path), text)


def write_html(explanations: list[Explanation], path: Path, title: str) -> None:
    write_text_atomically(Path(path), render(explanations, title))


def finite(data):
    """`data` with every inf or nan replaced by None (JSON has neither)."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: finite(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite(v) for v in data]
    return data


def write_json(explanations: list[Explanation], path: Path, extra: dict | None = None) -> None:
    """Every number of every explanation, as JSON (`Explanation.as_dict`), under `extra` fields."""
    data = finite({**(extra or {}), "inputs": [found.as_dict() for found in explanations]})
    write_text_atomically(Path(path), json.dumps(data, indent=1, allow_nan=False) + "\n")
