"""Render an HTML report in headless Chromium (Debian's `chromium` package): a screenshot, and the
network requests the page made (read from Chromium's net log), so a test can tell that a report
draws and that it is self-contained.

    python tests/chromium.py runs/compare-x/compare.html docs/compare-report.png [--size 1100x1500]

writes the screenshot (reduced to a 256-colour palette, which keeps a page of plots small) and
prints the requests the page made (none for a self-contained report).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# Chromium's own background traffic (updates, sync, ...) is switched off so that the net log holds
# the page's requests; host resolution fails for every name, so nothing leaves the machine anyway
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--no-first-run",
    "--hide-scrollbars",
    "--host-resolver-rules=MAP * ~NOTFOUND",
]


def executable() -> str | None:
    """The Chromium binary, or None where it is not installed."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def render(page: Path, screenshot: Path, size: tuple[int, int] = (1100, 1500), timeout: float = 120) -> list[str]:
    """Screenshot `page` (a local HTML file) at `size` (width, height in CSS pixels); returns the
    URLs of the network requests the page itself made."""
    binary = executable()
    if binary is None:
        raise FileNotFoundError("chromium is not installed")
    with tempfile.TemporaryDirectory() as tmp:
        net_log = Path(tmp) / "net.json"
        subprocess.run(
            [
                binary,
                *FLAGS,
                f"--user-data-dir={tmp}/profile",
                f"--log-net-log={net_log}",
                f"--screenshot={screenshot}",
                f"--window-size={size[0]},{size[1]}",
                Path(page).resolve().as_uri(),
            ],
            check=True,
            capture_output=True,
            timeout=timeout,
        )
        return page_requests(json.loads(net_log.read_text()))


def dump_dom(page: Path, size: tuple[int, int] = (1100, 1500), timeout: float = 120) -> str:
    """The page's DOM as Chromium has it after the page's scripts ran (a script can write what it
    measures of the layout into the DOM for a test to read)."""
    binary = executable()
    if binary is None:
        raise FileNotFoundError("chromium is not installed")
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run(
            [
                binary,
                *FLAGS,
                f"--user-data-dir={tmp}/profile",
                f"--window-size={size[0]},{size[1]}",
                "--dump-dom",
                Path(page).resolve().as_uri(),
            ],
            check=True,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        return done.stdout


# Run in the page once it has loaded: the box (CSS pixels, page coordinates) of every figure, image,
# caption, table and heading, and the page's scroll size, written into the DOM that --dump-dom prints.
_MEASURE = """<script>
window.addEventListener("load", () => {
  const box = (e) => { const r = e.getBoundingClientRect();
    return {tag: e.tagName.toLowerCase(), left: r.left + scrollX, top: r.top + scrollY, right: r.right + scrollX,
            bottom: r.bottom + scrollY, naturalWidth: e.naturalWidth || 0, text: (e.alt || e.textContent || "").slice(0, 60)}; };
  const found = {viewport: [innerWidth, innerHeight],
                 scroll: [document.documentElement.scrollWidth, document.documentElement.scrollHeight],
                 boxes: [...document.querySelectorAll("h1, p, figure, img, figcaption, table")].map(box)};
  const out = document.createElement("pre"); out.id = "lorakit-measured"; out.textContent = JSON.stringify(found);
  document.body.appendChild(out);
});
</script>"""


def measure(page: Path, size: tuple[int, int] = (1100, 1500), timeout: float = 120) -> dict:
    """Where Chromium lays out the page's parts: {"viewport": [w, h], "scroll": [w, h], "boxes": [{tag,
    left, top, right, bottom, naturalWidth, text}, ...]} in CSS pixels, in document order (a copy of
    the page with a measuring script, rendered with --dump-dom)."""
    import html as html_module
    import re

    binary = executable()
    if binary is None:
        raise FileNotFoundError("chromium is not installed")
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "measured.html"
        copy.write_text(Path(page).read_text().replace("</body>", _MEASURE + "</body>"))
        done = subprocess.run(
            [
                binary,
                *FLAGS,
                f"--user-data-dir={tmp}/profile",
                f"--window-size={size[0]},{size[1]}",
                "--virtual-time-budget=5000",
                "--dump-dom",
                copy.as_uri(),
            ],
            check=True,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    found = re.search(r'<pre id="lorakit-measured">(.*?)</pre>', done.stdout, re.S)
    if found is None:
        raise RuntimeError("the measuring script did not run: " + done.stdout[-500:])
    return json.loads(html_module.unescape(found.group(1)))


def page_requests(net_log: dict) -> list[str]:
    """URLs of the requests a file:// page started: their initiator is the page's opaque origin,
    which the net log writes as "null" (the browser's own requests say "not an origin")."""
    names = {number: name for name, number in net_log["constants"]["logEventTypes"].items()}
    return [
        event["params"]["url"]
        for event in net_log["events"]
        if names.get(event["type"]) == "URL_REQUEST_START_JOB" and event.get("params", {}).get("initiator") == "null"
    ]


def small_png(path: Path) -> None:
    """Rewrite the screenshot with a 256-colour palette (plots and text lose nothing visible)."""
    from PIL import Image

    with Image.open(path) as image:
        reduced = image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    reduced.save(path, optimize=True)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("page", type=Path)
    parser.add_argument("png", type=Path)
    parser.add_argument("--size", default="1100x1500", help="WIDTHxHEIGHT in CSS pixels")
    args = parser.parse_args()
    width, height = (int(x) for x in args.size.split("x"))
    requests = render(args.page, args.png, (width, height))
    small_png(args.png)
    print(f"{args.png}: {args.png.stat().st_size / 1024:.0f} KiB; requests made by the page: {requests or 'none'}")
    sys.exit(1 if requests else 0)
