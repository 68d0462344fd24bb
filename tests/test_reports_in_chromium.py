"""The compare, inspect and explain HTML reports, drawn by a real browser: headless Chromium (Debian's
`chromium` package; skipped where it is not installed) takes a screenshot that must show the plots
(not a blank page), the page must make no network request (a report opens offline), and its layout,
measured in the browser, must put the pictures first, whole and apart (no overlap, nothing cut off
at the window's edge). The plots' own insides are checked in test_report_layout.py."""

from __future__ import annotations

import math

import pytest

import lorakit
from chromium import executable, measure, render
from conftest import perturb_trainable, tiny_llama
from lorakit import analysis, compare

pytestmark = [
    pytest.mark.chromium,
    pytest.mark.skipif(executable() is None, reason="chromium is not installed (apt-get install chromium)"),
]
pytest.importorskip("matplotlib")  # the reports' plots; Pillow comes with it
from PIL import Image  # noqa: E402  (after the skip: Pillow comes with matplotlib)

SIZE = (1100, 1400)


def drawn(png) -> tuple[int, float]:
    """(distinct colours, share of pixels that are not the page's white) of a screenshot."""
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == SIZE
        pixels = image.convert("RGB")
        colours = pixels.getcolors(maxcolors=SIZE[0] * SIZE[1])
    white = next((count for count, colour in colours if colour == (255, 255, 255)), 0)
    return len(colours), 1 - white / (SIZE[0] * SIZE[1])


def fake_result(method: str, trainable: int, metric: float, slope: float) -> compare.MethodResult:
    """A finished run as `lorakit train` reports it (the report is what is drawn, not the training)."""
    report = {
        "train_seconds": 12.0 * (1 + slope),
        "steps": 40,
        "metric": "accuracy",
        "trainable_params": trainable,
        "total_params": 22_700_000,
        "adapter_bytes": 4 * trainable,
        "peak_memory_mb": 900 + trainable / 1e3,
        "tokens_per_s": 3000.0,
        "final_loss": 0.3 + slope,
        "before": {"accuracy": 0.5},
        "after": {"accuracy": metric},
    }
    losses = [(s, 0.7 * math.exp(-s / (10 + 20 * slope)) + 0.25) for s in range(1, 41)]
    return compare.MethodResult(method, "done", report=report, losses=losses)


def test_a_page_with_an_external_image_is_caught_and_blank(tmp_path):
    # the checks below must be able to fail: a page whose only picture is fetched from elsewhere
    page = tmp_path / "external.html"
    page.write_text(
        '<!doctype html><html><body><img src="https://example.com/plot.png" width="600" height="400"></body></html>'
    )
    requests = render(page, tmp_path / "external.png", SIZE)
    assert requests == ["https://example.com/plot.png"]
    _, ink = drawn(tmp_path / "external.png")
    assert ink < 0.02  # nothing was drawn


def test_compare_report_draws_offline(tmp_path):
    results = [
        fake_result("lora", 338_690, 0.78, 0.0),
        fake_result("vera", 30_722, 0.75, 0.5),
        fake_result("dora", 353_282, 0.79, 0.1),
        compare.MethodResult("qlora", "failed", "simulated failure"),
    ]
    records = compare.rows(results, limit_s=0.2)
    page = tmp_path / "compare.html"
    compare.write_html(results, records, 0.2, page, "lorakit compare: lora, vera, dora, qlora")
    requests = render(page, tmp_path / "compare.png", SIZE)
    assert requests == []
    colours, ink = drawn(tmp_path / "compare.png")
    assert colours > 100 and ink > 0.05, (colours, ink)  # text, table lines and coloured plot lines


def test_inspect_report_draws_offline(tmp_path):
    model = tiny_llama(seed=1)
    names = [n for n, _ in model.named_modules() if n.endswith(("q_proj", "v_proj", "down_proj"))]
    original = analysis.snapshot_base_weights(model, names)
    lorakit.adapt(model, lorakit.DoRA(r=4, targets=["q_proj", "v_proj", "down_proj"]))
    perturb_trainable(model, seed=2)
    found = analysis.changes(model, original)
    assert found and not any(c.inert for c in found)
    page = tmp_path / "inspect.html"
    analysis.write_html(found, page, "lorakit inspect: a DoRA adapter")
    requests = render(page, tmp_path / "inspect.png", SIZE)
    assert requests == []
    colours, ink = drawn(tmp_path / "inspect.png")
    assert colours > 100 and ink > 0.05, (colours, ink)


def layout_problems(found: dict) -> list[str]:
    """What is wrong with a page's layout as Chromium measured it (`chromium.measure`)."""
    width, height = found["viewport"]
    boxes = found["boxes"]
    figures = [b for b in boxes if b["tag"] == "figure"]
    images = [b for b in boxes if b["tag"] == "img"]
    tables = [b for b in boxes if b["tag"] == "table"]
    problems = []
    if found["scroll"][0] > width:
        problems.append(f"the page is {found['scroll'][0]} px wide in a {width} px window: its right side is cut off")
    if not figures or figures[0]["top"] > height / 2:
        problems.append(
            f"the first picture starts at {figures[0]['top'] if figures else None} px, not in the first half screen"
        )
    if tables and figures and tables[0]["top"] < figures[0]["top"]:
        problems.append("a table comes before the pictures")
    for a, b in zip(figures, figures[1:]):
        if b["top"] < a["bottom"]:
            problems.append(f"{a['text']!r} and {b['text']!r} overlap")
    for image in images:
        shown = image["right"] - image["left"]
        if image["right"] > width or image["left"] < 0:
            problems.append(f"{image['text']!r} runs past the window")
        if not 0 < shown <= image["naturalWidth"]:
            problems.append(f"{image['text']!r} is drawn {shown} px wide from {image['naturalWidth']} px")
    return problems


def test_the_layout_check_catches_a_table_first_and_a_cut_off_picture(tmp_path):
    page = tmp_path / "bad.html"
    rows = "".join(f"<tr><td>{i}</td></tr>" for i in range(300))
    page.write_text(
        f'<!doctype html><html><body><table>{rows}</table><figure><img alt="wide" width="3000" height="10" '
        'src="data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="></figure></body></html>'
    )
    problems = layout_problems(measure(page, SIZE))
    assert any("table comes before" in p for p in problems) and any("cut off" in p for p in problems), problems


def test_compare_report_layout_in_the_browser(tmp_path):
    from test_report_layout import crowded_comparison

    results = crowded_comparison()
    page = tmp_path / "compare.html"
    compare.write_html(results, compare.rows(results, limit_s=0.2), 0.2, page, "lorakit compare")
    assert layout_problems(measure(page, SIZE)) == []


def test_inspect_report_of_many_modules_shows_its_pictures_first(tmp_path):
    from test_report_layout import tiny_bert

    model = tiny_bert(24)  # 144 adapted modules: a long table
    targets = ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense")
    names = [n for n, _ in model.named_modules() if n.endswith(targets)]
    original = analysis.snapshot_base_weights(model, names)
    lorakit.adapt(model, lorakit.LoRA(r=4, targets=list(targets)))
    perturb_trainable(model, seed=2)
    page = tmp_path / "inspect.html"
    analysis.write_html(analysis.changes(model, original), page, "lorakit inspect: 144 modules")
    assert layout_problems(measure(page, SIZE)) == []


# measured in the browser: token chips and grid labels never overlap, no text is cut off, the page is
# no wider than the window, and clicking a token shows its own panel
LAYOUT_CHECK = """<script>
(function () {
  function overlap(a, b) { return a.left < b.right - 0.5 && b.left < a.right - 0.5 && a.top < b.bottom - 0.5 && b.top < a.bottom - 0.5; }
  function overlaps(elements) {
    var boxes = elements.map(function (e) { return e.getBoundingClientRect(); }), found = 0;
    for (var i = 0; i < boxes.length; i++) for (var j = i + 1; j < boxes.length; j++) if (overlap(boxes[i], boxes[j])) found++;
    return found;
  }
  var result = {chips: 0, labels: 0, clipped: [], wide: document.documentElement.scrollWidth > window.innerWidth, click: null};
  document.querySelectorAll('section.prompt').forEach(function (section) {
    result.chips += overlaps(Array.from(section.querySelectorAll('.tok')));
  });
  document.querySelectorAll('table').forEach(function (table) {
    result.labels += overlaps(Array.from(table.querySelectorAll('th')));
  });
  document.querySelectorAll('td, th, caption, .tok, h1, h2, h3, p, .scroll').forEach(function (e) {
    if (e.scrollWidth > e.clientWidth + 1 && getComputedStyle(e).display !== 'inline') result.clipped.push(e.textContent.slice(0, 40));
  });
  var chip = document.querySelector('section.prompt .tok:not(.selected)');  // not the panel shown at first
  chip.click();
  var shown = Array.from(chip.closest('section').querySelectorAll('.panel.shown'));
  result.click = shown.length === 1 && shown[0].dataset.pos === chip.dataset.pos && shown[0].offsetHeight > 0
    && chip.classList.contains('selected');
  document.body.setAttribute('data-layout', JSON.stringify(result));
})();
</script></body>"""


def test_explain_report_draws_offline_and_lays_out_cleanly(tmp_path):
    import html
    import json
    import re

    from chromium import dump_dom
    from lorakit.explain import explain, page
    from test_explain import TOKENIZER, adapted

    model, _ = adapted("dora")
    found = [
        explain(model, TOKENIZER, "Reverse: fox dog cat", completion=" tac god xof"),
        explain(model, TOKENIZER, "Reverse: a b", max_new_tokens=3),
    ]
    report = tmp_path / "explain.html"
    page.write_html(found, report, "lorakit explain: a DoRA adapter")
    requests = render(report, tmp_path / "explain.png", SIZE)
    assert requests == []
    colours, ink = drawn(tmp_path / "explain.png")
    assert colours > 50 and ink > 0.05, (colours, ink)
    checked = tmp_path / "checked.html"
    checked.write_text(report.read_text().replace("</body>", LAYOUT_CHECK))
    layout = json.loads(html.unescape(re.search(r'data-layout="([^"]*)"', dump_dom(checked, SIZE)).group(1)))
    assert layout == {"chips": 0, "labels": 0, "clipped": [], "wide": False, "click": True}, layout


def test_the_layout_check_can_fail(tmp_path):
    import html
    import json
    import re

    from chromium import dump_dom

    page = tmp_path / "bad.html"  # chips drawn on top of each other, a clipped cell, a page wider than the window
    page.write_text(
        '<!doctype html><html><body><section class="prompt"><span class="tok out" data-pos="0" '
        'style="position:absolute;left:0">aaaa</span><span class="tok" data-pos="1" style="position:absolute;left:5px">bbbb</span>'
        '<table><tr><td style="max-width:20px;overflow:hidden">a long cell text</td></tr></table>'
        '<div style="width:3000px">wide</div></section></body></html>'
    )
    checked = tmp_path / "checked.html"
    checked.write_text(page.read_text().replace("</body>", LAYOUT_CHECK))
    layout = json.loads(html.unescape(re.search(r'data-layout="([^"]*)"', dump_dom(checked, SIZE)).group(1)))
    assert layout["chips"] == 1 and layout["clipped"] == ["a long cell text"] and layout["wide"] and not layout["click"]
