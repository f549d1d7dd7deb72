"""Screenshot of an `alignrl report` page in headless Chromium (the README's docs/report.png).

    python scripts/report_screenshot.py demo_out/report-grpo.html docs/report.png [--width 1200 --height 1000]

Opens the page as a file:// URL, fails on any console message, page error or request other than the file itself
(the checks of tests/test_report.py), and writes a PNG of the top of the page (`--colors N`: reduced to an N-colour
palette, with Pillow). Needs Chromium (Debian: `apt-get install chromium`) and the
`playwright` package; CHROMIUM=/path/to/chrome picks the browser.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
from pathlib import Path

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-default-apps", "--disable-extensions"]  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("report")
    ap.add_argument("png")
    ap.add_argument("--width", type=int, default=1200)
    ap.add_argument("--height", type=int, default=1000)
    ap.add_argument("--colors", type=int, default=0, help="reduce to a palette of this size (needs Pillow)")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    chromium = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        sys.exit("Chromium not found: apt-get install chromium (or set CHROMIUM)")
    url = Path(args.report).resolve().as_uri()
    problems: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=ARGS)
        page = browser.new_page(viewport={"width": args.width, "height": args.height})
        page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}"))
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.on("request", lambda r: r.url == url or problems.append(f"request: {r.url}"))
        page.goto(url, wait_until="load")
        png = page.screenshot()
        browser.close()
    if problems:
        sys.exit("\n".join(problems))
    if args.colors:
        from PIL import Image

        img = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=args.colors, method=Image.Quantize.FASTOCTREE)
        buf = io.BytesIO()
        img.save(buf, format="PNG", optimize=True)
        png = buf.getvalue()
    Path(args.png).write_bytes(png)
    print(f"{args.png}: {len(png) // 1024} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
