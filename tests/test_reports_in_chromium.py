"""The compare and inspect HTML reports, drawn by a real browser: headless Chromium (Debian's
`chromium` package; skipped where it is not installed) takes a screenshot that must show the plots
(not a blank page), and the page must make no network request (a report opens offline)."""

from __future__ import annotations

import math

import pytest

import lorakit
from chromium import executable, render
from conftest import perturb_trainable, tiny_llama
from lorakit import analysis, compare

pytestmark = pytest.mark.skipif(executable() is None, reason="chromium is not installed (apt-get install chromium)")
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
    report = {"train_seconds": 12.0 * (1 + slope), "steps": 40, "metric": "accuracy", "trainable_params": trainable,
              "total_params": 22_700_000, "adapter_bytes": 4 * trainable, "peak_memory_mb": 900 + trainable / 1e3,
              "tokens_per_s": 3000.0, "final_loss": 0.3 + slope, "before": {"accuracy": 0.5}, "after": {"accuracy": metric}}
    losses = [(s, 0.7 * math.exp(-s / (10 + 20 * slope)) + 0.25) for s in range(1, 41)]
    return compare.MethodResult(method, "done", report=report, losses=losses)


def test_a_page_with_an_external_image_is_caught_and_blank(tmp_path):
    # the checks below must be able to fail: a page whose only picture is fetched from elsewhere
    page = tmp_path / "external.html"
    page.write_text('<!doctype html><html><body><img src="https://example.com/plot.png" width="600" height="400"></body></html>')
    requests = render(page, tmp_path / "external.png", SIZE)
    assert requests == ["https://example.com/plot.png"]
    _, ink = drawn(tmp_path / "external.png")
    assert ink < 0.02  # nothing was drawn


def test_compare_report_draws_offline(tmp_path):
    results = [fake_result("lora", 338_690, 0.78, 0.0), fake_result("vera", 30_722, 0.75, 0.5),
               fake_result("dora", 353_282, 0.79, 0.1), compare.MethodResult("qlora", "failed", "simulated failure")]
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
    found = [explain(model, TOKENIZER, "Reverse: fox dog cat", completion=" tac god xof"),
             explain(model, TOKENIZER, "Reverse: a b", max_new_tokens=3)]
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
    page.write_text('<!doctype html><html><body><section class="prompt"><span class="tok out" data-pos="0" '
                    'style="position:absolute;left:0">aaaa</span><span class="tok" data-pos="1" style="position:absolute;left:5px">bbbb</span>'
                    '<table><tr><td style="max-width:20px;overflow:hidden">a long cell text</td></tr></table>'
                    '<div style="width:3000px">wide</div></section></body></html>')
    checked = tmp_path / "checked.html"
    checked.write_text(page.read_text().replace("</body>", LAYOUT_CHECK))
    layout = json.loads(html.unescape(re.search(r'data-layout="([^"]*)"', dump_dom(checked, SIZE)).group(1)))
    assert layout["chips"] == 1 and layout["clipped"] == ["a long cell text"] and layout["wide"] and not layout["click"]
