"""Render every page of the built docs at a given width and report horizontal overflow.

For each HTML page it reports the elements of the article that run past its right edge,
and the scroll containers (wide tables, code blocks, display equations) whose content is
wider than what they show. With ``--shots DIR`` it also writes a full-page screenshot of
every page, to look at.

Needs Playwright (``pip install playwright``) and a Chromium (Debian's ``chromium``)::

    make docs
    python docs/tools/check_layout.py docs/_build/html --width 1280 --shots /tmp/shots

The exit status is 1 when any page overflows.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

FIND_OVERFLOW = """
() => {
  const article = document.querySelector('article') || document.body;
  const right = article.getBoundingClientRect().right;
  const found = [];
  const describe = (el) => {
    const text = (el.innerText || el.textContent || '').trim().replace(/\\s+/g, ' ');
    return el.tagName.toLowerCase() + (el.className && typeof el.className === 'string'
      ? '.' + el.className.split(' ').join('.') : '') + ': ' + text.slice(0, 70);
  };
  const reported = [];
  for (const el of article.querySelectorAll('*')) {
    const box = el.getBoundingClientRect();
    if (box.width === 0 || reported.some((r) => r.contains(el))) continue;
    // a heading's permalink sign sits just past the edge by design
    if (/^H[1-6]$/.test(el.tagName) || el.classList.contains('headerlink')) continue;
    // MathJax's assistive MathML is clipped to nothing by design
    if (el.closest('mjx-assistive-mml')) continue;
    const style = getComputedStyle(el);
    const scrolls = ['auto', 'scroll', 'hidden'].includes(style.overflowX);
    if (scrolls && el.scrollWidth > el.clientWidth + 2) {
      found.push(['hidden', el.scrollWidth - el.clientWidth, describe(el)]);
      reported.push(el);
    } else if (box.right > right + 8 && !el.closest('.highlight, .table-wrapper')) {
      found.push(['past edge', Math.round(box.right - right), describe(el)]);
      reported.push(el);
    }
  }
  return found.slice(0, 40);
}
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("html", type=Path, help="the built HTML folder")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--shots", type=Path, help="write full-page screenshots here")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args(argv)
    pages = sorted(p for p in args.html.rglob("*.html")
                   if not {"_modules", "_static", "_sources"} & set(p.parts)
                   and p.name not in {"genindex.html", "search.html", "py-modindex.html"})
    if args.shots:
        args.shots.mkdir(parents=True, exist_ok=True)
    bad = 0
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=args.chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": args.width, "height": 900})
        for path in pages:
            page.goto(path.resolve().as_uri())
            page.wait_for_load_state("load")
            # MathJax typesets after load.
            page.wait_for_function(
                "() => !window.MathJax || !MathJax.startup || MathJax.startup.promise"
                " .then !== undefined", timeout=10_000)
            page.evaluate("() => window.MathJax && MathJax.startup ? MathJax.startup.promise"
                          " : null")
            found = page.evaluate(FIND_OVERFLOW)
            name = path.relative_to(args.html).as_posix()
            if found:
                bad += 1
                print(f"{name}: {len(found)} overflowing")
                for kind, pixels, what in found:
                    print(f"    {kind:9s} {pixels:5d} px  {what}")
            if args.shots:
                page.screenshot(path=str(args.shots / (name.replace("/", "_") + ".png")),
                                full_page=True)
        browser.close()
    print(f"{len(pages)} pages at {args.width} px, {bad} with overflow")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
